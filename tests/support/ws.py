"""Support of the WebSocket tests: backends and clients built on the ``websockets``
library, raw RFC 6455 framing for what the library will not do (bytes sent before the
``101``, a backend that resets), and what poise's admin API says about the relays.

Backends:

- :class:`WsBackend`: ``websockets.sync.server`` in a thread of its own (a thread per
  connection), running a *handler* per WebSocket with a :class:`Session` that records
  what arrived and how the connection ended (close code and reason *received*, 1006
  when none was).  Every handshake request is recorded too, refused ones included.
  :func:`echo` sends every message back and obeys a few commands (:func:`command`).
- :class:`AsyncEchoBackend`: ``websockets.asyncio.server`` on a loop in a thread, for
  a thousand connections at once without a thousand threads.
- :class:`WsBackendProcess`: :class:`WsBackend` in a process of its own
  (``python -m tests.support.ws``), to be killed with SIGKILL.
- raw handlers for :class:`tests.support.tcp.TcpBackend`: :func:`raw_greeting_echo`
  (the ``101`` and a first frame in one write), :func:`raw_answer_after_fin` and
  :func:`raw_fin_first` (half-close either way), :func:`raw_reset_after_first_frame`.

Every wait is bounded: sockets and ``recv`` calls have timeouts, so a proxy that hangs
fails a test instead of blocking it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from websockets.asyncio.server import serve as async_serve
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as ws_connect
from websockets.sync.server import ServerConnection, serve

from tests.support.tcp import Conn
from tests.support.waiting import wait_for

LOOPBACK = "127.0.0.1"
TIMEOUT = 10.0
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
# Text messages starting with this are commands to :func:`echo` (see :func:`command`).
COMMAND = "\x1bcmd:"


# -- backends: websockets.sync.server ---------------------------------------------------------

class Session:
    """One WebSocket accepted by a :class:`WsBackend`, as its handler sees it."""

    def __init__(self, backend: WsBackend, ws: ServerConnection, index: int) -> None:
        self.backend = backend
        self.ws = ws
        self.index = index
        self.path = ws.request.path if ws.request is not None else None
        self.subprotocol = ws.subprotocol
        self.messages: list[str | bytes] = []       # every message received, in order
        self.close_code: int | None = None          # received (1006: no close frame)
        self.close_reason: str | None = None
        self.error: BaseException | None = None     # what the handler raised, if not a close
        self.closed = threading.Event()             # the handler is done

    def wait_closed(self, timeout: float = TIMEOUT) -> Session:
        wait_for(self.closed.is_set, timeout, lambda: f"{self!r} closed")
        return self

    def __repr__(self) -> str:
        return (f"<Session {self.backend.name}#{self.index} got {len(self.messages)} "
                f"close={self.close_code}>")


Handler = Callable[[Session], None]


def command(text: str) -> str:
    """A text message that makes :func:`echo` do something instead of echoing:

    - ``close CODE REASON``: close the WebSocket with that code and reason;
    - ``fin``: shut the TCP connection down without a close frame (the backend is gone);
    - ``name``: answer with the backend's name;
    - ``fragments A B C``: send one text message ``ABC`` in three frames;
    - ``ping``: ping the client and answer ``pong True`` once its pong came (``pong
      False`` if none within 10 s);
    - ``ticks N SECONDS``: send ``tick 0`` … ``tick N-1``, one every SECONDS."""
    return COMMAND + text


def echo(session: Session) -> None:
    """Send every message back as it came (text as text, binary as binary), or obey a
    :func:`command`."""
    ws = session.ws
    while True:
        msg = ws.recv()
        session.messages.append(msg)
        if isinstance(msg, str) and msg.startswith(COMMAND):
            verb, _, arg = msg[len(COMMAND):].partition(" ")
            if verb == "close":
                code, _, reason = arg.partition(" ")
                ws.close(int(code), reason)
            elif verb == "fin":
                ws.socket.shutdown(socket.SHUT_RDWR)
            elif verb == "name":
                ws.send(session.backend.name)
            elif verb == "fragments":
                ws.send(iter(arg.split(" ")))
            elif verb == "ping":
                ws.send(f"pong {ws.ping().wait(10)}")
            elif verb == "ticks":
                count, interval = arg.split()
                for i in range(int(count)):
                    ws.send(f"tick {i}")
                    time.sleep(float(interval))
            continue
        ws.send(msg)


class WsBackend:
    """A ``websockets.sync.server`` on a loopback port, serving in a thread.

    ``refuse``: called as ``process_request`` (``(connection, request)``), may return a
    response to answer the handshake with instead of a ``101``.  ``ssl``: a server
    context (``wss``).  ``subprotocols`` and ``compression`` as the library takes them.
    Messages have no size limit; the server sends no keepalive pings."""

    def __init__(self, name: str = "ws1", handler: Handler = echo, *,
                 ssl: ssl.SSLContext | None = None, subprotocols: list[str] | None = None,
                 compression: str | None = "deflate",
                 refuse: Callable[[ServerConnection, Any], Any] | None = None,
                 port: int = 0) -> None:
        self.name = name
        self.handler = handler
        self.refuse = refuse
        self.lock = threading.Lock()
        self.handshakes: list[Any] = []     # websockets.http11.Request, every one received
        self.sessions: list[Session] = []
        self.server = serve(self._handle, LOOPBACK, port, ssl=ssl, subprotocols=subprotocols,
                            compression=compression, process_request=self._process_request,
                            max_size=None, max_queue=None, ping_interval=None,
                            close_timeout=2, open_timeout=TIMEOUT)
        self.port = self.server.socket.getsockname()[1]
        self.address = f"{LOOPBACK}:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever,
                                        name=f"ws-{name}", daemon=True)
        self._thread.start()

    def _process_request(self, connection: ServerConnection, request: Any) -> Any:
        with self.lock:
            self.handshakes.append(request)
        if self.refuse is not None:
            return self.refuse(connection, request)
        return None

    def _handle(self, ws: ServerConnection) -> None:
        with self.lock:
            session = Session(self, ws, len(self.sessions))
            self.sessions.append(session)
        try:
            self.handler(session)
        except ConnectionClosed as e:
            session.close_code = e.rcvd.code if e.rcvd is not None else 1006
            session.close_reason = e.rcvd.reason if e.rcvd is not None else None
        except BaseException as e:      # (recorded; the test looks)
            session.error = e
        finally:
            session.closed.set()

    # -- what it saw ------------------------------------------------------------------------

    def open(self) -> list[Session]:
        """Sessions whose handler still runs."""
        with self.lock:
            return [s for s in self.sessions if not s.closed.is_set()]

    def wait_sessions(self, n: int, timeout: float = TIMEOUT) -> list[Session]:
        """Until ``n`` sessions were accepted; all of them."""
        wait_for(lambda: len(self.sessions) >= n, timeout,
                 lambda: f"{n} WebSocket(s) at {self.name} (now {len(self.sessions)})")
        with self.lock:
            return list(self.sessions)

    def wait_idle(self, timeout: float = TIMEOUT) -> None:
        wait_for(lambda: not self.open(), timeout,
                 lambda: f"no WebSocket open at {self.name} (now {self.open()})")

    def reset(self) -> None:
        with self.lock:
            self.sessions = []
            self.handshakes = []

    def stop(self) -> None:
        self.server.shutdown()
        self._thread.join(5)
        for s in self.open():
            with contextlib.suppress(OSError):
                s.ws.socket.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> WsBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<WsBackend {self.name} {self.address}>"


@contextlib.contextmanager
def ws_backends(*names: str, **options: Any) -> Iterator[list[WsBackend]]:
    """``WsBackend(name, **options)`` for each name, stopped on exit."""
    started = [WsBackend(n, **options) for n in names]
    try:
        yield started
    finally:
        for b in started:
            b.stop()


class WsBackendProcess:
    """An echoing :class:`WsBackend` in a process of its own, to be killed."""

    def __init__(self, name: str = "wsp") -> None:
        self.name = name
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.support.ws", name],
                                     cwd=ROOT, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("READY "):
            self.proc.kill()
            raise RuntimeError(f"websocket backend {name} did not start: {line!r}")
        self.port = int(line.split()[1])
        self.address = f"{LOOPBACK}:{self.port}"

    def kill(self) -> None:
        """SIGKILL: the kernel closes its sockets; nobody sends a close frame."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> WsBackendProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
        self.proc.stdout.close()


# -- backends: websockets.asyncio.server --------------------------------------------------------

class AsyncEchoBackend:
    """An echoing ``websockets.asyncio.server`` (no compression, no pings) on a loop in
    a thread of its own; counts the WebSockets it holds open.  For many at once."""

    def __init__(self, name: str = "aws") -> None:
        self.name = name
        self.opened = 0
        self.open = 0
        self.messages = 0
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"aws-{name}", daemon=True)
        self._thread.start()
        if not self._ready.wait(TIMEOUT):
            raise RuntimeError("async websocket backend did not start")
        self.address = f"{LOOPBACK}:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._start())
        self._ready.set()
        self.loop.run_forever()

    async def _start(self) -> None:
        self.server = await async_serve(self._echo, LOOPBACK, 0, backlog=4096,
                                        compression=None, ping_interval=None,
                                        max_size=None, close_timeout=2)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _echo(self, ws: Any) -> None:
        self.opened += 1
        self.open += 1
        try:
            async for msg in ws:
                self.messages += 1
                await ws.send(msg)
        finally:
            self.open -= 1

    def stop(self) -> None:
        async def close() -> None:
            self.server.close()
            await self.server.wait_closed()
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(close(), self.loop).result(TIMEOUT)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(TIMEOUT)

    def __enter__(self) -> AsyncEchoBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- clients ------------------------------------------------------------------------------------

def url(px: Any, path: str = "/", scheme: str = "ws") -> str:
    return f"{scheme}://{LOOPBACK}:{px.port}{path}"


def client(px: Any, path: str = "/", *, scheme: str = "ws", **options: Any) -> ClientConnection:
    """A ``websockets.sync.client`` connection through poise ``px`` (never through an
    HTTP proxy from the environment; no size limit, no keepalive pings unless asked;
    usable with or without ``with``)."""
    kw: dict[str, Any] = dict(proxy=None, max_size=None, max_queue=None, ping_interval=None,
                              open_timeout=TIMEOUT, close_timeout=5, legacy=True)
    kw.update(options)
    return ws_connect(url(px, path, scheme), **kw)


def closed_within(ws: ClientConnection, timeout: float) -> ConnectionClosed:
    """Read (and drop) messages until the connection closes; the close, or fail when it
    did not within ``timeout`` seconds."""
    try:
        while True:
            ws.recv(timeout=timeout)
    except ConnectionClosed as e:
        return e
    except TimeoutError:
        raise AssertionError(f"the WebSocket did not close within {timeout}s") from None


# -- raw RFC 6455 ---------------------------------------------------------------------------------

def new_key() -> str:
    return base64.b64encode(os.urandom(16)).decode()


def accept_key(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()


def handshake_request(key: str, path: str = "/", host: str = "poise.test",
                      extra: tuple[tuple[str, str], ...] = ()) -> bytes:
    """An opening handshake (RFC 6455 §4.1)."""
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}", "Upgrade: websocket",
             "Connection: Upgrade", f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13",
             *(f"{n}: {v}" for n, v in extra)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def switching_response(key: str) -> bytes:
    """A backend's ``101`` to a handshake with ``key``."""
    return (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept_key(key).encode() +
            b"\r\n\r\n")


def frame(payload: bytes, opcode: int = 0x1, *, masked: bool = True, fin: bool = True) -> bytes:
    """One frame; a client's are masked (RFC 6455 §5.3), a server's are not."""
    head = bytes([(0x80 if fin else 0) | opcode])
    n = len(payload)
    mask_bit = 0x80 if masked else 0
    if n < 126:
        head += bytes([mask_bit | n])
    elif n < 1 << 16:
        head += bytes([mask_bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([mask_bit | 127]) + struct.pack("!Q", n)
    if not masked:
        return head + payload
    mask = os.urandom(4)
    return head + mask + _masked(payload, mask)


def _masked(payload: bytes, mask: bytes) -> bytes:
    """``payload`` XOR the repeated 4-byte ``mask`` (its own inverse)."""
    n = len(payload)
    if not n:
        return b""
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")


def close_frame(code: int, reason: str = "", *, masked: bool = True) -> bytes:
    return frame(struct.pack("!H", code) + reason.encode(), 0x8, masked=masked)


class RawStream:
    """Reads an HTTP head and then frames from ``recv`` (a socket's or a :class:`Conn`'s)."""

    def __init__(self, recv: Callable[[int], bytes]) -> None:
        self._recv = recv
        self.buffer = b""

    def _more(self) -> None:
        data = self._recv(65536)
        if not data:
            raise EOFError(f"EOF after {self.buffer[:200]!r}")
        self.buffer += data

    def _take(self, n: int) -> bytes:
        while len(self.buffer) < n:
            self._more()
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out

    def head(self) -> tuple[str, dict[str, str]]:
        """``(start line, {lower-case name: value})`` of an HTTP head."""
        while b"\r\n\r\n" not in self.buffer:
            self._more()
        raw, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        start, *lines = raw.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return start, headers

    def frame(self) -> tuple[int, bytes]:
        """``(opcode, payload)`` of the next frame, unmasked."""
        b0, b1 = self._take(2)
        n = b1 & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", self._take(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", self._take(8))
        mask = self._take(4) if b1 & 0x80 else None
        payload = self._take(n)
        if mask is not None:
            payload = _masked(payload, mask)
        return b0 & 0x0F, payload

    def rest(self) -> bytes:
        """What is buffered and everything until EOF (a reset counts as EOF)."""
        out = self.buffer
        self.buffer = b""
        while True:
            try:
                data = self._recv(65536)
            except ConnectionResetError:
                return out
            if not data:
                return out
            out += data


# Raw backend handlers (tests.support.tcp.TcpBackend) --------------------------------------------

def raw_greeting_echo(conn: Conn) -> None:
    """Answer the handshake with the ``101`` and a first text frame (``hello from
    NAME``) in one write; then echo data frames, and answer a close frame with one."""
    stream = RawStream(conn.recv)
    _, headers = stream.head()
    greeting = frame(f"hello from {conn.backend.name}".encode(), masked=False)
    conn.sendall(switching_response(headers["sec-websocket-key"]) + greeting)
    while True:
        opcode, payload = stream.frame()
        if opcode == 0x8:
            conn.sendall(frame(payload, 0x8, masked=False))
            return
        conn.sendall(frame(payload, opcode, masked=False))


def raw_answer_after_fin(conn: Conn) -> None:
    """Accept the handshake, read frames until the client's FIN (kept in
    ``conn.frames``), then send ``got N frames`` and a FIN of its own."""
    stream = RawStream(conn.recv)
    _, headers = stream.head()
    conn.sendall(switching_response(headers["sec-websocket-key"]))
    conn.frames = []
    while True:
        try:
            conn.frames.append(stream.frame())
        except EOFError:
            break
    conn.sendall(frame(f"got {len(conn.frames)} frames".encode(), masked=False))
    conn.shutdown_write()


def raw_fin_first(conn: Conn) -> None:
    """Accept the handshake, send ``bye`` and a FIN at once, then read frames until the
    client's FIN (kept in ``conn.frames``)."""
    stream = RawStream(conn.recv)
    _, headers = stream.head()
    conn.sendall(switching_response(headers["sec-websocket-key"]) +
                 frame(b"bye", masked=False))
    conn.shutdown_write()
    conn.frames = []
    while True:
        try:
            conn.frames.append(stream.frame())
        except EOFError:
            break


def raw_reset_after_first_frame(conn: Conn) -> None:
    """Accept the handshake, read one frame, then reset the connection (SO_LINGER 0)."""
    stream = RawStream(conn.recv)
    _, headers = stream.head()
    conn.sendall(switching_response(headers["sec-websocket-key"]))
    stream.frame()
    conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.sock.close()


# -- what poise says ------------------------------------------------------------------------------

def in_flight(px: Any, cluster: str = "app") -> dict[str, int]:
    """``{address: in_flight}`` of ``cluster``'s backends, from the admin API (workers
    report about every second)."""
    r = px.admin.get(f"/clusters/{cluster}")
    assert r.status == 200, r
    return {b["address"]: b["in_flight"] for b in r.json()["backends"]}


def wait_in_flight(px: Any, expected: dict[str, int], cluster: str = "app",
                   timeout: float = 10.0) -> None:
    """Until the admin API shows ``expected`` (``{address: in_flight}``)."""
    wait_for(lambda: in_flight(px, cluster) == expected, timeout,
             lambda: f"in_flight {expected} (now {in_flight(px, cluster)})", step=0.1)


def main() -> None:
    """``python -m tests.support.ws NAME``: an echo backend; prints ``READY PORT``."""
    backend = WsBackend(sys.argv[1] if len(sys.argv) > 1 else "wsp")
    print(f"READY {backend.port}", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
