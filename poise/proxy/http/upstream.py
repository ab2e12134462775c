"""Per-backend keep-alive connection pools and the upstream HTTP/1.1 connection.

An :class:`UpstreamConnection` serves one exchange at a time.  Its parser callbacks
only record what happened; :meth:`UpstreamConnection.data_received` acts on it after
the parser returns, so a connection is never handed to the next request while its
parser is still running.

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
import logging
from collections import deque
from typing import TYPE_CHECKING, Any, Final

import httptools

from poise.core.backend import Backend, BackendStats
from poise.errors import (
    UpstreamProtocolError,
    UpstreamReset,
    UpstreamTimeout,
)
from poise.proxy.deadline import Deadline, Timeouts
from poise.proxy.dial import connect_error, dial
from poise.proxy.http import fasthead
from poise.proxy.http.accounting import Tries
from poise.proxy.http.headers import CRLF, HOP_BY_HOP, body_slice, chunk, drop_listed
from poise.proxy.http.tunnel import open_tunnel
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


class UpstreamConnection:
    """One keep-alive connection to a backend, parsing responses with httptools."""

    __slots__ = ("pool", "transport", "exchange", "parser", "usable", "reused", "_slow",
                 "_body_left",
                 "reading_paused", "idle_since", "deadline", "owner", "_fields", "_has_length",
                 "_te", "_connection", "_done", "_head_only", "_keep_alive", "_status")

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.transport: Any = None     # an asyncio.Transport once connected
        self.exchange: Exchange | None = None
        # The client connection this one is private to (it began with a PROXY header
        # naming that client), or None: shared.
        self.owner: Any = None
        # httptools, created when a response first needs it (see _read_slow).
        self.parser: Any = None
        # Whether httptools owns the response being read (else the one-call head
        # parser, fasthead, reads the next head), and the Content-Length body bytes
        # the fast path still expects.
        self._slow = parse_response is None
        self._body_left = 0
        self.usable = False
        self.reused = False
        self.reading_paused = False
        self.idle_since = 0.0
        self.deadline = Deadline(pool.timeouts, self._timed_out)
        self._fields: list[bytes] = []    # name, ": ", value, CRLF — hop-by-hop dropped
        self._has_length = False
        self._te: bytes | None = None
        self._connection: list[bytes] | None = None
        self._done = False          # the response (or a HEAD's head) is complete
        self._head_only = False     # ended at the head: reset the parser afterwards
        self._keep_alive = False
        self._status = 0

    # -- asyncio callbacks -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (With TLS: after the handshake, and ``transport`` is the TLS one.  uvloop
        # sets TCP_NODELAY on the TCP socket itself: asking for the "socket" here
        # would make it keep a socket object per connection.)
        self.transport = transport
        self.usable = True
        self.pool.stats.active_connections += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.usable = False
        pool = self.pool
        pool.stats.active_connections -= 1
        self.deadline.cancel()
        ex = self.exchange
        if ex is None:
            # Closed while idle: out of the idle list now, so that it neither counts
            # against max_idle nor is picked to make room under a connection limit.
            try:
                pool.idle.remove(self)
            except ValueError:
                pass
        owner = self.owner
        if owner is not None and pool.owned.get(owner) is self:
            del pool.owned[owner]
        pool.closed()
        if ex is not None:
            self.exchange = None
            ex.upstream_lost(self, UpstreamReset(f"{pool.backend.address} closed the connection"))

    def eof_received(self) -> bool:
        self.usable = False
        ex = self.exchange
        if ex is not None and ex.until_close and not self._done:
            # A response delimited by connection close ends here.
            self._done = True
            self._keep_alive = False
            self._response_done(ex)
        return False

    def data_received(self, data: bytes) -> None:
        ex = self.exchange
        if ex is None:              # bytes nobody asked for: the connection is unsafe
            self.close()
            return
        ex.response_started = True
        if self._slow:
            self._read_slow(ex, data)
            return
        if self._body_left:
            self._fast_body(ex, data, 0)
        else:
            head = parse_response(data, 0)
            if head is None or not self._fast_head(ex, head, data):
                self._slow = True
                self._read_slow(ex, data)
                return
        if self.exchange is not ex:     # the exchange dropped this response to retry
            self.close()
        elif self._done:
            self._response_done(ex)     # flushes too
        elif ex._out:
            ex.flush_client()

    def _fast_head(self, ex: Exchange, head: tuple[int, bool, bool, list[bytes], int, int],
                   data: bytes) -> bool:
        """A response head from fasthead.parse_response: what on_header and
        on_headers_complete do for httptools, in one go; then the body bytes in
        ``data``.  False (nothing done) for a body delimited by the connection's close,
        which httptools reads."""
        status, http11, keep_alive, headers, body_start, length = head
        if ex.head_only or status == 204 or status == 304:
            length = 0
        elif length < 0:
            return False
        fields: list[bytes] = []
        has_length = False
        for i in range(0, len(headers), 2):
            name = headers[i]
            if (name[0] | 0x20) in _WATCH_FIRST:
                low = name.lower()
                if low in HOP_BY_HOP:
                    continue    # (fasthead takes no Connection list, Transfer-Encoding)
                if low == b"content-length":
                    has_length = True
            fields += (name, b": ", headers[i + 1], CRLF)
        self._status = status
        self.deadline.clear()
        self._keep_alive = keep_alive
        ex.on_response_head(status, fields, has_length, False)
        if self.exchange is not ex:
            return True
        if length:
            self._body_left = length
            if body_start < len(data):
                self._fast_body(ex, data, body_start)
        else:
            self._done = True
            if body_start < len(data):
                self.usable = False     # bytes after the response: out of sync
        return True

    def _fast_body(self, ex: Exchange, data: bytes, pos: int) -> None:
        """Content-Length body bytes from ``data[pos:]``."""
        body, end = body_slice(data, pos, self._body_left)
        if end < len(data):
            self.usable = False         # bytes after the response: out of sync
        left = self._body_left = self._body_left - (end - pos)
        ex._out.append(chunk(body) if ex._chunk_out else body)
        if not left:
            self._done = True

    def _read_slow(self, ex: Exchange, data: bytes) -> None:
        """Parse ``data`` with httptools (callbacks below)."""
        parser = self.parser
        if parser is None:
            parser = self.parser = httptools.HttpResponseParser(self)
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            # A 101: to a WebSocket handshake, the relay starts (what follows the head
            # is the backend's first frames); else on_informational refused it.
            if ex.status == 101 and self.exchange is ex:
                open_tunnel(ex, self, data[e.args[0]:])
                return
            self.usable = False
            if not self._done:
                self.close()
                if self.exchange is ex:
                    ex.upstream_failed(self, UpstreamProtocolError("unexpected 101"))
            return
        except httptools.HttpParserError as e:
            self.usable = False
            if self.exchange is not ex:     # the exchange has already dealt with it
                self.close()
                return
            if isinstance(e, httptools.HttpParserCallbackError) and e.__context__ is not None:
                log.error("bug while relaying a response", exc_info=e.__context__)
            if not self._done:
                self.close()
                ex.upstream_failed(self, UpstreamProtocolError(f"malformed response: {e}"))
                return
        if self.exchange is not ex:     # the exchange dropped this response to retry
            self.close()
            return
        if self._done:
            self._response_done(ex)     # flushes too
        elif ex._out:
            ex.flush_client()

    def pause_reading(self) -> None:
        """The client cannot take more of the response: stop reading it."""
        if not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused:
            self.reading_paused = False
            if not self.transport.is_closing():
                self.transport.resume_reading()

    def pause_writing(self) -> None:
        ex = self.exchange
        if ex is not None:
            ex.client.block_reading(UPSTREAM_FULL)

    def resume_writing(self) -> None:
        ex = self.exchange
        if ex is not None:
            ex.client.unblock_reading(UPSTREAM_FULL)

    # -- parser callbacks: record, don't act ------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        # Only names starting with c/k/p/t/u can be hop-by-hop or Content-Length:
        # the rest skip lower-casing.
        if (name[0] | 0x20) in _WATCH_FIRST:
            low = name.lower()
            if low in HOP_BY_HOP:
                if low == b"transfer-encoding":
                    self._te = value
                elif low == b"connection" and value.lower() not in _PLAIN_CONNECTION:
                    self._connection = (self._connection or []) + [value]
                return
            if low == b"content-length":
                self._has_length = True
        self._fields += (name, b": ", value, CRLF)

    def on_headers_complete(self) -> None:
        ex = self.exchange
        fields = self._fields
        self._fields = []
        if ex is None:
            return
        status = self._status = self.parser.get_status_code()
        if self._connection is not None:
            fields = drop_listed(fields, self._connection)
            self._connection = None
        if 100 <= status < 200:
            self._has_length = False
            self._te = None
            ex.on_informational(status, fields)
            return
        self.deadline.clear()
        self._keep_alive = self.parser.should_keep_alive()
        te, self._te = self._te, None
        has_length, self._has_length = self._has_length, False
        chunked = te is not None and te.rstrip().lower().endswith(b"chunked")
        ex.on_response_head(status, fields, has_length, chunked)
        if ex.head_only:
            self._head_only = self._done = True

    def on_body(self, body: bytes) -> None:
        ex = self.exchange
        if ex is None or self._done:
            self.usable = False     # body bytes after a HEAD response: out of sync
            return
        ex._out.append(chunk(body) if ex._chunk_out else body)

    def on_message_complete(self) -> None:
        if self._done or self._status < 200:
            return                  # end of an informational response or of a HEAD's head
        self._done = True

    # -- decisions ---------------------------------------------------------------------

    def _response_done(self, ex: Exchange) -> None:
        if self._head_only:
            self.parser = None      # (it expects a body that never comes: a new one)
            self._head_only = False
        # The next response starts at a message boundary, which the fast path takes.
        self._slow = parse_response is None
        self.exchange = None
        self._done = False
        if not self._keep_alive:
            self.usable = False
        ex.on_response_complete(self)

    def _timed_out(self) -> None:
        ex = self.exchange
        self.close()
        if ex is not None:
            self.exchange = None
            ex.upstream_failed(self, UpstreamTimeout(
                f"no response head from {self.pool.backend.address} "
                f"within {self.pool.response_timeout:g}s"))

    def close(self) -> None:
        self.usable = False
        self.deadline.cancel()
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.usable = False
        self.exchange = None
        if self.transport is not None:
            self.transport.abort()

    def __repr__(self) -> str:
        state = "busy" if self.exchange else ("idle" if self.usable else "closed")
        return f"<UpstreamConnection {self.pool.backend.address} {state}>"


log = logging.getLogger("poise")

# Reasons a client connection stops reading (bit flags, see ClientConnection).
UPSTREAM_FULL: Final = 1
# First letters (lower-cased) of the hop-by-hop names and of Content-Length.
_WATCH_FIRST: Final = frozenset(b"ckptu")
# Connection values that nominate no other header (the common case, skipped cheaply).
# The one-call head parser, or None (Final: a C static when compiled).
parse_response: Final[Any] = fasthead.parse_response
_PLAIN_CONNECTION: Final = frozenset({b"keep-alive", b"close"})
