"""An HTTP/2 client connection: frames ↔ streams, flow control and abuse limits.

The codec is ``jh2`` (h2's API with a Rust HPACK; plain ``h2`` when jh2 is missing).
Each request stream becomes an :class:`~poise.proxy.http.h2stream.H2Exchange`, which
goes through the same routing, balancing, limits and upstream pools as an HTTP/1.x
request; this module only turns frames into its calls and its response into frames.

Bounded memory, both ways:

- *request bodies*: a stream may receive ``initial_stream_window`` bytes ahead of what
  the backend took.  Its WINDOW_UPDATEs are withheld while its exchange stops reading
  (backend connection not attached yet, or its write buffer full), so a client can
  never push more; the connection window is granted back as bytes arrive (the stream
  windows are the bound: ``max_concurrent_streams × initial_stream_window``).
- *responses*: what the client's flow-control window does not let through waits in
  the stream, and beyond ``PENDING_HIGH`` bytes the backend connection stops being
  read.  A stream that stays blocked on a zero window for ``client_idle_timeout`` is
  reset and its backend connection closed.

Abuse (RFC 9113 §10.5 and the 2023 "rapid reset", CVE-2023-44487): streams beyond
``max_concurrent_streams`` are refused (REFUSED_STREAM); a client that resets most of
the streams it opens (over ``RAPID_RESETS``), or floods PING/SETTINGS
(``CONTROL_PER_SECOND``) or empty DATA frames, gets GOAWAY ENHANCE_YOUR_CALM and the
connection is closed; CONTINUATION floods are bounded by the codec (64 frames);
protocol errors get the codec's GOAWAY with the right code.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from poise.errors import PoiseError
from poise.proxy.http.h2stream import H2Exchange, H2Stream
from poise.proxy.http2.codec import (
    ENHANCE_YOUR_CALM,
    NO_ERROR,
    PROTOCOL_ERROR,
    REFUSED_STREAM,
    ProtocolError,
    StreamClosedError,
    events,
    go_away,
    server_connection,
    uncap_streams,
)
from poise.proxy.http2.request import Malformed, fill_request
from poise.proxy.http2.responses import ResponseFrames
from poise.proxy.proxy_protocol import connection_addresses

if TYPE_CHECKING:
    from poise.proxy.http.protocol import ClientConnection

log = logging.getLogger("poise")

# PING and SETTINGS frames (each) a client may send per second; empty DATA frames
# (no END_STREAM) it may send per stream.
CONTROL_PER_SECOND = 100
EMPTY_DATA_PER_STREAM = 100


class H2Session(ResponseFrames, asyncio.Protocol):
    """One client connection speaking HTTP/2 (after :meth:`adopt`)."""

    @classmethod
    def adopt(cls, client: ClientConnection, data: bytes) -> H2Session:
        """Take over ``client``'s connection (accepted, counted and admitted as an
        HTTP/1.x one), ``data`` being what it received so far (preface included)."""
        session = cls(client)
        client.transport.set_protocol(session)
        session.start(data)
        return session

    def __init__(self, client: ClientConnection) -> None:
        site = self.site = client.site
        self.loop = client.loop
        self.transport: Any = client.transport
        self.peer_ip = client.peer_ip
        self.proxied = client.proxied
        self.sni = client.sni
        self.forwarded = client.forwarded
        # The connection limits' hold passes to the session; the HTTP/1 side is done.
        self._guard, self._held = client._guard, client._held
        client._held = None
        client.closed = True
        client.deadline.cancel()
        site.connections.discard(client)
        site.connections.add(self)
        settings = site.http2
        self.max_streams: int = settings.max_concurrent_streams
        self.stream_window: int = settings.initial_stream_window
        self.conn_window: int = settings.initial_connection_window
        self.h2 = server_connection(self.max_streams, self.stream_window,
                                    site.max_header_size)
        self.streams: dict[int, H2Stream] = {}
        # Response bytes waiting for window, per stream id: [chunks, size, end].
        self.pending: dict[int, list[Any]] = {}
        self.closed = False
        self.draining = False
        self.write_paused = False
        self._conn_unacked = 0
        self._opened = 0
        self._premature = 0
        self._second = 0.0
        self._pings = self._settings = 0
        self._empty: dict[int, int] = {}
        self._stalled: dict[int, float] = {}    # stream id → since when (zero window)
        self._timer: asyncio.TimerHandle | None = None
        self._touched: list[H2Exchange] = []

    # -- connection --------------------------------------------------------------------

    def start(self, data: bytes) -> None:
        h2 = self.h2
        h2.initiate_connection()
        uncap_streams(h2)
        if self.conn_window > 65_535:
            h2.increment_flow_control_window(self.conn_window - 65_535)
        self._write()
        self._arm(self.site.header_timeout)
        if data:
            self.data_received(data)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self.site.bytes_in += len(data)
        try:
            events = self.h2.receive_data(data)
        except ProtocolError as e:
            log.debug("http2 %s: protocol error: %s", self.peer_ip.decode(), e)
            self._close_now()       # (the codec has queued its GOAWAY)
            return
        for event in events:
            handler = _HANDLERS.get(type(event))
            if handler is not None:
                handler(self, event)
            if self.closed:
                return
        touched = self._touched
        if touched:
            for ex in touched:
                if ex._up_out:
                    ex.flush_upstream()
            touched.clear()
        self._write()

    def _write(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.closed:
            self.transport.write(data)

    def eof_received(self) -> bool:
        return False        # (no half-close in HTTP/2: the client is gone)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        held = self._held
        if held is not None:
            self._held = None
            self._guard.release(held)
        self.site.connections.discard(self)
        for stream in list(self.streams.values()):
            stream.closed = True
            if stream.exchange is not None:
                stream.exchange.abandon()
        self.streams.clear()
        self.pending.clear()

    def pause_writing(self) -> None:
        self.write_paused = True
        for stream in self.streams.values():
            ex = stream.exchange
            if ex is not None and ex.conn is not None:
                ex.conn.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        for stream in self.streams.values():
            ex = stream.exchange
            if ex is not None and ex.conn is not None and stream.stream_id not in self.pending:
                ex.conn.resume_reading()

    def addresses(self) -> tuple[Any, Any]:
        return connection_addresses(self.proxied, self.transport)

    # -- requests ----------------------------------------------------------------------

    def _request(self, event: Any) -> None:
        sid = event.stream_id
        self._opened += 1
        if self.draining or len(self.streams) >= self.max_streams:
            self.h2.reset_stream(sid, REFUSED_STREAM)
            return
        if self._timer is not None and not self.streams:
            self._timer.cancel()
            self._timer = None
        stream = H2Stream(self, sid)
        ex = stream.exchange = H2Exchange(stream, self.site.max_request_body)
        self.streams[sid] = stream
        try:
            fill_request(ex, self.site, event.headers, event.stream_ended is not None)
        except Malformed as e:
            log.debug("http2 %s: stream %d malformed: %s", self.peer_ip.decode(), sid, e)
            del self.streams[sid]
            stream.reset = stream.closed = True
            self.h2.reset_stream(sid, PROTOCOL_ERROR)
            if not self.streams:
                self._arm(self.site.idle_timeout)
            return
        except PoiseError as e:
            ex.route_name = ""          # (answered for no cluster: counted and logged)
            ex.respond_error(e)
            return
        if event.stream_ended is not None:
            ex.request_done()
        ex.start()
        self._touched.append(ex)

    def _data(self, event: Any) -> None:
        flow = event.flow_controlled_length
        self._conn_unacked += flow
        if self._conn_unacked >= self.conn_window // 4:
            try:
                self.h2.increment_flow_control_window(self._conn_unacked)
            except ProtocolError:       # (closed by a GOAWAY earlier in this read)
                return
            self._conn_unacked = 0
        stream = self.streams.get(event.stream_id)
        if stream is None or stream.exchange is None:
            return
        data = event.data
        if not data and event.stream_ended is None:
            count = self._empty[event.stream_id] = self._empty.get(event.stream_id, 0) + 1
            if count > EMPTY_DATA_PER_STREAM:
                self._calm("empty DATA frames")
            return
        ex = stream.exchange
        try:
            ex.request_body(data)
        except PoiseError as e:     # over max_request_body
            self._fail_stream(stream, e)
            return
        stream.unacked += flow
        if not stream.blocked and stream.unacked >= self.stream_window // 2:
            self.grant(stream, write=False)     # (data_received writes once at its end)
        self._touched.append(ex)

    def _ended(self, event: Any) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is not None and stream.exchange is not None \
                and not stream.exchange.request_complete and not stream.exchange.finished:
            stream.exchange.request_done()
            self._touched.append(stream.exchange)

    def _fail_stream(self, stream: H2Stream, error: PoiseError) -> None:
        ex = stream.exchange
        assert ex is not None
        if not ex.response_head_sent:
            conn = ex.conn
            if conn is not None:        # (it has part of the body: never reused)
                ex.conn = None
                conn.abort()
            ex.respond_error(error)
        else:
            stream.abort()

    def grant(self, stream: H2Stream, write: bool = True) -> None:
        """Let the client send the request-body bytes its stream has had taken."""
        n = stream.unacked
        if n and not stream.reset:
            stream.unacked = 0
            try:
                self.h2.increment_flow_control_window(n, stream.stream_id)
            except (StreamClosedError, ProtocolError, KeyError):
                return
            if write:
                self._write()

    # -- control frames, abuse, timers -------------------------------------------------

    def _control(self, event: Any) -> None:
        now = self.loop.time()
        if now - self._second >= 1.0:
            self._second = now
            self._pings = self._settings = 0
        if isinstance(event, events.PingReceived):
            self._pings += 1
            flood = self._pings > CONTROL_PER_SECOND
        else:
            self._settings += 1
            flood = self._settings > CONTROL_PER_SECOND
        if flood:
            self._calm("PING/SETTINGS flood")

    def _goaway_received(self, event: Any) -> None:
        self.draining = True
        if not self.streams:
            self._close_now()

    def _calm(self, why: str) -> None:
        log.info("http2 %s: %s: closing the connection", self.peer_ip.decode(), why)
        self.site.rejected["http2_abuse"] = self.site.rejected.get("http2_abuse", 0) + 1
        self._goaway(ENHANCE_YOUR_CALM)

    def _goaway(self, code: int) -> None:
        if self.closed:
            return
        try:
            self.h2.close_connection(code)
        except ProtocolError:
            pass
        self._close_now()

    def _close_now(self) -> None:
        if not self.closed:
            data = self.h2.data_to_send()
            if data:
                self.transport.write(data)
            self.closed = True
            self.transport.close()

    def _arm(self, delay: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_later(delay, self._idle)

    def _idle(self) -> None:
        self._timer = None
        if not self.streams and not self.closed:
            self._goaway(NO_ERROR)

    # -- what the listener asks -------------------------------------------------------

    def drain(self) -> None:
        """Graceful stop: GOAWAY now (no new streams), finish what is open, close."""
        if self.draining or self.closed:
            return
        self.draining = True
        if not self.streams:
            self._goaway(NO_ERROR)
        else:
            self.transport.write(go_away(self.h2, self.h2.highest_inbound_stream_id,
                                         NO_ERROR))

    def retire(self, grace: float) -> None:
        self.drain()

    def abort(self) -> None:
        if not self.closed:
            self.closed = True
            self.transport.abort()

    def __repr__(self) -> str:
        return f"<H2Session {self.peer_ip.decode()} streams={len(self.streams)}>"


_HANDLERS: dict[type, Any] = {
    events.RequestReceived: H2Session._request,
    events.DataReceived: H2Session._data,
    events.StreamEnded: H2Session._ended,
    events.StreamReset: H2Session._reset_by_client,
    events.WindowUpdated: H2Session._window_opened,
    events.PingReceived: H2Session._control,
    events.RemoteSettingsChanged: H2Session._control,
    events.ConnectionTerminated: H2Session._goaway_received,
}
