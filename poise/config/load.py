"""Read, parse and validate configuration files; every error carries its field path."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from poise.config.model import Config
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
    return parse_config(text, fmt)


def parse_config(text: str, fmt: str = "yaml") -> Config:
    """Parse and validate config text in ``fmt`` (``yaml`` or ``toml``)."""
    data = _parse(text, fmt)
    if not isinstance(data, dict):
        raise ConfigError([("", "the config must be a mapping at the top level")])
    try:
        config = Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError([(_path(err["loc"]), _message(err)) for err in e.errors()]) from None
    problems = semantic_errors(config)
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
        elif "[" in part or "-" in part and not part.isidentifier():
            continue  # pydantic's union-branch tags such as "function-before[...]"
        else:
            out += f".{part}" if out else part
    return out


def _message(err: dict[str, Any]) -> str:
    if err["type"] == "extra_forbidden":
        return "unknown key"
    if err["type"] == "missing":
        return "required"
    msg = err["msg"]
    return msg.removeprefix("Value error, ")


def semantic_errors(config: Config) -> list[tuple[str, str]]:
    """Cross-field checks that a schema cannot express."""
    errors: list[tuple[str, str]] = []
    clusters = {}
    for i, c in enumerate(config.clusters):
        if c.name in clusters:
            errors.append((f"clusters[{i}].name", f"duplicate cluster name {c.name!r}"))
        clusters[c.name] = c
        errors.extend(_policy_errors(f"clusters[{i}].policy", c.policy))
        seen: set[str] = set()
        for j, b in enumerate(c.backends):
            if b.address in seen:
                errors.append((f"clusters[{i}].backends[{j}].address",
                               f"duplicate backend {b.address}"))
            seen.add(b.address)
    names: set[str] = set()
    binds: set[str] = set()
    for i, lst in enumerate(config.listeners):
        if lst.name in names:
            errors.append((f"listeners[{i}].name", f"duplicate listener name {lst.name!r}"))
        names.add(lst.name)
        if lst.bind in binds:
            errors.append((f"listeners[{i}].bind", f"{lst.bind} is bound twice"))
        binds.add(lst.bind)
        for j, r in enumerate(lst.routes):
            if r.cluster not in clusters:
                errors.append((f"listeners[{i}].routes[{j}].cluster",
                               f"unknown cluster {r.cluster!r}"))
    return errors


def _policy_errors(path: str, policy: str | dict[str, Any]) -> list[tuple[str, str]]:
    if isinstance(policy, str):
        name, options = policy, {}
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
