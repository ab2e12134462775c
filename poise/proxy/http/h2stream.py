"""One HTTP/2 request: the stream (:class:`H2Stream`, the exchange's downstream) and
its exchange (:class:`H2Exchange`), which is an HTTP/1.x exchange towards the backend
whose response goes out as HTTP/2 frames.

Everything between — routing, policies, limits, retries, deadlines, upstream pools,
metrics and logs — is :class:`~poise.proxy.http.exchange.Exchange`'s own; only how the
request arrives (:mod:`poise.proxy.http2.session` builds it from the HEADERS) and how
the response leaves differ.  The session (interpreted: it drives the HTTP/2 codec)
does the framing and flow control; these classes call it.
"""

from __future__ import annotations

from typing import Any, Final

from poise.errors import PayloadTooLarge, PoiseError
from poise.proxy.http.downstream import Downstream
from poise.proxy.http.errors import status_of
from poise.proxy.http.exchange import Exchange
from poise.proxy.http.headers import status_line
from poise.proxy.http.resilience import accept_response

# The RST_STREAM code of a response that cannot be completed (RFC 9113 §7; the
# others poise sends are in poise.proxy.http2.codec).
INTERNAL_ERROR: Final = 2


class H2Stream(Downstream):
    """The client side of one HTTP/2 request: a stream of ``session``.

    ``blocked``: reasons not to let the client send more request body (the session
    withholds the stream's WINDOW_UPDATEs while any is set); ``unacked``: body bytes
    taken but not yet granted back."""

    __slots__ = ("session", "stream_id", "exchange", "blocked", "unacked", "reset")

    def __init__(self, session: Any, stream_id: int) -> None:
        super().__init__(session.site)
        self.session = session
        self.stream_id = stream_id
        self.transport = session.transport
        self.peer_ip = session.peer_ip
        self.proxied = session.proxied
        self.sni = session.sni
        self.forwarded = session.forwarded
        self.exchange: H2Exchange | None = None
        self.blocked = 0
        self.unacked = 0
        self.reset = False          # reset by either side: nothing more is sent on it
        self.h2 = True

    def exchange_done(self, ex: Exchange) -> None:
        self.session.stream_done(self)

    def block_reading(self, reason: int) -> None:
        self.blocked |= reason

    def unblock_reading(self, reason: int) -> None:
        if self.blocked & reason:
            self.blocked &= ~reason
            if not self.blocked:
                self.session.grant(self)

    def reject_body(self, reason: str) -> None:
        raise PayloadTooLarge(reason)

    def abort(self) -> None:
        """The response cannot be completed: reset the stream (the client sees it)."""
        if not self.closed:
            self.closed = True
            self.session.reset_stream(self, INTERNAL_ERROR)

    def owner(self) -> Any:
        return self.session

    def addresses(self) -> tuple[Any, Any]:
        result: tuple[Any, Any] = self.session.addresses()
        return result

    def __repr__(self) -> str:
        return f"<H2Stream {self.stream_id} {self.peer_ip.decode()}>"


class H2Exchange(Exchange):
    """An exchange whose client is an HTTP/2 stream.

    The response head is held (``_head``) until the first body bytes or the end, so
    that a response without a body goes out as one HEADERS frame with END_STREAM (what
    gRPC calls "trailers-only": its errors are such responses)."""

    __slots__ = ("stream", "_head")

    def __init__(self, stream: H2Stream, max_body: int) -> None:
        super().__init__(stream, max_body)
        self.stream = stream
        self._head: tuple[int, list[bytes]] | None = None

    def on_informational(self, status: int, fields: list[bytes]) -> None:
        if status == 101:           # no Upgrade is forwarded for an HTTP/2 request
            Exchange.on_informational(self, status, fields)
        elif status != 100 or (self.expect_continue and not self.response_head_sent):
            self.stream.session.send_head(self.stream, status, fields, False)

    def on_response_head(self, status: int, fields: list[bytes], has_length: bool,
                         chunked: bool) -> None:
        if not accept_response(self, status, fields):
            return
        if not has_length and not chunked and not (
                self.head_only or status == 204 or status == 304):
            self.until_close = True     # (the backend's close ends the body)
        self.response_head_sent = True
        self._head = (status, fields)
        # The upstream flushes a response only when _out holds something: a marker
        # stands for the head.
        self._out.append(b"")

    def _send_head(self, end: bool) -> None:
        head = self._head
        if head is not None:
            self._head = None
            self.stream.session.send_head(self.stream, head[0], head[1], end)

    def flush_client(self) -> None:
        out = self._out
        if out:
            data = out[0] if len(out) == 1 else b"".join(out)
            out.clear()
            stream = self.stream
            if not stream.closed:
                self._send_head(False)
                if data:
                    self.bytes_sent += len(data)
                    self._wrote_client = True
                    stream.session.send_body(stream, data, False)

    def end_response(self) -> None:
        out = self._out
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        stream = self.stream
        if not stream.closed:
            self.bytes_sent += len(data)
            self._wrote_client = True
            trailers = self.trailers
            if self._head is not None and not data and trailers is None:
                self._send_head(True)       # one HEADERS frame with END_STREAM
                stream.session.stream_ended(stream)
                return
            self._send_head(False)
            if trailers is None:
                stream.session.send_body(stream, data, True)
            else:                   # (gRPC's status is in them)
                stream.session.send_body(stream, data, False)
                stream.session.send_trailers(stream, trailers)

    def respond_error(self, error: BaseException) -> None:
        status = self.status = status_of(error)
        extra = error.headers if isinstance(error, PoiseError) else b""
        body = b"" if self.head_only else status_line(status)[9:].rstrip() + b"\n"
        fields: list[bytes] = [b"content-type", b": ", b"text/plain", b"\r\n",
                               b"content-length", b": ", b"%d" % len(body), b"\r\n"]
        if extra:
            for line in extra.split(b"\r\n"):
                name, sep, value = line.partition(b":")
                if sep:
                    fields += (name, b": ", value.strip(), b"\r\n")
        self._out.clear()
        self.response_head_sent = True
        stream = self.stream
        if not stream.closed:
            stream.session.send_head(stream, status, fields, False)
            self.bytes_sent += len(body)
            stream.session.send_body(stream, body, True)
        self._finish()
