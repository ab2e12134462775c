"""How a client connection's bytes become requests: the one-call fast path (fasthead,
h1head.c) for heads in plain form, httptools for everything else.

``read_fast`` parses whole heads and Content-Length bodies itself and hands the rest
of a read to ``read_slow`` from the first head the fast path declines; httptools then
owns the stream (``ClientConnection._mode`` is SLOW) until its message ends, and its
callbacks are ClientConnection's ``on_*`` methods.  Both paths end in the same
connection methods (``_new_exchange``, ``on_header``, ``_dispatch``,
``_parse_failed``), so a request is checked and served the same whichever parsed it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Final

import httptools

from poise.errors import (
    BadRequest,
    HeadersTooLarge,
    InternalError,
    PoiseError,
    UriTooLong,
    VersionNotSupported,
)
from poise.proxy.http import fasthead
from poise.proxy.http.bounds import MessageBounds
from poise.proxy.http.headers import body_slice
from poise.proxy.http.request import origin_form
from poise.proxy.http.upgrade import after_upgrade

if TYPE_CHECKING:
    from poise.proxy.http.protocol import ClientConnection

log = logging.getLogger("poise")
# Who parses a connection's next bytes (ClientConnection._mode).
FAST: Final = 0     # the one-call head parser (fasthead): the stream is at a message
                    # boundary, or in a Content-Length body the fast path framed
SLOW: Final = 1     # httptools: it began a message it has not finished (or there is no
                    # fast parser, or the connection was upgraded)
CLOSING: Final = 2  # the last message was not keep-alive: nothing may follow it
# (Final: a C static when compiled, not a module dict lookup per use.)
parse_request: Final[Any] = fasthead.parse_request


def read_fast(conn: ClientConnection, data: bytes) -> None:
    """Parse ``data`` a whole head per call; from the first head the fast path
    declines, httptools parses the rest."""
    pos = 0
    n = len(data)
    try:
        while pos < n:
            if conn._body_left:
                pos = fast_body(conn, data, pos)
                continue
            if conn._mode != FAST or conn._failed is not None or conn.closed:
                break
            head = parse_request(data, pos)
            if head is None:
                conn._mode = SLOW
                read_slow(conn, data[pos:] if pos else data)
                return
            pos = fast_head(conn, head)
        if pos < n and conn._mode == CLOSING and conn._failed is None:
            raise BadRequest("Data after `Connection: close`")    # (as llhttp)
    except PoiseError as e:
        conn._parse_failed(e)
    except Exception as e:
        log.error("bug while parsing a request", exc_info=e)
        conn._parse_failed(InternalError(f"{type(e).__name__}: {e}"))


FastRequest = tuple[bytes, bytes, bool, bool, list[bytes], "list[bytes] | None", int, int, int,
                    "bytes | None", bool, int]


def fast_head(conn: ClientConnection, head: FastRequest) -> int:
    """One request head from fasthead.parse_request: what the httptools callbacks do
    from on_message_begin to on_headers_complete, in one go (the C parser has sorted
    the fields: RequestHead.take_sorted).  Returns where its body (or the next
    message) starts."""
    (method, target, http11, keep_alive, fields, watched, body_start, length, header_block,
     host, expect_continue, count) = head
    site = conn.site
    ex = conn._new_exchange(fields)
    if conn.deadline.when is not None:      # (a head deadline: the head is here)
        conn.deadline.clear()
    conn._url = target
    if len(target) > site.max_request_line:
        raise UriTooLong(f"request target longer than {site.max_request_line} bytes")
    ex.take_sorted(fields, watched, host, expect_continue, length)
    conn._header_count = count
    if header_block > site.max_header_size:
        raise HeadersTooLarge(f"header block larger than {site.max_header_size} bytes")
    if conn._header_count > site.max_headers:
        raise HeadersTooLarge(f"more than {site.max_headers} headers")
    if target[:1] != b"/":
        target = origin_form(target, ex, method)
    conn._http11 = http11
    ex.head_complete(method, target, http11, keep_alive)
    if not keep_alive:
        conn._mode = CLOSING
    conn._dispatch(ex)
    if length > 0:
        conn._body_left = length
    else:
        # (Its try, if one began, began in this call: that clock reading will do.)
        conn._fast_message_done(ex, ex._try_began)
    return body_start


def fast_body(conn: ClientConnection, data: bytes, pos: int) -> int:
    """Content-Length body bytes from ``data[pos:]``; returns where they end."""
    body, end = body_slice(data, pos, conn._body_left)
    left = conn._body_left = conn._body_left - (end - pos)
    ex = conn._parsing
    if ex is not None:
        ex.request_body(body)
        if not left:
            conn._fast_message_done(ex)
    return end


def read_slow(conn: ClientConnection, data: bytes) -> None:
    """Parse ``data`` with httptools (ClientConnection's ``on_*`` callbacks)."""
    parser = conn.parser
    if parser is None:
        parser = conn.parser = httptools.HttpRequestParser(conn)
    bounds = conn._bounds
    if bounds is None:
        bounds = conn._bounds = MessageBounds()
    if bounds.head_buf is None:     # (MessageBounds.read, inlined)
        bounds.buf = data
        bounds.pos = bounds.body_start = bounds.body_len = 0
    else:
        bounds.read(data)
    upgraded_at = -1
    try:
        parser.feed_data(data)
    except httptools.HttpParserUpgrade as e:
        upgraded_at = e.args[0]
    except httptools.HttpParserError as e:
        conn._parse_failed(translate(e))
    else:
        if conn._in_head or bounds.head_buf is not None or bounds.scanner is not None:
            bounds.read_done(conn._in_head)
            if conn._in_head:
                conn._head_continues()
    if upgraded_at >= 0:
        # Outside the except block: errors in the rest must not chain onto it.
        after_upgrade(conn, data, upgraded_at)


def translate(e: httptools.HttpParserError) -> PoiseError:
    """An httptools error as a poise error; our own errors raised in callbacks win.
    Any other exception from a callback is a bug: logged, answered 500."""
    ctx = e.__context__
    if isinstance(ctx, PoiseError):
        return ctx
    if isinstance(e, httptools.HttpParserCallbackError) and ctx is not None:
        log.error("bug while parsing a request", exc_info=ctx)
        return InternalError(f"{type(ctx).__name__}: {ctx}")
    message = str(e)
    if "HTTP version" in message:
        return VersionNotSupported(message)
    return BadRequest(message)
