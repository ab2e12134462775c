"""One request/response exchange, in phase order: route → pick → connect/reuse →
forward request → relay response → finish.

An Exchange starts as the request head being parsed (it *is* a
:class:`~poise.proxy.http.request.RequestHead`), then the client connection feeds it
body bytes and the upstream connection feeds it response events.  Bytes for either
side are collected in a list and written once per read (``flush_upstream`` /
``flush_client``), so a small request or response goes out in one write.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from poise.core import retry
from poise.core.context import RequestContext
from poise.errors import PoiseError, UpstreamProtocolError
from poise.proxy.http import fasthead
from poise.proxy.http.accounting import begin_try, end_try, start_trace
from poise.proxy.http.errors import error_response, status_of
from poise.proxy.http.headers import CRLF, LAST_CHUNK, STATUS_LINES, chunk, status_line
from poise.proxy.http.heads import response_end, upstream_head
from poise.proxy.http.request import RequestHead
from poise.proxy.http.resilience import (
    accept_response,
    admit,
    arm_response_deadline,
    end_exchange,
    fail_try,
    may_connect,
    open_connection,
    resume_from_queue,
    retry_stale,
)
from poise.proxy.http.upgrade import route_websocket
from poise.proxy.http.writer import WRITER
from poise.proxy.http2.upstream import h2_send

if TYPE_CHECKING:
    from poise.proxy.http.downstream import Downstream
    from poise.proxy.http.pool import UpstreamPool
    from poise.proxy.http.router import RouteTarget
    from poise.proxy.http.site import ClusterRuntime
    from poise.proxy.http.upstream import UpstreamConnection

# (Final: a C static when compiled, not a module dict lookup per call.)
monotonic: Final = fasthead.clock      # (time.monotonic's clock)
join_parts: Final[Any] = fasthead.join_parts
IDEMPOTENT: Final = fasthead.shared(method.encode() for method in retry.IDEMPOTENT)
# Request bytes kept for a re-send on a fresh connection (stale keep-alive); beyond
# this the request is not replayable.
REPLAY_LIMIT: Final = 64 * 1024
# Request body buffered while no upstream connection is attached, before the client
# connection stops reading.
BUFFER_LIMIT: Final = 64 * 1024
BUFFERING: Final = 4   # Downstream read-blocking reason
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
_SWITCHING: Final = b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\n"
# ``_replay`` of a replayable request that has kept no body bytes yet (most have none:
# GET): shared, never appended to (``_keep`` makes the request its own list first).
_NOTHING_KEPT: Final[list[bytes]] = []


class Exchange(RequestHead):
    """The life of one request. Created by its Downstream when a request begins."""

    __slots__ = (
        "client", "cluster", "method", "target", "http11", "keep_alive", "head_only",
        "request_complete", "pool", "conn", "_up_out", "_up_size", "_replay",
        "_replay_size", "_replay_limit", "_retried", "response_started", "response_head_sent",
        "_wrote_client", "until_close", "_chunk_out", "_out", "_body_seen", "finished",
        "_counted", "_ctx", "_started_at", "_held", "_tried", "_deadline_at", "_timer",
        "connecting", "began", "status", "bytes_sent", "attempts", "_try_began", "route_name",
        "trace", "ended", "websocket", "raw_body", "trailers",
    )
    # Set once routed and picked (start): unset until then.
    cluster: ClusterRuntime
    pool: UpstreamPool
    method: bytes
    target: bytes
    http11: bool
    keep_alive: bool
    head_only: bool
    _replay: list[bytes] | None
    _started_at: float
    _timer: Any

    def __init__(self, client: Downstream, max_body: int,
                 fields: list[bytes] | None = None) -> None:
        # RequestHead's slots (``fields``: the head's fields when the C parser has
        # sorted them already, else none yet)
        self.fields: list[bytes] = [] if fields is None else fields
        self.host: bytes | None = None
        self.content_length = -1
        self.chunked = self.te = self.expect_continue = False
        self.upgrade: bytes | None = None
        self.xff: bytes | None = None
        self.connection: list[bytes] | None = None
        self.max_body = max_body
        self.client = client
        self.conn: UpstreamConnection | None = None
        self.request_complete = False
        self._up_out: list[bytes] = []
        self._up_size = 0
        self._replay_size = 0
        self._replay_limit = REPLAY_LIMIT
        self._retried = False
        self.response_started = False     # an upstream byte arrived
        self.response_head_sent = False   # a response head is queued or sent
        self._wrote_client = False        # response bytes actually went to the client
        self.until_close = False
        self._chunk_out = False
        self._out: list[bytes] = []
        self._body_seen = 0
        self.finished = False
        self._counted = False
        self._ctx: RequestContext | None = None
        # For poise.proxy.http.resilience: slots held in the cluster's limits (bit
        # flags), backends tried and failed, the request deadline and the queue/backoff
        # timer.
        self._held = 0
        self._tried: list[UpstreamPool] | None = None
        self._deadline_at: float | None = None
        self._timer = None      # an asyncio.TimerHandle
        self.connecting = False     # a connection is being opened for it
        # For metrics, the access log and tracing (poise.proxy.http.accounting): when
        # the request began, the status sent (0: none yet), response bytes written,
        # tries, when the current try began (0: not timed), the cluster routed to
        # ("" none; None: not started) and the request's trace (None: not traced).
        self.began = monotonic()
        self.status = 0
        self.bytes_sent = 0
        self.attempts = 0
        self._try_began = 0.0
        self.route_name: str | None = None
        self.trace: Any = None
        self.ended = 0.0        # when the response ended (0: read the clock when needed)
        # A WebSocket handshake: upgrade.WEBSOCKET until routed, then the route's
        # settings (config.model.WebSocket); None: an ordinary request.
        self.websocket: Any = None
        # The body goes to the backend as it came, unframed (an HTTP/2 backend: DATA
        # frames; set when routed); and the response's trailer fields (flat, as
        # ``fields``), relayed at its end where the client's protocol can carry them.
        self.raw_body = False
        self.trailers: list[bytes] | None = None

    def head_complete(self, method: bytes, target: bytes, http11: bool,
                      keep_alive: bool) -> None:
        """The request head is complete: check it (``finish_head``), then record it."""
        self.finish_head(http11)
        self.method = method
        self.target = target
        self.http11 = http11
        self.keep_alive = keep_alive
        self.head_only = method == b"HEAD"
        # Body bytes kept for a re-send (the head is rebuilt); None: never re-sent.
        self._replay = _NOTHING_KEPT if method in IDEMPOTENT else None

    # -- phase 1: route and pick ---------------------------------------------------------

    def start(self) -> None:
        """Route, apply the route's rate limits, then :meth:`proceed`."""
        site = self.client.site
        self.route_name = ""
        if site.tracer is not None:
            start_trace(self, site.tracer)
        try:
            router = site.router if site.sni_routers is None else site.router_for(
                self.client.sni)
            target: RouteTarget | None = router.catch_all
            if target is None:
                target = router.route(self.method, self.target, self.host, self.pairs())
            cluster = self.cluster = target.cluster
            self.route_name = cluster.name
            if cluster.h2:
                self.raw_body = True
                self.websocket = None   # (no Upgrade over HTTP/2: a plain request)
            elif self.websocket is not None:
                route_websocket(self, target)
            limits = target.limits
            if limits is not None and not limits.check(self, 0, self.began):
                return      # a global limit asks Redis first: it calls proceed()
        except PoiseError as e:
            self.respond_error(e)
            return
        self.proceed()

    def proceed(self) -> None:
        """Admit (cluster limits), pick a backend, then send."""
        cluster = self.cluster
        try:
            if cluster.guarded:
                admit(self, cluster)
            pool = self.pool = cluster.choose(self)
        except PoiseError as e:
            self.respond_error(e)
            return
        self._up_out.insert(0, upstream_head(self))
        self._send(pool)

    def _send(self, pool: UpstreamPool) -> None:
        """Count the attempt on ``pool``'s backend and attach an idle upstream
        connection, or open one (or wait in the queue when a limit is reached)."""
        self.pool = pool
        pool.stats.in_flight += 1
        pool.requests += 1
        self._counted = True
        cluster = self.cluster
        if cluster.load_changed is not None:
            cluster.load_changed(pool.backend)
        if cluster.observe is not None:
            self._started_at = self.client.loop.time()
        if cluster.h2:
            h2_send(self, pool)
            return
        if cluster.send_proxy_protocol is None:
            conn = pool.pop_idle() if pool.idle else None
            if conn is not None and not conn.usable:
                conn.close()
                conn = pool.take_idle()
        else:   # connections name their client: only this client's may be reused
            conn = pool.take_owned(self.client.owner())
        if conn is not None:
            conn.reused = True
            begin_try(self)
            self._attach(conn, self._try_began)
        elif cluster.limits is None or may_connect(self):
            begin_try(self)
            open_connection(self)

    def context(self) -> RequestContext:
        """The request as balancing policies see it (built only for those that look)."""
        if self._ctx is None:
            self._ctx = RequestContext(self.client.peer_ip.decode(), self.target, self.method,
                                       self.pairs())
        return self._ctx

    def _observe(self, ok: bool) -> None:
        """Report this attempt's latency and outcome to a latency-aware policy."""
        observe = self.cluster.observe
        assert observe is not None      # (called only when the policy observes)
        observe(self.pool.backend, self.client.loop.time() - self._started_at, ok)

    # -- phase 2: connection (opening one, with failover: resilience.open_connection) ---

    def _attach(self, conn: UpstreamConnection, now: float = 0.0) -> None:
        """Send on ``conn`` (``now``: as for Deadline.push)."""
        self.conn = conn
        conn.exchange = self
        if self.request_complete:   # else request_done starts the response deadline
            if self._deadline_at is None:
                conn.deadline.push(conn.pool.response_timeout, now)
            else:
                arm_response_deadline(self, conn)
        client = self.client
        if client.write_paused:
            conn.pause_reading()
        if self._up_size > BUFFER_LIMIT:
            client.unblock_reading(BUFFERING)

    def dequeued(self, conn: UpstreamConnection | None) -> None:
        """Our turn in the cluster's queue: use ``conn`` (released by a finished
        request), or connect."""
        resume_from_queue(self, conn)

    # -- phase 3: forward the request ----------------------------------------------------

    def request_body(self, data: bytes) -> None:
        """Body bytes from the client (de-chunked); re-framed for the backend."""
        self._body_seen += len(data)
        if self.chunked:
            if self._body_seen > self.max_body:
                self.client.reject_body("chunked body exceeds max_request_body")
                return
            if not self.raw_body:
                data = chunk(data)
        self._up_out.append(data)
        self._up_size += len(data)
        if self._replay is not None:
            self._keep(data)
            self._replay_size += len(data)
            if self._replay_size > self._replay_limit:
                self._replay = None
        if self.conn is None and self._up_size > BUFFER_LIMIT:
            self.client.block_reading(BUFFERING)

    def request_done(self, now: float = 0.0) -> None:
        """The whole request has been read; the backend's response deadline starts
        (``now``: as for Deadline.push, a clock reading taken in this same call)."""
        self.request_complete = True
        conn = self.conn
        if conn is not None:
            if self._deadline_at is None:
                conn.deadline.push(conn.pool.response_timeout, now)
            else:
                arm_response_deadline(self, conn)
        if self.raw_body:
            self._up_out.append(b"")    # (so that a flush tells the backend it ended)
        elif self.chunked:
            self._up_out.append(LAST_CHUNK)
            if self._replay is not None:
                self._keep(LAST_CHUNK)

    def _keep(self, data: bytes) -> None:
        """Keep request body bytes for a re-send (``_replay`` is not None)."""
        replay = self._replay
        if replay is _NOTHING_KEPT or replay is None:
            replay = self._replay = []
        replay.append(data)

    def flush_upstream(self) -> None:
        """Write what the client sent since the last flush, if a connection is attached."""
        conn = self.conn
        out = self._up_out
        if conn is None or not out:
            return
        WRITER.write(conn.transport, out[0] if len(out) == 1 else join_parts(out))
        out.clear()
        self._up_size = 0

    # -- phase 4: relay the response -----------------------------------------------------

    def on_informational(self, status: int, fields: list[bytes]) -> None:
        if status == 101:
            conn = self.conn
            assert conn is not None         # (its parser reports this)
            if self.websocket is not None and not self.response_head_sent:
                # Sent when the parser stops after it (UpstreamConnection: the tunnel).
                self.status = 101
                self.response_head_sent = True
                self._out.append(_SWITCHING + b"".join(fields) + b"upgrade: " +
                                 (self.upgrade or b"websocket") + CRLF + CRLF)
                return
            conn.close()        # only a WebSocket handshake is forwarded with Upgrade
            self.upstream_failed(conn, UpstreamProtocolError("unexpected 101 from backend"))
        elif status == 100:
            if self.expect_continue and not self.response_head_sent:
                self._out.append(_CONTINUE)
        elif self.http11:
            self._out.append(status_line(status) + b"".join(fields) + CRLF)

    def on_response_head(self, status: int, fields: list[bytes], has_length: bool,
                         chunked: bool) -> None:
        """The backend's final response head; ``fields`` are its end-to-end header
        lines (flat name, ": ", value, CRLF groups)."""
        if not accept_response(self, status, fields):
            return
        client = self.client
        close = (not self.keep_alive or not self.request_complete
                 or (client.draining and not client.queue))
        if not has_length and not (self.head_only or status == 204 or status == 304):
            self.until_close = not chunked
            if self.http11:
                self._chunk_out = True
            else:
                close = True        # HTTP/1.0 client: the end of the body is the close
        if close:
            self.keep_alive = False
        # (Joined with the body when written: flush_client, end_response.)
        out = self._out
        line = STATUS_LINES.get(status)
        out.append(line if line is not None else status_line(status))
        out += fields
        out.append(response_end(close, self._chunk_out, self.http11))
        self.response_head_sent = True

    def flush_client(self) -> None:
        out = self._out
        if out:
            client = self.client
            if not client.closed:
                data = out[0] if len(out) == 1 else join_parts(out)
                WRITER.write(client.transport, data)
                self.bytes_sent += len(data)
                self._wrote_client = True
            out.clear()

    # -- phase 5: finish ------------------------------------------------------------------

    def on_response_complete(self, conn: UpstreamConnection) -> None:
        """The backend's response is complete: flush, recycle the connection, finish."""
        self.end_response()
        client = self.client
        self.conn = None
        self.finished = True
        # One clock read for the try's end and the request's (0: none needed).
        ended = 0.0
        if client.site.counting:
            ended = self.ended = monotonic()
        end_try(self, self.status, None, ended)
        end_exchange(self)
        if self.request_complete and conn.usable:
            self.pool.release(conn, ended)
        else:
            conn.close()
        client.exchange_done(self)

    def end_response(self) -> None:
        """Send the rest of the response and its end."""
        out = self._out
        if self._chunk_out:
            trailers = self.trailers
            out.append(LAST_CHUNK if trailers is None
                       else b"0\r\n" + b"".join(trailers) + CRLF)
        client = self.client
        if out and not client.closed:
            data = out[0] if len(out) == 1 else join_parts(out)
            WRITER.write(client.transport, data)
            self.bytes_sent += len(data)
            self._wrote_client = True

    def respond_error(self, error: BaseException) -> None:
        """Answer with the status for ``error`` (before any response byte was sent).
        The connection stays open unless body bytes we did not read may follow."""
        body_pending = not self.request_complete and (self.content_length > 0 or self.chunked)
        client = self.client
        close = not self.keep_alive or body_pending or (client.draining and not client.queue)
        self.keep_alive = not close
        extra = error.headers if isinstance(error, PoiseError) else b""
        self.status = status_of(error)
        self._out.append(error_response(self.status, close, self.head_only, extra))
        self.response_head_sent = True
        self.flush_client()
        self._finish()

    def _finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        end_exchange(self)
        self.client.exchange_done(self)

    def _uncount(self) -> None:
        """This request no longer counts as in flight on its backend."""
        if self._counted:
            self._counted = False
            self.pool.stats.in_flight -= 1
            if self.cluster.load_changed is not None:
                self.cluster.load_changed(self.pool.backend)

    # -- failures ------------------------------------------------------------------------

    def upstream_lost(self, conn: UpstreamConnection, error: PoiseError) -> None:
        """The connection closed under us. A reused connection that died before any
        response byte is retried once on a fresh one, when the request is replayable."""
        if not retry_stale(self, conn):
            self.upstream_failed(conn, error)

    def upstream_failed(self, conn: UpstreamConnection | None, error: PoiseError) -> None:
        """This try failed with ``error`` (``conn``, if any, is closed): retry it, or
        answer the client (502/503/504), or cut off a response already begun."""
        fail_try(self, conn, error)

    def abandon(self) -> None:
        """The client went away: drop the upstream side without reusing it."""
        if self.finished:
            return
        self.finished = True
        self._try_began = 0.0       # (not the backend's failure: not counted as a try)
        end_exchange(self)
        conn = self.conn
        if conn is not None:
            self.conn = None
            conn.abort()

    def __repr__(self) -> str:
        method = getattr(self, "method", b"?").decode()
        target = getattr(self, "target", b"?")[:60].decode(errors="replace")
        return f"<Exchange {method} {target} upstream={self.conn!r} done={self.finished}>"
