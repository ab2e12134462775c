"""Declining an HTTP Upgrade (``h2c``, WebSocket) while keeping the request's body.

poise never upgrades a connection; it strips ``Upgrade`` and answers in HTTP/1.1, as
RFC 9110 §7.8 allows.  httptools, however, stops parsing at the head of any request
llhttp flags as an upgrade and hands back the rest as "upgraded" bytes — including a
body announced by Content-Length or chunked framing.  :class:`BodyAfterUpgrade` parses
that body with a fresh parser primed by a synthetic head with the same framing, then
relays every later callback to the client connection unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import httptools

if TYPE_CHECKING:
    from poise.proxy.http.protocol import ClientConnection


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
