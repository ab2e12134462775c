"""Property tests of the resilience paths (retries, circuit-breaker limits, the queue of
requests waiting for a connection, request deadlines, outlier reporting) under arbitrary
interleavings of client and backend events, without sockets.

One to four client connections sit in front of a cluster of two or three backends
whose configuration hypothesis draws.  Everything runs on an asyncio loop with a
*virtual* clock (the cluster's clock for outlier ejection and the retry budget follows
it too): timers (queue_timeout, request_timeout, per-try and connect timeouts, backoff,
ejection ends) fire only when a step moves time on, and running the loop never blocks.
New upstream connections come from the loop's ``create_connection``, replaced by an
in-memory one that waits for the test to accept or refuse the connect:
``UpstreamPool._open`` itself runs unchanged, so its accounting is under test too.

After every step: no exception escaped a callback (called directly or by the loop) and
nothing was logged as an error; the limits are within their caps and agree with what
the exchanges and connections hold; nothing waits without a way to make progress.  At
the end everything outstanding is answered with 200 and the clients close: every
counter is back to zero, nothing holds a timer or a task, each client read one
well-formed response per request (a prefix only if its connection closed), and each
backend read well-formed requests with their bodies intact, none sent more often than
the retry rules allow.
"""

from __future__ import annotations

import asyncio
import errno
import inspect
import json
import logging
import random
import re
from unittest import mock

import h11
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from poise.config.load import parse_config
from poise.core.policies import create_policy
from poise.proxy.http import cluster as cluster_module
from poise.proxy.http.exchange import Exchange
from poise.proxy.http.protocol import ClientConnection
from poise.proxy.http.resilience import PENDING, REQUEST, RETRY
from poise.proxy.http.site import ClusterRuntime, Site
from poise.proxy.http.upstream import UpstreamConnection

ALLOWED_STATUSES = {200, 500, 502, 503, 504, 400, 413}
# Steps of virtual time a "time passes" event moves on (seconds).
TIME_STEPS = [0.0005, 0.003, 0.02, 0.06, 0.3, 1.1]
# How far the drain looks ahead for timers still to fire (queue, deadlines, linger).
HORIZON = 5.0


# -- the event loop on a virtual clock ----------------------------------------------------


class VirtualLoop(asyncio.SelectorEventLoop):
    """An asyncio loop whose clock moves only when the test says so.  ``step`` runs one
    iteration (what is ready, and the timers due) and returns without blocking.

    ``create_connection`` is the backends' side of connecting: it parks the connect
    until the test accepts it or refuses it (``Harness.connect``)."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 1000.0
        self.errors: list[dict] = []
        self.tasks: list[asyncio.Task] = []
        self.connecting: list[tuple[UpstreamConnection, asyncio.Future]] = []
        self.transports: list[Transport] = []
        self.set_exception_handler(lambda loop, context: self.errors.append(context))
        self.set_task_factory(self._new_task)

    def time(self) -> float:
        return self.now

    def _new_task(self, loop, coro, **kwargs):
        task = asyncio.Task(coro, loop=loop, **kwargs)
        self.tasks.append(task)
        return task

    async def create_connection(self, protocol_factory, host=None, port=None, **kwargs):
        protocol = protocol_factory()
        accepted = self.create_future()
        self.connecting.append((protocol, accepted))
        await accepted                  # OSError when refused
        transport = Transport(self, protocol)
        protocol.connection_made(transport)
        try:                            # (asyncio's waiter: a cancel now closes it)
            await asyncio.sleep(0)
        except BaseException:
            transport.close()
            raise
        return transport, protocol

    def waiting_connects(self) -> list[tuple[UpstreamConnection, asyncio.Future]]:
        return [(p, f) for p, f in self.connecting if not f.done()]

    def step(self) -> None:
        self.call_soon(self.stop)
        self.run_forever()

    def live_timers(self) -> list[asyncio.TimerHandle]:
        return [h for h in self._scheduled if not h.cancelled()]

    def busy(self) -> bool:
        """Callbacks ready, or timers due now."""
        return bool(self._ready) or any(h.when() <= self.now for h in self.live_timers())


class VirtualClock:
    """The cluster's clock (outlier ejections, retry budget) on the loop's time."""

    def __init__(self, loop: VirtualLoop) -> None:
        self.loop = loop

    def now(self) -> float:
        return self.loop.now


class Transport:
    """An in-memory transport.  ``close``/``abort`` report ``connection_lost`` on the next
    loop iteration, as asyncio and uvloop do; a write after ``write_eof`` raises, as
    uvloop does; a write after close is dropped (and counted)."""

    def __init__(self, loop: VirtualLoop, protocol, peer=("127.0.0.1", 40000)) -> None:
        self.loop = loop
        self.protocol = protocol
        self.peer = peer
        self.data = bytearray()
        self.answered = 0           # (upstream) request bytes the backend has answered
        self.remainder = b""        # (upstream) the rest of a response being delivered
        self.remainder_fin = False  # (upstream) ... after which the backend closes
        self.closed = False
        self.eof = False
        self.lost = False
        self.paused = False
        self.write_full = False     # (upstream) pause_writing was called on the protocol
        self.late_writes = 0
        loop.transports.append(self)

    def write(self, data: bytes) -> None:
        if self.eof:
            raise RuntimeError("Cannot call write() after write_eof()")
        if self.closed:
            self.late_writes += 1
            return
        self.data += data

    def get_extra_info(self, name: str, default=None):
        return self.peer if name == "peername" else default

    def is_closing(self) -> bool:
        return self.closed

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.loop.call_soon(self.lose, None)

    abort = close

    def lose(self, exc: Exception | None) -> None:
        """The connection is gone (reported once)."""
        self.closed = True
        if not self.lost:
            self.lost = True
            self.protocol.connection_lost(exc)

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    @property
    def unanswered(self) -> bool:
        return len(self.data) > self.answered


def _started(coro) -> bool:
    """Whether a coroutine has started; compiled ones (mypyc) cannot tell: yes."""
    try:
        return inspect.getcoroutinestate(coro) != inspect.CORO_CREATED
    except AttributeError:
        return True


class TrackingClient(ClientConnection):
    """A ClientConnection that remembers every exchange it created."""

    def __init__(self, site: Site) -> None:
        super().__init__(site)
        self.exchanges: list = []

    def _new_exchange(self, fields: list[bytes] | None = None) -> Exchange:
        ex = super()._new_exchange(fields)      # (whichever parser reads the head)
        self.exchanges.append(ex)
        return ex


class Client:
    """One client connection and what its peer has sent."""

    def __init__(self, site: Site, loop: VirtualLoop, index: int) -> None:
        self.conn = TrackingClient(site)
        self.transport = Transport(loop, self.conn, peer=(f"127.0.0.{index + 1}", 40000))
        self.conn.connection_made(self.transport)
        self.sent: list[int] = []   # request ids, in order
        self.outbox = bytearray()   # sent, not read yet (reading paused)
        self.unsent = b""           # the rest of a request being sent
        self.fin_sent = False
        self.fin_read = False
        self.gone = False           # the peer reset or closed the connection
        self.write_paused = False

    def read(self) -> None:
        """What the transport would read now (nothing while paused)."""
        t = self.transport
        if t.lost or t.paused:
            return
        if self.outbox:
            data = bytes(self.outbox)
            self.outbox.clear()
            self.conn.data_received(data)
        if self.fin_sent and not self.fin_read and not self.outbox and not t.paused \
                and not t.lost:
            self.fin_read = True
            if not self.conn.eof_received():
                t.close()


class ErrorLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


# -- scenarios ------------------------------------------------------------------------------


@st.composite
def scenarios(draw, retry_heavy: bool = False) -> dict:
    """A listener and a cluster with some combination of the resilience settings."""
    backends = []
    for i in range(draw(st.integers(2, 3))):
        backend = {"address": f"127.0.0.1:{2001 + i}",
                   "weight": draw(st.sampled_from([1, 1, 3]))}
        if draw(st.integers(0, 3)) == 0:
            backend["max_connections"] = draw(st.integers(1, 2))
        backends.append(backend)
    cluster: dict = {
        "name": "app", "backends": backends,
        "policy": draw(st.sampled_from(["round_robin", "least_conn", "peak_ewma"])),
        "connect_timeout": draw(st.sampled_from([0.05, 2.0])),
        "keepalive_max_idle": draw(st.sampled_from([1, 8])),
    }
    if retry_heavy or draw(st.booleans()):
        retry_on = draw(st.lists(st.sampled_from([500, 502, 503, "reset", "timeout",
                                                  "connect_failure"]),
                                 min_size=1, max_size=6, unique=True))
        cluster["retries"] = {
            "attempts": draw(st.integers(2 if retry_heavy else 1, 3)),
            "retry_on": retry_on,
            "backoff": draw(st.sampled_from([{"base": 0, "max": 0}, "1ms..2ms", "10ms..40ms"])),
            "budget": 10, "min_per_second": 1000,
            "retry_non_idempotent": draw(st.booleans()),
            "max_buffered_body": draw(st.sampled_from([65536, 4])),
        }
        per_try = draw(st.sampled_from([None, 0.05, 0.25]))
        if per_try is not None:
            cluster["retries"]["per_try_timeout"] = per_try
    if draw(st.booleans()):
        cluster["max_requests"] = draw(st.integers(1, 3))
    if draw(st.booleans()):
        cluster["max_connections"] = draw(st.integers(1, 3))
    if cluster.get("max_connections") is not None or any("max_connections" in b
                                                         for b in backends):
        if draw(st.booleans()):
            cluster["max_pending"] = draw(st.integers(0, 2))
        cluster["queue_timeout"] = draw(st.sampled_from([0.01, 0.1, 1.0]))
    if draw(st.booleans()):
        cluster["max_retries"] = draw(st.integers(0, 2))
    if draw(st.booleans()):
        timeout = draw(st.sampled_from([0.05, 0.3, 2.0]))
        per_try = cluster.get("retries", {}).get("per_try_timeout")
        cluster["request_timeout"] = max(timeout, per_try or 0)
    if draw(st.booleans()):
        cluster["outlier_detection"] = {
            "consecutive_gateway_errors": draw(st.integers(1, 3)),
            "base_ejection_time": draw(st.sampled_from([0.05, 30])),
            "max_ejection_percent": draw(st.sampled_from(["50%", "100%"])),
        }
    listener = {
        "name": "web", "bind": "127.0.0.1:1", "routes": [{"cluster": "app"}],
        "max_request_body": draw(st.sampled_from([4096, 8])),
        "abort_on_client_close": draw(st.booleans()),
        "client_header_timeout": 1000, "client_idle_timeout": 1000,
    }
    return {"listeners": [listener], "clusters": [cluster]}


METHODS = ["GET", "GET", "GET-close", "PUT", "POST", "POST-chunked"]


def request_bytes(rid: int, kind: str, body: bytes) -> bytes:
    """A request tagged ``x-req: rid`` (so that the backends' copies can be counted)."""
    if kind == "GET":
        return b"GET /r/%d HTTP/1.1\r\nHost: a\r\nx-req: %d\r\n\r\n" % (rid, rid)
    if kind == "GET-close":
        return b"GET /r/%d HTTP/1.1\r\nHost: a\r\nx-req: %d\r\nConnection: close\r\n\r\n" % (
            rid, rid)
    if kind == "POST-chunked":
        chunks = b"%x\r\n%b\r\n" % (len(body), body) if body else b""
        return (b"POST /r/%d HTTP/1.1\r\nHost: a\r\nx-req: %d\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n%b0\r\n\r\n" % (rid, rid, chunks))
    return (b"%b /r/%d HTTP/1.1\r\nHost: a\r\nx-req: %d\r\nContent-Length: %d\r\n\r\n%b"
            % (kind.encode(), rid, rid, len(body), body))


FRAMINGS = ["length", "length", "length", "chunked", "until-close", "close"]


def response_bytes(status: int, framing: str) -> tuple[bytes, int, bool]:
    """A response, where its head ends, and whether the backend closes after it.
    ``status`` 101 and 0 are a misbehaving backend (an unasked-for upgrade, garbage);
    103 precedes a 200."""
    if status == 0:
        return b"HTTP/1.1 2x0 Bad\r\n\r\n", 10, False
    if status == 101:
        head = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n"
        return head + b"hello", len(head), False
    early = b""
    if status == 103:
        early, status = b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n", 200
    body = b"ok-ok-ok-ok" if status == 200 else b"status %d" % status
    if framing == "chunked":
        head = b"HTTP/1.1 %d X\r\nTransfer-Encoding: chunked\r\n\r\n" % status
        rest = b"4\r\n%b\r\n%x\r\n%b\r\n0\r\n\r\n" % (body[:4], len(body) - 4, body[4:])
        closes = False
    elif framing == "until-close":
        head = b"HTTP/1.1 %d X\r\n\r\n" % status
        rest, closes = body, True
    else:
        head = b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n%b\r\n" % (
            status, len(body), b"Connection: close\r\n" if framing == "close" else b"")
        rest, closes = body, framing == "close"
    return early + head + rest, len(early + head), closes


# -- the harness ------------------------------------------------------------------------------


class Harness:
    """Client connections in front of a cluster, driven step by step."""

    def __init__(self, scenario: dict, clients: int = 1, auto_connect: bool = False) -> None:
        self.scenario = scenario
        config = parse_config(json.dumps(scenario))
        self.loop = loop = VirtualLoop()
        # The cluster's clock and its policy's randomness, deterministic (hypothesis
        # replays and shrinks examples).
        self._patches = [
            mock.patch.object(cluster_module, "MonotonicClock", lambda: VirtualClock(loop)),
            mock.patch.object(cluster_module, "create_policy", lambda name, options:
                              create_policy(name, options, rng=random.Random(0),
                                            clock=VirtualClock(loop))),
        ]
        for patch in self._patches:
            patch.start()
        spec = config.clusters[0]
        self.cluster = ClusterRuntime(spec, loop)
        self.cluster.rng = random.Random(0)
        self.retries = spec.retries
        self.pools = list(self.cluster.pools.values())
        self.site = Site(config.listeners[0], {"app": self.cluster}, loop)
        self.clients = [Client(self.site, loop, i) for i in range(clients)]
        self.log = ErrorLog()
        # Connects complete as soon as the loop runs (refuse_next of them refused), or
        # wait for a "connect" event.
        self.auto_connect = auto_connect
        self.refuse_next = 0
        self.sent: dict[int, tuple[str, bytes]] = {}    # id → (method kind, body)
        self.copies: dict[int, int] = {}

    # -- plumbing

    def __enter__(self) -> Harness:
        logging.getLogger("poise").addHandler(self.log)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger("poise").removeHandler(self.log)
        for patch in self._patches:
            patch.stop()
        # An example cut short (a failure, or hypothesis stopping it) may leave connects
        # pending: cancel them and let them unwind now rather than when collected.
        loop = self.loop
        loop.set_exception_handler(lambda loop, context: None)
        for _ in range(50):
            try:
                loop.step()
            except Exception:
                pass
            pending = [task for task in loop.tasks if not task.done()]
            if not pending:
                break
            for task in pending:
                # (a task cancelled before it starts leaves its connect never awaited)
                if _started(task.get_coro()):
                    task.cancel()
        loop.close()

    @property
    def exchanges(self) -> list:
        return [ex for c in self.clients for ex in c.conn.exchanges]

    @property
    def upstreams(self) -> list[Transport]:
        return [t for t in self.loop.transports if isinstance(t.protocol, UpstreamConnection)]

    def settle(self) -> None:
        """Run the loop until nothing is ready or due; let the clients' transports read
        what their peers sent."""
        loop = self.loop
        for _ in range(500):
            for client in self.clients:
                client.read()
            if self.auto_connect:
                for _conn, accepted in loop.waiting_connects():
                    self.refuse_next -= 1
                    self._resolve(accepted, ok=self.refuse_next < 0)
                self.refuse_next = max(0, self.refuse_next)
            self._raise_errors()
            if not loop.busy():
                return
            loop.step()
            self._raise_errors()
        raise AssertionError("the loop never settles (callbacks keep rescheduling)")

    def _raise_errors(self) -> None:
        if self.loop.errors:
            context = self.loop.errors[0]
            raise AssertionError(f"exception in a loop callback: {context.get('message')}: "
                                 f"{context.get('handle') or context.get('task')}") \
                from context.get("exception")
        if self.log.records:
            record = self.log.records[0]
            raise AssertionError(f"poise logged an error: {record.getMessage()}") \
                from (record.exc_info[1] if record.exc_info else None)

    # -- client events

    def send(self, c: Client, requests: list[tuple[str, bytes]], cut: int | None) -> None:
        if c.gone or c.fin_sent:
            return
        data = c.unsent
        for kind, body in requests:
            body = b"" if kind.startswith("GET") else body
            rid = len(self.sent) + 1
            self.sent[rid] = (kind, body)
            c.sent.append(rid)
            data += request_bytes(rid, kind, body)
        if cut is not None and data:
            cut %= len(data)
            data, c.unsent = data[:cut], data[cut:]
        else:
            c.unsent = b""
        c.outbox += data

    def fin(self, c: Client) -> None:
        c.fin_sent = True

    def disconnect(self, c: Client, error: bool = False) -> None:
        if not c.gone:
            c.gone = True
            c.transport.lose(ConnectionResetError() if error else None)

    def toggle_write_paused(self, c: Client) -> None:
        """The client's socket buffer fills up, or drains."""
        if c.gone or c.transport.lost:
            return
        c.write_paused = not c.write_paused
        if c.write_paused:
            c.conn.pause_writing()
        else:
            c.conn.resume_writing()

    # -- backend events

    def readable(self) -> list[Transport]:
        """Upstream connections with request bytes to answer or a response to finish."""
        return [t for t in self.upstreams
                if not t.closed and not t.paused and (t.unanswered or t.remainder)]

    def answer(self, t: Transport, status: int, framing: str = "length", cut: str = "",
               at: int = 0, reset: bool = False) -> None:
        """The backend answers on ``t``: all of the response, or part of it (cut in its
        ``head`` or its ``body``; the rest comes with a later answer, or never if the
        backend then resets)."""
        conn = t.protocol
        if t.remainder:
            response, t.remainder = t.remainder, b""
            closes, head_end = t.remainder_fin, 0
        else:
            heads = t.data.count(b"\r\nx-req: ", t.answered)
            assert heads <= 1, f"{heads} requests sent at once on one connection: {t.data!r}"
            t.answered = len(t.data)
            response, head_end, closes = response_bytes(status, framing)
        if cut == "head" and head_end > 1:
            split = 1 + at % (head_end - 1)
        elif cut == "body" and len(response) > head_end + 1:
            split = head_end + 1 + at % (len(response) - head_end - 1)
        else:
            split = len(response)
        response, t.remainder = response[:split], response[split:]
        t.remainder_fin = closes
        conn.data_received(response)
        if reset:
            self.reset(t)
        elif closes and not t.remainder:
            self.backend_fin(t)

    def unsolicited(self, t: Transport) -> None:
        """The backend sends bytes on a connection with no request outstanding."""
        if not t.closed and not t.unanswered and not t.remainder:
            t.protocol.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    def reset(self, t: Transport) -> None:
        if not t.lost:
            t.remainder = b""
            t.lose(ConnectionResetError("reset by the backend"))

    def backend_fin(self, t: Transport) -> None:
        if not t.closed:
            t.remainder = b""
            if not t.protocol.eof_received():
                t.close()

    def toggle_backend_full(self, t: Transport) -> None:
        """The backend stops reading the request (its socket buffer is full), or resumes."""
        t.write_full = not t.write_full
        if t.write_full:
            t.protocol.pause_writing()
        else:
            t.protocol.resume_writing()

    def connect(self, index: int, ok: bool) -> None:
        """A connect in progress succeeds or is refused (with auto_connect: the next
        connect is refused)."""
        if self.auto_connect:
            self.refuse_next += not ok
            return
        waiting = self.loop.waiting_connects()
        if waiting:
            self._resolve(waiting[index % len(waiting)][1], ok)

    @staticmethod
    def _resolve(accepted: asyncio.Future, ok: bool) -> None:
        if ok:
            accepted.set_result(None)
        else:
            accepted.set_exception(ConnectionRefusedError(errno.ECONNREFUSED, "refused"))

    def advance(self, seconds: float) -> None:
        self.loop.now += seconds

    def until_deadline(self, index: int) -> None:
        """Time passes until a response deadline of an upstream connection."""
        due = sorted(t.protocol.deadline.when for t in self.upstreams
                     if not t.closed and t.protocol.deadline.when is not None)
        if due:
            self.loop.now = max(self.loop.now, due[index % len(due)])

    # -- invariants

    def check(self) -> None:
        """Invariants that hold whenever the loop has settled."""
        cluster = self.cluster
        limits = cluster.limits
        exchanges = self.exchanges
        opened = {id(p): 0 for p in self.pools}
        connected = {id(p): 0 for p in self.pools}
        for conn, _ in self.loop.waiting_connects():
            opened[id(conn.pool)] += 1
        for t in self.upstreams:
            if not t.lost:
                opened[id(t.protocol.pool)] += 1
                connected[id(t.protocol.pool)] += 1
        for pool in self.pools:
            name = pool.backend.address
            assert pool.active >= 0 and pool.stats.in_flight >= 0, pool
            assert pool.active == opened[id(pool)], \
                f"{name}: active={pool.active}, but {opened[id(pool)]} connections " \
                "are open or opening"
            assert pool.stats.active_connections == connected[id(pool)], name
            if pool.max_connections is not None:
                assert pool.active <= pool.max_connections, \
                    f"{name}: {pool.active} connections, over its max_connections"
            counted = sum(1 for ex in exchanges if ex._counted and ex.pool is pool)
            assert pool.stats.in_flight == counted, \
                f"{name}: in_flight={pool.stats.in_flight}, {counted} exchanges count there"
            for conn in pool.idle:
                assert conn.exchange is None, f"an idle connection serves {conn.exchange!r}"
        if limits is not None:
            for field in ("requests", "connections", "pending", "retries"):
                value, cap = getattr(limits, field), getattr(limits, "max_" + field)
                assert value >= 0, f"limits.{field} = {value}"
                assert cap is None or value <= cap, f"limits.{field} = {value} > {cap}"
            assert limits.connections == sum(p.active for p in self.pools), limits
            held = [ex._held for ex in exchanges]
            assert limits.requests == sum(1 for h in held if h & REQUEST), limits
            assert limits.retries == sum(1 for h in held if h & RETRY), limits
            assert limits.pending == sum(1 for h in held if h & PENDING), limits
            assert limits.pending == len(cluster.pending), (limits, list(cluster.pending))
        else:
            assert not cluster.pending
        connecting = self._connecting_exchanges()
        for ex in cluster.pending:
            assert not ex.finished, f"a finished exchange waits in the queue: {ex!r}"
            assert not ex.client.closed and ex is ex.client.current, \
                f"a queued exchange of a closed client or not its current one: {ex!r}"
            assert ex._timer is not None, f"a queued exchange has no queue timer: {ex!r}"
            assert ex.conn is None and ex not in connecting, ex
            usable = [c for c in ex.pool.idle if c.usable]
            assert not usable, f"{ex!r} waits in the queue while its backend has idle " \
                               f"connections {usable}"
        if limits is not None and limits.max_connections is not None \
                and limits.connections >= limits.max_connections:
            # Requests that only the cluster's max_connections holds back (their backend
            # has room): docs/resilience.md, the longest-idle connection is closed to make
            # room.  (A request waiting for its backend's limit is not helped by that.)
            held = [ex for ex in cluster.pending if ex.pool.max_connections is None
                    or ex.pool.active < ex.pool.max_connections]
            usable = [c for p in self.pools for c in p.idle if c.usable]
            assert not (held and usable), f"{held} wait for the cluster's max_connections " \
                                          f"while connections sit idle: {usable}"
        for ex in exchanges:
            if ex.conn is not None:
                assert ex.conn.exchange is ex, f"{ex!r} holds a connection serving another"
                assert not ex.finished, f"finished {ex!r} still holds a connection"
            if ex.finished:
                assert not ex._held and not ex._counted and ex._timer is None, \
                    f"finished {ex!r} holds {ex._held=} {ex._counted=} {ex._timer=}"
        picker = getattr(cluster.picker, "_primary", cluster.picker)
        if hasattr(picker, "drift"):
            assert not picker.drift(), f"in_flight changes not reported: {picker.drift()}"
        for t in self.upstreams:
            assert not t.late_writes, "poise wrote to an upstream connection after closing it"
        for c in self.clients:
            assert not c.transport.late_writes, "poise wrote to a client after closing it"
            # Liveness: a client's current request, once started, is going somewhere.
            cur = c.conn.current
            if cur is not None and not c.transport.lost and cur.cluster is not None \
                    and not cur.finished:
                assert (cur.conn is not None or cur in cluster.pending
                        or cur._timer is not None or cur in connecting), \
                    f"{cur!r} is stuck: no connection, not queued, no timer, not connecting"

    def _connecting_exchanges(self) -> list:
        return [ex for ex in self.exchanges if ex.connecting]

    # -- the end

    def drain(self) -> None:
        """Answer everything outstanding with 200 and let every timer due run."""
        for c in self.clients:
            if not c.gone and not c.fin_sent and c.unsent:
                c.outbox += c.unsent
                c.unsent = b""
            if c.write_paused:
                self.toggle_write_paused(c)
        for t in self.upstreams:
            if t.write_full:
                self.toggle_backend_full(t)
        for _ in range(1000):
            self.settle()
            self.check()
            waiting = self.loop.waiting_connects()
            if waiting:
                waiting[0][1].set_result(None)
                continue
            ready = self.readable()
            if ready:
                self.answer(ready[0], 200)
                continue
            timers = [h.when() for h in self.loop.live_timers()
                      if h.when() <= self.loop.now + HORIZON]
            if not timers:
                return
            self.loop.now = max(self.loop.now, min(timers))
        raise AssertionError("drain did not finish: the exchanges keep going")

    def finish(self) -> None:
        """Drain, check what the clients read, close everything, check it is all gone."""
        self.drain()
        for i, c in enumerate(self.clients):
            statuses, ending = read_responses(c.transport.data)
            _note(f"client {i} read {statuses}, then {ending}")
            assert all(s in ALLOWED_STATUSES for s in statuses), statuses
            if not (c.transport.closed or c.transport.eof):   # (eof: closed, lingering)
                assert c.conn.current is None and not c.conn.queue, \
                    f"a request was never answered (a hang): {c.conn!r}"
                assert len(statuses) == len(c.sent), \
                    f"client {i}: {len(c.sent)} requests sent, {len(statuses)} answered"
                assert ending == "open", ending
            else:
                assert len(statuses) <= len(c.sent), (c.sent, statuses)
                # Closed by poise, with the client still there: the last response said
                # so, or was cut short (the backend failed while it was relayed).
                assert c.gone or c.fin_sent or ending != "open", \
                    f"client {i}: poise closed the connection after {statuses} unannounced"
        self.check_backends()
        # The clients go away; the pools close their idle connections.
        for c in self.clients:
            self.disconnect(c)
        self.settle()
        for pool in self.pools:
            pool.close_idle()
        self.cluster.stop()
        self.settle()
        self.check()
        limits = self.cluster.limits
        if limits is not None:
            assert (limits.requests, limits.pending, limits.retries, limits.connections) == \
                (0, 0, 0, 0), limits
        assert not self.cluster.pending
        for pool in self.pools:
            assert pool.stats.in_flight == 0 and pool.active == 0, pool
            assert pool.stats.active_connections == 0, pool
        exchanges = self.exchanges
        for ex in exchanges:
            assert ex._timer is None and not ex._held and not ex._counted, ex
        for task in self.loop.tasks:
            assert task.done(), f"task left pending: {task!r}"
            assert task.cancelled() or task.exception() is None, task
        leftover = [h for h in self.loop.live_timers()
                    if getattr(h._callback, "__self__", None) in exchanges]
        assert not leftover, f"exchange timers left: {leftover}"

    def check_backends(self) -> None:
        """Each backend connection read well-formed requests, each with its body intact,
        and no request was sent more often than the retry rules allow."""
        copies = self.copies
        for t in self.upstreams:
            for rid, body in requests_of(t.data):
                sent_body = self.sent[rid][1]
                assert body == sent_body, f"request {rid}: body {body!r} != {sent_body!r}"
            for rid in re.findall(rb"\r\nx-req: (\d+)\r\n", t.data):   # (heads written)
                copies[int(rid)] = copies.get(int(rid), 0) + 1
        retries = self.retries
        attempts = retries.attempts if retries is not None else 1
        for rid, n in copies.items():
            kind = self.sent[rid][0]
            replayable = kind in ("GET", "GET-close", "PUT") or (retries is not None
                                                    and retries.retry_non_idempotent)
            # Tries, plus one re-send after a kept-alive connection turned out closed.
            bound = attempts + 1 if replayable else 1
            assert n <= bound, f"request {rid} ({kind}) was sent upstream {n} times " \
                               f"(at most {bound})"


def _note(text: str) -> None:
    try:
        note(text)
    except InvalidArgument:     # (outside a hypothesis test)
        pass


def responses_of(data: bytes) -> list[int]:
    """Status codes of the final responses in ``data`` (h11, as a client); AssertionError
    if they are malformed.  A truncated last response is allowed (the connection
    aborted)."""
    return read_responses(data)[0]


def read_responses(data: bytes) -> tuple[list[int], str]:
    """The statuses of the final responses in ``data``, and how the stream ends:
    ``close`` (after a response that announced it), ``truncated`` (within a response,
    or after an informational one), or ``open`` (after a complete keep-alive response,
    or nothing at all)."""
    conn = h11.Connection(h11.CLIENT)
    statuses: list[int] = []
    _send_get(conn)
    if not data:
        return statuses, "open"
    conn.receive_data(bytes(data))      # (b"" would mean EOF)
    informational = False
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as e:
            raise AssertionError(f"malformed response bytes: {bytes(data[:300])!r}") from e
        if event in (h11.NEED_DATA, h11.PAUSED) or isinstance(event, h11.ConnectionClosed):
            partial = informational or conn.their_state is not h11.SEND_RESPONSE \
                or bool(conn.trailing_data[0])
            return statuses, "truncated" if partial else "open"
        informational = isinstance(event, h11.InformationalResponse)
        if isinstance(event, h11.Response):
            statuses.append(event.status_code)
        if isinstance(event, h11.EndOfMessage):
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return statuses, "close"
            conn.start_next_cycle()
            _send_get(conn)


def _send_get(conn: h11.Connection) -> None:
    # Every request is read back as a GET: the responses to all of them have bodies.
    conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    conn.send(h11.EndOfMessage())


def requests_of(data: bytes) -> list[tuple[int, bytes]]:
    """``(x-req id, body)`` of each complete request in ``data`` (h11, as a server);
    AssertionError if they are malformed.  A truncated last request is allowed."""
    conn = h11.Connection(h11.SERVER)
    found: list[tuple[int, bytes]] = []
    conn.receive_data(bytes(data))
    rid, body = 0, b""
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as e:
            raise AssertionError(f"malformed request bytes upstream: {bytes(data)!r}") from e
        if event in (h11.NEED_DATA, h11.PAUSED) or isinstance(event, h11.ConnectionClosed):
            return found
        if isinstance(event, h11.Request):
            rid = int(dict(event.headers)[b"x-req"])
            body = b""
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            found.append((rid, body))
            conn.send(h11.Response(status_code=200, headers=[("Content-Length", "0")]))
            conn.send(h11.EndOfMessage())
            conn.start_next_cycle()


# -- the events -------------------------------------------------------------------------------

EVENTS = {
    "send": 6, "send-pipelined": 2, "send-part": 2, "burst": 2, "fin": 1, "disconnect": 1,
    "write-paused": 1, "answer": 8, "answer-part": 3, "answer-part+reset": 3,
    "reset": 3, "backend-fin": 1, "backend-full": 1, "unsolicited": 1, "connect-ok": 6, "connect-refused": 2,
    "time": 4, "deadline": 2,
}
RETRY_EVENTS = {**EVENTS, "send": 8, "answer": 10, "reset": 5, "fin": 0, "disconnect": 0,
                "write-paused": 0, "backend-full": 0, "unsolicited": 0}
STATUSES = [200, 200, 500, 502, 503, 103, 101, 0]
BODIES = st.binary(max_size=12).map(lambda b: bytes(97 + x % 26 for x in b))


def _names(weights: dict[str, int]) -> list[str]:
    return [name for name, weight in weights.items() for _ in range(weight)]


def request_list(data, n: int) -> list[tuple[str, bytes]]:
    return [(data.draw(st.sampled_from(METHODS)), data.draw(BODIES)) for _ in range(n)]


def play(h: Harness, data, names: list[str], max_steps: int) -> None:
    """Draw and run events, checking the invariants after each."""
    h.settle()
    h.check()
    pick = lambda items: items[data.draw(st.integers(0, len(items) - 1))]  # noqa: E731
    for _ in range(data.draw(st.integers(1, max_steps), label="steps")):
        event = data.draw(st.sampled_from(names), label="event")
        c = pick(h.clients)
        if event == "send":
            h.send(c, request_list(data, 1), None)
        elif event == "burst":          # every client sends a request at once
            for other in h.clients:
                h.send(other, request_list(data, 1), None)
        elif event == "send-pipelined":
            h.send(c, request_list(data, data.draw(st.integers(2, 3))), None)
        elif event == "send-part":
            h.send(c, request_list(data, 1) if not c.unsent else [],
                   data.draw(st.integers(1, 200)))
        elif event == "fin":
            h.fin(c)
        elif event == "disconnect":
            h.disconnect(c, error=data.draw(st.booleans()))
        elif event == "write-paused":
            h.toggle_write_paused(c)
        elif event.startswith("answer"):
            ready = h.readable()
            if ready:
                h.answer(pick(ready), data.draw(st.sampled_from(STATUSES)),
                         data.draw(st.sampled_from(FRAMINGS)),
                         "" if event == "answer" else data.draw(st.sampled_from(["head",
                                                                                 "body"])),
                         data.draw(st.integers(0, 100)), reset=event == "answer-part+reset")
        elif event in ("reset", "backend-fin", "backend-full", "unsolicited"):
            live = [t for t in h.upstreams if not t.closed]
            if live:
                t = pick(live)
                {"reset": h.reset, "backend-fin": h.backend_fin, "unsolicited": h.unsolicited,
                 "backend-full": h.toggle_backend_full}[event](t)
        elif event.startswith("connect"):
            h.connect(data.draw(st.integers(0, 3)), event == "connect-ok")
        elif event == "time":
            h.advance(data.draw(st.sampled_from(TIME_STEPS)))
        elif event == "deadline":
            h.until_deadline(data.draw(st.integers(0, 3)))
        note(f"{event} (client {h.clients.index(c)})")
        h.settle()
        h.check()


FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@FUZZ
@given(scenario=scenarios(), clients=st.integers(1, 4), auto_connect=st.booleans(),
       data=st.data())
def test_any_sequence_of_events_leaves_nothing_behind(scenario, clients, auto_connect, data):
    note(json.dumps(scenario))
    with Harness(scenario, clients, auto_connect) as h:
        play(h, data, _names(EVENTS), max_steps=40)
        h.finish()


@FUZZ
@given(scenario=scenarios(retry_heavy=True), clients=st.integers(1, 3),
       auto_connect=st.booleans(), data=st.data())
def test_retries_never_resend_more_than_allowed(scenario, clients, auto_connect, data):
    """Failures everywhere, retries on: a POST (unless retry_non_idempotent) reaches a
    backend at most once, a GET at most ``attempts`` times plus one re-send after a
    stale keep-alive connection (``check_backends``), and the rest still holds."""
    note(json.dumps(scenario))
    with Harness(scenario, clients, auto_connect) as h:
        play(h, data, _names(RETRY_EVENTS), max_steps=40)
        h.finish()


def test_the_harness_sees_a_retry_and_a_stale_resend():
    # Sanity check of the harness itself: a GET answered 503 is retried (on the one
    # backend, on a fresh connection); a GET on a kept-alive connection that the backend
    # closes before answering is re-sent once on a fresh one.
    scenario = {
        "listeners": [{"name": "web", "bind": "127.0.0.1:1", "routes": [{"cluster": "app"}]}],
        "clusters": [{"name": "app", "backends": [{"address": "127.0.0.1:2001"}],
                      "retries": {"attempts": 2, "retry_on": [503], "backoff": "0s..0s"}}],
    }
    with Harness(scenario) as h:
        c = h.clients[0]
        h.send(c, [("GET", b"")], None)
        h.settle()
        h.connect(0, ok=True)
        h.settle()
        h.answer(h.readable()[0], 503)
        h.settle()
        h.connect(0, ok=True)
        h.settle()
        h.check()
        first, second = h.upstreams
        assert first.closed and second.unanswered
        h.answer(second, 200)
        h.settle()
        h.send(c, [("GET", b"")], None)     # reuses the second connection ...
        h.settle()
        assert second.unanswered and not h.loop.waiting_connects()
        h.reset(second)                     # ... which the backend had closed
        h.settle()
        h.check()
        assert len(h.loop.waiting_connects()) == 1
        h.finish()
        assert responses_of(c.transport.data) == [200, 200]
        assert h.copies == {1: 2, 2: 2}


def test_the_harness_sees_the_queue_and_a_hand_over():
    # Two clients, one connection allowed: the second request waits in the queue and
    # takes over the connection the first one released.
    scenario = {
        "listeners": [{"name": "web", "bind": "127.0.0.1:1", "routes": [{"cluster": "app"}]}],
        "clusters": [{"name": "app", "backends": [{"address": "127.0.0.1:2001"}],
                      "max_connections": 1}],
    }
    with Harness(scenario, clients=2) as h:
        a, b = h.clients
        h.send(a, [("GET", b"")], None)
        h.send(b, [("PUT", b"xyz")], None)
        h.settle()
        h.check()
        assert len(h.cluster.pending) == 1 and h.cluster.limits.pending == 1
        h.connect(0, ok=True)
        h.settle()
        h.answer(h.readable()[0], 200)
        h.settle()
        h.check()
        assert not h.cluster.pending and len(h.upstreams) == 1
        h.answer(h.readable()[0], 200)
        h.finish()
        assert h.copies == {1: 1, 2: 1}


def test_an_unasked_for_101_fails_the_try_once():
    # Regression (found by the properties above): on_informational failed the try, then
    # data_received's HttpParserUpgrade handler failed it again: two retries at once,
    # the second backend's in_flight left one too high.
    scenario = {
        "listeners": [{"name": "web", "bind": "127.0.0.1:1", "routes": [{"cluster": "app"}]}],
        "clusters": [{"name": "app", "backends": [{"address": "127.0.0.1:2001"},
                                                  {"address": "127.0.0.1:2002"}],
                      "retries": {"attempts": 3, "retry_on": ["reset"], "backoff": "0s..0s"}}],
    }
    with Harness(scenario) as h:
        c = h.clients[0]
        h.send(c, [("GET", b"")], None)
        h.settle()
        h.connect(0, ok=True)
        h.settle()
        exchange = c.conn.current
        h.answer(h.readable()[0], 101)      # the backend answers a GET with a 101
        assert len(exchange._tried) == 1, f"one failed try counted as {exchange._tried}"
        h.settle()
        assert len(h.loop.waiting_connects()) == 1, "the request is retried twice at once"
        h.check()                           # (in_flight of the second backend: 2, not 1)
        h.finish()
        assert responses_of(c.transport.data) == [200]


def test_nothing_pipelined_after_a_chunked_body_too_large_is_forwarded():
    # Regression (found by the properties above): the 413 for a chunked body over
    # max_request_body did not stop the parser, so a request pipelined after it was
    # started and forwarded, on a connection already answered and closing.
    scenario = {
        "listeners": [{"name": "web", "bind": "127.0.0.1:1", "routes": [{"cluster": "app"}],
                       "max_request_body": 8}],
        "clusters": [{"name": "app", "backends": [{"address": "127.0.0.1:2001"}]}],
    }
    with Harness(scenario) as h:
        c = h.clients[0]
        h.send(c, [("POST-chunked", b"aaaaaaaaa"), ("POST", b"second")], None)
        h.settle()
        assert responses_of(c.transport.data) == [413]
        while h.loop.waiting_connects():
            h.connect(0, ok=True)
            h.settle()
        forwarded = b"".join(bytes(t.data) for t in h.upstreams)
        assert b"x-req: 2" not in forwarded, f"forwarded after the 413: {forwarded!r}"
        h.check()
        h.finish()


def test_a_retried_pipelined_empty_chunked_post_is_terminated():
    # Regression (found by the properties above): a chunked POST read whole before it
    # started (pipelined) was retried without its last chunk, so the backend would read
    # the next request on that connection as its body.
    scenario = {
        "listeners": [{"name": "web", "bind": "127.0.0.1:1", "routes": [{"cluster": "app"}]}],
        "clusters": [{"name": "app", "backends": [{"address": "127.0.0.1:2001"},
                                                  {"address": "127.0.0.1:2002"}],
                      "retries": {"attempts": 2, "retry_on": [503], "backoff": "0s..0s",
                                  "retry_non_idempotent": True}}],
    }
    with Harness(scenario) as h:
        c = h.clients[0]
        h.send(c, [("GET", b""), ("POST-chunked", b"")], None)
        h.settle()
        h.connect(0, ok=True)
        h.settle()
        h.answer(h.readable()[0], 200)      # the GET; then the POST starts
        h.settle()
        h.connect(0, ok=True)
        h.settle()
        h.answer(h.readable()[0], 503)      # the POST's first try: retried
        h.settle()
        retried = h.readable()[0]           # (on the connection the GET left idle)
        assert requests_of(retried.data) == [(1, b""), (2, b"")], bytes(retried.data)
        h.finish()


def test_a_closed_idle_connection_does_not_keep_a_request_queued():
    # Regression (found by the properties above): free_idle_connection "closed" the
    # oldest listed idle connection although the backend had closed it already, so
    # nothing was freed and the request waited out queue_timeout (503) while another
    # connection sat idle.
    scenario = {
        "listeners": [{"name": "web", "bind": "127.0.0.1:1", "routes": [{"cluster": "app"}]}],
        "clusters": [{"name": "app", "max_connections": 1, "queue_timeout": 1.0,
                      "backends": [{"address": f"127.0.0.1:{2001 + i}"} for i in range(3)]}],
    }
    with Harness(scenario) as h:
        c = h.clients[0]
        h.send(c, [("GET", b"")], None)         # to backend 1 (round robin) ...
        h.settle()
        h.connect(0, ok=True)
        h.settle()
        first = h.readable()[0]
        h.answer(first, 200)                    # ... whose connection goes idle
        h.settle()
        h.backend_fin(first)                    # and is closed by the backend
        h.settle()
        h.advance(0.1)
        h.send(c, [("GET", b"")], None)         # to backend 2: its connection goes idle
        h.settle()
        h.connect(0, ok=True)
        h.settle()
        h.answer(h.readable()[0], 200)
        h.settle()
        h.send(c, [("GET", b"")], None)         # to backend 3: max_connections reached,
        h.settle()                              # backend 2's idle connection must go
        h.advance(1.0)                          # (queue_timeout)
        h.finish()
        assert responses_of(c.transport.data) == [200, 200, 200]


@pytest.mark.parametrize("seed", range(3))
def test_the_harness_is_deterministic(seed):
    # The same events give the same bytes (hypothesis needs that to shrink).
    scenario = {
        "listeners": [{"name": "web", "bind": "127.0.0.1:1", "routes": [{"cluster": "app"}]}],
        "clusters": [{"name": "app", "policy": "peak_ewma",
                      "backends": [{"address": "127.0.0.1:2001"},
                                   {"address": "127.0.0.1:2002"}],
                      "max_connections": 1, "queue_timeout": 0.1,
                      "outlier_detection": {"consecutive_gateway_errors": 1,
                                            "base_ejection_time": 0.05},
                      "retries": {"attempts": 3, "retry_on": [502, "reset"],
                                  "backoff": "1ms..2ms"}}],
    }
    outputs = []
    for _ in range(2):
        rng = random.Random(seed)
        with Harness(scenario, clients=2) as h:
            for _ in range(40):
                choice = rng.randrange(4)
                if choice == 0:
                    h.send(rng.choice(h.clients), [("GET", b"")], None)
                elif choice == 1:
                    h.connect(rng.randrange(3), ok=rng.random() < 0.7)
                elif choice == 2 and h.readable():
                    h.answer(h.readable()[0], rng.choice([200, 502]))
                else:
                    h.advance(rng.choice(TIME_STEPS))
                h.settle()
                h.check()
            h.finish()
            outputs.append(([bytes(c.transport.data) for c in h.clients],
                            [bytes(t.data) for t in h.upstreams]))
    assert outputs[0] == outputs[1]
