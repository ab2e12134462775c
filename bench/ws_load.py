#!/usr/bin/env python3
"""The WebSocket backend and load generator of bench/websocket.py (uvloop, one process).

``backend PORT``: an HTTP/1.1 server. A WebSocket opening handshake (RFC 6455 §4.1:
``Upgrade: websocket`` and a ``Sec-WebSocket-Key``) is answered with ``101 Switching
Protocols`` and its ``Sec-WebSocket-Accept`` (§4.2.2); from then on every byte that
arrives is written back unchanged. Any other request gets ``200`` with a 64-byte body
(keep-alive), which the proxies' readiness probes use.

A raw byte echo is not a WebSocket server (it sends the client's masked frames back
masked, and answers a Close frame with the same Close frame), but none of the proxies
measured parses frames after the ``101``: each relays bytes both ways, so what they do
per message is the same as with a real echo server, and the backend stays cheap.

``client messages PORT``: opens ``--connections`` connections to 127.0.0.1:PORT, does
the handshake on each (checking the 101 and its Sec-WebSocket-Accept), then prints
``{"event": "ready"}`` and waits for a line on stdin. Then, for ``--duration`` seconds,
every connection keeps ``--window`` messages in flight: pre-built masked binary frames
of ``--size`` payload bytes, one more sent for each one echoed back (counted by bytes
received; the first window's echo is compared byte for byte). It prints one JSON line
``{"messages", "seconds", "errors", ...}``, waits for a line or the end of stdin (so
that closing the connections comes after the parent's CPU readings), and exits.

``client handshakes PORT``: the same ready/go exchange, then ``--connections``
concurrent loops of: connect, handshake, check the 101 and its accept value, close
(a FIN, the client first); it prints ``{"handshakes", "seconds", "errors", ...}``
in the same way.

Errors are connections refused, reset or closed early, answers other than a correct
101, and echoes that differ from what was sent (``error_kinds`` counts each kind).

    python bench/ws_load.py backend 19400
    python bench/ws_load.py client messages 19401 --connections 50 --window 8 --size 64
    python bench/ws_load.py client handshakes 19401 --connections 32
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import os
import socket
import sys
import time
from collections import Counter

import uvloop

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC11B85"   # RFC 6455 §1.3
SMALL_BODY = b"poise-bench: a small fixed response body of exactly 64 bytes...\n"
HIGH_WATER = 1024 * 1024


def accept_value(key: bytes) -> bytes:
    """Sec-WebSocket-Accept for a Sec-WebSocket-Key (RFC 6455 §4.2.2, item 5.4)."""
    return base64.b64encode(hashlib.sha1(key.strip() + GUID).digest())


def _nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def parse_head(head: bytes) -> tuple[bytes, dict[bytes, bytes]]:
    """(first line, {lower-case name: value}) of an HTTP/1.1 head without its CRLFCRLF."""
    lines = head.split(b"\r\n")
    fields = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        fields[name.strip().lower()] = value.strip()
    return lines[0], fields


# ---------------------------------------------------------------- backend


class Backend(asyncio.Protocol):
    """HTTP/1.1 until a WebSocket handshake, then a byte echo."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.echo = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        _nodelay(transport)
        transport.set_write_buffer_limits(high=HIGH_WATER)

    def data_received(self, data: bytes) -> None:
        if self.echo:
            self.transport.write(data)
            return
        self.buf += data
        while not self.echo:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > 65536:
                    self.transport.close()
                return
            head, self.buf = self.buf[:end], self.buf[end + 4:]
            self.request(head)
        if self.buf:
            rest, self.buf = self.buf, b""
            self.transport.write(rest)

    def request(self, head: bytes) -> None:
        line, fields = parse_head(head)
        upgrade = fields.get(b"upgrade", b"").lower()
        key = fields.get(b"sec-websocket-key")
        if line.startswith(b"GET ") and b"websocket" in upgrade and key:
            self.transport.write(b"HTTP/1.1 101 Switching Protocols\r\n"
                                 b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
                                 b"Sec-WebSocket-Accept: " + accept_value(key) + b"\r\n\r\n")
            self.echo = True
            return
        close = fields.get(b"connection", b"").lower() == b"close"
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                             b"Content-Length: %d\r\n%b\r\n%b" % (
                                 len(SMALL_BODY), b"Connection: close\r\n" if close else b"",
                                 SMALL_BODY))
        if close:
            self.transport.close()

    def pause_writing(self) -> None:        # the client is slow: stop reading it
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.transport.resume_reading()


async def serve_backend(port: int) -> None:
    loop = asyncio.get_running_loop()
    await loop.create_server(Backend, "127.0.0.1", port, backlog=4096)
    await asyncio.Event().wait()


# ---------------------------------------------------------------- client: common


def frame(size: int) -> bytes:
    """A masked binary frame (FIN set) of ``size`` payload bytes (RFC 6455 §5.2)."""
    payload = bytes((i * 7 + 1) % 251 for i in range(size))
    if size < 126:
        header = bytes((0x82, 0x80 | size))
    elif size < 65536:
        header = bytes((0x82, 0x80 | 126)) + size.to_bytes(2, "big")
    else:
        header = bytes((0x82, 0x80 | 127)) + size.to_bytes(8, "big")
    mask = os.urandom(4)
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def handshake_request(port: int, key: bytes) -> bytes:
    return (b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: %b\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n" % (port, key))


def new_key() -> tuple[bytes, bytes]:
    """(a Sec-WebSocket-Key, the Sec-WebSocket-Accept it expects)."""
    key = base64.b64encode(os.urandom(16))
    return key, accept_value(key)


def check_switch(head: bytes, accept: bytes) -> str | None:
    """None if ``head`` is a correct 101 for the key whose accept value is ``accept``,
    else what is wrong with it (an error kind)."""
    line, fields = parse_head(head)
    parts = line.split(None, 2)
    if len(parts) < 2 or parts[1] != b"101":
        return f"status {parts[1].decode(errors='replace') if len(parts) > 1 else '?'}"
    if fields.get(b"sec-websocket-accept") != accept:
        return "wrong Sec-WebSocket-Accept"
    if b"websocket" not in fields.get(b"upgrade", b"").lower():
        return "101 without Upgrade: websocket"
    return None


class Switching(asyncio.Protocol):
    """Sends a handshake and waits for the 101 (``switched`` resolves to the bytes
    after its head, or an error kind as an exception)."""

    def __init__(self, port: int, key: tuple[bytes, bytes], errors: Counter) -> None:
        self.port = port
        self.key, self.accept = key
        self.errors = errors
        self.transport: asyncio.Transport | None = None
        self.head = b""
        self.switched: asyncio.Future = asyncio.get_running_loop().create_future()
        self.closed = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        _nodelay(transport)
        transport.write(handshake_request(self.port, self.key))

    def data_received(self, data: bytes) -> None:
        if self.switched.done():
            self.relayed(data)
            return
        self.head += data
        end = self.head.find(b"\r\n\r\n")
        if end < 0:
            return
        problem = check_switch(self.head[:end], self.accept)
        if problem:
            self.switched.set_exception(LoadError(problem))
            self.transport.close()
        else:
            self.switched.set_result(self.head[end + 4:])
        self.head = b""

    def relayed(self, data: bytes) -> None:
        pass

    def connection_lost(self, exc) -> None:
        self.closed = True
        if not self.switched.done():
            self.switched.set_exception(LoadError(
                "reset before the 101" if exc else "closed before the 101"))
        else:
            self.lost(exc)

    def lost(self, exc) -> None:
        pass


class LoadError(Exception):
    """One failed connection; its message is the error kind."""


async def say(message: dict) -> None:
    """Print ``message`` as a JSON line, then wait for a line (or the end) on stdin: the
    parent reads the CPU times in between."""
    print(json.dumps(message), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)


# ---------------------------------------------------------------- client: messages


class Messages(Switching):
    """One connection keeping ``window`` echo messages in flight."""

    def __init__(self, port, key, errors, run: MessageRun) -> None:
        super().__init__(port, key, errors)
        self.run = run
        self.received = 0
        self.done = 0           # messages echoed back in full
        self.checked = 0        # bytes compared with what was sent

    def relayed(self, data: bytes) -> None:
        run = self.run
        if self.checked < len(run.burst):
            n = min(len(data), len(run.burst) - self.checked)
            if data[:n] != run.burst[self.checked:self.checked + n]:
                self.errors["echo differs from what was sent"] += 1
                self.transport.abort()
                return
            self.checked += n
        self.received += len(data)
        done = self.received // run.frame_len
        new = done - self.done
        self.done = done
        if new and run.sending:
            self.transport.write(run.burst[:new * run.frame_len])

    def start(self) -> None:
        self.transport.write(self.run.burst)

    def lost(self, exc) -> None:
        if self.run.sending:
            self.errors["reset during the run" if exc else "closed during the run"] += 1


class MessageRun:
    def __init__(self, size: int, window: int) -> None:
        self.frame = frame(size)
        self.frame_len = len(self.frame)
        self.burst = self.frame * window
        self.sending = False


async def messages(args) -> None:
    loop = asyncio.get_running_loop()
    errors: Counter = Counter()
    run = MessageRun(args.size, args.window)

    async def open_one() -> Messages | None:
        try:
            _, conn = await loop.create_connection(
                lambda: Messages(args.port, new_key(), errors, run), "127.0.0.1", args.port)
            rest = await asyncio.wait_for(conn.switched, args.timeout)
        except (OSError, LoadError, TimeoutError) as exc:
            errors[str(exc) if isinstance(exc, LoadError) else type(exc).__name__] += 1
            return None
        if rest:
            errors["bytes after the 101"] += 1
        return conn

    conns = [c for c in await asyncio.gather(*(open_one() for _ in range(args.connections)))
             if c is not None]
    await say({"event": "ready"})
    run.sending = True
    started = time.perf_counter()
    for conn in conns:
        conn.start()
    await asyncio.sleep(args.duration)
    run.sending = False
    seconds = time.perf_counter() - started
    await say({"messages": sum(c.done for c in conns), "seconds": seconds,
               "bytes_received": sum(c.received for c in conns),
               "frame_bytes": run.frame_len, "connections": len(conns),
               "errors": sum(errors.values()), "error_kinds": dict(errors)})
    for conn in conns:          # (after the parent's last CPU reading)
        conn.transport.close()


# ---------------------------------------------------------------- client: handshakes


async def handshakes(args) -> None:
    loop = asyncio.get_running_loop()
    errors: Counter = Counter()
    keys = [new_key() for _ in range(256)]
    count = 0
    stop = False

    async def one_loop(i: int) -> None:
        nonlocal count
        n = i
        while not stop:
            n += args.connections
            try:
                transport, conn = await loop.create_connection(
                    lambda key=keys[n % 256]: Switching(args.port, key, errors),
                    "127.0.0.1", args.port)
                try:
                    await asyncio.wait_for(conn.switched, args.timeout)
                finally:
                    transport.close()
            except (OSError, LoadError, TimeoutError) as exc:
                if not stop:
                    errors[str(exc) if isinstance(exc, LoadError)
                           else type(exc).__name__] += 1
                    await asyncio.sleep(0.01)
                continue
            if not stop:
                count += 1

    await say({"event": "ready"})
    started = time.perf_counter()
    tasks = [loop.create_task(one_loop(i)) for i in range(args.connections)]
    await asyncio.sleep(args.duration)
    stop = True
    seconds = time.perf_counter() - started
    await say({"handshakes": count, "seconds": seconds, "connections": args.connections,
               "errors": sum(errors.values()), "error_kinds": dict(errors)})
    await asyncio.wait(tasks, timeout=args.timeout)


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="mode", required=True)
    b = sub.add_parser("backend", help="the echo backend")
    b.add_argument("port", type=int)
    c = sub.add_parser("client", help="the load generator")
    c.add_argument("case", choices=("messages", "handshakes"))
    c.add_argument("port", type=int)
    c.add_argument("--connections", type=int, default=50)
    c.add_argument("--window", type=int, default=8, help="messages in flight per connection")
    c.add_argument("--size", type=int, default=64, help="payload bytes per message")
    c.add_argument("--duration", type=float, default=5.0)
    c.add_argument("--timeout", type=float, default=10.0,
                   help="seconds to wait for a 101 (default 10)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.mode == "backend":
        uvloop.run(serve_backend(args.port))
        return
    uvloop.run(messages(args) if args.case == "messages" else handshakes(args))


if __name__ == "__main__":
    main()
