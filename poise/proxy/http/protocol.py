"""The client side of the HTTP proxy: bytes ↔ httptools, keep-alive, pipelining,
flow control, header deadlines and limits.

Requests are answered strictly in order.  A pipelined request parsed while another is
being served waits in a queue (its body buffered) and the connection stops reading
until the queue drains, so memory stays bounded.  Any request this connection cannot
frame unambiguously is answered with its 4xx/5xx status and the connection closed.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, Final

from mypy_extensions import mypyc_attr

from poise.errors import (
    BadRequest,
    HeadersTooLarge,
    PayloadTooLarge,
    PoiseError,
    RequestTimeout,
    UriTooLong,
    VersionNotSupported,
)
from poise.proxy.deadline import Deadline
from poise.proxy.http.accounting import answer_counted
from poise.proxy.http.bounds import MessageBounds
from poise.proxy.http.downstream import Downstream
from poise.proxy.http.errors import error_response, status_of
from poise.proxy.http.exchange import Exchange
from poise.proxy.http.headers import CRLF
from poise.proxy.http.reading import FAST, SLOW, parse_request, read_fast, read_slow
from poise.proxy.http.request import WATCH_FIRST, origin_form
from poise.proxy.http.upgrade import WEBSOCKET, framing_of, wants_websocket
from poise.proxy.http.upstream import UPSTREAM_FULL
from poise.proxy.proxy_protocol import connection_addresses

if TYPE_CHECKING:
    from poise.proxy.http.site import Site

log = logging.getLogger("poise")
# Seconds a closing connection keeps discarding what the client still sends.
LINGER: Final = 2.0
# Reasons to stop reading from the client (bit flags).
PIPELINED: Final = 2       # a complete request waits behind the one being served
CLIENT_FULL: Final = 8     # unused by the client itself; kept distinct from upstream flags


@mypyc_attr(allow_interpreted_subclasses=True)   # (tests subclass it to observe it)
class ClientConnection(Downstream):
    """One downstream HTTP/1.x connection. Created per accepted socket by the listener.

    (Downstream's ``proxied`` is set by the acceptor before connection_made, from the
    PROXY header the connection began with; ``sni`` from the TLS handshake.)"""

    __slots__ = ("parser", "deadline", "current", "_parsing", "_mode", "_body_left",
                 "_blocked", "_failed", "_in_head", "_url", "_header_count", "_bounds", "_http11",
                 "_upgrade_body", "early", "_idle", "_guard", "_held")

    def __init__(self, site: Site) -> None:
        super().__init__(site)
        # The connection guard (limits) that admitted this connection, and the count
        # buckets it holds there until it closes.
        self._guard: Any = None
        self._held: tuple[int, int] | None = None
        # httptools, created when first needed (see reading.read_slow): most connections
        # never need it, and an idle one should not hold it.
        self.parser: Any = None
        self._mode = FAST if parse_request is not None else SLOW
        self._body_left = 0     # Content-Length body bytes the fast path still expects
        self.deadline = Deadline(site.timeouts, self._timed_out)
        self.current: Exchange | None = None
        self._parsing: Exchange | None = None   # the request whose head/body is being read
        self._blocked = 0
        self._failed: PoiseError | None = None  # a parse error waiting its turn to answer
        # request head being parsed
        self._in_head = False
        self._url = b""
        self._header_count = 0
        # Where messages start in what httptools parses (made with the parser).
        self._bounds: MessageBounds | None = None
        self._http11 = True     # the version of the last request head
        self._upgrade_body: bytes | None = None
        # After a WebSocket handshake request: what the client sent after it, kept
        # until the backend answers (sent on after a 101), with reading blocked.
        self.early: list[bytes] | None = None
        self._idle = False

    # -- asyncio callbacks -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        # (Not get_extra_info("socket"): uvloop would make and keep a socket object
        # per connection, 72 bytes, for nothing — it sets TCP_NODELAY itself.)
        peer = transport.get_extra_info("peername")
        proxied = self.proxied
        if proxied is not None:
            self.peer_ip = proxied[0][0].encode()
        elif isinstance(peer, tuple):
            self.peer_ip = peer[0].encode()
        elif peer is None:
            # Reset before we could ask its address: nobody to answer, and a request
            # it sent must not be served as an anonymous client's (rate limits).
            self.closed = True
            transport.close()
            return
        else:
            self.peer_ip = b"unix"      # (a Unix socket's peer name is a str)
        guard = self.site.guard
        if guard is not None:
            self._held = guard.admit(self.peer_ip)
            if self._held is None:      # over max_connections(_per_ip): closed at once
                self.closed = True
                transport.close()
                return
            self._guard = guard
        if self.site.tls is not None:
            ssl_object = transport.get_extra_info("ssl_object")
            if ssl_object is not None:
                # (Noted by ServerTls' SNI callback: a server-side SSL object's
                # server_hostname is always None.)
                self.sni = getattr(ssl_object, "sni_name", None)
        # X-Forwarded-For/-Proto for requests that bring none of their own.
        self.forwarded = (b"x-forwarded-for: " + self.peer_ip + b"\r\n" + self.site.xfp
                          if self.site.forwarded_headers else b"")
        self.site.connections.add(self)
        self.site.accepted += 1
        self.deadline.set(self.site.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        held = self._held
        if held is not None:
            self._held = None
            self._guard.release(held)
        self.deadline.detach()      # (freed by reference counting, not the GC)
        self.site.connections.discard(self)
        if self.current is not None:
            self.current.abandon()
            self.current = None
        for ex in self.queue:
            ex.abandon()
        self.queue.clear()

    def eof_received(self) -> bool:
        # By default a client that closes has given up: returning False closes the
        # transport, and connection_lost cancels what is in flight.  With
        # abort_on_client_close off, a half-closed client still gets the responses to
        # complete requests it sent; a request cut off mid-head or mid-body never can.
        if (self.current is None and not self.queue) or self._in_head \
                or self._parsing is not None or self.site.abort_on_client_close:
            return False
        self.draining = True
        return True

    def data_received(self, data: bytes) -> None:
        if self.closed or self._failed is not None or self.early is not None:
            if self.early is not None and not self.closed:
                self.early.append(data)     # (a read already under way as it paused)
            return
        self.site.bytes_in += len(data)
        if self._mode == SLOW:
            read_slow(self, data)
        else:
            read_fast(self, data)
        cur = self.current
        if cur is not None and cur._up_out:
            cur.flush_upstream()

    def pause_writing(self) -> None:
        self.write_paused = True
        cur = self.current
        if cur is not None and cur.conn is not None:
            cur.conn.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        cur = self.current
        if cur is not None and cur.conn is not None:
            cur.conn.resume_reading()

    def _fast_message_done(self, ex: Exchange, now: float = 0.0) -> None:
        """``ex``'s request has been read whole (unless it was already given up);
        ``now``: as for Exchange.request_done."""
        # (A method of its own: within reading.fast_head mypyc would take ``_parsing``
        # to be the Exchange assigned there, although calls since may have cleared it.)
        if self._parsing is ex:
            self._parsing = None
            ex.request_done(now)

    # -- parser callbacks (httptools) ----------------------------------------------------

    def on_message_begin(self) -> None:
        self._mode = SLOW
        self._in_head = True
        self._url = b""
        self._new_exchange()

    def _new_exchange(self, fields: list[bytes] | None = None) -> Exchange:
        """A request begins (either parser): the exchange its head is read into
        (``fields``: its fields, when the C parser has sorted them)."""
        ex = Exchange(self, self.site.max_request_body, fields)
        self._parsing = ex
        self._header_count = 0
        if self._idle:              # the idle deadline ends; a head deadline may start
            self._idle = False
            self.deadline.clear()
        return ex

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self.site.max_request_line:
            raise UriTooLong(f"request target longer than {self.site.max_request_line} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        # Limits are checked when the head is complete (one read holds at most 256 KiB;
        # a head spanning reads is bounded by _head_continues).
        self._header_count += 1
        ex = self._parsing
        assert ex is not None           # (set by on_message_begin)
        if (name[0] | 0x20) in WATCH_FIRST:     # headers that need a look
            ex.add_watched(name, value)
        else:
            ex.fields += (name, b": ", value, CRLF)

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self.deadline.when is not None and not self._idle:
            self.deadline.clear()
        parser = self.parser
        method = parser.get_method()
        ex = self._parsing
        assert ex is not None
        bounds = self._bounds
        assert bounds is not None
        header_block = bounds.check_head(method, self._url, ex.te)
        if header_block < 0:
            version = parser.get_http_version()
            if version != "1.1" and version != "1.0":
                raise VersionNotSupported(f"HTTP/{version}")
            raise BadRequest("malformed request line")
        http11 = self._http11 = bounds.http11
        site = self.site
        if header_block > site.max_header_size:
            raise HeadersTooLarge(f"header block larger than {site.max_header_size} bytes")
        if self._header_count > site.max_headers:
            raise HeadersTooLarge(f"more than {site.max_headers} headers")
        if method == b"CONNECT":
            raise BadRequest("CONNECT is not supported")
        target = self._url
        if target[:1] != b"/":
            target = origin_form(target, ex, method)
        ex.head_complete(method, target, http11, parser.should_keep_alive())
        if ex.upgrade is not None and parser.should_upgrade():
            if wants_websocket(ex, method, http11):
                # Forwarded if its route allows; nothing after it is parsed (a 101
                # makes the connection a relay, any other answer closes it).
                ex.websocket = WEBSOCKET
                ex.keep_alive = False
                self.early = []
            else:
                # Declined (never forwarded); its body, if any, is parsed after the head.
                self._upgrade_body = framing_of(ex.content_length, ex.chunked)
        self._dispatch(ex)

    def _dispatch(self, ex: Exchange) -> None:
        """``ex``'s head is complete (either parser): serve it, or queue it behind the
        one being served (and stop reading until that is done)."""
        if self.current is None:
            self.current = ex
            ex.start()
        else:
            self.queue.append(ex)
            self.block_reading(PIPELINED)

    def on_body(self, body: bytes) -> None:
        bounds = self._bounds
        assert bounds is not None       # (made by reading.read_slow before parsing)
        bounds.body_len += len(body)
        ex = self._parsing
        if ex is not None:
            ex.request_body(body)

    def on_message_complete(self) -> None:
        if self._upgrade_body is not None:
            return      # httptools ends an Upgrade request at its head: the body follows
        bounds = self._bounds
        assert bounds is not None
        if bounds.scanner is None:      # (MessageBounds.message_done, inlined)
            bounds.pos = bounds.body_start + bounds.body_len
        else:
            bounds.message_done()
        if parse_request is not None and self.parser.should_keep_alive():
            self._mode = FAST       # (else llhttp refuses what follows, as it should)
        ex = self._parsing
        if ex is not None:
            self._parsing = None
            ex.request_done()

    # -- head checks ---------------------------------------------------------------------

    def _head_continues(self) -> None:
        """The head spans reads: bound its size, start its deadline."""
        site = self.site
        bounds = self._bounds
        assert bounds is not None
        if bounds.head_size > site.max_request_line + site.max_header_size:
            self._parse_failed(HeadersTooLarge("request head too large"))
            return
        if self.deadline.when is None:
            self.deadline.set(site.header_timeout)

    # -- flow control --------------------------------------------------------------------

    def block_reading(self, reason: int) -> None:
        if not self._blocked and self.transport is not None:
            self.transport.pause_reading()
        self._blocked |= reason

    def unblock_reading(self, reason: int) -> None:
        if self._blocked & reason:
            self._blocked &= ~reason
            if not self._blocked and not self.closed:
                self.transport.resume_reading()

    # -- exchange lifecycle --------------------------------------------------------------

    def exchange_done(self, ex: Exchange) -> None:
        """``ex`` finished its response: start the next queued request or go idle."""
        if ex is not self.current:
            return
        self.current = None
        if self._parsing is ex:
            self._parsing = None
        if self._blocked & UPSTREAM_FULL:
            self.unblock_reading(UPSTREAM_FULL)
        if not ex.keep_alive or self.closed:
            if ex.request_complete:
                self._close()
            else:
                self._linger()      # the rest of its body may still be arriving
            return
        if self.queue:
            nxt = self.queue.pop(0)
            if not self.queue:
                self.unblock_reading(PIPELINED)
            self.current = nxt
            nxt.start()
            nxt.flush_upstream()
        elif self._failed is not None:
            self._answer_and_close(self._failed, None)
        elif self.draining:
            self._close()
        else:
            self._idle = True
            # Header deadlines are shorter but cleared by now: push never re-arms early.
            # (From when its response ended, if it was read: a clock reading saved.)
            self.deadline.push(self.site.idle_timeout, ex.ended)

    def reject_body(self, reason: str) -> None:
        """Called from a parser callback: raising stops the parser where it is, so
        nothing after the offending body is parsed (data_received answers 413)."""
        raise PayloadTooLarge(reason)

    # -- errors, deadlines and closing ---------------------------------------------------

    def _parse_failed(self, error: PoiseError) -> None:
        """The request stream is broken at ``error``: answer in turn, then close."""
        broken = self._parsing
        self._parsing = None
        self._in_head = False
        self._failed = error
        self.block_reading(PIPELINED)
        if broken is not None and broken is not self.current:
            if broken in self.queue:
                self.queue.remove(broken)
            broken.abandon()
        cur = self.current
        if cur is None:
            self._answer_and_close(error, broken)
        elif cur is broken:
            cur.keep_alive = False
            if cur.response_head_sent:
                cur.abandon()
                self.abort()
            else:
                # Answered here, not by the exchange: counted here, not as abandoned.
                cur.route_name = None
                cur.abandon()
                self.current = None
                self._answer_and_close(error, cur)

    def _answer_and_close(self, error: PoiseError, ex: Exchange | None) -> None:
        """Answer ``error`` (the request ``ex``'s, when it got that far), then close."""
        if self.closed:
            return
        status = status_of(error)
        data = error_response(status, close=True)
        self._write(data)
        if ex is None:
            answer_counted(self.site, status, len(data), 0.0, self.peer_ip, b"", b"", True)
        else:
            answer_counted(self.site, status, len(data), ex.began, self.peer_ip,
                           getattr(ex, "method", b""), self._url, self._http11)
        self._linger()

    def _linger(self) -> None:
        """Close after our answer without resetting a client that is still sending:
        send FIN, then read and discard for up to LINGER seconds (as nginx's
        lingering_close), so the client reads our answer instead of a reset."""
        if self.closed:
            return
        self.closed = True
        transport = self.transport
        if not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        self._blocked = 0
        transport.resume_reading()
        self.deadline.set(LINGER)

    def _timed_out(self) -> None:
        if self.closed:             # the end of a lingering close
            self.transport.close()
            return
        if self._idle:
            self._close()
        elif self._in_head or (self.current is None and not self.queue):
            # Answered in turn if an earlier pipelined request is still in flight.
            self._parse_failed(RequestTimeout(
                f"request head not received within {self.site.header_timeout:g}s"))

    def retire(self, grace: float) -> None:
        """Its listener was removed by a reload: what is in flight, and a request that
        arrives within ``grace`` seconds, are answered with ``Connection: close``
        (the client is told, not cut off); an idle connection that sends nothing in
        that time is closed."""
        self.draining = True
        if self._idle and not self.closed:
            when = self.deadline.when
            if when is None or when > self.loop.time() + grace:
                self.deadline.set(grace)

    def drain(self) -> None:
        """Graceful shutdown: finish what is in flight, then close."""
        self.draining = True
        if self.current is None and not self.queue:
            self._close()

    def _close(self) -> None:
        if not self.closed:
            self.closed = True
            self.deadline.cancel()
            self.transport.close()

    def _write(self, data: bytes) -> None:
        if not self.closed:
            self.transport.write(data)

    def addresses(self) -> tuple[Any, Any]:
        """``(client, local)``: the client's address and the one it connected to, each
        ``(ip, port)`` — as a PROXY header carried them, else the socket's own (for
        sending a PROXY header on, and logs); None where unknown."""
        return connection_addresses(self.proxied, self.transport)

    def abort(self) -> None:
        """Close without flushing: the client must see a truncated response."""
        if not self.closed:
            self.closed = True
            self.transport.abort()

    def __repr__(self) -> str:
        return (f"<ClientConnection {self.peer_ip.decode()} current={self.current!r} "
                f"queued={len(self.queue)}>")

