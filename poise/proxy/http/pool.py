"""Per-backend keep-alive connection pools (:class:`UpstreamPool`).

TLS (``cluster.tls_context``) and PROXY headers (``cluster.send_proxy_protocol``) only
change how a connection is opened (:func:`poise.proxy.dial.dial`); once open, a TLS
connection is pooled and reused like a plain one.

A connection that began with a PROXY header names one client, so it is *private* to
the client connection it was opened for (its ``owner``: a ClientConnection, or the
H2Session of an HTTP/2 stream: ``Downstream.owner()``), as HAProxy makes such
connections: it waits in the pool's idle list like any other (so ``max_idle``,
``idle_timeout`` and the connection limits see it), but only
:meth:`UpstreamPool.take_owned` hands it out, and only to its owner.  The shared path
(:meth:`UpstreamPool.take_idle`, the exchange's ``idle.pop()``) is only taken by
clusters that send no header, so it never meets a private connection and pays nothing
for them; the exchange decides between the two with one attribute check.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING, Any

from poise.core.backend import Backend, BackendStats
from poise.proxy.deadline import Timeouts
from poise.proxy.dial import connect_error, dial
from poise.proxy.http.accounting import Tries
from poise.proxy.http.upstream import UpstreamConnection
from poise.proxy.proxy_protocol import header_for

if TYPE_CHECKING:
    from collections.abc import Awaitable

    from poise.proxy.http.cluster import ClusterRuntime
    from poise.proxy.http.exchange import Exchange


class UpstreamPool:
    """Idle keep-alive connections to one backend (LIFO, so the warmest is reused).

    ``max_idle`` caps idle connections kept; ``idle_timeout`` closes those unused for
    longer (swept by :meth:`expire`).  ``active`` counts open and opening connections
    (``max_connections`` caps it, None = no cap); a connection released while requests
    wait in the cluster's queue goes to them instead of the idle list.

    ``owned`` maps a client connection to the connection last opened for it with a
    PROXY header (busy or idle; see the module docstring), empty for other clusters.
    """

    __slots__ = ("backend", "stats", "cluster", "pending", "idle", "max_idle", "idle_timeout",
                 "connect_timeout", "response_timeout", "max_connections", "loop", "active",
                 "failing", "requests", "errors", "tries", "owned", "h2", "timeouts")

    def __init__(self, backend: Backend, stats: BackendStats, cluster: ClusterRuntime | None,
                 *, max_idle: int, idle_timeout: float, connect_timeout: float,
                 response_timeout: float, loop: asyncio.AbstractEventLoop,
                 max_connections: int | None = None) -> None:
        self.backend = backend
        self.stats = stats
        self.cluster = cluster
        # The cluster's queue of requests waiting for a connection (shared).
        self.pending: deque[Exchange] = cluster.pending if cluster is not None else deque()
        self.idle: deque[UpstreamConnection] = deque()
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self.response_timeout = response_timeout
        self.max_connections = max_connections
        self.loop = loop
        # The response deadlines of this pool's connections (poise.proxy.deadline).
        self.timeouts = Timeouts(loop)
        self.active = 0
        # The backend's last outcome reported to outlier detection was a failure.
        self.failing = False
        # Tries sent to the backend, and those that failed (connect failure, reset,
        # timeout, malformed or 5xx response), for the control plane.  Here rather than
        # in BackendStats: a native attribute costs the request path next to nothing.
        self.requests = 0
        self.errors = 0
        # Tries by outcome and latency, for metrics (poise.proxy.http.accounting).
        self.tries = Tries()
        self.owned: dict[Any, UpstreamConnection] = {}
        # HTTP/2 clusters: this backend's connections and the requests waiting for one
        # (a poise.proxy.http2.upstream.H2Pool, made on first use), else None.
        self.h2: Any = None

    def take_idle(self) -> UpstreamConnection | None:
        """A pooled connection still open at both ends, or None."""
        idle = self.idle
        while idle:
            conn = idle.pop()
            if conn.usable:
                return conn
            conn.close()
        return None

    def take_owned(self, owner: Any) -> UpstreamConnection | None:
        """The idle connection opened for client connection ``owner`` (its PROXY header
        names that client), taken out of the idle list; or None."""
        conn = self.owned.get(owner)
        if conn is None or not conn.usable:
            return None
        try:
            self.idle.remove(conn)  # (by identity, in C: cheap even for a long list)
        except ValueError:
            return None             # busy, or just opened and not yet attached
        return conn

    def connect(self, timeout: float | None = None,
                owner: Any = None) -> Awaitable[UpstreamConnection]:
        """Start opening a connection, counted against the limits from this call on;
        await the result for the connection (within ``timeout``, default
        ``connect_timeout``), or UpstreamConnectError / UpstreamConnectTimeout.

        ``owner`` is the client connection it is opened for: a cluster that sends PROXY
        headers names its address in the header (none given: ``UNKNOWN``/``LOCAL``),
        and the connection is then private to it."""
        conn = UpstreamConnection(self)
        self.opening()
        return self._open(conn, timeout, owner)

    async def _open(self, conn: UpstreamConnection, timeout: float | None,
                    owner: Any) -> UpstreamConnection:
        b = self.backend
        cluster = self.cluster
        limit = self.connect_timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(limit):
                if cluster is None or (cluster.tls_context is None
                                       and cluster.send_proxy_protocol is None):
                    await self.loop.create_connection(  # type: ignore[type-var]
                        lambda: conn, b.host, b.port)
                else:
                    await self._dial(conn, cluster, owner, limit)
        except BaseException as e:
            if conn.transport is None:  # else its connection_lost does the accounting
                self.closed()
            error = connect_error(e, b.address)
            if error is None:
                raise
            raise error from None
        return conn

    async def _dial(self, conn: UpstreamConnection, cluster: ClusterRuntime,
                    owner: Any, limit: float) -> None:
        """Open ``conn`` with TLS and/or a PROXY header naming ``owner``'s client."""
        b = self.backend
        preamble = b""
        version = cluster.send_proxy_protocol
        if version is not None:
            client, local = owner.addresses() if owner is not None else (None, None)
            preamble = header_for(version, client, local)
            if owner is not None:
                conn.owner = owner
        tls = cluster.tls_context
        await dial(self.loop, lambda: conn, b.host, b.port, tls=tls,
                   server_name=cluster.server_name(b) if tls is not None else None,
                   preamble=preamble, handshake_timeout=limit)
        if owner is not None and version is not None:
            self.owned[owner] = conn

    def opening(self) -> None:
        """A connection is being opened: it counts against the limits from now on."""
        self.active += 1
        cluster = self.cluster
        if cluster is not None and cluster.limits is not None:
            cluster.limits.opened()

    def closed(self) -> None:
        """A connection counted by :meth:`opening` is gone; a queued request may connect."""
        self.active -= 1
        cluster = self.cluster
        if cluster is not None and cluster.limits is not None:
            cluster.limits.closed()
            if self.pending:
                cluster.connection_freed()

    def release(self, conn: UpstreamConnection) -> None:
        """Take back a connection whose exchange completed cleanly."""
        if not conn.usable or len(self.idle) >= self.max_idle:
            conn.close()
            return
        if conn.reading_paused:     # an idle connection must read, to notice a close
            conn.resume_reading()
        cluster = self.cluster
        if self.pending and cluster is not None and cluster.hand_over(self, conn):
            return
        conn.idle_since = self.loop.time()
        self.idle.append(conn)

    def expire(self, now: float) -> None:
        """Close idle connections unused for longer than ``idle_timeout``, and the
        private ones whose client connection has closed (nobody may use them)."""
        idle = self.idle
        cutoff = now - self.idle_timeout
        while idle and idle[0].idle_since < cutoff:
            idle.popleft().close()
        if self.h2 is not None:
            self.h2.expire(now)
        owned = self.owned
        if owned:
            for owner in [o for o in owned if o.closed]:
                conn = owned.pop(owner)
                if conn.exchange is None:
                    conn.close()    # (its connection_lost takes it off the idle list)
                else:
                    conn.usable = False     # closed when its exchange releases it

    def disown(self) -> None:
        """The cluster stopped or started sending PROXY headers: no connection opened
        before may be reused (idle ones close now, busy ones when released)."""
        for conn in self.owned.values():
            conn.usable = False
        self.owned.clear()
        self.close_idle()

    def close_idle(self) -> None:
        while self.idle:
            self.idle.pop().close()
        if self.h2 is not None:
            self.h2.close_idle()

    def __repr__(self) -> str:
        return f"<UpstreamPool {self.backend.address} active={self.active} idle={len(self.idle)}>"
