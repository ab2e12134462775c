"""Test support: an admin server on its own uvloop thread (so tests may use blocking
sockets and click's CliRunner), and a raw HTTP/1.1 client that checks every response
it reads is well-formed."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import uvloop

from poise.admin.api import AdminApi
from poise.admin.http import AdminServer, Limits

T = TypeVar("T")


class ServerThread:
    """An :class:`AdminServer` for ``api`` on 127.0.0.1 (a free port), served by a
    uvloop loop in a daemon thread.  ``errors`` collects whatever reaches the loop's
    exception handler (nothing should)."""

    def __init__(self, api: AdminApi, limits: Limits | None = None) -> None:
        self.api = api
        self.errors: list[dict[str, Any]] = []
        self.loop = uvloop.new_event_loop()
        self.loop.set_exception_handler(lambda loop, context: self.errors.append(context))
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = AdminServer(api, self.loop, limits)
        self.run(self.server.start("127.0.0.1", 0))
        self.addr: tuple[str, int] = self.server.addresses[0]

    def run(self, coro: Any, timeout: float = 5.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], T]) -> T:
        async def call() -> T:
            return fn()
        return self.run(call())

    def connections(self) -> int:
        return self.call(lambda: len(self.server.connections))

    def wait_connections(self, n: int, timeout: float = 3.0) -> None:
        deadline = time.monotonic() + timeout
        while self.connections() != n:
            assert time.monotonic() < deadline, f"{self.connections()} connections, not {n}"
            time.sleep(0.01)

    def stop(self) -> None:
        self.call(self.server.close)
        self.run(self.server.wait_closed())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@dataclass
class Reply:
    status: int
    reason: str
    headers: dict[str, str]     # lower-case names (each at most once)
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


def request(method: str, target: str, body: bytes = b"", headers: dict[str, str] | None = None,
            version: str = "1.1") -> bytes:
    """A request's bytes; Host is added unless ``headers`` has one (None: leave out)."""
    fields = {"host": "admin"} if version == "1.1" else {}
    fields.update(headers or {})
    if body:
        fields.setdefault("content-length", str(len(body)))
    lines = [f"{method} {target} HTTP/{version}"]
    lines += [f"{k}: {v}" for k, v in fields.items() if v is not None]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class Conn:
    """A blocking client connection to ``addr``."""

    def __init__(self, addr: tuple[str, int], timeout: float = 3.0) -> None:
        self.sock = socket.create_connection(addr, timeout=timeout)
        self.buf = b""

    def __enter__(self) -> Conn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def ask(self, method: str, target: str, body: bytes = b"", **kw: Any) -> Reply:
        self.send(request(method, target, body, **kw))
        return self.reply(head=method == "HEAD")

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        self.buf += chunk
        return bool(chunk)

    def reply(self, head: bool = False) -> Reply:
        """Read one response, checking that it is well-formed JSON with
        Content-Length (no body after HEAD)."""
        while b"\r\n\r\n" not in self.buf:
            if not self._fill():
                raise EOFError(f"connection closed mid-head: {self.buf!r}")
        raw, _, self.buf = self.buf.partition(b"\r\n\r\n")
        status_line, *lines = raw.decode("latin-1").split("\r\n")
        version, status, reason = status_line.split(" ", 2)
        assert version == "HTTP/1.1" and status.isdigit() and len(status) == 3, status_line
        headers: dict[str, str] = {}
        for line in lines:
            name, sep, value = line.partition(": ")
            assert sep and name == name.lower() and name not in headers, line
            headers[name] = value
        if int(status) == 100:
            return self.reply(head)
        assert headers["content-type"] == "application/json"
        length = int(headers["content-length"])
        if head:
            length = 0
        while len(self.buf) < length:
            if not self._fill():
                raise EOFError("connection closed mid-body")
        body, self.buf = self.buf[:length], self.buf[length:]
        if not head:
            json.loads(body)
        return Reply(int(status), reason, headers, body)

    def closed(self) -> bool:
        """True when the server closed the connection (EOF or reset) with nothing
        more to read; False if it is still open after the timeout."""
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return not self.buf
                self.buf += chunk
        except ConnectionResetError:
            return not self.buf
        except TimeoutError:
            return False


def healthy(addr: tuple[str, int], within: float = 0.5) -> None:
    """Assert that /healthz answers 200 on a new connection within ``within`` s."""
    started = time.monotonic()
    with Conn(addr, timeout=within) as c:
        r = c.ask("GET", "/healthz")
    assert r.status == 200 and r.json == {"status": "ok"}
    assert time.monotonic() - started < within


def read_to_eof(sock: socket.socket, timeout: float = 3.0) -> bytes:
    """Everything the server sends until it closes (a reset counts as a close);
    fails if it neither closes nor sends for ``timeout`` seconds."""
    sock.settimeout(timeout)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        except TimeoutError:
            raise AssertionError(f"the server neither answered nor closed: {data!r}") from None
        if not chunk:
            return data
        data += chunk


def parse_replies(data: bytes) -> list[Reply]:
    """Split a response stream (no responses to HEAD in it) into well-formed replies;
    fails on anything else, a truncated response included."""
    c = Conn.__new__(Conn)
    c.buf = data
    c.sock = _Exhausted()       # type: ignore[assignment]
    replies = []
    while c.buf:
        replies.append(c.reply())
    return replies


class _Exhausted:
    def recv(self, n: int) -> bytes:
        return b""
