"""``poise reload``: ask a running poise, through its admin API, to re-read its config.

The config file named on the command line is only consulted for where the admin API
listens and its token, and read leniently: the file may well be invalid — that is
what the server will report.
"""

from __future__ import annotations

import http.client
import json
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import yaml

from poise.config.units import parse_address

DEFAULT_ADMIN = "127.0.0.1:9901"
TOKEN_ENV = "POISE_ADMIN_TOKEN"
TIMEOUT = 30.0      # seconds; a reload re-reads and validates a file, nothing slower
# Exit codes.
APPLIED, FAILED, REJECTED = 0, 1, 2
# A listener on every address is reached on loopback.
_UNSPECIFIED = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


@dataclass(frozen=True, slots=True)
class AdminTarget:
    """Where the admin API is and the token to show it (None: none)."""

    host: str
    port: int
    token: str | None

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def reload(config: str | None, admin: str | None, token: str | None, *,
           env: Mapping[str, str] | None = None, timeout: float = TIMEOUT) -> int:
    """Run ``poise reload``: POST /reload, report the outcome, return the exit code —
    0 applied, 2 rejected (the errors listed one per line, as ``poise check`` does),
    1 when the admin API cannot be asked (bad address, unreachable, 401, anything
    else); messages go to stderr but for the success line."""
    try:
        target = resolve(config, admin, token, os.environ if env is None else env)
    except ValueError as e:
        return _failed(f"--admin {admin}: {e}")
    try:
        status, body = post_reload(target, timeout)
    except TimeoutError:
        return _failed(f"no answer from the admin API at {target} within {timeout:g}s")
    except (OSError, http.client.HTTPException) as e:
        reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
        return _failed(f"cannot reach the admin API at {target}: {reason}")
    except ValueError as e:     # a token http.client will not put in a header
        return _failed(f"cannot send the token: {e}")
    return _report(target, status, body)


def resolve(config: str | None, admin: str | None, token: str | None,
            env: Mapping[str, str]) -> AdminTarget:
    """The admin API to call: ``admin``, else ``admin.bind`` of ``config``, else
    127.0.0.1:9901; the token: ``token``, else $POISE_ADMIN_TOKEN, else ``admin.token``
    of ``config``.  ValueError for an ``admin`` that is not host:port."""
    section = admin_section(config) if config else {}
    bind = section.get("bind")
    if admin is None:
        admin = bind if isinstance(bind, str) else DEFAULT_ADMIN
        try:
            host, port = parse_address(admin)
        except ValueError:      # (the server will report a bad admin.bind)
            host, port = parse_address(DEFAULT_ADMIN)
    else:
        host, port = parse_address(admin)
    configured = section.get("token")
    token = token or env.get(TOKEN_ENV) or (configured if isinstance(configured, str) else None)
    return AdminTarget(_UNSPECIFIED.get(host, host), port, token)


def admin_section(path: str) -> dict[str, Any]:
    """The ``admin`` mapping of the config file at ``path`` (TOML for ``.toml``, else
    YAML); empty when the file cannot be read or parsed or has none."""
    try:
        text = Path(path).read_text(encoding="utf-8")
        data = tomllib.loads(text) if path.lower().endswith(".toml") else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, yaml.YAMLError, tomllib.TOMLDecodeError):
        return {}
    section = data.get("admin") if isinstance(data, dict) else None
    return section if isinstance(section, dict) else {}


def post_reload(target: AdminTarget, timeout: float = TIMEOUT) -> tuple[int, Any]:
    """POST /reload; the status and the JSON body (None when the body is not JSON).
    Raises OSError (TimeoutError included) or http.client.HTTPException."""
    headers = {"accept": "application/json"}
    if target.token:
        headers["authorization"] = f"Bearer {target.token}"
    conn = http.client.HTTPConnection(target.host, target.port, timeout=timeout)
    try:
        conn.request("POST", "/reload", body=b"", headers=headers)
        response = conn.getresponse()
        raw = response.read()
    finally:
        conn.close()
    try:
        return response.status, json.loads(raw)
    except ValueError:
        return response.status, None


def _report(target: AdminTarget, status: int, body: Any) -> int:
    data = body if isinstance(body, dict) else {}
    if status == 200 and data.get("applied") is True:
        click.echo(f"reloaded: config version {data.get('version')}")
        return APPLIED
    errors = data.get("errors")
    if status == 400 and isinstance(errors, list):
        click.echo(f"reload rejected: invalid configuration "
                   f"(version {data.get('version')} keeps running)", err=True)
        for e in errors:
            field, message = (e.get("field"), e.get("message")) if isinstance(e, dict) \
                else ("", e)
            click.echo(f"  {field}: {message}" if field else f"  {message}", err=True)
        return REJECTED
    if status == 401:
        hint = "refused the token" if target.token else \
            f"needs a token (--token or ${TOKEN_ENV})"
        return _failed(f"the admin API at {target} {hint}")
    detail = data.get("error") if isinstance(data.get("error"), str) else "no JSON error"
    return _failed(f"the admin API at {target} answered {status}: {detail}")


def _failed(message: str) -> int:
    click.echo(f"poise reload: {message}", err=True)
    return FAILED
