"""A ``protocol: tcp`` listener at run time, in one worker: its routes (by TLS server
name), timeouts, connection guard and counters.  Built from config; a connection
reads it when it starts (a reload changes new connections, never running ones)."""

from __future__ import annotations

import asyncio
from typing import Any

from poise.config.model import Listener
from poise.proxy.http.cluster import ClusterRuntime
from poise.proxy.http.router import sni_matches
from poise.proxy.tls import listener_tls


class TcpSite:
    """Everything a client connection of one tcp listener needs.

    ``routes`` are ``(sni pattern or None, cluster)`` in order; the first whose pattern
    matches the connection's server name (TLS termination: the handshake's; passthrough:
    the ClientHello's) takes it, and a connection no route takes is closed.
    The counters (``accepted``, ``bytes_in``, ``bytes_out``, ``rejected`` by reason) and
    ``connections`` are those an HTTP Site has, for metrics and draining."""

    def __init__(self, spec: Listener, clusters: dict[str, ClusterRuntime],
                 loop: asyncio.AbstractEventLoop, limiters: Any = None,
                 warm: Any = None) -> None:
        self.loop = loop
        self.connections: set[Any] = set()
        self.served: dict[str, Any] = {}        # (no requests: kept empty for metrics)
        self.accepted = 0
        # Bytes relayed by the connections that closed (open ones count their own:
        # see bytes_in and bytes_out, so that the relay itself counts nothing).
        self.closed_in = 0
        self.closed_out = 0
        self.rejected: dict[str, int] = {}
        self.tls: Any = None
        self.configure(spec, clusters, limiters=limiters, warm=warm)

    def configure(self, spec: Listener, clusters: dict[str, ClusterRuntime],
                  limiters: Any = None, warm: Any = None) -> None:
        """Take ``spec``'s settings for the connections accepted from now on."""
        # First what may fail (certificate files are read again): then nothing changed.
        self.tls = listener_tls(self.tls, spec.tls)
        self.name = spec.name
        self.routes = [(r.match.sni if r.match is not None else None, clusters[r.cluster])
                       for r in spec.routes]
        first = self.routes[0]
        # Without any sni condition in front: every connection goes there.
        self.catch_all: ClusterRuntime | None = first[1] if first[0] is None else None
        self.passthrough = spec.tls_passthrough
        self.header_timeout = spec.client_header_timeout
        self.idle_timeout = spec.idle_timeout
        self.guard = limiters.guard(spec) if limiters is not None else None
        self.warm = warm

    @property
    def bytes_in(self) -> int:
        """Bytes received from clients, open connections included."""
        return self.closed_in + sum(c.received for c in self.connections)

    @property
    def bytes_out(self) -> int:
        """Bytes received from backends for clients, open connections included."""
        return self.closed_out + sum(c.upstream.received for c in self.connections
                                     if c.upstream is not None)

    def cluster_for(self, sni: str | None) -> ClusterRuntime | None:
        """The cluster of the first route that takes server name ``sni``, or None."""
        for pattern, cluster in self.routes:
            if pattern is None or sni_matches(pattern, sni):
                return cluster
        return None

    def reject(self, reason: str) -> None:
        """Count a connection closed before it was relayed."""
        self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def reject_proxy_header(self, _reason: str) -> None:
        self.reject("proxy_protocol")

    def retire(self, grace: float) -> None:
        """The listener was removed: its connections carry on until they end or the
        server cuts them off after ``grace`` seconds (a byte stream has no point at
        which to tell the client to reconnect)."""

    def __repr__(self) -> str:
        return f"<TcpSite {self.name} connections={len(self.connections)}>"
