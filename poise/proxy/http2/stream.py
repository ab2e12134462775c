"""One request's stream to an HTTP/2 backend (see :mod:`poise.proxy.http2.upstream`):
its header list, and :class:`StreamWriter`, the transport of the upstream connection
the exchange holds for it, through which its body goes out and its response comes
back."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from poise.proxy.http.headers import CRLF, chunk
from poise.proxy.http2.codec import CANCEL, ProtocolError, StreamClosedError

if TYPE_CHECKING:
    from poise.proxy.http.exchange import Exchange
    from poise.proxy.http.upstream import UpstreamConnection
    from poise.proxy.http2.upstream import H2Upstream

# Request body bytes waiting for the backend's window before the client stops being
# read.
BODY_HIGH = 256 * 1024
# (poise.proxy.http.upstream.UPSTREAM_FULL: a client-side read-blocking reason.)
_UPSTREAM_FULL = 1


def request_headers(ex: Exchange, conn: H2Upstream) -> list[tuple[bytes, bytes]]:
    """The exchange's request as an HTTP/2 header list (the same fields as its
    HTTP/1.1 head: X-Forwarded-*, trace context; ``te: trailers`` for gRPC)."""
    client = ex.client
    pool = conn.pool
    authority = ex.host if ex.host is not None else pool.backend.address.encode()
    scheme = b"https" if pool.cluster is not None and pool.cluster.tls_context else b"http"
    headers = [(b":method", ex.method), (b":scheme", scheme), (b":authority", authority),
               (b":path", ex.target)]
    f = ex.fields
    grpc = False
    for i in range(0, len(f), 4):
        name = f[i].lower()
        if name == b"host":
            continue
        if name == b"content-type" and f[i + 2].startswith(b"application/grpc"):
            grpc = True
        headers.append((name, f[i + 2]))
    if grpc:
        headers.append((b"te", b"trailers"))
    if ex.trace is not None:
        headers += _pairs(ex.trace.try_headers(pool.backend.address, ex.attempts))
    site = client.site
    if site.forwarded_headers:
        peer = client.peer_ip
        headers.append((b"x-forwarded-for", peer if ex.xff is None else ex.xff + b", " + peer))
        headers += _pairs(site.xfp)
        if ex.host is not None:
            headers.append((b"x-forwarded-host", ex.host))
    return headers


def _pairs(lines: bytes) -> list[tuple[bytes, bytes]]:
    result = []
    for line in lines.split(b"\r\n"):
        name, sep, value = line.partition(b":")
        if sep:
            result.append((name.strip().lower(), value.strip()))
    return result


def flat_fields(headers: Any) -> list[bytes]:
    """An HTTP/2 header list (pseudo-headers left out) as flat ``fields``."""
    fields: list[bytes] = []
    for name, value in headers:
        if name[:1] != b":":
            fields += (name, b": ", value, CRLF)
    return fields


class StreamWriter:
    """The ``transport`` of the UpstreamConnection an exchange holds for one stream:
    the request body goes out as DATA, the response comes back through it."""

    def __init__(self, upstream: H2Upstream, sid: int, conn: UpstreamConnection) -> None:
        self.upstream = upstream
        self.sid = sid
        self.conn = conn
        self.pending = b""          # request body waiting for the backend's window
        self.ended = False          # END_STREAM sent
        self.done = False           # the stream is over (response ended, reset, lost)
        self.paused = False         # the client cannot take more: no WINDOW_UPDATE
        self.unacked = 0
        self.blocking = False       # we stopped the client reading its request body

    # -- the request ---------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.done or self.ended:
            return
        if data:
            self.pending += data
        self.send_pending()

    def send_pending(self) -> None:
        upstream = self.upstream
        h2 = upstream.h2
        data = self.pending
        try:
            while data:
                window = h2.local_flow_control_window(self.sid)
                if window <= 0:
                    break
                n = min(window, h2.max_outbound_frame_size, len(data))
                h2.send_data(self.sid, data[:n])
                data = data[n:]
            self.pending = data
            ex = self.conn.exchange
            if not data and ex is not None and ex.request_complete and not self.ended:
                self.ended = True
                h2.end_stream(self.sid)
        except (StreamClosedError, ProtocolError):
            self.pending = b""
            return
        if len(self.pending) > BODY_HIGH:
            self.block_client()
        elif self.blocking and not upstream.write_paused:
            self.unblock_client()
        upstream.flush()

    def block_client(self) -> None:
        ex = self.conn.exchange
        if ex is not None and not self.blocking:
            self.blocking = True
            ex.client.block_reading(_UPSTREAM_FULL)

    def unblock_client(self) -> None:
        ex = self.conn.exchange
        if self.blocking:
            self.blocking = False
            if ex is not None:
                ex.client.unblock_reading(_UPSTREAM_FULL)

    # -- the response --------------------------------------------------------------------

    def on_head(self, headers: Any, ended: bool) -> None:
        """The response's HEADERS (``ended``: with END_STREAM, so the end follows at
        once: nothing is flushed before it)."""
        conn = self.conn
        ex = conn.exchange
        if ex is None:
            return
        status = 0
        for name, value in headers:
            if name == b":status":
                status = int(value)
                break
        fields = flat_fields(headers)
        ex.response_started = True
        if 100 <= status < 200:
            ex.on_informational(status, fields)
        else:
            conn.deadline.clear()
            has_length = any(fields[i].lower() == b"content-length"
                             for i in range(0, len(fields), 4))
            ex.on_response_head(status, fields, has_length, True)
        if conn.exchange is not ex:     # dropped to be retried
            self.close()
            return
        if ex._out and not ended:
            ex.flush_client()

    def on_data(self, data: bytes, flow: int) -> None:
        ex = self.conn.exchange
        h2 = self.upstream.h2
        if flow:
            h2.increment_flow_control_window(flow)      # (the connection's window)
        if ex is None:
            return
        if data:
            ex._out.append(chunk(data) if ex._chunk_out else data)
            ex.flush_client()
        if self.paused:
            self.unacked += flow
        elif flow and not self.done:
            try:
                h2.increment_flow_control_window(flow, self.sid)
            except (StreamClosedError, ProtocolError, KeyError):
                pass        # (jh2: KeyError for a closed stream it has dropped)

    def on_end(self) -> None:
        conn = self.conn
        ex = conn.exchange
        self.done = True
        self.upstream.stream_done(self)
        if ex is not None:
            conn.exchange = None
            ex.on_response_complete(conn)   # (closes conn: not usable, so not pooled)

    def lost(self, error: Any) -> None:
        """The stream or its connection is gone before the response ended."""
        self.done = True
        conn = self.conn
        ex = conn.exchange
        self.unblock_client()
        if ex is not None:
            conn.exchange = None
            ex.upstream_lost(conn, error)

    # -- what the exchange asks of a transport ------------------------------------------

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False
        n, self.unacked = self.unacked, 0
        if n and not self.done:
            try:
                self.upstream.h2.increment_flow_control_window(n, self.sid)
            except (StreamClosedError, ProtocolError, KeyError):
                return
            self.upstream.flush()

    def is_closing(self) -> bool:
        return self.done

    def close(self) -> None:
        """The exchange is done with the stream: cancel it if it is still running."""
        self.unblock_client()
        if not self.done:
            self.done = True
            try:
                self.upstream.h2.reset_stream(self.sid, CANCEL)
            except (StreamClosedError, ProtocolError, KeyError):
                pass
            self.upstream.stream_done(self)
            self.upstream.flush()

    abort = close

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        transport = self.upstream.transport
        return default if transport is None else transport.get_extra_info(name, default)
