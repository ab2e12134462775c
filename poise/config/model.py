"""The configuration schema (pydantic). Unknown keys are errors everywhere.

Field types (durations, sizes, percentages, addresses) are in
:mod:`poise.config.fields`, health and resilience settings in
:mod:`poise.config.resilience`; both are re-exported here.  Defaults follow what
HAProxy and nginx users expect; each field's docstring-comment states it.
"""

from __future__ import annotations

import ipaddress
import os
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    Field,
    PlainValidator,
    field_validator,
    model_validator,
)

from poise.config.discovery import Discovery
from poise.config.fields import (  # noqa: F401  (re-exported: the schema's one import place)
    Address,
    Duration,
    Percent,
    PositiveDuration,
    Size,
    Strict,
    printable,
)
from poise.config.limits import DEFAULT_TABLE_SLOTS, Cidr, RateLimits, TableSlots
from poise.config.observability import AccessLog, Metrics, Tracing
from poise.config.resilience import (  # noqa: F401  (re-exported)
    Backoff,
    HealthCheck,
    OutlierDetection,
    Retries,
    StatusRanges,
)
from poise.config.tls import ClusterTls, ListenerTls
from poise.config.workers import MAX_WORKERS, auto_workers, connection_cap, nofile_hard


def _check_policy(value: object) -> str | dict[str, Any]:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return dict(value)
    raise ValueError("expected a policy name or a mapping {type: NAME, ...options}")


# A name, or a mapping {type: NAME, ...options}; names and options are checked against
# the policy registry in load.semantic_errors.
PolicySpec = Annotated[str | dict[str, Any], PlainValidator(_check_policy)]


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


class WebSocket(Strict):
    """How a route treats WebSocket upgrades (``Upgrade: websocket`` on a GET).

    Enabled by default, as HAProxy and nginx-with-headers do: the upgrade is forwarded
    and, on ``101``, both connections become a byte relay.  ``idle_timeout`` closes a
    relay when nothing moved either way for that long (default 1 h); ``max_lifetime``
    closes it that long after the switch, whatever it does (None: never)."""

    enabled: bool = True
    idle_timeout: PositiveDuration = 3600.0
    max_lifetime: PositiveDuration | None = None


class Http2(Strict):
    """HTTP/2 from clients on an http listener (``http2: true`` takes the defaults).

    Plain listeners take h2c with prior knowledge next to HTTP/1.1 (told apart by the
    connection preface); TLS listeners offer ``h2`` in ALPN.  Each connection allows
    ``max_concurrent_streams`` requests at once; a stream may receive
    ``initial_stream_window`` request-body bytes ahead of the backend and the whole
    connection ``initial_connection_window`` (so memory stays bounded)."""

    max_concurrent_streams: int = Field(100, ge=1, le=10_000)
    initial_stream_window: Size = Field(64 * 1024, ge=1024, le=2**31 - 1)
    initial_connection_window: Size = Field(1024 * 1024, ge=65_535, le=2**31 - 1)


def _http2_switch(value: object) -> object:
    if value is True:
        return {}
    if value is False:
        return None
    return value


class Route(Strict):
    """Send requests that match ``match`` (or all, when absent) to ``cluster``."""

    match: Match | None = None
    cluster: str
    # Its label in metrics (default: the cluster's name).
    name: str | None = Field(None, min_length=1, max_length=64)
    # This route's rate limits (default: the listener's; ``[]``: none).
    rate_limit: RateLimits | None = None
    websocket: WebSocket = Field(default_factory=WebSocket)


def _default(model: type[BaseModel], field: str) -> Any:
    return model.model_fields[field].get_default(call_default_factory=True)


# Listener fields that only mean something for HTTP.
HTTP_ONLY_FIELDS = ("max_request_line", "max_header_size", "max_headers", "max_request_body",
                    "forwarded_headers", "abort_on_client_close", "client_idle_timeout",
                    "trusted_proxies", "rate_limit", "access_log", "http2")


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
    # HTTP/2 from clients (None: HTTP/1.x only); ``true`` takes the defaults.
    http2: Annotated[Http2 | None, BeforeValidator(_http2_switch)] = None

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
                if route.websocket != WebSocket():
                    problems.append("routes of a tcp listener take no websocket settings")
                if m is not None and (m.host or m.path or m.path_prefix or m.methods
                                      or m.headers):
                    problems.append("routes of a tcp listener match on sni only")
        else:
            if self.tls is not None and "alpn" not in self.tls.model_fields_set \
                    and self.http2 is not None:
                # (Models are frozen: the listener gets a copy offering h2 first.)
                object.__setattr__(self, "tls", self.tls.model_copy(
                    update={"alpn": ["h2", "http/1.1"]}))
            spoken = {"http/1.1", "h2"} if self.http2 is not None else {"http/1.1"}
            if self.tls is not None and set(self.tls.alpn) - spoken:
                problems.append("tls.alpn: an http listener may only offer http/1.1, "
                                "and h2 with http2 on")
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
    # An idle plain HTTP/1.1 connection unused this long is parked: only its socket is
    # kept, until a request revives it (poise.proxy.http.parking); 0 = never.
    keepalive_park_after: Duration = 5.0
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
    # How HTTP requests reach the backends: HTTP/1.1 (keep-alive pools), or HTTP/2
    # (``h2``: h2c, or ALPN h2 with ``tls``), streams multiplexed over few connections.
    protocol: Literal["http1", "h2"] = "http1"

    @model_validator(mode="after")
    def _warm_without_proxy_header(self) -> Cluster:
        if self.warm_connections and self.send_proxy_protocol is not None:
            raise ValueError("warm_connections and send_proxy_protocol exclude each other: "
                             "a PROXY header names a client, so a connection cannot be "
                             "opened before its client arrives")
        if self.protocol == "h2" and self.send_proxy_protocol is not None:
            raise ValueError("protocol h2 and send_proxy_protocol exclude each other: an "
                             "HTTP/2 connection carries many clients' requests, and a "
                             "PROXY header names one")
        return self


def _workers(value: object) -> object:
    # "auto": one worker per CPU this process may run on (Config may then add more).
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
        if v is not None and not printable(v):
            raise ValueError("must be printable ASCII without spaces")
        return v


class Config(Strict):
    """The whole file."""

    # Worker processes; "auto" = one per CPU, or more if the listeners' max_connections
    # need them (auto_workers).  With more than one, the process started becomes the
    # supervisor and control plane and serves no traffic itself.
    workers: Annotated[int, BeforeValidator(_workers)] = Field(1, ge=1, le=MAX_WORKERS)
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

    @model_validator(mode="wrap")
    @classmethod
    def _auto_workers(cls, data: Any, handler: Any) -> Config:
        config = handler(data)
        if isinstance(data, dict) and data.get("workers") == "auto":
            # (Here, not in _workers: the count depends on the validated listeners.)
            workers = auto_workers(config.workers, connection_cap(config.listeners),
                                   nofile_hard())
            if workers != config.workers:
                object.__setattr__(config, "workers", workers)
        return config
