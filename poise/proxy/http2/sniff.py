"""Telling HTTP/2 from HTTP/1.x on a listener with ``http2`` on.

A TLS connection says in ALPN (``h2``).  A plain one says with its first bytes: an
HTTP/2 client with prior knowledge starts with the 24-byte connection preface
(RFC 9113 §3.4), which no HTTP/1.x request does.  Either way the connection is
accepted as an HTTP/1.x :class:`~poise.proxy.http.protocol.ClientConnection` first
(limits, counters, addresses), which an HTTP/2 one then takes over.  Listeners
without ``http2`` never meet this module.
"""

from __future__ import annotations

import asyncio
from typing import Any

from poise.proxy.http.protocol import ClientConnection
from poise.proxy.http2.session import H2Session

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class Http2Sniffer(asyncio.Protocol):
    """A connection's protocol until it is known to speak HTTP/2 or HTTP/1.x."""

    def __init__(self, site: Any) -> None:
        self.site = site
        self.proxied: Any = None        # (set by the PROXY acceptor, as for a client)
        self.client: ClientConnection | None = None
        self._seen = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        client = self.client = ClientConnection(self.site)
        client.proxied = self.proxied
        client.connection_made(transport)
        if client.closed:
            return
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            if ssl_object.selected_alpn_protocol() == "h2":
                H2Session.adopt(client, b"")
            else:
                transport.set_protocol(client)
        # Plain: the first bytes tell.

    def data_received(self, data: bytes) -> None:
        client = self.client
        assert client is not None
        seen = self._seen + data
        if seen[:len(PREFACE)] != PREFACE[:len(seen)]:      # not the preface: HTTP/1.x
            client.transport.set_protocol(client)
            client.data_received(seen)
        elif len(seen) >= len(PREFACE):
            H2Session.adopt(client, seen)
        else:
            self._seen = seen

    def eof_received(self) -> bool:
        client = self.client
        assert client is not None
        return client.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.client is not None:
            self.client.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.client is not None:
            self.client.pause_writing()

    def resume_writing(self) -> None:
        if self.client is not None:
            self.client.resume_writing()
