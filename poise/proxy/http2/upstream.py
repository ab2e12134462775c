"""HTTP/2 to the backends (cluster ``protocol: h2``): gRPC and other h2-only services.

A request of an h2 cluster is an ordinary :class:`~poise.proxy.http.exchange.Exchange`
(routing, the policy's pick per request, limits, retries, deadlines, metrics) up to
``Exchange._send``, which hands its try to :func:`h2_send`.  From there:

- each backend has an :class:`H2Pool` (per worker): its HTTP/2 connections and the
  requests waiting for one.  A request takes a stream on a connection with room
  (below the backend's SETTINGS_MAX_CONCURRENT_STREAMS); another connection is opened
  only when every open one is full;
- the stream is given to the exchange as an ordinary ``UpstreamConnection`` whose
  ``transport`` is a :class:`StreamWriter`: what the exchange writes (its body, raw:
  ``Exchange.raw_body``) goes out as DATA frames within the backend's flow-control
  windows, and END_STREAM once the request is complete;
- the response's HEADERS, DATA, trailers and END_STREAM become the exchange's
  ``on_response_head``, body, ``trailers`` and ``on_response_complete``; a response
  the client cannot take fast enough stops the stream's WINDOW_UPDATEs.

``grpc-timeout`` (gRPC's deadline) bounds the request like ``request_timeout``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque
from typing import TYPE_CHECKING, Any

from poise.errors import UpstreamConnectError, UpstreamReset
from poise.proxy.dial import connect_error, dial
from poise.proxy.http.accounting import begin_try
from poise.proxy.http2.codec import (
    H2Configuration,
    H2Connection,
    ProtocolError,
    SettingCodes,
    Settings,
    events,
)
from poise.proxy.http2.stream import StreamWriter, flat_fields, request_headers

if TYPE_CHECKING:
    from poise.proxy.http.exchange import Exchange
    from poise.proxy.http.pool import UpstreamPool

log = logging.getLogger("poise")

# The response bytes one stream may receive ahead of the client (our stream window).
STREAM_WINDOW = 256 * 1024
CONNECTION_WINDOW = 16 * 1024 * 1024
# Streams assumed allowed per connection until the backend's SETTINGS say.
DEFAULT_STREAMS = 100
_GRPC_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}


def h2_send(ex: Exchange, pool: UpstreamPool) -> None:
    """``ex``'s try on ``pool``'s backend, over HTTP/2 (from ``Exchange._send``)."""
    out = ex._up_out
    if out:                 # the HTTP/1.1 head the exchange made: HTTP/2 sends its own
        ex._up_size -= len(out[0])
        del out[0]
    if ex.attempts == 0:
        _grpc_deadline(ex)
    begin_try(ex)
    h2pool = pool.h2
    if h2pool is None:
        h2pool = pool.h2 = H2Pool(pool)
    h2pool.send(ex)


def _grpc_deadline(ex: Exchange) -> None:
    """A ``grpc-timeout`` (``<digits><H|M|S|m|u|n>``) sets the request's deadline."""
    f = ex.fields
    for i in range(0, len(f), 4):
        if f[i].lower() == b"grpc-timeout":
            value = f[i + 2].strip()
            unit = _GRPC_UNITS.get(value[-1:])
            if unit is None or not value[:-1].isdigit() or len(value) > 9:
                return      # malformed: ignored (the backend sees it too)
            at = ex.client.loop.time() + int(value[:-1]) * unit
            if ex._deadline_at is None or at < ex._deadline_at:
                ex._deadline_at = at
            return


class H2Pool:
    """One backend's HTTP/2 connections in this worker, and requests waiting for one."""

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.conns: list[H2Upstream] = []
        self.waiting: deque[Exchange] = deque()
        self.connecting = 0

    def send(self, ex: Exchange) -> None:
        for conn in self.conns:
            if conn.has_room():
                conn.open_stream(ex)
                return
        self.waiting.append(ex)
        # Connections being opened, or open but without the backend's SETTINGS yet,
        # will take the waiting requests: another is opened only beyond what they may.
        coming = self.connecting + sum(1 for conn in self.conns if not conn.settled)
        if coming == 0 or len(self.waiting) > coming * DEFAULT_STREAMS:
            self.connecting += 1
            self.pool.opening()
            self.pool.loop.create_task(self._open())

    async def _open(self) -> None:
        pool = self.pool
        backend = pool.backend
        cluster = pool.cluster
        assert cluster is not None
        conn = H2Upstream(self)
        tls = cluster.tls_context
        try:
            async with asyncio.timeout(pool.connect_timeout):
                await dial(pool.loop, lambda: conn, backend.host, backend.port, tls=tls,
                           server_name=cluster.server_name(backend) if tls else None,
                           handshake_timeout=pool.connect_timeout)
        except Exception as e:
            self.connecting -= 1
            if conn.transport is None:
                pool.closed()
            self._connect_failed(connect_error(e, backend.address) or UpstreamConnectError(
                f"connect to {backend.address} failed: {e}"))
            return
        self.connecting -= 1
        self.conns.append(conn)
        while self.waiting and conn.has_room():
            ex = self.waiting.popleft()
            if not ex.finished:
                conn.open_stream(ex)
        conn.flush()

    def _connect_failed(self, error: Any) -> None:
        """Connecting failed: nothing was sent, so each waiting request fails over to
        another backend (as an HTTP/1.1 try does), or is answered with the error."""
        waiting, self.waiting = self.waiting, deque()
        for ex in waiting:
            if not ex.finished:
                fail_over(ex, self.pool, error)

    def lost(self, conn: H2Upstream) -> None:
        if conn in self.conns:
            self.conns.remove(conn)
        if self.waiting and not self.connecting:
            self.connecting += 1
            self.pool.opening()
            self.pool.loop.create_task(self._open())

    def expire(self, now: float) -> None:
        """Close connections without a stream for longer than the pool's
        ``idle_timeout`` (keepalive_idle_timeout)."""
        cutoff = now - self.pool.idle_timeout
        for conn in list(self.conns):
            if not conn.streams and conn.idle_since < cutoff:
                conn.transport.close()

    def close_idle(self) -> None:
        for conn in list(self.conns):
            if not conn.streams:
                conn.transport.close()
            else:
                conn.goaway = True      # (no new streams: closed when its last ends)

    def room_freed(self, conn: H2Upstream) -> None:
        while self.waiting and conn.has_room():
            ex = self.waiting.popleft()
            if not ex.finished:
                conn.open_stream(ex)


def fail_over(ex: Exchange, pool: UpstreamPool, error: Any) -> None:
    """A try whose connection could not be opened: try another backend (once each),
    unless the cluster's retries leave connect failures out; else answer."""
    # (Imported here: poise.proxy.http.resilience imports this module.)
    from poise.proxy.http.resilience import fail_over as next_backend
    tried = ex._tried = (ex._tried or []) + [pool]
    nxt = next_backend(ex, pool, error, tried)
    if nxt is None:
        return
    begin_try(ex)
    h2pool = nxt.h2
    if h2pool is None:
        h2pool = nxt.h2 = H2Pool(nxt)
    h2pool.send(ex)


class H2Upstream(asyncio.Protocol):
    """One HTTP/2 connection to a backend."""

    def __init__(self, h2pool: H2Pool) -> None:
        self.h2pool = h2pool
        self.pool = h2pool.pool
        self.transport: Any = None
        self.h2 = H2Connection(config=H2Configuration(
            client_side=True, header_encoding=None,
            validate_outbound_headers=False, normalize_outbound_headers=False))
        self.streams: dict[int, StreamWriter] = {}
        # Streams allowed at once: one until the backend's SETTINGS say (``settled``),
        # so that a backend with a small limit never has to refuse streams.
        self.max_streams = DEFAULT_STREAMS
        self.settled = False
        self.goaway = False
        self.closed = False
        self.used = 0               # streams opened on it so far
        self.idle_since = 0.0       # when its last stream ended
        self.write_paused = False

    # -- connection ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.pool.stats.active_connections += 1
        h2 = self.h2
        h2.local_settings = Settings(client=True, initial_values={
            SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW, SettingCodes.ENABLE_PUSH: 0})
        h2.initiate_connection()
        h2.increment_flow_control_window(CONNECTION_WINDOW - 65_535)
        self.flush()

    def has_room(self) -> bool:
        return not self.goaway and not self.closed and len(self.streams) < (
            self.max_streams if self.settled else 1)

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.closed:
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        try:
            received = self.h2.receive_data(data)
        except ProtocolError as e:
            log.warning("HTTP/2 protocol error from backend %s: %s",
                        self.pool.backend.address, e)
            self.flush()
            self.transport.close()
            return
        for event in received:
            handler = _HANDLERS.get(type(event))
            if handler is not None:
                handler(self, event)
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.stats.active_connections -= 1
        self.pool.closed()
        self.h2pool.lost(self)
        streams, self.streams = self.streams, {}
        for writer in streams.values():
            writer.lost(UpstreamReset(f"{self.pool.backend.address} closed the connection"))

    def pause_writing(self) -> None:
        self.write_paused = True
        for writer in self.streams.values():
            writer.block_client()

    def resume_writing(self) -> None:
        self.write_paused = False
        for writer in list(self.streams.values()):
            writer.unblock_client()

    # -- streams -------------------------------------------------------------------------

    def open_stream(self, ex: Exchange) -> None:
        """Send ``ex``'s request on a new stream of this connection."""
        # (Imported here: poise.proxy.http.upstream imports this module's importers.)
        from poise.proxy.http.upstream import UpstreamConnection
        sid = self.h2.get_next_available_stream_id()
        conn = UpstreamConnection(self.pool)
        writer = StreamWriter(self, sid, conn)
        conn.transport = writer
        conn.reused = self.used > 0
        self.used += 1
        self.streams[sid] = writer
        end = ex.request_complete and not any(ex._up_out)
        if end:
            ex._up_out.clear()
            ex._up_size = 0
            writer.ended = True
        self.h2.send_headers(sid, request_headers(ex, self), end_stream=end)
        ex._attach(conn)
        ex.flush_upstream()
        self.flush()

    def _response(self, event: Any) -> None:
        writer = self.streams.get(event.stream_id)
        if writer is not None:
            writer.on_head(event.headers, getattr(event, "stream_ended", None) is not None)

    def _data(self, event: Any) -> None:
        writer = self.streams.get(event.stream_id)
        if writer is None:
            if event.flow_controlled_length:
                self.h2.acknowledge_received_data(event.flow_controlled_length,
                                                  event.stream_id)
            return
        writer.on_data(event.data, event.flow_controlled_length)

    def _trailers(self, event: Any) -> None:
        writer = self.streams.get(event.stream_id)
        if writer is not None:
            ex = writer.conn.exchange
            if ex is not None:
                ex.trailers = flat_fields(event.headers)

    def _ended(self, event: Any) -> None:
        writer = self.streams.get(event.stream_id)
        if writer is not None:
            writer.on_end()

    def _reset(self, event: Any) -> None:
        writer = self.streams.pop(event.stream_id, None)
        if writer is not None:
            writer.done = True
            writer.lost(UpstreamReset(
                f"{self.pool.backend.address} reset the stream (code {event.error_code})"))
            self.h2pool.room_freed(self)

    def _settings(self, event: Any) -> None:
        limit = self.h2.remote_settings.max_concurrent_streams
        self.max_streams = max(1, min(limit, 10_000))
        self.settled = True
        self.h2pool.room_freed(self)

    def _window(self, event: Any) -> None:
        if event.stream_id:
            writer = self.streams.get(event.stream_id)
            if writer is not None:
                writer.send_pending()
        else:
            for writer in list(self.streams.values()):
                writer.send_pending()

    def _goaway(self, event: Any) -> None:
        self.goaway = True
        last = event.last_stream_id
        for sid in [s for s in self.streams if last is not None and s > last]:
            writer = self.streams.pop(sid)
            writer.done = True
            writer.lost(UpstreamReset(f"{self.pool.backend.address} sent GOAWAY"))
        if not self.streams:
            self.transport.close()

    def stream_done(self, writer: StreamWriter) -> None:
        if self.streams.pop(writer.sid, None) is not None:
            if not self.streams:
                self.idle_since = self.pool.loop.time()
                if self.goaway:
                    self.transport.close()
                    return
            self.h2pool.room_freed(self)


_HANDLERS: dict[type, Any] = {
    events.ResponseReceived: H2Upstream._response,
    events.InformationalResponseReceived: H2Upstream._response,
    events.DataReceived: H2Upstream._data,
    events.TrailersReceived: H2Upstream._trailers,
    events.StreamEnded: H2Upstream._ended,
    events.StreamReset: H2Upstream._reset,
    events.RemoteSettingsChanged: H2Upstream._settings,
    events.WindowUpdated: H2Upstream._window,
    events.ConnectionTerminated: H2Upstream._goaway,
}
