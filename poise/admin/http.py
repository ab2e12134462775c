"""The admin API's HTTP/1.1 server: bytes ↔ httptools ↔ :class:`AdminApi`, hardened.

Nothing a client sends may crash or stall the control plane, so every connection is
bounded in what it can cost (:class:`Limits`):

- at most ``max_connections`` at once; one more is closed as soon as it is accepted;
- a request (head and body) must arrive within ``request_timeout`` of its first byte
  (of the accept, for a connection's first request): else 408 and close; bytes
  trickling in do not extend it;
- a keep-alive connection with no request for ``idle_timeout`` is closed;
- a head over ``max_head`` bytes is 431, a target over ``max_target`` 414, a body over
  ``max_body`` 413 (from Content-Length before any of it is read; a chunked body when it
  crosses the limit);
- malformed requests (as llhttp judges them in strict mode, plus: HTTP/1.1 without
  exactly one Host, Host twice, Transfer-Encoding on HTTP/1.0, an Upgrade offer with a
  body) are 400, versions other than 1.0/1.1 are 505; an error response closes the
  connection.

:class:`~poise.admin.reader.RequestReader` turns bytes into requests; the connection
answers them in order as they complete (handlers are synchronous: no Task per
request).  Work is bounded per event-loop turn: input is parsed a slice at a time and
about TURN answers are written before other callbacks run.  When the client does not
read its answers (the transport asks us to pause writing), reading stops until they
drain, and the request deadline ends a connection that never drains.

A connection ends lingeringly: after its last response we send FIN and discard what the
client still sends for up to ``linger`` seconds, so that a client still sending (a body
we refused, say) reads our answer rather than a reset.

Responses are HTTP/1.1 with Content-Length, of the content type the API says (JSON
but for the dashboard's static files) and ``cache-control: no-store`` unless the API
gives its own; a response to HEAD has no body.  An Upgrade offer is
declined: the request is answered and the connection closed.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque
from enum import Enum
from http import HTTPStatus
from typing import cast

from poise.admin.api import AdminApi, Response, error
from poise.admin.reader import Limits, Request, RequestReader
from poise.errors import PoiseError, RequestTimeout

__all__ = ["AdminServer", "Limits"]

log = logging.getLogger("poise")
# Work per connection per event-loop turn, so that a client pipelining thousands of
# requests cannot hold the loop: input is parsed SLICE bytes at a time (a slice holds
# at most a few hundred requests) and at most about TURN requests are answered before
# other callbacks get their turn.
SLICE = 4096
TURN = 32


class AdminServer:
    """Serves ``api`` on the listeners added by :meth:`start`, on ``loop``."""

    def __init__(self, api: AdminApi, loop: asyncio.AbstractEventLoop,
                 limits: Limits | None = None) -> None:
        self.api = api
        self.loop = loop
        self.limits = limits or Limits()
        self.connections: set[Connection] = set()
        self._servers: list[asyncio.Server] = []

    def __repr__(self) -> str:
        where = " ".join(f"{h}:{p}" for h, p in self.addresses) or "unbound"
        return f"<AdminServer {where} connections={len(self.connections)}>"

    async def start(self, host: str, port: int) -> None:
        """Listen on ``host:port`` (port 0: any free one; see :attr:`addresses`).

        A plain bind with SO_REUSEADDR, never SO_REUSEPORT: a second process on the same
        address must fail to start rather than share the admin API; OSError if it is
        taken."""
        server = await self.loop.create_server(
            lambda: Connection(self), host, port, reuse_address=True, reuse_port=False)
        self._servers.append(server)

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """The ``(host, port)`` of every bound socket."""
        return [sock.getsockname()[:2] for s in self._servers for sock in s.sockets]

    def close(self) -> None:
        """Stop accepting and close every connection (at once when it has unsent
        output: a client that does not read must not hold the shutdown)."""
        for server in self._servers:
            server.close()
        for conn in list(self.connections):
            conn.shut()

    async def wait_closed(self) -> None:
        """Wait until the listeners are closed (after :meth:`close`)."""
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()


class State(Enum):
    READING = "reading"     # a request is due: the request deadline runs
    IDLE = "idle"           # between keep-alive requests: the idle deadline runs
    DRAINING = "draining"   # nothing more is parsed; queued answers go out, then close
    CLOSING = "closing"     # all answered, FIN sent; input is discarded until EOF
    CLOSED = "closed"


class Connection(asyncio.Protocol):
    """One admin client connection: reads requests, answers them in order."""

    def __init__(self, server: AdminServer) -> None:
        self.server = server
        self.loop = server.loop
        self.limits = server.limits
        self.transport: asyncio.Transport | None = None
        self.reader = RequestReader(server.limits, self)
        self.state = State.READING
        self.unparsed = memoryview(b"")         # read, not yet given to the reader
        self.queue: deque[Request] = deque()    # complete or refused, not yet answered
        self.write_paused = False
        self.read_paused = False
        self.peer_eof = False
        self._timer: asyncio.TimerHandle | None = None
        self._scheduled = False                 # _work will run on the next turn

    def __repr__(self) -> str:
        return f"<admin.Connection {self.state.value} queued={len(self.queue)}>"

    # -- asyncio callbacks --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if len(self.server.connections) >= self.limits.max_connections:
            self.state = State.CLOSED
            transport.abort()   # type: ignore[attr-defined]
            return
        self.transport = cast(asyncio.Transport, transport)   # (uvloop's is no subclass)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Pipelined answers are separate small writes: Nagle would hold each one
            # until the client's delayed ACK of the previous one.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.connections.add(self)
        self._enter(State.READING)

    def connection_lost(self, exc: Exception | None) -> None:
        self.state = State.CLOSED
        self.server.connections.discard(self)
        self.queue.clear()
        self.unparsed = memoryview(b"")
        if self._timer is not None:
            self._timer.cancel()

    def data_received(self, data: bytes) -> None:
        if self.state is State.IDLE:
            self._enter(State.READING)      # the request deadline runs from its first byte
        elif self.state is not State.READING:
            return                          # nothing more will be answered: discard
        self.unparsed = memoryview(bytes(self.unparsed) + data if self.unparsed else data)
        self._work()

    def eof_received(self) -> bool:
        self.peer_eof = True
        if self.queue and self.state in (State.READING, State.DRAINING):
            self.state = State.DRAINING     # answer what was sent, then close
            return True
        return False                        # (the transport closes once output is sent)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if not self._scheduled:
            self._work()

    # -- the reader's sink --------------------------------------------------------------

    def request_begun(self) -> None:
        self._enter(State.READING)          # each request has the whole deadline

    def head_received(self, request: Request) -> None:
        if request.expect_continue and not request.http10 and not self.queue \
                and (request.length or request.chunked) and self.transport is not None:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def request_received(self, request: Request) -> None:
        self.queue.append(request)

    # -- parsing and answering, a bounded amount per loop turn -----------------------------

    def _work(self) -> None:
        """Answer what is queued and parse more, in turn, until TURN requests were
        answered; then let other callbacks run and carry on in the next loop turn."""
        self._scheduled = False
        budget = TURN
        while self.state not in (State.CLOSING, State.CLOSED):
            budget -= self._answer_queued(budget)
            if self.queue or budget <= 0 or not self.unparsed or self.state is not State.READING:
                break
            self._parse_slice()
        self._settle(budget)

    def _parse_slice(self) -> None:
        chunk, self.unparsed = self.unparsed[:SLICE], self.unparsed[SLICE:]
        try:
            self.reader.feed(chunk)
        except PoiseError as e:
            self._fail(e, self.reader.current)
            return
        if self.reader.finished:
            self.unparsed = memoryview(b"")

    def _answer_queued(self, budget: int) -> int:
        answered = 0
        while self.queue and answered < budget and not self.write_paused \
                and self.state not in (State.CLOSING, State.CLOSED):
            req = self.queue.popleft()
            self._send(req.answer or self._answer(req), keep_alive=req.keep_alive,
                       head=req.method == "HEAD", http10=req.http10)
            answered += 1
        return answered

    def _settle(self, budget: int) -> None:
        """After a turn's work: wait for the client (reading on), for it to read
        (reading off), for the next turn, or close."""
        if self.state in (State.CLOSING, State.CLOSED):
            return
        if self.state is not State.READING:
            self.unparsed = memoryview(b"")
        if self.queue or self.unparsed:
            self._pause_reading()
            if budget <= 0 and not self.write_paused and not self._scheduled:
                self._scheduled = True
                self.loop.call_soon(self._work)
            return
        if self.state is State.DRAINING:
            self._linger()
            return
        self._resume_reading()
        # Idle once answered; bytes that begin no request (empty lines) do not make a
        # connection idle: its request deadline runs on.
        if self.state is State.READING and self.reader.current is None and budget < TURN:
            self._enter(State.IDLE)

    def _answer(self, req: Request) -> Response:
        try:
            return self.server.api.handle(req.method, req.target.decode("latin-1"),
                                          req.headers, bytes(req.body))
        except Exception:   # AdminApi.handle promises not to raise; a bug must not kill us
            log.exception("admin API: unexpected error answering %s", req.method)
            return error(500, "internal error")

    def _send(self, response: Response, *, keep_alive: bool, head: bool = False,
              http10: bool = False) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        lines = [f"HTTP/1.1 {response.status} {_reason(response.status)}",
                 f"content-type: {response.content_type}",
                 f"content-length: {len(response.body)}"]
        if not any(name == "cache-control" for name, _ in response.headers):
            lines.append("cache-control: no-store")
        lines += [f"{name}: {value}" for name, value in response.headers]
        if not keep_alive:
            lines.append("connection: close")
            self.state = State.DRAINING     # nothing after it is answered
        elif http10:
            lines.append("connection: keep-alive")
        out = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        transport.write(out if head else out + response.body)

    # -- failures, deadlines, closing ---------------------------------------------------

    def _fail(self, problem: PoiseError, refused: Request | None) -> None:
        """Queue the answer to ``problem`` after those already queued; nothing more is
        read.  (Once the refused request's head is parsed, a HEAD gets no body.)"""
        req = refused if refused is not None and refused.head_done else Request()
        req.answer = error(problem.status, str(problem))
        req.keep_alive = False
        self.queue.append(req)
        self.state = State.DRAINING

    def _enter(self, state: State) -> None:
        self.state = state
        delay = self.limits.request_timeout if state is State.READING \
            else self.limits.idle_timeout
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_later(delay, self._timed_out)

    def _timed_out(self) -> None:
        self._timer = None
        if self.transport is None or self.state is State.CLOSED:
            return
        if self.state is State.READING and not self.queue and not self.write_paused:
            self._fail(RequestTimeout(
                f"request not received within {self.limits.request_timeout:g}s"),
                self.reader.current)
            self._work()
        else:
            # Idle, lingering over, or answers wait for a client that does not read.
            self.shut()

    def _linger(self) -> None:
        """All answered: half-close, then discard input until EOF or ``linger``."""
        transport = self.transport
        self.state = State.CLOSING
        if transport is None:
            return
        if self.peer_eof or not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        self._resume_reading()
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_later(self.limits.linger, self._timed_out)

    def _pause_reading(self) -> None:
        if not self.read_paused and self.transport is not None:
            self.read_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self.read_paused and self.transport is not None:
            self.read_paused = False
            self.transport.resume_reading()

    def shut(self) -> None:
        """Close now: gracefully when all output is sent, else abort."""
        transport = self.transport
        if transport is None:
            return
        if transport.get_write_buffer_size():
            transport.abort()
        else:
            transport.close()


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""
