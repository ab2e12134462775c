"""The load side of bench/memory.py: many keep-alive connections, one GET on each, held.

One non-blocking, selector-based client (no threads, no asyncio) so that its own
memory and CPU stay small and it needs a single file descriptor per connection: it
stays under the sandbox's 20,000 open files per process for 10,000 connections.

Contract of :func:`hold`: open ``count`` TCP connections to ``127.0.0.1:port`` (at
most ``connecting`` handshakes in progress at a time, so that no proxy's listen
backlog overflows and a SYN is never retried a second later), then send ``GET path``
on each with at most ``in_flight`` requests outstanding, read each response whole
(status 200, Content-Length body) and return the sockets, open and idle.  Raises
:class:`ClientError` (after closing what it opened) on a refused connection, a non-200
answer, a connection closed early or the ``timeout``.

Connections are spread over source addresses 127.0.0.2 … 127.0.0.201 (with
IP_BIND_ADDRESS_NO_PORT, so the port is still picked at connect time for the whole
4-tuple) and closed with an RST (SO_LINGER 0): thousands of connections per run, run
after run, never exhaust the ephemeral ports nor leave TIME_WAIT sockets behind.

Also a command line, for bench/memory_inproc.py (whose poise must not share a process
with its client): ``python memory_client.py PORT COUNT [PATH] [IN_FLIGHT]`` prints
``ready N`` once every response is read, then holds the connections until its stdin
reaches EOF or a line, and closes them.
"""

from __future__ import annotations

import errno
import re
import selectors
import socket
import struct
import sys
import time

IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
SOURCES = 200                   # 127.0.0.2 … 127.0.0.201
_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.I)
_RST = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends an RST


class ClientError(RuntimeError):
    """The proxy refused, failed or was too slow; the message says how far we got."""


def close_all(socks: list[socket.socket]) -> None:
    """Close every socket with an RST (no TIME_WAIT left behind)."""
    for s in socks:
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RST)
        except OSError:
            pass
        s.close()


def _new_socket(i: int, port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setblocking(False)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
    s.bind((f"127.0.0.{2 + i % SOURCES}", 0))
    err = s.connect_ex(("127.0.0.1", port))
    if err not in (0, errno.EINPROGRESS):
        s.close()
        raise ClientError(f"connect to port {port}: {errno.errorcode.get(err, err)}")
    return s


def _complete(buf: bytes) -> bool:
    """True when ``buf`` holds a whole 200 response (raises ClientError otherwise)."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return False
    if not buf.startswith(b"HTTP/1.1 200"):
        raise ClientError(f"unexpected answer: {buf[:80]!r}")
    m = _LENGTH.search(buf, 0, end + 2)
    if m is None:
        raise ClientError(f"no Content-Length in {buf[:end]!r}")
    return len(buf) >= end + 4 + int(m.group(1))


def hold(port: int, count: int, path: str = "/", *, connecting: int = 128,
         in_flight: int = 32, timeout: float = 120.0) -> list[socket.socket]:
    """Open ``count`` connections, one GET each, and return them idle (see module doc)."""
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    deadline = time.monotonic() + timeout
    sel = selectors.DefaultSelector()
    socks: list[socket.socket] = []
    try:
        _connect(sel, socks, port, count, connecting, deadline)
        _exchange(sel, socks, request, in_flight, deadline)
    except BaseException:
        close_all(socks)
        raise
    finally:
        sel.close()
    return socks


def _connect(sel, socks, port, count, connecting, deadline) -> None:
    """Phase 1: all connections established (no request yet)."""
    pending = 0
    while len(socks) < count or pending:
        while len(socks) < count and pending < connecting:
            s = _new_socket(len(socks), port)
            socks.append(s)
            sel.register(s, selectors.EVENT_WRITE)
            pending += 1
        for key, _ in sel.select(max(0.0, min(1.0, deadline - time.monotonic()))):
            s = key.fileobj
            err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise ClientError(f"connection {len(socks) - pending} of {count} failed: "
                                  f"{errno.errorcode.get(err, err)}")
            sel.unregister(s)
            pending -= 1
        if time.monotonic() > deadline:
            raise ClientError(f"timed out connecting: {len(socks) - pending} of {count} open")


def _exchange(sel, socks, request, in_flight, deadline) -> None:
    """Phase 2: one request and its whole response on every connection."""
    bufs: dict[socket.socket, bytes] = {}
    todo = list(reversed(socks))
    done = 0
    while todo or bufs:
        while todo and len(bufs) < in_flight:
            s = todo.pop()
            s.send(request)     # (tiny: a fresh socket's buffer always takes it whole)
            bufs[s] = b""
            sel.register(s, selectors.EVENT_READ)
        for key, _ in sel.select(max(0.0, min(1.0, deadline - time.monotonic()))):
            s = key.fileobj
            try:
                data = s.recv(65536)
            except ConnectionError as exc:
                raise ClientError(f"after {done} responses: {exc}") from None
            if not data:
                raise ClientError(f"connection closed by the proxy after {done} responses")
            buf = bufs[s] = bufs[s] + data
            if _complete(buf):
                sel.unregister(s)
                del bufs[s]
                done += 1
        if time.monotonic() > deadline:
            raise ClientError(f"timed out: {done} of {len(socks)} responses read")


def main(argv: list[str]) -> int:
    port, count = int(argv[0]), int(argv[1])
    path = argv[2] if len(argv) > 2 else "/"
    in_flight = int(argv[3]) if len(argv) > 3 else 32
    try:
        socks = hold(port, count, path, in_flight=in_flight)
    except ClientError as exc:
        print(f"error {exc}", flush=True)
        return 1
    print(f"ready {len(socks)}", flush=True)
    sys.stdin.readline()
    close_all(socks)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
