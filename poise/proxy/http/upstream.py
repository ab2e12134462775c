"""The upstream HTTP/1.1 connection: one keep-alive connection to a backend.

An :class:`UpstreamConnection` serves one exchange at a time.  Its parser callbacks
only record what happened; :meth:`UpstreamConnection.data_received` acts on it after
the parser returns, so a connection is never handed to the next request while its
parser is still running.  Response heads in plain form are read in one call
(fasthead, h1head.c); httptools reads the rest.  Its pool is
:class:`poise.proxy.http.pool.UpstreamPool`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, Final

import httptools

from poise.errors import (
    UpstreamProtocolError,
    UpstreamReset,
    UpstreamTimeout,
)
from poise.proxy.deadline import Deadline
from poise.proxy.http import fasthead
from poise.proxy.http.headers import (
    CRLF,
    HOP_BY_HOP,
    body_slice,
    chunk,
    drop_listed,
    split_block,
)
from poise.proxy.http.tunnel import open_tunnel

if TYPE_CHECKING:
    from poise.proxy.http.exchange import Exchange
    from poise.proxy.http.pool import UpstreamPool


class UpstreamConnection:
    """One keep-alive connection to a backend, parsing responses with httptools."""

    __slots__ = ("pool", "transport", "exchange", "parser", "usable", "reused", "_slow",
                 "_body_left",
                 "reading_paused", "idle_since", "deadline", "owner", "_fields", "_has_length",
                 "_te", "_connection", "_done", "_head_only", "_keep_alive", "_status",
                 "parked")

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
        # Its pool parked it (pool.py): the transport went, the socket lives on.
        self.parked = False

    # -- asyncio callbacks -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (With TLS: after the handshake, and ``transport`` is the TLS one.  uvloop
        # sets TCP_NODELAY on the TCP socket itself: asking for the "socket" here
        # would make it keep a socket object per connection.)
        self.transport = transport
        self.usable = True
        self.pool.stats.active_connections += 1

    def connection_lost(self, exc: Exception | None) -> None:
        if self.parked:
            # Only the transport closed: the connection is open, parked in its pool
            # (still counted there), and this object is done with.
            return
        self.usable = False
        pool = self.pool
        pool.stats.active_connections -= 1
        self.deadline.detach()      # (freed by reference counting, not the GC)
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

    def _fast_head(self, ex: Exchange, head: tuple[int, bool, bool, bytes, int, int],
                   data: bytes) -> bool:
        """A response head from fasthead.parse_response, its end-to-end header lines
        already one block (what on_header would have gathered, h1head.c), ended through
        _head_done as with httptools; then the body bytes in ``data``.  False (nothing
        done) for a body delimited by the connection's close, which httptools reads."""
        status, http11, keep_alive, block, body_start, length = head
        self._has_length = length >= 0
        if ex.head_only or status == 204 or status == 304:
            length = 0
        elif length < 0:
            return False
        # (An HTTP/2 client's exchange reads the fields a name and value at a time.)
        self._head_done(status, keep_alive, split_block(block) if ex.client.h2 else [block])
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
        parser = self.parser
        fields = self._fields
        self._fields = []
        self._head_done(parser.get_status_code(), parser.should_keep_alive(), fields)

    def _head_done(self, status: int, keep_alive: bool, fields: list[bytes]) -> None:
        """A response head is complete, whichever parser read it: its end-to-end
        ``fields`` (on_header's, or the C parser's block)."""
        ex = self.exchange
        if ex is None:
            return
        self._status = status
        if self._connection is not None:
            fields = drop_listed(fields, self._connection)
            self._connection = None
        if 100 <= status < 200:
            self._has_length = False
            self._te = None
            ex.on_informational(status, fields)
            return
        self.deadline.clear()
        self._keep_alive = keep_alive
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
