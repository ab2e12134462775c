"""poise relies on uvloop to set TCP_NODELAY on accepted and connected sockets (it does
not ask for each connection's socket object, which uvloop would then keep: 72 bytes
per connection).  If a uvloop upgrade stopped doing it, small responses would wait for
Nagle's algorithm: this says so."""

from __future__ import annotations

import asyncio
import socket

import uvloop


def test_uvloop_sets_tcp_nodelay_on_both_ends() -> None:
    async def main() -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        accepted: asyncio.Future[asyncio.BaseTransport] = loop.create_future()

        class Server(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                accepted.set_result(transport)

        server = await loop.create_server(Server, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        transport, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port)
        theirs = await asyncio.wait_for(accepted, 5)
        flags = tuple(t.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP,
                                                              socket.TCP_NODELAY)
                      for t in (transport, theirs))
        transport.close()
        theirs.close()
        server.close()
        return flags

    assert all(uvloop.run(main()))
