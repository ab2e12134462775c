"""HTTP/2 clients for proxy tests, over a plain socket (h2c with prior knowledge).

``H2Client`` drives h2's client-side ``H2Connection`` with outbound validation off, so
it sends what it is told (upper-case names, connection-specific fields, missing or
doubled pseudo-headers) and keeps flow control in the test's hands (``auto_window``
off: WINDOW_UPDATEs only when :meth:`H2Client.grant` says so).

``RawH2`` writes frames itself (hyperframe and hpack, h2's own building blocks) for
what a well-behaved codec refuses to do: opening more streams than the server allows,
floods of resets, PINGs, SETTINGS or CONTINUATION frames.  It also reads what h2's
client rejects although RFC 9113 allows it: a 304 with a Content-Length, and DATA
after a graceful GOAWAY (h2 closes its state machine on any GOAWAY).  It reads the server's
frames back and records them per stream as ``H2Client`` does.

Both keep, per stream, a :class:`Stream` (status, headers, 1xx heads, body, reset
code), and for the connection the GOAWAY (``goaway``: error code, last stream id) and
whether the server closed it (``closed``).  Every wait has a deadline; a socket
timeout is never mistaken for a close.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    InformationalResponseReceived,
    PingAckReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
)
from h2.settings import SettingCodes, Settings
from hpack import Decoder, Encoder
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
TIMEOUT = 10.0

NO_ERROR = ErrorCodes.NO_ERROR
PROTOCOL_ERROR = ErrorCodes.PROTOCOL_ERROR
REFUSED_STREAM = ErrorCodes.REFUSED_STREAM
CANCEL = ErrorCodes.CANCEL
ENHANCE_YOUR_CALM = ErrorCodes.ENHANCE_YOUR_CALM

INITIAL_WINDOW_SIZE = SettingCodes.INITIAL_WINDOW_SIZE
MAX_CONCURRENT_STREAMS = SettingCodes.MAX_CONCURRENT_STREAMS
ENABLE_PUSH = SettingCodes.ENABLE_PUSH


@dataclass
class Stream:
    """What the server sent on one stream."""

    status: int | None = None
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    informational: list[tuple[int, list[tuple[bytes, bytes]]]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    ended: bool = False
    reset: int | None = None        # the RST_STREAM error code

    @property
    def done(self) -> bool:
        return self.ended or self.reset is not None

    def header(self, name: str) -> str | None:
        values = [v.decode("latin-1") for n, v in self.headers if n == name.encode()]
        assert len(values) <= 1, f"{name} appears {len(values)} times"
        return values[0] if values else None


def _status_of(headers: list[tuple[bytes, bytes]]) -> int:
    return int(dict(headers)[b":status"])


def request_headers(method: str, path: str, authority: str = "test.example",
                    extra=(), scheme: str = "http") -> list[tuple[bytes, bytes]]:
    """A request's header list, pseudo-headers first, everything as bytes."""
    def b(x):
        return x if isinstance(x, bytes) else x.encode()
    out = [(b":method", b(method)), (b":scheme", b(scheme)), (b":path", b(path))]
    if authority is not None:
        out.append((b":authority", b(authority)))
    return out + [(b(n), b(v)) for n, v in extra]


class _Recorder:
    """Per-stream results and the connection's fate, plus waiting on them."""

    sock: socket.socket

    def __init__(self) -> None:
        self.streams: dict[int, Stream] = {}
        self.goaway: tuple[int, int] | None = None     # (error code, last stream id)
        self.closed = False                             # EOF or reset from the server
        self.pings_acked = 0

    def stream(self, sid: int) -> Stream:
        return self.streams.setdefault(sid, Stream())

    def _recv(self, timeout: float) -> bytes | None:
        """Bytes from the server; b"" at EOF/reset (``closed`` set); None on timeout."""
        if self.closed:
            return b""
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data = self.sock.recv(1 << 20)
        except TimeoutError:
            return None
        except OSError:         # (ECONNRESET: the server closed with data unread)
            data = b""
        if not data:
            self.closed = True
        return data

    def _sendall(self, data: bytes) -> bool:
        """Send ``data``; False when the server has gone (reset or closed)."""
        self.sock.settimeout(TIMEOUT)
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            return False

    def pump(self, timeout: float = 0.1) -> bool:
        raise NotImplementedError

    def wait(self, predicate, timeout: float = TIMEOUT, what: str = "condition"):
        """Read and handle frames until ``predicate()`` is truthy (returned); fail after
        ``timeout`` seconds, or when the server closes and it is still false."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{what}: not within {timeout}s "
                                     f"(goaway={self.goaway}, closed={self.closed})")
            if self.closed:
                raise AssertionError(f"{what}: the server closed the connection "
                                     f"(goaway={self.goaway})")
            self.pump(min(left, 0.5))

    def response(self, sid: int, timeout: float = TIMEOUT) -> Stream:
        """Stream ``sid`` once it ended or was reset."""
        self.wait(lambda: self.stream(sid).done, timeout, f"the end of stream {sid}")
        return self.streams[sid]

    def wait_closed(self, timeout: float = TIMEOUT) -> bool:
        """Read until the server closes the connection; False if it did not in time."""
        deadline = time.monotonic() + timeout
        while not self.closed and time.monotonic() < deadline:
            self.pump(min(0.5, max(deadline - time.monotonic(), 0.001)))
        return self.closed

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class H2Client(_Recorder):
    """h2's client-side connection over a blocking socket.

    ``settings``: the client's SETTINGS (e.g. ``{INITIAL_WINDOW_SIZE: 1024}``), in
    force from its first frame; ``auto_window``: give received DATA back to the
    server's windows at once (otherwise :meth:`grant` does, when the test says)."""

    def __init__(self, addr: tuple[str, int] | socket.socket, *, settings: dict | None = None,
                 auto_window: bool = True, timeout: float = TIMEOUT) -> None:
        super().__init__()
        self.sock = (addr if isinstance(addr, socket.socket)
                     else socket.create_connection(addr, timeout=timeout))
        self.conn = H2Connection(H2Configuration(
            client_side=True, header_encoding=None,
            validate_outbound_headers=False, normalize_outbound_headers=False,
            validate_inbound_headers=True))
        initial = {ENABLE_PUSH: 0, **(settings or {})}
        self.conn.local_settings = Settings(client=True, initial_values=initial)
        self.auto_window = auto_window
        self.received_unacked: dict[int, int] = {}      # stream id → DATA bytes held
        self.conn.initiate_connection()
        self.flush()

    def flush(self) -> bool:
        data = self.conn.data_to_send()
        return self._sendall(data) if data else True

    def request(self, method: str, path: str, *, authority: str = "test.example",
                headers=(), body: bytes | None = None, end: bool = True,
                raw_headers: list | None = None) -> int:
        """Open a stream; ``raw_headers`` (a complete header list) replaces the
        pseudo-headers built from the other arguments.  ``end`` with no body sets
        END_STREAM on the HEADERS."""
        sid = self.conn.get_next_available_stream_id()
        hdrs = raw_headers if raw_headers is not None else request_headers(
            method, path, authority, headers)
        self.stream(sid)
        self.conn.send_headers(sid, hdrs, end_stream=end and body is None)
        self.flush()
        if body is not None:
            self.send_body(sid, body, end=end)
        return sid

    def send_body(self, sid: int, data: bytes, *, end: bool = True,
                  timeout: float = TIMEOUT) -> None:
        """Send ``data`` as the server's windows allow (reading meanwhile)."""
        view = memoryview(data)
        deadline = time.monotonic() + timeout
        while view:
            window = min(self.conn.local_flow_control_window(sid),
                         self.conn.max_outbound_frame_size)
            if window <= 0:
                if time.monotonic() > deadline:
                    raise AssertionError(f"no window to send on stream {sid}")
                if not self.pump(0.2) and self.closed:
                    raise AssertionError("the server closed while the body was sent")
                if self.stream(sid).reset is not None:
                    return
                continue
            n = min(window, len(view))
            self.conn.send_data(sid, bytes(view[:n]))
            view = view[n:]
            if not self.flush():
                raise AssertionError("the server went away while the body was sent")
        if end:
            self.conn.end_stream(sid)
            self.flush()

    def grant(self, sid: int, n: int | None = None) -> None:
        """Give back ``n`` (default: all held) received bytes of stream ``sid`` to its
        window and the connection's."""
        held = self.received_unacked.get(sid, 0)
        n = held if n is None else min(n, held)
        if n:
            self.received_unacked[sid] = held - n
            self.conn.acknowledge_received_data(n, sid)
            self.flush()

    def ping(self, data: bytes = b"12345678") -> None:
        self.conn.ping(data)
        self.flush()

    def reset(self, sid: int, code: int = CANCEL) -> None:
        self.conn.reset_stream(sid, code)
        self.flush()

    def pump(self, timeout: float = 0.1) -> bool:
        """Read once (up to ``timeout``) and handle what came; False at EOF or
        timeout."""
        data = self._recv(timeout)
        if not data:
            return False
        for event in self.conn.receive_data(data):
            self._handle(event)
        self.flush()
        return True

    def _handle(self, event) -> None:
        if isinstance(event, InformationalResponseReceived):
            self.stream(event.stream_id).informational.append(
                (_status_of(event.headers), list(event.headers)))
        elif isinstance(event, ResponseReceived):
            s = self.stream(event.stream_id)
            s.status, s.headers = _status_of(event.headers), list(event.headers)
        elif isinstance(event, TrailersReceived):
            self.stream(event.stream_id).headers += list(event.headers)
        elif isinstance(event, DataReceived):
            self.stream(event.stream_id).body += event.data
            n = event.flow_controlled_length
            if self.auto_window:
                if n:
                    self.conn.acknowledge_received_data(n, event.stream_id)
            else:
                self.received_unacked[event.stream_id] = (
                    self.received_unacked.get(event.stream_id, 0) + n)
        elif isinstance(event, StreamEnded):
            self.stream(event.stream_id).ended = True
        elif isinstance(event, StreamReset):
            self.stream(event.stream_id).reset = int(event.error_code)
        elif isinstance(event, ConnectionTerminated):
            self.goaway = (int(event.error_code), event.last_stream_id)
        elif isinstance(event, PingAckReceived):
            self.pings_acked += 1


class RawH2(_Recorder):
    """A client that writes frames by hand and records what comes back.

    The preface and a SETTINGS frame (``settings``) are sent on connect; the server's
    SETTINGS are acknowledged and, with ``auto_window``, its DATA is given back to
    the windows at once."""

    def __init__(self, addr: tuple[str, int], *, settings: dict | None = None,
                 auto_window: bool = True, timeout: float = TIMEOUT) -> None:
        super().__init__()
        self.sock = socket.create_connection(addr, timeout=timeout)
        self.encoder = Encoder()
        self.decoder = Decoder()
        self.auto_window = auto_window
        self.frames: list[Frame] = []           # every frame received, in order
        self._buffer = bytearray()
        self._block: tuple[int, bytearray, bool] | None = None   # (sid, fragment, end)
        self.received_unacked: dict[int, int] = {}      # (without auto_window)
        self.send(PREFACE + self.settings_frame({ENABLE_PUSH: 0, **(settings or {})}))

    # -- frames ----------------------------------------------------------------------

    def block(self, headers: list[tuple[bytes, bytes]]) -> bytes:
        """An HPACK header block (the encoder's dynamic table is the server's)."""
        return self.encoder.encode(headers, huffman=False)

    def headers_frame(self, sid: int, headers: list | bytes, *, end_stream: bool = True,
                      end_headers: bool = True) -> bytes:
        f = HeadersFrame(sid)
        f.data = headers if isinstance(headers, bytes) else self.block(headers)
        if end_stream:
            f.flags.add("END_STREAM")
        if end_headers:
            f.flags.add("END_HEADERS")
        return f.serialize()

    def request_frame(self, sid: int, method: str = "GET", path: str = "/echo",
                      authority: str = "test.example", extra=(), *,
                      end_stream: bool = True) -> bytes:
        return self.headers_frame(sid, request_headers(method, path, authority, extra),
                                  end_stream=end_stream)

    @staticmethod
    def continuation_frame(sid: int, fragment: bytes, end_headers: bool = False) -> bytes:
        f = ContinuationFrame(sid)
        f.data = fragment
        if end_headers:
            f.flags.add("END_HEADERS")
        return f.serialize()

    @staticmethod
    def data_frame(sid: int, data: bytes, end_stream: bool = False) -> bytes:
        f = DataFrame(sid)
        f.data = data
        if end_stream:
            f.flags.add("END_STREAM")
        return f.serialize()

    @staticmethod
    def rst_frame(sid: int, code: int = CANCEL) -> bytes:
        f = RstStreamFrame(sid)
        f.error_code = code
        return f.serialize()

    @staticmethod
    def ping_frame(data: bytes = b"\0" * 8, ack: bool = False) -> bytes:
        f = PingFrame(0)
        f.opaque_data = data
        if ack:
            f.flags.add("ACK")
        return f.serialize()

    @staticmethod
    def settings_frame(settings: dict | None = None, ack: bool = False) -> bytes:
        f = SettingsFrame(0)
        if ack:
            f.flags.add("ACK")
        else:
            f.settings = {int(k): v for k, v in (settings or {}).items()}
        return f.serialize()

    @staticmethod
    def window_update_frame(sid: int, increment: int) -> bytes:
        f = WindowUpdateFrame(sid)
        f.window_increment = increment
        return f.serialize()

    def send(self, *frames: bytes) -> bool:
        """Write frames (serialized); False once the server has gone."""
        return self._sendall(b"".join(frames))

    def grant(self, sid: int) -> None:
        """Give the DATA received on ``sid`` (without ``auto_window``) back to its
        window and the connection's."""
        n = self.received_unacked.pop(sid, 0)
        if n:
            self.send(self.window_update_frame(0, n), self.window_update_frame(sid, n))

    # -- reading ---------------------------------------------------------------------

    def pump(self, timeout: float = 0.1) -> bool:
        data = self._recv(timeout)
        if not data:
            return False
        self._buffer += data
        replies = []
        while len(self._buffer) >= 9:
            frame, length = Frame.parse_frame_header(memoryview(self._buffer[:9]))
            if len(self._buffer) < 9 + length:
                break
            frame.parse_body(memoryview(bytes(self._buffer[9:9 + length])))
            del self._buffer[:9 + length]
            self.frames.append(frame)
            replies += self._handle(frame)
        if replies:
            self.send(*replies)
        return True

    def _handle(self, frame: Frame) -> list[bytes]:
        sid = frame.stream_id
        if isinstance(frame, SettingsFrame):
            return [] if "ACK" in frame.flags else [self.settings_frame(ack=True)]
        if isinstance(frame, PingFrame):
            if "ACK" in frame.flags:
                self.pings_acked += 1
                return []
            return [self.ping_frame(frame.opaque_data, ack=True)]
        if isinstance(frame, GoAwayFrame):
            self.goaway = (frame.error_code, frame.last_stream_id)
        elif isinstance(frame, RstStreamFrame):
            self.stream(sid).reset = frame.error_code
        elif isinstance(frame, (HeadersFrame, ContinuationFrame)):
            if isinstance(frame, HeadersFrame):
                self._block = (sid, bytearray(frame.data), "END_STREAM" in frame.flags)
            else:
                assert self._block is not None and self._block[0] == sid, "stray CONTINUATION"
                self._block[1].extend(frame.data)
            if "END_HEADERS" in frame.flags:
                _, fragment, end = self._block
                self._block = None
                headers = [(bytes(n), bytes(v)) for n, v in
                           self.decoder.decode(bytes(fragment), raw=True)]
                s = self.stream(sid)
                if s.status is not None:
                    s.headers += headers                # trailers
                else:
                    status = _status_of(headers)
                    if 100 <= status < 200:
                        s.informational.append((status, headers))
                    else:
                        s.status, s.headers = status, headers
                if end:
                    s.ended = True
        elif isinstance(frame, DataFrame):
            s = self.stream(sid)
            s.body += frame.data
            if "END_STREAM" in frame.flags:
                s.ended = True
            n = frame.flow_controlled_length
            if self.auto_window and n:
                out = [self.window_update_frame(0, n)]
                if not s.ended:
                    out.append(self.window_update_frame(sid, n))
                return out
            self.received_unacked[sid] = self.received_unacked.get(sid, 0) + n
        return []
