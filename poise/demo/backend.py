"""A tiny HTTP/1.1 demo backend: answers with its name after a little latency.

Paths: ``/`` → ``hello from NAME``; ``/slow`` → the same after 200–400 ms;
``/status/N`` → status N; anything else → name and path.  Keep-alive aware.
Not a production server: it exists so ``poise demo`` has something to balance.
"""

from __future__ import annotations

import asyncio
import random

import httptools

_REASONS = {200: "OK", 404: "Not Found", 500: "Internal Server Error", 503: "Service Unavailable"}


class DemoBackend(asyncio.Protocol):
    def __init__(self, name: str, base_latency: float, rng: random.Random) -> None:
        self.name = name
        self.base_latency = base_latency
        self.rng = rng
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
            self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_message_complete(self) -> None:
        path = self.url.decode(errors="replace").split("?")[0]
        keep_alive = self.parser.should_keep_alive()
        status, delay = 200, self.base_latency * self.rng.uniform(0.5, 1.5)
        body = f"hello from {self.name}\n"
        if path == "/slow":
            delay += self.rng.uniform(0.2, 0.4)
        elif path.startswith("/status/") and path[8:].isdigit():
            status = int(path[8:])
        elif path != "/":
            body = f"{self.name} served {path}\n"
        asyncio.get_running_loop().call_later(delay, self._respond, status, body, keep_alive)

    def _respond(self, status: int, body: str, keep_alive: bool) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        data = body.encode()
        head = (f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}\r\n"
                f"content-type: text/plain\r\ncontent-length: {len(data)}\r\n"
                f"x-backend: {self.name}\r\n"
                + ("" if keep_alive else "connection: close\r\n") + "\r\n")
        self.transport.write(head.encode() + data)
        if not keep_alive:
            self.transport.close()


async def start_backend(name: str, host: str, port: int, base_latency: float,
                        seed: int = 0) -> asyncio.Server:
    rng = random.Random(seed)
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: DemoBackend(name, base_latency, rng), host, port)
