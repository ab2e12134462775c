"""Runtime objects compiled from config for the HTTP data path: a :class:`Site` per
listener (clusters: :mod:`poise.proxy.http.cluster`). Built once; the request path only
reads attributes."""

from __future__ import annotations

import asyncio
from typing import Any

from poise.config.model import Listener
from poise.observability.access_format import AccessLogger
from poise.proxy.http.accounting import Counts
from poise.proxy.http.cluster import ClusterRuntime
from poise.proxy.http.router import Router, RouteTarget

__all__ = ["ClusterRuntime", "Site"]


class Site:
    """Everything a client connection on one listener needs, precomputed.

    One Site per bound listener for as long as it stays bound: a reload that changes
    its settings or routes calls :meth:`configure`, which the next request on every
    connection (kept-alive ones included) sees."""

    def __init__(self, spec: Listener, clusters: dict[str, ClusterRuntime],
                 loop: asyncio.AbstractEventLoop, counting: bool = True,
                 access_log: AccessLogger | None = None, tracer: Any = None,
                 limiters: Any = None) -> None:
        self.loop = loop
        self.connections: set = set()
        # Counters since the listener was bound (poise.proxy.http.accounting): per
        # cluster name the responses sent, and connections accepted, bytes in and out.
        self.served: dict[str, Counts] = {}
        # The cluster name counted last and its counts (a lookup saved per request).
        self.last_route: str | None = None
        self.last_served = Counts()
        self.accepted = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.configure(spec, clusters, counting, access_log, tracer, limiters)

    def configure(self, spec: Listener, clusters: dict[str, ClusterRuntime],
                  counting: bool = True, access_log: AccessLogger | None = None,
                  tracer: Any = None, limiters: Any = None) -> None:
        """Take ``spec``'s settings and routes (to the runtimes in ``clusters``).

        ``counting``: count each response by status and latency (``metrics.enabled``);
        ``access_log``: an :class:`~poise.observability.access_format.AccessLogger` or
        None (a native call: both are compiled);
        ``tracer``: a :class:`~poise.observability.tracing.Tracer` or None;
        ``limiters``: a :class:`~poise.proxy.ratelimits.Limiters` (rate and connection
        limits) or None (none)."""
        self.name = spec.name
        self.counting = counting
        self.access_log = access_log
        self.tracer = tracer
        limits = limiters.route_limits(spec) if limiters is not None else [None] * len(
            spec.routes)
        self.router = Router(spec.routes, clusters, [
            RouteTarget(clusters[route.cluster], limit)
            for route, limit in zip(spec.routes, limits, strict=True)])
        # A ConnectionGuard (max_connections, max_connections_per_ip) or None.
        self.guard = limiters.guard(spec) if limiters is not None else None
        self.header_timeout = spec.client_header_timeout
        self.idle_timeout = spec.client_idle_timeout
        self.max_request_line = spec.max_request_line
        self.max_header_size = spec.max_header_size
        self.max_headers = spec.max_headers
        self.max_request_body = spec.max_request_body
        self.forwarded_headers = spec.forwarded_headers
        self.abort_on_client_close = spec.abort_on_client_close
        self.xfp = b"x-forwarded-proto: http\r\n"

    def retire(self, grace: float) -> None:
        """The listener was removed: its connections finish what they are doing and
        close (see ``ClientConnection.retire``)."""
        for conn in list(self.connections):
            conn.retire(grace)

    def __repr__(self) -> str:
        return f"<Site {self.name} connections={len(self.connections)}>"
