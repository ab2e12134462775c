"""The configuration schema (pydantic). Unknown keys are errors everywhere.

Durations accept ``250ms``/``2s``/``1m`` or numbers of seconds; sizes accept
``64KiB``/``1MiB`` or numbers of bytes.  Defaults follow what HAProxy and nginx users
expect; each field's docstring-comment states it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainValidator, field_validator

from poise.config.units import parse_address, parse_duration, parse_size

Duration = Annotated[float, BeforeValidator(parse_duration)]
Size = Annotated[int, BeforeValidator(parse_size)]


def _check_address(value: object) -> str:
    parse_address(value)
    return value  # type: ignore[return-value]


Address = Annotated[str, BeforeValidator(_check_address)]


def _check_policy(value: object) -> str | dict[str, Any]:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return dict(value)
    raise ValueError("expected a policy name or a mapping {type: NAME, ...options}")


# A name, or a mapping {type: NAME, ...options}; names and options are checked against
# the policy registry in load.semantic_errors.
PolicySpec = Annotated[str | dict[str, Any], PlainValidator(_check_policy)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Match(Strict):
    """Route conditions; all given conditions must hold. ``host`` may be ``*.example.com``."""

    host: str | None = None
    path_prefix: str | None = None
    path: str | None = None
    methods: list[str] | None = Field(None, min_length=1)
    headers: dict[str, str] | None = None

    @field_validator("path_prefix", "path")
    @classmethod
    def _absolute(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith("/"):
            raise ValueError("must start with /")
        return v

    @field_validator("methods")
    @classmethod
    def _upper(cls, v: list[str] | None) -> list[str] | None:
        return None if v is None else [m.upper() for m in v]

    @field_validator("host")
    @classmethod
    def _host(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if "*" in v and not (v.startswith("*.") and "*" not in v[2:]):
            raise ValueError("wildcards are only allowed as a leading '*.'")
        return v.lower()


class Route(Strict):
    """Send requests that match ``match`` (or all, when absent) to ``cluster``."""

    match: Match | None = None
    cluster: str


class Listener(Strict):
    """A bound socket and what it serves."""

    name: str
    bind: Address
    protocol: Literal["http"] = "http"
    routes: list[Route] = Field(min_length=1)
    # Total deadline for a request head, from accept (first request) or first byte.
    client_header_timeout: Duration = 10.0
    # How long an idle keep-alive client connection is kept open.
    client_idle_timeout: Duration = 60.0
    max_request_line: Size = 8 * 1024
    max_header_size: Size = 64 * 1024
    max_headers: int = Field(100, ge=1)
    # Checked against Content-Length before any body byte is read.
    max_request_body: Size = 1024**3
    # Add X-Forwarded-For/-Proto/-Host to forwarded requests.
    forwarded_headers: bool = True


class BackendConfig(Strict):
    address: Address
    weight: int = Field(1, ge=1, le=10_000)
    # Only used when no primary backend of the cluster is ready.
    backup: bool = False


class Cluster(Strict):
    """A named set of backends and how to talk to them."""

    name: str
    policy: PolicySpec = "round_robin"
    backends: list[BackendConfig] = Field(min_length=1)
    connect_timeout: Duration = 2.0
    # From the request being sent until the response head has arrived.
    response_header_timeout: Duration = 30.0
    # Idle upstream keep-alive connections kept per backend and per worker.
    keepalive_max_idle: int = Field(1024, ge=0)
    keepalive_idle_timeout: Duration = 60.0


class Config(Strict):
    """The whole file."""

    workers: int = Field(1, ge=1, le=256)
    # Graceful shutdown waits this long for requests in flight before closing.
    drain_timeout: Duration = 30.0
    listeners: list[Listener] = Field(min_length=1)
    clusters: list[Cluster] = Field(min_length=1)
