"""Real loopback servers for the health-check tests, run inside the test's own loop.

``HealthServer`` answers each request head with ``respond(server, conn, head)``: bytes
to write, or None to stay silent; a test changes ``status``/``body``/``respond`` on
the fly.  ``wait_for`` polls a condition instead of sleeping a fixed time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from poise.core.backend import Backend


async def wait_for(cond: Callable[[], object], timeout: float = 5.0, what: str = "") -> None:
    """Return as soon as ``cond()`` is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or cond}")
        await asyncio.sleep(0.005)


def ok_response(status: int = 200, body: bytes = b"ok", extra: bytes = b"") -> bytes:
    return (b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n%s\r\n" % (status, len(body), extra)
            + body)


def default_respond(server: HealthServer, conn: ServerConn, head: bytes) -> bytes | None:
    return ok_response(server.status, server.body)


class ServerConn(asyncio.Protocol):
    def __init__(self, server: HealthServer) -> None:
        self.server = server
        self.buf = b""
        self.requests = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.server.accepted += 1
        self.server.conns.add(self)

    def connection_lost(self, exc) -> None:
        self.server.conns.discard(self)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while b"\r\n\r\n" in self.buf:
            head, self.buf = self.buf.split(b"\r\n\r\n", 1)
            self.requests += 1
            self.server.heads.append(head)
            out = self.server.respond(self.server, self, head)
            if out:
                self.transport.write(out)
            self.server.statuses.append(self.server.status if out else None)


class HealthServer:
    """A loopback HTTP server on a free port that counts connections and requests."""

    def __init__(self) -> None:
        self.accepted = 0
        self.conns: set[ServerConn] = set()
        self.heads: list[bytes] = []
        self.statuses: list[int | None] = []
        self.status = 200
        self.body = b"ok"
        self.respond = default_respond
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> HealthServer:
        return await self.start_on(0)

    async def start_on(self, port: int) -> HealthServer:
        """Listen on ``port`` (0: a free one), e.g. again after :meth:`close`."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: ServerConn(self), "127.0.0.1", port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def backend(self) -> Backend:
        return Backend("127.0.0.1", self.port)

    @property
    def requests(self) -> int:
        return len(self.heads)

    @property
    def open(self) -> int:
        return len(self.conns)

    def loop_call(self, fn: Callable[[], object], delay: float = 0.01) -> None:
        """Run ``fn`` a little later (long enough for the peer to read what came before)."""
        asyncio.get_running_loop().call_later(delay, fn)

    async def close(self) -> None:
        self._server.close()
        for c in list(self.conns):
            c.transport.abort()
        await self._server.wait_closed()


class Changes:
    """Records on_change calls; ``at`` holds what ``snapshot()`` said at each flip."""

    def __init__(self, snapshot: Callable[[], object] = lambda: None) -> None:
        self.calls: list[tuple[Backend, bool]] = []
        self.at: list[object] = []
        self.snapshot = snapshot

    def __call__(self, backend: Backend, healthy: bool) -> None:
        self.calls.append((backend, healthy))
        self.at.append(self.snapshot())

    @property
    def states(self) -> list[bool]:
        return [h for _, h in self.calls]
