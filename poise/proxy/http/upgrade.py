"""HTTP Upgrade on the client side: a WebSocket handshake is let through, any other
upgrade (``h2c``, a WebSocket request poise cannot forward) is declined while its body
is kept.

A **WebSocket** opening handshake (RFC 6455 §4.1: a GET, HTTP/1.1, no body, Upgrade
listing ``websocket``) is forwarded if its route allows (``Exchange.start``); nothing
the client sends after it is parsed: it is kept (``ClientConnection.early``) and the
connection stops reading until the backend answers.  A ``101`` turns both connections
into a byte relay (:mod:`poise.proxy.http.tunnel`) that sends what was kept first; any
other answer is an ordinary response after which the connection closes.

**Declined** upgrades: poise strips ``Upgrade`` and answers in HTTP/1.1, as RFC 9110
§7.8 allows.  httptools, however, stops parsing at the head of any request llhttp
flags as an upgrade and hands back the rest as "upgraded" bytes — including a body
announced by Content-Length or chunked framing.  :class:`BodyAfterUpgrade` parses that
body with a fresh parser primed by a synthetic head with the same framing, then relays
every later callback to the client connection unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import httptools

from poise.proxy.http.bounds import ChunkScanner, MessageBounds
from poise.proxy.http.headers import CRLF

if TYPE_CHECKING:
    from poise.proxy.http.exchange import Exchange
    from poise.proxy.http.protocol import ClientConnection
    from poise.proxy.http.router import RouteTarget

# Exchange.websocket of a handshake request not routed yet.
WEBSOCKET: Final = True
# ClientConnection read-blocking reason: a WebSocket handshake waits for its answer.
AWAITING_SWITCH: Final = 16


def wants_websocket(ex: Exchange, method: bytes, http11: bool) -> bool:
    """Whether ``ex`` (an Upgrade request) is a WebSocket opening handshake poise may
    forward: a GET in HTTP/1.1 without a body whose Upgrade lists ``websocket``."""
    value = ex.upgrade
    if value is None or method != b"GET" or not http11 or ex.content_length > 0 \
            or ex.chunked:
        return False
    return any(token.strip().lower() == b"websocket" for token in value.split(b","))


def route_websocket(ex: Exchange, target: RouteTarget) -> None:
    """Forward the WebSocket handshake's Upgrade if the route allows (else it is
    declined: forwarded as a plain GET, and the connection closes after it)."""
    settings = ex.websocket = target.websocket
    if settings is not None and ex.upgrade is not None:
        ex.fields += (b"connection", b": ", b"upgrade", CRLF,
                      b"upgrade", b": ", ex.upgrade, CRLF)


def after_upgrade(conn: ClientConnection, data: bytes, offset: int) -> None:
    """httptools stopped at an Upgrade request's end, ``offset`` into ``data``."""
    rest = data[offset:]
    early = conn.early
    if early is not None:       # a WebSocket handshake: keep the rest, wait
        if rest:
            early.append(rest)
        if not conn.closed:
            # (Closed: poise has answered it already, 404 or 503, and is lingering:
            # reading must go on, to see the client's close.)
            conn.block_reading(AWAITING_SWITCH)
        return
    # Declined: parse on as HTTP/1.1.
    conn._bounds = MessageBounds()
    framing = conn._upgrade_body
    if framing is None:
        conn.parser = httptools.HttpRequestParser(conn)
    else:
        conn._upgrade_body = None
        conn.parser = BodyAfterUpgrade(conn, framing).parser
        if conn._parsing is not None and conn._parsing.chunked:
            conn._bounds.scanner = ChunkScanner()
    if rest:
        conn.data_received(rest)


def framing_of(content_length: int, chunked: bool) -> bytes | None:
    """The framing header a declined Upgrade request's body needs, or None (no body)."""
    if chunked:
        return b"transfer-encoding: chunked\r\n"
    if content_length > 0:
        return b"content-length: %d\r\n" % content_length
    return None


class BodyAfterUpgrade:
    """Owns the connection's parser after a declined Upgrade request with a body."""

    def __init__(self, conn: ClientConnection, framing: bytes) -> None:
        self.conn = conn
        self.parser = httptools.HttpRequestParser(self)
        self._priming = True
        self.parser.feed_data(b"POST / HTTP/1.1\r\nhost: upgrade-body\r\n" + framing + b"\r\n")
        self._priming = False

    # The synthetic head's own callbacks are swallowed; all else goes to the connection.

    def on_message_begin(self) -> None:
        if not self._priming:
            self.conn.on_message_begin()

    def on_url(self, url: bytes) -> None:
        if not self._priming:
            self.conn.on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._priming:
            self.conn.on_header(name, value)

    def on_headers_complete(self) -> None:
        if not self._priming:
            self.conn.on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self.conn.on_body(body)

    def on_message_complete(self) -> None:
        self.conn.on_message_complete()
