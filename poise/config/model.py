"""The configuration schema (pydantic). Unknown keys are errors everywhere.

Durations accept ``250ms``/``2s``/``1m`` or numbers of seconds; sizes accept
``64KiB``/``1MiB`` or numbers of bytes; percentages accept ``10%`` or numbers of percent
and are stored as fractions (``10%`` → 0.1).  Defaults follow what HAProxy and nginx users
expect; each field's docstring-comment states it.
"""

from __future__ import annotations

import ipaddress
import os
import re
from functools import partial
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    ValidationInfo,
    field_validator,
    model_validator,
)

from poise.config.discovery import Discovery
from poise.config.limits import DEFAULT_TABLE_SLOTS, Cidr, RateLimits, TableSlots
from poise.config.observability import AccessLog, Metrics, Tracing
from poise.config.tls import ClusterTls, ListenerTls
from poise.config.units import parse_address, parse_duration, parse_size
from poise.core.units import parse_percent

Duration = Annotated[float, BeforeValidator(parse_duration)]
PositiveDuration = Annotated[float, BeforeValidator(parse_duration), Field(gt=0)]
Size = Annotated[int, BeforeValidator(parse_size)]


def _dump_percent(fraction: float) -> str:
    # A bare number would read back as percent, so dumps say "20%" to round-trip.
    return f"{round(fraction * 100, 9):.12g}%"


# A fraction 0..1 written as ``10%`` or ``10`` (percent).
Percent = Annotated[float, BeforeValidator(parse_percent), PlainSerializer(_dump_percent)]


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


_STATUS_RANGE = re.compile(r"^\s*(\d{3})\s*(?:-\s*(\d{3})\s*)?$")
_STATUS_CLASS = re.compile(r"^\s*([1-5])xx\s*$", re.IGNORECASE)
_STATUS_HELP = "expected a status 100..599, a range like 500-599, or a class like 5xx"


def _status(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 100 <= value <= 599:
        raise ValueError(_STATUS_HELP)
    return value


def _status_range(value: object) -> tuple[int, int]:
    if isinstance(value, str):
        if m := _STATUS_CLASS.match(value):
            lo = int(m.group(1)) * 100
            return lo, lo + 99
        if m := _STATUS_RANGE.match(value):
            lo = _status(int(m.group(1)))
            hi = _status(int(m.group(2) or lo))
        else:
            raise ValueError(_STATUS_HELP)
    elif isinstance(value, list | tuple) and len(value) == 2:   # (lo, hi), as dumped
        lo, hi = _status(value[0]), _status(value[1])
    else:
        lo = hi = _status(value)
    if lo > hi:
        raise ValueError(f"empty status range {lo}-{hi}")
    return lo, hi


def _status_list(value: object) -> object:
    # A lone status or range stands for a list of one.
    return [value] if isinstance(value, int | str) else value


# Response statuses as ``[200, "300-399", "5xx"]``, normalised to ``((lo, hi), ...)``.
StatusRanges = Annotated[
    tuple[Annotated[tuple[int, int], BeforeValidator(_status_range)], ...],
    BeforeValidator(_status_list),
    Field(min_length=1),
]

_RETRY_CONDITIONS = ("connect_failure", "reset", "timeout")
_RETRY_HELP = "expected connect_failure, reset, timeout or a status 500..599"


def _retry_on(value: object) -> str | int:
    if isinstance(value, str) and value in _RETRY_CONDITIONS:
        return value
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 500 <= value <= 599:
        raise ValueError(_RETRY_HELP)
    return value


# What makes an attempt worth retrying: a failure kind, or a response status 500..599.
RetryOn = Annotated[Literal["connect_failure", "reset", "timeout"] | int,
                    PlainValidator(_retry_on)]

# A retry budget may exceed 100%: 10 (1000%) allows ten retries per request.
RetryBudget = Annotated[float, BeforeValidator(partial(parse_percent, maximum=10.0)),
                        PlainSerializer(_dump_percent)]

# RFC 9110 token characters, which a method consists of.
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


def _printable(v: str) -> bool:
    return v.isascii() and v.isprintable() and " " not in v


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Match(Strict):
    """Route conditions; all given conditions must hold. ``host`` and ``sni`` may be
    ``*.example.com``.  ``sni`` is the TLS server name of the client's connection (TLS
    listeners only); on a ``tcp`` listener it is the only condition there is."""

    host: str | None = None
    sni: str | None = None
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

    @field_validator("host", "sni")
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
    # Its label in metrics (default: the cluster's name).
    name: str | None = Field(None, min_length=1, max_length=64)
    # This route's rate limits (default: the listener's; ``[]``: none).
    rate_limit: RateLimits | None = None


def _default(model: type[BaseModel], field: str) -> Any:
    return model.model_fields[field].get_default(call_default_factory=True)


# Listener fields that only mean something for HTTP.
HTTP_ONLY_FIELDS = ("max_request_line", "max_header_size", "max_headers", "max_request_body",
                    "forwarded_headers", "abort_on_client_close", "client_idle_timeout",
                    "trusted_proxies", "rate_limit", "access_log")


class Listener(Strict):
    """A bound socket and what it serves: HTTP (``protocol: http``, the default) or
    bytes relayed to a backend (``protocol: tcp``).

    ``cluster: NAME`` is short for ``routes: [{cluster: NAME}]``."""

    name: str
    bind: Address
    protocol: Literal["http", "tcp"] = "http"
    routes: list[Route] = Field(min_length=1)
    # Total deadline for a request head, from accept (first request) or first byte.
    # On a tcp listener: for the PROXY header and, with tls_passthrough, the ClientHello.
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
    # A client that closes its side (FIN) while requests are in flight has given up:
    # cancel them and free their upstream connections (nginx's default; HAProxy's
    # `option abortonclose`).  False: treat the FIN as a half-close and still answer.
    abort_on_client_close: bool = True
    # This listener's access log (default: the top-level ``access_log``; ``false``: none).
    access_log: AccessLog | Literal[False] | None = None
    # Open client connections, all workers together (None: no cap), and the same per
    # client address: a connection over either is closed as soon as it is accepted.
    max_connections: int | None = Field(None, ge=1)
    max_connections_per_ip: int | None = Field(None, ge=1)
    # Proxies in front of this listener: from a peer in these networks, a rate limit's
    # client_ip is the right-most X-Forwarded-For address not in them.
    trusted_proxies: list[Cidr] = Field(default_factory=list)
    # Rate limits of the routes without their own (shared by them: one bucket per key).
    rate_limit: RateLimits | None = None
    # TLS termination (None: plain).
    tls: ListenerTls | None = None
    # tcp only: relay TLS untouched, routed by the SNI name of the ClientHello.
    tls_passthrough: bool = False
    # Every connection starts with a PROXY protocol header (v1 or v2), required: its
    # client address replaces the peer's (ip_hash, X-Forwarded-For, limits, logs).
    proxy_protocol: bool = False
    # tcp only: a connection with no byte either way for this long is closed.
    idle_timeout: PositiveDuration = 3600.0

    @model_validator(mode="before")
    @classmethod
    def _cluster_shortcut(cls, data: object) -> object:
        if isinstance(data, dict) and "cluster" in data:
            data = dict(data)
            cluster = data.pop("cluster")
            if "routes" in data:
                raise ValueError("give either cluster or routes, not both")
            data["routes"] = [{"cluster": cluster}]
        return data

    @model_validator(mode="after")
    def _protocol_fields(self) -> Listener:
        problems = []
        if self.protocol == "tcp":
            # (Against the defaults, not what was set: a dumped config must load.)
            http_only = [f for f in HTTP_ONLY_FIELDS
                         if getattr(self, f) != _default(Listener, f)]
            if http_only:
                problems.append(f"{', '.join(http_only)}: only for http listeners")
            for route in self.routes:
                m = route.match
                if route.rate_limit is not None:
                    problems.append("routes of a tcp listener take no rate_limit")
                if m is not None and (m.host or m.path or m.path_prefix or m.methods
                                      or m.headers):
                    problems.append("routes of a tcp listener match on sni only")
        else:
            if self.tls is not None and set(self.tls.alpn) - {"http/1.1"}:
                problems.append("tls.alpn: an http listener speaks HTTP/1.1 only, so it "
                                "may only offer http/1.1")
            if self.tls_passthrough:
                problems.append("tls_passthrough: only for tcp listeners (an http "
                                "listener reads requests, so it terminates TLS)")
            if self.idle_timeout != _default(Listener, "idle_timeout"):
                problems.append("idle_timeout: only for tcp listeners (http: "
                                "client_idle_timeout)")
        if self.tls_passthrough and self.tls is not None:
            problems.append("tls and tls_passthrough exclude each other")
        if self.tls is None and not self.tls_passthrough and any(
                r.match is not None and r.match.sni for r in self.routes):
            problems.append("match on sni needs tls or tls_passthrough")
        if problems:
            raise ValueError("; ".join(problems))
        return self


# The largest backend weight (config, admin API).
MAX_WEIGHT = 10_000


class BackendConfig(Strict):
    address: Address
    weight: int = Field(1, ge=1, le=MAX_WEIGHT)
    # Only used when no primary backend of the cluster is ready.
    backup: bool = False
    # Connections open to this backend at once (per worker); None = unlimited.
    max_connections: int | None = Field(None, ge=1)


class HealthCheck(Strict):
    """Active probes of every backend: ``rise`` passes in a row mark a backend up,
    ``fall`` failures in a row mark it down.  An ``http`` probe passes when the status
    is in ``expect_status`` and the body contains ``expect_body`` (if set); a ``tcp``
    probe passes when a connection opens (``path``, ``method``, ``host`` and the
    ``expect_*`` fields are then unused)."""

    type: Literal["http", "tcp"] = "http"
    path: str = "/health"
    method: str = "GET"
    # Host header sent; None = the backend's address.
    host: str | None = None
    expect_status: StatusRanges = ((200, 399),)
    # A substring the response body must contain.
    expect_body: str | None = None
    interval: PositiveDuration = 2.0
    # Must not exceed ``interval``: probes of one backend never overlap.
    timeout: PositiveDuration = 1.0
    # Each wait is interval × (1 ± jitter), so that workers do not probe in lockstep.
    jitter: Percent = 0.10
    rise: int = Field(2, ge=1)
    fall: int = Field(3, ge=1)

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError("must start with /")
        if not _printable(v):
            raise ValueError("must not contain spaces or control characters")
        return v

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        if not _TOKEN.match(v):
            raise ValueError("expected an HTTP method such as GET or HEAD")
        return v.upper()

    @field_validator("host")
    @classmethod
    def _host(cls, v: str | None) -> str | None:
        if v is not None and not (v and _printable(v)):
            raise ValueError("expected a host name, without spaces or control characters")
        return v

    @field_validator("timeout")
    @classmethod
    def _timeout(cls, v: float, info: ValidationInfo) -> float:
        interval = info.data.get("interval")
        if interval is not None and v > interval:
            raise ValueError(f"must not exceed interval ({interval:g}s)")
        return v

    @field_validator("jitter")
    @classmethod
    def _jitter(cls, v: float) -> float:
        if v > 0.5:
            raise ValueError("must be at most 50%")
        return v


class OutlierDetection(Strict):
    """Passive ejection of backends whose requests keep failing.  The n-th ejection of
    a backend lasts n × ``base_ejection_time``, capped at ``max_ejection_time``."""

    # Failures in a row (any status in failure_statuses, or no response) that eject.
    consecutive_failures: int = Field(5, ge=1)
    # 502/503/504 or no response at all, in a row, that eject.
    consecutive_gateway_errors: int = Field(5, ge=1)
    failure_statuses: StatusRanges = ((500, 599),)
    base_ejection_time: PositiveDuration = 30.0
    max_ejection_time: Duration = 300.0
    # A fraction of the cluster's backends: more are never ejected at once.
    max_ejection_percent: Percent = 0.5

    @field_validator("max_ejection_time")
    @classmethod
    def _max_time(cls, v: float, info: ValidationInfo) -> float:
        base = info.data.get("base_ejection_time")
        if base is not None and v < base:
            raise ValueError(f"must be at least base_ejection_time ({base:g}s)")
        return v


class Backoff(Strict):
    """The wait before retry n: exponential from ``base``, capped at ``max``, jittered.
    Also written as the string ``"25ms..250ms"``."""

    base: Duration = 0.025
    max: Duration = 0.25

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, data: object) -> object:
        if not isinstance(data, str):
            return data
        parts = data.split("..")
        if len(parts) != 2:
            raise ValueError("expected {base, max} or a range like 25ms..250ms")
        return {"base": parts[0].strip(), "max": parts[1].strip()}

    @field_validator("max")
    @classmethod
    def _max(cls, v: float, info: ValidationInfo) -> float:
        base = info.data.get("base")
        if base is not None and v < base:
            raise ValueError(f"must be at least base ({base:g}s)")
        return v


def _default_retry_on() -> list[str | int]:
    return ["connect_failure", "reset", "timeout", 502, 503, 504]


class Retries(Strict):
    """Sending a failed request again, to another backend where one is left."""

    # Total tries, including the first.
    attempts: int = Field(2, ge=1, le=10)
    retry_on: list[RetryOn] = Field(default_factory=_default_retry_on)
    # Deadline of each try's response head; None = response_header_timeout applies.
    per_try_timeout: PositiveDuration | None = None
    backoff: Backoff = Backoff()
    # Retries allowed per request, on average (over 10 s), besides min_per_second.
    budget: RetryBudget = 0.2
    min_per_second: float = Field(10.0, ge=0, allow_inf_nan=False)
    # Retry POST, PATCH, ... too (only idempotent methods otherwise).
    retry_non_idempotent: bool = False
    # Requests with larger bodies are not retried (the body is not kept to replay).
    max_buffered_body: Size = 64 * 1024


class Cluster(Strict):
    """A named set of backends and how to talk to them."""

    name: str
    policy: PolicySpec = "round_robin"
    # With ``discovery``, a seed used until the source first answers (may be empty).
    backends: list[BackendConfig] = Field(default_factory=list)
    # None: the backends are those listed (see poise.discovery).
    discovery: Discovery | None = None
    connect_timeout: Duration = 2.0
    # From the request being sent until the response head has arrived.
    response_header_timeout: Duration = 30.0
    # Idle upstream keep-alive connections kept per backend and per worker.
    keepalive_max_idle: int = Field(1024, ge=0)
    keepalive_idle_timeout: Duration = 60.0
    health_check: HealthCheck | None = None
    outlier_detection: OutlierDetection | None = None
    # Below this fraction of ready backends, all non-ejected backends are used as if
    # ready (a failing health check must not take the whole cluster down); 0 = never.
    panic_threshold: Percent = 0.5
    # Limits per worker; None = unlimited.  Requests beyond max_connections wait, up
    # to max_pending of them and queue_timeout each.
    max_connections: int | None = Field(None, ge=0)
    max_pending: int | None = Field(None, ge=0)
    queue_timeout: Duration = 1.0
    # Requests in flight to the cluster, and retries in flight.
    max_requests: int | None = Field(None, ge=0)
    max_retries: int | None = Field(None, ge=0)
    # None = no retries beyond trying other backends after a failed connect.
    retries: Retries | None = None
    # Total deadline across all tries and waits, until the response head → 504.
    request_timeout: PositiveDuration | None = None
    # TLS towards the backends (None: plain).
    tls: ClusterTls | None = None
    # Start each backend connection with a PROXY protocol header carrying the client's
    # address (None: none).
    send_proxy_protocol: Literal["v1", "v2"] | None = None
    # tcp listeners: connected spares kept per backend and worker, so that a new
    # client connection skips the connect.
    warm_connections: int = Field(0, ge=0, le=1024)

    @model_validator(mode="after")
    def _warm_without_proxy_header(self) -> Cluster:
        if self.warm_connections and self.send_proxy_protocol is not None:
            raise ValueError("warm_connections and send_proxy_protocol exclude each other: "
                             "a PROXY header names a client, so a connection cannot be "
                             "opened before its client arrives")
        return self


def _workers(value: object) -> object:
    # "auto": one worker per CPU this process may run on.
    if value == "auto":
        return max(1, len(os.sched_getaffinity(0)))
    if isinstance(value, str) and not value.strip().isdigit():
        raise ValueError("expected a number of workers or auto")
    return value


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP addresses."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Admin(Strict):
    """The admin API (JSON over HTTP), served by the control plane on its own socket."""

    bind: Address = "127.0.0.1:9901"
    # Every endpoint but /healthz then needs ``Authorization: Bearer <token>``.
    # Required when ``bind`` is not a loopback address (checked in load.py).
    token: str | None = Field(None, min_length=1)

    @field_validator("token")
    @classmethod
    def _token(cls, v: str | None) -> str | None:
        if v is not None and not _printable(v):
            raise ValueError("must be printable ASCII without spaces")
        return v


class Config(Strict):
    """The whole file."""

    # Worker processes; "auto" = one per CPU.  With more than one, the process started
    # becomes the supervisor and control plane and serves no traffic itself.
    workers: Annotated[int, BeforeValidator(_workers)] = Field(1, ge=1, le=256)
    # Graceful shutdown waits this long for requests in flight before closing.
    drain_timeout: Duration = 30.0
    listeners: list[Listener] = Field(min_length=1)
    clusters: list[Cluster] = Field(min_length=1)
    # None: no admin API.
    admin: Admin | None = None
    metrics: Metrics = Metrics()
    # None: no access log (a listener may still set its own).
    access_log: AccessLog | None = None
    # None: no tracing (``traceparent`` is passed through untouched).
    tracing: Tracing | None = None
    # Keys the shared rate-limit table holds (a power of two; 16 bytes each), read at
    # start: when full, the key nearest to expiry is forgotten.
    rate_limit_table_slots: TableSlots = DEFAULT_TABLE_SLOTS
