#!/usr/bin/env python3
"""Reference floors for the benchmark: the least a Python proxy on uvloop can cost.

Not poise and not a proxy anyone should run.  Each relay gives every client
connection its own backend connection (alternating between the backends) and does
nothing a load balancer must do beyond what its name says:

- ``uvloop-relay``: copies bytes both ways (an L4 relay: no HTTP at all);
- ``httptools-relay``: parses requests and responses with httptools and rebuilds each
  head from the parsed headers (adding X-Forwarded-For), as poise does, but with no
  pooling, routing, balancing, limits, header checks, deadlines or error handling.

The gap between ``httptools-relay`` and poise in `make bench` is what poise's own
logic costs per request; the gap between the relays and HAProxy is what uvloop and
httptools cost before any of it.

    python bench/floors.py {uvloop-relay|httptools-relay} PORT BACKEND_PORT...
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import sys

import httptools
import uvloop


def _nodelay(transport: asyncio.BaseTransport) -> None:
    transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Upstream(asyncio.Protocol):
    """The backend side: bytes go to the client as they come (raw relay)."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        _nodelay(transport)

    def data_received(self, data: bytes) -> None:
        self.client.transport.write(data)

    def connection_lost(self, exc) -> None:
        self.client.transport.close()


class Client(asyncio.Protocol):
    """The client side: opens its backend connection, then relays bytes to it."""

    upstream_class = Upstream

    def __init__(self, backends) -> None:
        self.backends = backends
        self.upstream: Upstream | None = None
        self.early: list[bytes] = []      # what arrived before the backend connected
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        _nodelay(transport)
        loop = asyncio.get_running_loop()
        loop.create_task(self._connect(loop))

    async def _connect(self, loop) -> None:
        try:
            _, upstream = await loop.create_connection(
                lambda: self.upstream_class(self), "127.0.0.1", next(self.backends))
        except OSError:
            self.transport.close()
            return
        self.upstream = upstream
        for data in self.early:
            upstream.transport.write(data)

    def send(self, data: bytes) -> None:
        if self.upstream is None:
            self.early.append(data)
        else:
            self.upstream.transport.write(data)

    def data_received(self, data: bytes) -> None:
        self.send(data)

    def connection_lost(self, exc) -> None:
        if self.upstream is not None:
            self.upstream.transport.close()


class HttpUpstream(Upstream):
    """Parses each response and sends the client a rebuilt head plus the body."""

    def __init__(self, client: Client) -> None:
        super().__init__(client)
        self.parser = httptools.HttpResponseParser(self)
        self.fields: list[bytes] = []
        self.out: list[bytes] = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields += (name, b": ", value, b"\r\n")

    def on_headers_complete(self) -> None:
        self.out.append(b"HTTP/1.1 %d OK\r\n%b\r\n" % (self.parser.get_status_code(),
                                                     b"".join(self.fields)))
        self.fields = []

    def on_body(self, body: bytes) -> None:
        self.out.append(body)

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)
        out = self.out
        self.client.transport.write(out[0] if len(out) == 1 else b"".join(out))
        out.clear()


class HttpClient(Client):
    """Parses each request and sends the backend a rebuilt head plus the body."""

    upstream_class = HttpUpstream

    def __init__(self, backends) -> None:
        super().__init__(backends)
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.fields: list[bytes] = []

    def on_message_begin(self) -> None:
        self.url = b""
        self.fields = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields += (name, b": ", value, b"\r\n")

    def on_headers_complete(self) -> None:
        self.send(b"%b %b HTTP/1.1\r\n%bx-forwarded-for: 127.0.0.1\r\n\r\n" % (
            self.parser.get_method(), self.url, b"".join(self.fields)))

    def on_body(self, body: bytes) -> None:
        self.send(body)

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)


RELAYS = {"uvloop-relay": Client, "httptools-relay": HttpClient}


async def serve(relay: type[Client], port: int, backends: list[int]) -> None:
    loop = asyncio.get_running_loop()
    cycle = itertools.cycle(backends)
    await loop.create_server(lambda: relay(cycle), "127.0.0.1", port, backlog=4096)
    await asyncio.Event().wait()


def main(argv: list[str]) -> None:
    if len(argv) < 3 or argv[0] not in RELAYS:
        raise SystemExit(f"usage: floors.py {{{'|'.join(RELAYS)}}} PORT BACKEND_PORT...")
    uvloop.run(serve(RELAYS[argv[0]], int(argv[1]), [int(p) for p in argv[2:]]))


if __name__ == "__main__":
    main(sys.argv[1:])
