"""The backend of bench/memory.py's upstream case: keep-alive HTTP/1.1 that can be slow.

    python memory_backend.py PORT [DELAY]

Answers every GET with ``200`` and the same 64-byte body as the other benches'
backend nginx (``configs.SMALL_BODY``), keeping the connection open forever (no idle
timeout: an idle pooled connection is closed by the proxy or not at all).  A request
whose target contains ``/slow`` is answered after ``DELAY`` seconds (default 0.5):
a burst of such requests is in flight at once, so a proxy must open one backend
connection per request, and those connections then sit idle in its pool.  nginx
cannot delay an answer without extra modules, hence this small uvloop server; its own
memory is not measured.
"""

from __future__ import annotations

import asyncio
import sys

import uvloop
from configs import SMALL_BODY

RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 64\r\n\r\n"
            + SMALL_BODY.encode())


class Backend(asyncio.Protocol):
    """One connection: requests have no body, are answered in order (no pipelining
    needed: the proxies send one request at a time per backend connection)."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while (end := self.buf.find(b"\r\n\r\n")) >= 0:
            head, self.buf = self.buf[:end], self.buf[end + 4:]
            line = head.split(b"\r\n", 1)[0]
            if b"/slow" in line:
                asyncio.get_running_loop().call_later(self.delay, self._answer)
            else:
                self._answer()

    def _answer(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(RESPONSE)

    def connection_lost(self, exc) -> None:
        self.transport = None


async def serve(port: int, delay: float) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Backend(delay), "127.0.0.1", port,
                                      backlog=4096)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(serve(int(sys.argv[1]), float(sys.argv[2]) if len(sys.argv) > 2 else 0.5))
