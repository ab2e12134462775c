"""Read, parse and validate configuration files; every error carries its field path."""

from __future__ import annotations

import importlib.util
import tomllib
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from poise.config.model import Admin, Config, is_loopback
from poise.config.units import parse_address, parse_duration
from poise.core.policies import POLICIES, create_policy
from poise.errors import ConfigError


def load_config(path: str | Path) -> Config:
    """Load ``path`` (``.yaml``/``.yml``/``.toml``); raise :class:`ConfigError` listing
    every problem found."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError([("", f"cannot read {p}: {e.strerror or e}")]) from None
    suffix = p.suffix.lower()
    if suffix in (".yaml", ".yml"):
        fmt = "yaml"
    elif suffix == ".toml":
        fmt = "toml"
    else:
        raise ConfigError([("", f"{p}: unknown config format (use .yaml, .yml or .toml)")])
    config = parse_config(text, fmt)
    # Access log files are opened (created) now, so that a path poise cannot write is
    # an error of `poise check` and of a reload rather than a worker's failure.
    from poise.observability.access_log import check
    problems = check(config)
    # Certificates and keys are read too: a missing or mismatched file is an error
    # of `poise check` and of a reload, never a worker's crash.
    from poise.proxy.tls import config_errors
    problems += config_errors(config)
    if problems:
        raise ConfigError(problems)
    return config


def parse_config(text: str, fmt: str = "yaml") -> Config:
    """Parse and validate config text in ``fmt`` (``yaml`` or ``toml``)."""
    data = _parse(text, fmt)
    if not isinstance(data, dict):
        raise ConfigError([("", "the config must be a mapping at the top level")])
    problems = semantic_errors(data)
    try:
        config = Config.model_validate(data)
    except ValidationError as e:
        schema = [(_path(err["loc"]), _message(err)) for err in e.errors()]
        raise ConfigError(schema + [p for p in problems if p not in schema]) from None
    if problems:
        raise ConfigError(problems)
    return config


def _parse(text: str, fmt: str) -> Any:
    try:
        if fmt == "toml":
            return tomllib.loads(text)
        return yaml.safe_load(text)
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as e:
        raise ConfigError([("", f"not valid {fmt.upper()}: {e}")]) from None


def _path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _message(err: dict[str, Any]) -> str:
    if err["type"] == "extra_forbidden":
        return "unknown key"
    if err["type"] == "missing":
        return "required"
    msg = err["msg"]
    return msg.removeprefix("Value error, ")


def semantic_errors(data: dict[str, Any]) -> list[tuple[str, str]]:
    """Cross-field checks a schema cannot express, made on the raw data so that they
    are reported together with schema errors; malformed parts are skipped (the schema
    reports those)."""
    errors: list[tuple[str, str]] = []
    clusters: set[str] = set()
    for i, c in _items(data, "clusters"):
        name = c.get("name")
        if isinstance(name, str):
            if name in clusters:
                errors.append((f"clusters[{i}].name", f"duplicate cluster name {name!r}"))
            clusters.add(name)
        if "policy" in c:
            errors.extend(_policy_errors(f"clusters[{i}].policy", c["policy"]))
        if not c.get("backends") and not isinstance(c.get("discovery"), dict):
            errors.append((f"clusters[{i}].backends", "at least one backend is needed "
                                                      "(or a discovery source)"))
        seen: set[str] = set()
        for j, b in _items(c, "backends"):
            address = b.get("address")
            if isinstance(address, str) and address in seen:
                errors.append((f"clusters[{i}].backends[{j}].address",
                               f"duplicate backend {address}"))
            seen.add(address)
        errors.extend(_resilience_errors(f"clusters[{i}]", c))
    names: set[str] = set()
    binds: dict[str, str] = {}
    for i, lst in _items(data, "listeners"):
        name, bind = lst.get("name"), lst.get("bind")
        if isinstance(name, str):
            if name in names:
                errors.append((f"listeners[{i}].name", f"duplicate listener name {name!r}"))
            names.add(name)
        if isinstance(bind, str):
            if bind in binds:
                errors.append((f"listeners[{i}].bind", f"{bind} is bound twice"))
            binds.setdefault(bind, f"listeners[{i}]")
        if isinstance(lst.get("cluster"), str) and lst["cluster"] not in clusters:
            errors.append((f"listeners[{i}].cluster", f"unknown cluster {lst['cluster']!r}"))
        for j, r in _items(lst, "routes"):
            cluster = r.get("cluster")
            if isinstance(cluster, str) and cluster not in clusters:
                errors.append((f"listeners[{i}].routes[{j}].cluster",
                               f"unknown cluster {cluster!r}"))
        if lst.get("protocol") == "tcp":
            errors.extend(_tcp_policy_errors(f"listeners[{i}]", lst, data))
        errors.extend(_rate_limit_errors(f"listeners[{i}]", lst))
    errors.extend(_admin_errors(data.get("admin"), binds))
    errors.extend(_observability_errors(data))
    return errors


# Policies that read what only an HTTP request has.
_HTTP_ONLY_POLICIES = ("sticky",)


def _tcp_policy_errors(path: str, listener: dict[str, Any],
                       data: dict[str, Any]) -> list[tuple[str, str]]:
    """A tcp listener's clusters must balance on what a connection has: its client
    address (no headers, cookies, paths or queries)."""
    wanted = {r.get("cluster") for _, r in _items(listener, "routes")}
    wanted.add(listener.get("cluster"))
    errors = []
    for i, c in _items(data, "clusters"):
        if c.get("name") not in wanted:
            continue
        policy = c.get("policy")
        name, options = (policy, {}) if isinstance(policy, str) else (
            (policy.get("type"), policy) if isinstance(policy, dict) else (None, {}))
        key = options.get("key")
        if name in _HTTP_ONLY_POLICIES or (name == "hash" and key != "ip"):
            what = f"hash on {key}" if name == "hash" else name
            where = f"clusters[{i}].policy" + (".type" if isinstance(policy, dict) else "")
            errors.append((where,
                           f"{what} needs HTTP requests, but tcp listener {path} "
                           f"({listener.get('name')}) routes connections here: use "
                           f"round_robin, random, least_conn, p2c, ip_hash, hash on ip "
                           f"or peak_ewma"))
    return errors


def _rate_limit_errors(path: str, listener: dict[str, Any]) -> list[tuple[str, str]]:
    """Global rate limits need Redis' client (the ``[redis]`` extra)."""
    places = [(f"{path}.rate_limit", listener.get("rate_limit"))]
    places += [(f"{path}.routes[{j}].rate_limit", r.get("rate_limit"))
               for j, r in _items(listener, "routes")]
    errors = []
    for where, limits in places:
        limits = [limits] if isinstance(limits, dict) else limits
        if not isinstance(limits, list):
            continue
        for k, limit in enumerate(limits):
            if isinstance(limit, dict) and limit.get("scope") == "global" \
                    and importlib.util.find_spec("redis") is None:
                errors.append((f"{where}[{k}].scope", "scope: global needs Redis' client: "
                                                      "pip install 'poise[redis]'"))
    return errors


def _observability_errors(data: dict[str, Any]) -> list[tuple[str, str]]:
    """Tracing needs its extra installed (access log files: see load_config)."""
    if not isinstance(data.get("tracing"), dict):
        return []
    from poise.observability.tracing import check_available
    try:
        check_available()
    except ConfigError as e:
        return list(e.errors)
    return []


def _admin_errors(admin: object, binds: dict[str, str]) -> list[tuple[str, str]]:
    """The admin API must not share a listener's address, nor be reachable beyond
    loopback without a token."""
    if not isinstance(admin, dict):
        return []
    bind = admin.get("bind", Admin.model_fields["bind"].default)
    if not isinstance(bind, str):
        return []
    try:
        host, _ = parse_address(bind)
    except ValueError:
        return []       # the schema reports it
    errors = []
    if bind in binds:
        errors.append(("admin.bind", f"{bind} is also bound by {binds[bind]}"))
    if admin.get("token") is None and not is_loopback(host):
        errors.append(("admin.token", f"required when the admin API listens beyond "
                                      f"loopback ({bind})"))
    return errors


def _resilience_errors(path: str, cluster: dict[str, Any]) -> list[tuple[str, str]]:
    errors: list[tuple[str, str]] = []
    retries = cluster.get("retries")
    per_try = _duration(retries.get("per_try_timeout")) if isinstance(retries, dict) else None
    total = _duration(cluster.get("request_timeout"))
    if per_try is not None and total is not None and per_try > total:
        errors.append((f"{path}.retries.per_try_timeout",
                       f"must not exceed request_timeout ({total:g}s)"))
    if cluster.get("max_pending") is not None and cluster.get("max_connections") is None \
            and not any(b.get("max_connections") is not None
                        for _, b in _items(cluster, "backends")):
        errors.append((f"{path}.max_pending",
                       "has no effect without max_connections: requests only queue when a "
                       "connection limit (the cluster's or a backend's) is reached"))
    return errors


def _duration(value: object) -> float | None:
    """Seconds, or None when ``value`` is absent or malformed (the schema reports that)."""
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError:
        return None


def _items(data: Any, key: str) -> list[tuple[int, dict[str, Any]]]:
    """``(index, mapping)`` for the mappings in the list ``data[key]``, if any."""
    items = data.get(key) if isinstance(data, dict) else None
    if not isinstance(items, list):
        return []
    return [(i, item) for i, item in enumerate(items) if isinstance(item, dict)]


def _policy_errors(path: str, policy: object) -> list[tuple[str, str]]:
    if isinstance(policy, str):
        name, options = policy, {}
    elif not isinstance(policy, dict):
        return []   # the schema reports the wrong type
    else:
        options = dict(policy)
        name = options.pop("type", None)
        if not isinstance(name, str):
            return [(f"{path}.type", "required: the policy name")]
        path = f"{path}.type"
    if name not in POLICIES:
        return [(path, f"unknown policy {name!r} (known: {', '.join(sorted(POLICIES))})")]
    try:
        create_policy(name, options)
    except (TypeError, ValueError) as e:
        return [(path, f"bad options for {name}: {e}")]
    return []


def policy_spec(policy: str | dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """``(name, options)`` from either config form of ``policy``."""
    if isinstance(policy, str):
        return policy, {}
    options = dict(policy)
    return options.pop("type"), options
