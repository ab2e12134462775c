"""Runtime objects compiled from config for the HTTP data path: a :class:`Site` per
listener (clusters: :mod:`poise.proxy.http.cluster`). Built once; the request path only
reads attributes."""

from __future__ import annotations

import asyncio
from typing import Any

from poise.config.model import Listener
from poise.observability.access_format import AccessLogger
from poise.proxy.deadline import Timeouts
from poise.proxy.http.accounting import Counts
from poise.proxy.http.cluster import ClusterRuntime
from poise.proxy.http.router import Router, RouteTarget, sni_subset
from poise.proxy.tls import listener_tls

__all__ = ["ClusterRuntime", "Site"]

# Routers kept per SNI name before the cache starts afresh.
_MAX_SNI_ROUTERS = 1024
# The router of a server name no route accepts: every request → 404.
_NO_ROUTE = Router([], {}, [])


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
        # The head, idle and linger deadlines of its connections (poise.proxy.deadline).
        self.timeouts = Timeouts(loop)
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
        # Connections closed before being served, by reason (metrics).
        self.rejected: dict[str, int] = {}
        # TLS termination (a poise.proxy.tls.ServerTls) or None; kept across reloads
        # so that bound sockets see new certificates.
        self.tls: Any = None
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
        # First what may fail (certificate files are read again): then nothing changed.
        self.tls = listener_tls(self.tls, spec.tls)
        self.name = spec.name
        self.counting = counting
        self.access_log = access_log
        self.tracer = tracer
        limits = limiters.route_limits(spec) if limiters is not None else [None] * len(
            spec.routes)
        targets = [RouteTarget(clusters[route.cluster], limit,
                               route.websocket if route.websocket.enabled else None)
                   for route, limit in zip(spec.routes, limits, strict=True)]
        self.router = Router(spec.routes, clusters, targets)
        # With routes that match on SNI: the routes of each server name, built on
        # first use (None: no route looks at SNI, every connection uses ``router``).
        self._routes = list(zip(spec.routes, targets, strict=True))
        self.sni_routers: dict[str | None, Router] | None = (
            {} if any(r.match is not None and r.match.sni for r in spec.routes) else None)
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
        # HTTP/2 settings (a config.model.Http2) or None: HTTP/1.x only.
        self.http2: Any = spec.http2
        self.xfp = (b"x-forwarded-proto: https\r\n" if spec.tls is not None
                    else b"x-forwarded-proto: http\r\n")

    def router_for(self, sni: str | None) -> Router:
        """The router of connections that asked for server name ``sni`` (only its
        routes whose ``sni`` condition holds; built once per name)."""
        routers = self.sni_routers
        assert routers is not None
        router = routers.get(sni)
        if router is None:
            if len(routers) >= _MAX_SNI_ROUTERS:    # names are the client's to choose
                routers.clear()
            routes, targets = sni_subset(self._routes, sni)
            router = routers[sni] = Router(routes, {}, targets) if routes else _NO_ROUTE
        return router

    def reject_proxy_header(self, _reason: str) -> None:
        """A connection was closed for a missing or malformed PROXY header."""
        self.rejected["proxy_protocol"] = self.rejected.get("proxy_protocol", 0) + 1

    def retire(self, grace: float) -> None:
        """The listener was removed: its connections finish what they are doing and
        close (see ``ClientConnection.retire``)."""
        for conn in list(self.connections):
            conn.retire(grace)

    def __repr__(self) -> str:
        return f"<Site {self.name} connections={len(self.connections)}>"
