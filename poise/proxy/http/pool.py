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

An idle connection unused for ``park_after`` seconds is *parked*
(:mod:`poise.proxy.http.parking`): its transport is dropped and only its socket's file
descriptor stays, in ``parked``, until :meth:`UpstreamPool.connect` revives it.  Only
plain HTTP/1.1 connections are parked (the cluster sets ``park_after`` to 0 for the
others: a TLS connection's state lives in its transport, a private one waits for one
client, HTTP/2 pools keep their own connections).
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections import deque
from typing import TYPE_CHECKING, Any

from poise.core.backend import Backend, BackendStats
from poise.proxy.deadline import Timeouts
from poise.proxy.dial import connect_error, dial
from poise.proxy.http.accounting import Tries
from poise.proxy.http.parking import lot_for
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

    ``parked`` holds the file descriptors of parked connections, oldest first, and
    ``parked_since`` (in step) when each was last released.  A parked connection is
    still an open connection to the backend: it counts in ``active`` (so in the
    connection limits), in ``stats.active_connections`` and, with the warm idle ones,
    against ``max_idle`` and ``idle_timeout``.  ``park_after`` (seconds; 0, the default,
    parks nothing) is set by the cluster (``keepalive_park_after``).
    """

    __slots__ = ("backend", "stats", "cluster", "pending", "idle", "push_idle", "pop_idle",
                 "max_idle", "idle_timeout",
                 "connect_timeout", "response_timeout", "max_connections", "loop", "active",
                 "failing", "requests", "errors", "tries", "owned", "h2", "timeouts",
                 "parked", "parked_since", "park_after")

    def __init__(self, backend: Backend, stats: BackendStats, cluster: ClusterRuntime | None,
                 *, max_idle: int, idle_timeout: float, connect_timeout: float,
                 response_timeout: float, loop: asyncio.AbstractEventLoop,
                 max_connections: int | None = None) -> None:
        self.backend = backend
        self.stats = stats
        self.cluster = cluster
        # The cluster's queue of requests waiting for a connection (shared).
        self.pending: deque[Exchange] = cluster.pending if cluster is not None else deque()
        # Oldest released first.  The request path calls ``push_idle`` and ``pop_idle``,
        # its append and pop bound once (no method lookup per request).
        self.idle: deque[UpstreamConnection] = deque()
        self.push_idle = self.idle.append
        self.pop_idle = self.idle.pop
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
        # (Two deques of plain numbers: a parked connection keeps no object of its own.)
        self.parked: deque[int] = deque()
        self.parked_since: deque[float] = deque()
        self.park_after = 0.0

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
        and the connection is then private to it.

        With parked connections, the one parked last is revived instead (no new
        connection: nothing more counts against the limits); it is ``reused``, as a
        pooled connection is, so a request it fails before any response byte is sent
        again once (parked connections are of clusters without PROXY headers, so
        ``owner`` does not matter to them)."""
        if self.parked:
            return self._revive(timeout)
        conn = UpstreamConnection(self)
        self.opening()
        return self._open(conn, timeout, owner)

    def _revive(self, timeout: float | None) -> Awaitable[UpstreamConnection]:
        """Take the warmest parked descriptor out of the lot (now, so that no other
        request takes it) and start making a transport around it."""
        fd = self._take_parked(newest=True)
        lot_for(self.loop).unpark(fd)
        # (The socket object owns the descriptor until uvloop takes it over, which
        # detaches it when the transport closes: closed exactly once either way.)
        sock = socket.socket(fileno=fd)
        # connection_made counts it again (it stayed counted while parked).
        self.stats.active_connections -= 1
        conn = UpstreamConnection(self)
        conn.reused = True
        return self._open(conn, timeout, None, sock)

    async def _open(self, conn: UpstreamConnection, timeout: float | None,
                    owner: Any, sock: socket.socket | None = None) -> UpstreamConnection:
        """Connect ``conn`` (or, with ``sock``, a revived parked socket: no handshake)."""
        b = self.backend
        cluster = self.cluster
        limit = self.connect_timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(limit):
                if sock is not None:
                    await self.loop.create_connection(  # type: ignore[type-var]
                        lambda: conn, sock=sock)
                elif cluster is None or (cluster.tls_context is None
                                         and cluster.send_proxy_protocol is None):
                    await self.loop.create_connection(  # type: ignore[type-var]
                        lambda: conn, b.host, b.port)
                else:
                    await self._dial(conn, cluster, owner, limit)
        except BaseException as e:
            if conn.transport is None:  # else its connection_lost does the accounting
                if sock is not None:
                    sock.close()        # (no-op when uvloop closed and detached it)
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

    def release(self, conn: UpstreamConnection, now: float = 0.0) -> None:
        """Take back a connection whose exchange completed cleanly (``now``: a clock
        reading taken just now, as for Timeouts.now, or 0.0)."""
        if not conn.usable or len(self.idle) + len(self.parked) >= self.max_idle:
            conn.close()
            return
        if conn.reading_paused:     # an idle connection must read, to notice a close
            conn.resume_reading()
        cluster = self.cluster
        if self.pending and cluster is not None and cluster.hand_over(self, conn):
            return
        conn.idle_since = self.timeouts.now(now)
        self.push_idle(conn)

    def expire(self, now: float) -> None:
        """Close idle connections (warm or parked) unused for longer than
        ``idle_timeout``, and the private ones whose client connection has closed
        (nobody may use them); then park those unused for longer than ``park_after``."""
        idle = self.idle
        cutoff = now - self.idle_timeout
        while idle and idle[0].idle_since < cutoff:
            idle.popleft().close()
        since = self.parked_since
        while since and since[0] < cutoff:
            self._close_parked(self._take_parked(newest=False))
        if self.park_after > 0.0 and idle:
            self._park_idle(now - self.park_after)
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

    def _park_idle(self, cutoff: float) -> None:
        """Park the idle connections released before ``cutoff`` (the oldest are at the
        left of ``idle``, and older than any warm one are parked already, so
        ``parked`` stays in release order)."""
        idle = self.idle
        lot = lot_for(self.loop)
        while idle and idle[0].idle_since < cutoff:
            conn = idle.popleft()
            transport = conn.transport
            if not conn.usable or transport is None or transport.get_write_buffer_size():
                conn.close()        # (closing, or out of step: not worth keeping)
                continue
            fd = -1
            try:
                # (uvloop's socket here is a stand-in that does not own the descriptor.)
                fd = os.dup(transport.get_extra_info("socket").fileno())
                lot.park(self, fd)
            except OSError:         # out of descriptors: stays warm until the next sweep
                if fd >= 0:
                    os.close(fd)
                idle.appendleft(conn)
                return
            # Its transport goes, its socket stays open through ``fd``: the abort closes
            # only uvloop's descriptor, so the backend sees neither FIN nor RST, and
            # connection_lost counts nothing for a parked connection.
            conn.parked = True
            conn.usable = False
            # The object is done with: let it go as soon as uvloop does (after the
            # abort's connection_lost).  Its deadline and its parser (if made) call
            # back into it, cycles that only a full garbage collection would free,
            # seconds or minutes later (with the transport it refers to): cut them.
            conn.deadline.detach()
            transport.abort()
            conn.transport = None
            conn.parser = None
            self.parked.append(fd)
            self.parked_since.append(conn.idle_since)

    def parked_closed(self, fd: int) -> None:
        """The parking lot closed parked descriptor ``fd`` (the backend closed the
        connection, reset it or sent bytes unasked): account for it as for an idle
        connection that closed."""
        i = self.parked.index(fd)
        del self.parked[i]
        del self.parked_since[i]
        self._parked_gone()

    def _take_parked(self, newest: bool) -> int:
        """The newest (or oldest) parked descriptor, taken out of ``parked``."""
        if newest:
            self.parked_since.pop()
            return self.parked.pop()
        self.parked_since.popleft()
        return self.parked.popleft()

    def _close_parked(self, fd: int) -> None:
        """Close parked descriptor ``fd``, already taken out of ``parked``."""
        lot_for(self.loop).discard(fd)
        self._parked_gone()

    def _parked_gone(self) -> None:
        self.stats.active_connections -= 1
        self.closed()

    def close_oldest_parked(self) -> None:
        """Close the connection parked longest (there must be one)."""
        self._close_parked(self._take_parked(newest=False))

    def disown(self) -> None:
        """The cluster stopped or started sending PROXY headers: no connection opened
        before may be reused (idle ones close now, busy ones when released)."""
        for conn in self.owned.values():
            conn.usable = False
        self.owned.clear()
        self.close_idle()

    def close_idle(self) -> None:
        """Close every idle connection, warm and parked."""
        while self.idle:
            self.idle.pop().close()
        self.close_parked()
        if self.h2 is not None:
            self.h2.close_idle()

    def close_parked(self) -> None:
        """Close every parked connection (e.g. the cluster now uses TLS: a parked
        descriptor would be revived in the clear)."""
        while self.parked:
            self._close_parked(self._take_parked(newest=True))

    def __repr__(self) -> str:
        parked = f" parked={len(self.parked)}" if self.parked else ""
        return (f"<UpstreamPool {self.backend.address} active={self.active} "
                f"idle={len(self.idle)}{parked}>")
