"""The admin HTTP server on real loopback sockets: keep-alive, pipelining, limits,
deadlines and hostile clients.  After every test the server must still answer /healthz
at once and hold no connection (see conftest.serve)."""

from __future__ import annotations

import asyncio
import select
import socket
import string
import struct
import threading
import time
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from poise.admin.api import AdminApi
from poise.admin.http import AdminServer, Limits
from poise.admin.reader import RequestReader
from tests.admin.conftest import FAST, serve
from tests.admin.fakes import FakeOps
from tests.admin.support import (
    Conn,
    ServerThread,
    healthy,
    parse_replies,
    read_to_eof,
    request,
)


def elapsed(since: float) -> float:
    return time.monotonic() - since


# -- keep-alive, pipelining, versions -----------------------------------------------------

def test_keep_alive(server):
    with Conn(server.addr) as c:
        for name in ("app", "api", "app"):
            r = c.ask("GET", f"/clusters/{name}")
            assert r.status == 200 and r.json["name"] == name
            assert "connection" not in r.headers
        assert r.headers["cache-control"] == "no-store"
    server.wait_connections(0)


def _mixed_requests(n: int) -> tuple[bytes, list[tuple[int, object]]]:
    """``n`` requests of every kind, and the (status, check) expected for each."""
    data, expected = b"", []
    for i in range(n):
        kind = i % 5
        if kind == 0:
            data += request("GET", f"/clusters/missing{i}")
            expected.append((404, {"error": f"no cluster 'missing{i}'"}))
        elif kind == 1:
            body = b'{"weight": %d}' % (i + 1)
            data += request("PUT", "/clusters/app/backends/%5B%3A%3A1%5D%3A9002/weight", body)
            expected.append((200, i + 1))
        elif kind == 2:
            data += request("GET", "/healthz")
            expected.append((200, {"status": "ok"}))
        elif kind == 3:
            data += request("DELETE", f"/nope/{i}")
            expected.append((404, {"error": "no such path"}))
        else:
            data += request("GET", "/clusters/api")
            expected.append((200, "api"))
    return data, expected


def _check_replies(c: Conn, expected: list[tuple[int, object]]) -> None:
    for status, check in expected:
        r = c.reply()
        assert r.status == status
        if isinstance(check, int):
            assert r.json["weight"] == check
        elif isinstance(check, str):
            assert r.json["name"] == check
        else:
            assert r.json == check


def test_pipelined_requests_are_answered_in_order(server):
    data, expected = _mixed_requests(200)
    with Conn(server.addr) as c:
        c.send(data)
        _check_replies(c, expected)
        assert c.ask("GET", "/healthz").status == 200


def test_pipelined_requests_in_small_pieces(server):
    data, expected = _mixed_requests(10)
    with Conn(server.addr) as c:
        c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(0, len(data), 7):
            c.send(data[i:i + 7])
        _check_replies(c, expected)


def test_http10_closes_by_default(server):
    with Conn(server.addr) as c:
        r = c.ask("GET", "/healthz", version="1.0")
        assert r.status == 200 and r.headers["connection"] == "close"
        assert c.closed()


def test_http10_keep_alive(server):
    with Conn(server.addr) as c:
        for _ in range(2):
            r = c.ask("GET", "/clusters/app", headers={"connection": "keep-alive"},
                      version="1.0")
            assert r.status == 200 and r.headers["connection"] == "keep-alive"
        r = c.ask("GET", "/healthz", headers={"host": "admin"}, version="1.0")
        assert r.headers["connection"] == "close"
        assert c.closed()


def test_connection_close_is_honoured(server, ops):
    with Conn(server.addr) as c:
        c.send(request("GET", "/healthz", headers={"connection": "close"})
               + request("POST", "/reload"))
        r = c.reply()
        assert r.status == 200 and r.headers["connection"] == "close"
        assert c.closed()
    assert ("reload",) not in ops.calls     # nothing after it is read


def test_head_has_no_body(server):
    with Conn(server.addr) as c:
        full = c.ask("GET", "/clusters")
        r = c.ask("HEAD", "/clusters")
        assert r.status == 200 and r.body == b""
        assert r.headers["content-length"] == full.headers["content-length"]
        r = c.ask("HEAD", "/reload")
        assert r.status == 405 and r.body == b"" and r.headers["allow"] == "POST"
        assert c.ask("GET", "/healthz").status == 200      # no stray body bytes


def test_expect_continue(server):
    with Conn(server.addr) as c:
        body = b'{"weight": 3}'
        c.send(request("PUT", "/clusters/app/backends/127.0.0.1:9001/weight",
                       headers={"expect": "100-continue", "content-length": str(len(body))}))
        while b"\r\n\r\n" not in c.buf:
            c._fill()
        assert c.buf == b"HTTP/1.1 100 Continue\r\n\r\n"
        c.buf = b""
        c.send(body)
        assert c.reply().json["weight"] == 3


def test_upgrade_offer_is_declined(server):
    with Conn(server.addr) as c:
        c.send(request("GET", "/healthz", headers={"connection": "upgrade",
                                                   "upgrade": "websocket"})
               + b"\x81\x05hello")
        r = c.reply()
        assert r.status == 200 and r.headers["connection"] == "close"
        assert c.closed()
    with Conn(server.addr) as c:
        r = c.ask("PUT", "/clusters/app/backends/127.0.0.1:9001/weight", b'{"weight": 3}',
                  headers={"connection": "upgrade", "upgrade": "h2c"})
        assert r.status == 400 and c.closed()


def test_token_over_http(ops):
    for s in serve(AdminApi(ops, "tok")):
        with Conn(s.addr) as c:
            r = c.ask("GET", "/workers")
            assert r.status == 401 and r.headers["www-authenticate"] == "Bearer"
            r = c.ask("GET", "/workers", headers={"authorization": "Bearer tok"})
            assert r.status == 200


def test_server_repr_and_addresses(server):
    host, port = server.addr
    assert repr(server.server) == f"<AdminServer {host}:{port} connections=0>"


async def test_listens_on_ipv6_and_refuses_a_taken_port():
    loop = asyncio.get_running_loop()
    server = AdminServer(AdminApi(FakeOps(), None), loop)
    await server.start("::1", 0)
    [(host, port)] = server.addresses
    assert host == "::1"
    other = AdminServer(AdminApi(FakeOps(), None), loop)
    with pytest.raises(OSError):
        await other.start("::1", port)
    server.close()
    await server.wait_closed()


# -- deadlines ----------------------------------------------------------------------------

# uvloop's timers have millisecond granularity: one may fire a hair early (a 408 for the
# 0.4 s deadline came after 0.39992 s).
TIMER_SLACK = 0.005


@pytest.mark.parametrize("sent", [
    b"",
    b"GET /healthz HTTP/1.1\r\nHost: a",
    b"\r\n",
    b"PUT /clusters/app/backends/127.0.0.1:9001/weight HTTP/1.1\r\nHost: a\r\n"
    b"Content-Length: 13\r\n\r\n{\"wei",
    b"PUT /clusters/app/backends/127.0.0.1:9001/weight HTTP/1.1\r\nHost: a\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n3\r\n{\"w\r\n",
])
def test_slow_request_is_408(server, sent):
    started = time.monotonic()
    with Conn(server.addr) as c:
        c.send(sent)
        r = c.reply()
        assert r.status == 408 and r.headers["connection"] == "close"
        assert c.closed()
    assert FAST.request_timeout - TIMER_SLACK <= elapsed(started) < FAST.request_timeout + 0.5


def test_slowloris_is_cut_off_by_the_total_deadline(server):
    """A byte of header every 20 ms does not extend the deadline; meanwhile the server
    answers other clients at once."""
    started = time.monotonic()
    with Conn(server.addr, timeout=0.02) as c:
        c.send(b"GET /healthz HTTP/1.1\r\nX-Slow: ")
        got = b""
        while elapsed(started) < 3 and not got:
            try:
                c.send(b"a")
                got = c.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if int(elapsed(started) * 50) % 10 == 0:
                healthy(server.addr)
        assert got.startswith(b"HTTP/1.1 408 ")
    assert elapsed(started) < FAST.request_timeout + 0.5


def test_idle_keep_alive_is_closed_quietly(server):
    with Conn(server.addr) as c:
        assert c.ask("GET", "/healthz").status == 200
        started = time.monotonic()
        assert c.closed()       # with no response
        assert FAST.idle_timeout - 0.05 <= elapsed(started) < FAST.idle_timeout + 0.5


# FAST's deadlines, but an idle timeout far above the request deadline: a pause just
# longer than the one must stay well below the other, even on a loaded CI box (FAST's
# 0.6 s left 0.15 s to spare).
PATIENT = Limits(request_timeout=FAST.request_timeout, idle_timeout=5.0, linger=FAST.linger,
                 max_connections=FAST.max_connections)


@pytest.fixture
def patient_server(api):
    yield from serve(api, PATIENT)


def test_the_request_deadline_is_per_request(patient_server):
    """Requests spaced by more than the request deadline (but less than the idle
    timeout) are all answered."""
    with Conn(patient_server.addr) as c:
        for _ in range(3):
            assert c.ask("GET", "/healthz").status == 200
            time.sleep(PATIENT.request_timeout + 0.05)


# -- limits -------------------------------------------------------------------------------

WEIGHT = "/clusters/app/backends/127.0.0.1:9001/weight"


def test_body_at_the_limit_is_read(server):
    body = b'{"weight": 4}'.rjust(FAST.max_body)
    with Conn(server.addr) as c:
        assert c.ask("PUT", WEIGHT, body).json["weight"] == 4


def test_content_length_over_the_limit_is_413_before_the_body(server):
    with Conn(server.addr) as c:
        c.send(request("PUT", WEIGHT, headers={"content-length": str(FAST.max_body + 1)}))
        r = c.reply()
        assert r.status == 413 and r.headers["connection"] == "close"
        assert c.closed()


def test_413_while_the_client_is_still_sending(server):
    """The client sends its whole (too large) body before reading: it still gets the
    answer, not a reset (the server lingers)."""
    body = b"x" * (FAST.max_body + 1)
    with Conn(server.addr) as c:
        c.send(request("PUT", WEIGHT, body))
        r = c.reply()
        assert r.status == 413
        assert c.closed()


def test_chunked_body_over_the_limit_is_413(server):
    chunk = b"4000\r\n" + b" " * 0x4000 + b"\r\n"
    with Conn(server.addr) as c:
        c.send(request("PUT", WEIGHT, headers={"transfer-encoding": "chunked"}))
        try:
            for _ in range(FAST.max_body // 0x4000 + 2):
                c.send(chunk)
        except OSError:
            pass
        assert c.reply().status == 413


def test_chunked_body(server):
    with Conn(server.addr) as c:
        c.send(request("PUT", WEIGHT, headers={"transfer-encoding": "chunked"})
               + b"5\r\n{\"wei\r\n8;ext=1\r\nght\": 6}\r\n0\r\nTrailer: x\r\n\r\n")
        assert c.reply().json["weight"] == 6
        assert c.ask("GET", "/healthz").status == 200


@pytest.mark.parametrize(("length", "status"), [(FAST.max_target, 404),
                                                (FAST.max_target + 1, 414)])
def test_target_limit(server, length, status):
    with Conn(server.addr) as c:
        r = c.ask("GET", "/" + "a" * (length - 1))
        assert r.status == status


def test_huge_target_is_414(server):
    with Conn(server.addr) as c:
        try:
            c.send(b"GET /" + b"a" * 1_000_000)
        except OSError:
            pass
        assert c.reply().status == 414


def _head_of(size: int) -> bytes:
    """A /healthz request whose head is exactly ``size`` bytes."""
    bare = request("GET", "/healthz", headers={"x-pad": ""})
    return request("GET", "/healthz", headers={"x-pad": "p" * (size - len(bare))})


@pytest.mark.parametrize(("size", "status"), [(FAST.max_head, 200), (FAST.max_head + 1, 431)])
def test_head_limit(server, size, status):
    head = _head_of(size)
    assert len(head) == size
    with Conn(server.addr) as c:
        c.send(head)
        assert c.reply().status == status


def test_many_headers_over_the_limit_are_431(server):
    headers = {f"x-h{i}": "v" * 50 for i in range(400)}
    with Conn(server.addr) as c:
        assert c.ask("GET", "/healthz", headers=headers).status == 431


def test_head_trickled_over_the_limit_is_431(server):
    with Conn(server.addr) as c:
        c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c.send(b"GET /healthz HTTP/1.1\r\nHost: a\r\n")
        try:
            for i in range(400):
                c.send(b"x-h%d: %s\r\n" % (i, b"v" * 60))
        except OSError:
            pass
        assert c.reply().status == 431


def test_endless_header_value_is_431(server):
    """One header line that never ends, sent in pieces (httptools would buffer it
    whole): refused once the bytes read pass the limit, give or take a read."""
    with Conn(server.addr) as c:
        c.send(b"GET /healthz HTTP/1.1\r\nHost: a\r\nX-Big: ")
        sent = 0
        while sent < 10_000_000 and not select.select([c.sock], [], [], 0.001)[0]:
            c.send(b"v" * 8192)
            sent += 8192
        assert c.reply().status == 431
        assert sent < 300_000


# FAST's limits with deadlines of 5 s: a connection over the limit that the server
# kept until a deadline would take that long to close, one closed at once well under
# the 2 s allowed (FAST's 0.4 s deadline left the bound 0.2 s on either side).
SLOW_DEADLINES = Limits(request_timeout=5.0, idle_timeout=5.0, linger=FAST.linger,
                        max_connections=FAST.max_connections)


@pytest.fixture
def slow_deadlines_server(api):
    yield from serve(api, SLOW_DEADLINES)


def test_too_many_connections(slow_deadlines_server):
    server = slow_deadlines_server
    conns = [Conn(server.addr) for _ in range(SLOW_DEADLINES.max_connections)]
    try:
        for c in conns:
            assert c.ask("GET", "/healthz").status == 200
        with Conn(server.addr, timeout=10) as extra:
            started = time.monotonic()
            assert extra.closed() and elapsed(started) < 2.0
        conns.pop().sock.close()
        server.wait_connections(SLOW_DEADLINES.max_connections - 1)
        healthy(server.addr)
    finally:
        for c in conns:
            c.sock.close()


def test_a_flood_of_connections(server):
    """Many more clients than allowed, all at once: the extra ones are closed, the
    server stays responsive, and every slot is given back."""
    socks = []
    try:
        for _ in range(100):
            socks.append(socket.create_connection(server.addr, timeout=1))
        for s in socks:
            try:
                s.sendall(request("GET", "/healthz"))
            except OSError:
                pass
    finally:
        for s in socks:
            s.close()
    server.wait_connections(0)


# -- hostile and broken clients -----------------------------------------------------------

@pytest.mark.parametrize(("data", "status"), [
    (b"\x00\xff\x16\x03\x01garbage\r\n\r\n", 400),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(256)), 400),   # TLS
    (b"get /healthz HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    (b"GET /healthz HTTP/1.1\r\n\r\n", 400),                          # no Host
    (b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    (b"GET /healthz HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    (b"GET /healthz HTTP/2.0\r\nHost: a\r\n\r\n", 505),
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400),
    (b"GET /healthz HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    (b"GET /healthz HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",
     400),
    (b"GET /healthz HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n", 400),
    (b"GET /healthz HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999999\r\n\r\n",
     400),
    (b"GET /healthz HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    (b"GET /healthz HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 400),
    (b"POST /reload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
    (b"GET /healthz HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n", 400),   # obs-fold
    (b"GET /healthz HTTP/1.1\nHost: a\n\n", 400),
    (b"GET /health z HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    (b"GET /healthz HTTP/1.1\r\nHost: a\r\nX: \x01\r\n\r\n", 400),
    (b"GET /healthz HTTP/1.1\r\nHo st: a\r\n\r\n", 400),
    (b"HEAD /healthz HTTP/1.1\r\nHost: a\r\nContent-Length: 70000\r\n\r\n", 413),
])
def test_malformed_requests(server, data, status):
    with Conn(server.addr) as c:
        c.send(data)
        r = c.reply(head=data.startswith(b"HEAD"))
        assert r.status == status and r.headers["connection"] == "close"
        assert c.closed()


def test_answers_before_garbage_are_sent_first(server):
    with Conn(server.addr) as c:
        c.send(request("GET", "/healthz") + request("GET", "/clusters/app") + b"\x00junk\r\n")
        assert [c.reply().status for _ in range(3)] == [200, 200, 400]
        assert c.closed()


@pytest.mark.parametrize(("sent", "complete"), [
    (b"GET /heal", 0),
    (b"GET /healthz HTTP/1.1\r\nHost: a\r\n", 0),
    (b"PUT " + WEIGHT.encode() + b" HTTP/1.1\r\nHost: a\r\nContent-Length: 13\r\n\r\n{\"we", 0),
    (request("GET", "/healthz") * 3 + b"GET /clu", 3),
])
@pytest.mark.parametrize("how", ["close", "reset", "half-close"])
def test_client_disconnects_mid_request(server, sent, complete, how):
    c = Conn(server.addr)
    c.send(sent)
    if how == "reset":
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    if how == "half-close":
        c.sock.shutdown(socket.SHUT_WR)
        while True:     # complete requests are still answered, then the server closes
            chunk = c.sock.recv(65536)
            if not chunk:
                break
            c.buf += chunk
        assert c.buf.count(b"HTTP/1.1 200 OK") == complete
    c.sock.close()
    server.wait_connections(0)


def test_client_that_never_reads_is_cut_off(server):
    """A client pipelining requests without reading the answers: the server stops
    reading from it, stays responsive to others, and drops it at the deadline."""
    burst = request("GET", "/clusters") * 500
    with Conn(server.addr, timeout=0.2) as c:
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        # Far more than loopback's socket buffers can hold (they autotune to a few MiB
        # each way): sending blocks only once the server stops reading.
        try:
            for _ in range(2000):
                c.send(burst)
        except TimeoutError:
            pass
        else:
            pytest.fail("the server kept reading")
        healthy(server.addr)
        server.wait_connections(0, timeout=FAST.request_timeout + 1)


def test_a_pipelining_client_does_not_hold_the_loop(server):
    """One client pipelines 10,000 requests (and reads the answers): the server answers
    a bounded number of them per turn of its event loop, so other connections are
    served in between.  Counted per loop turn, not timed: without the bound, one 256 KiB
    read alone was thousands of requests in one turn (and held the loop ~250 ms)."""
    n = 10_000
    burst = request("GET", "/healthz") * (n - 1) + request(
        "GET", "/healthz", headers={"connection": "close"})
    handled = [0]
    handle = server.api.handle

    def counting(*args, **kwargs):
        handled[0] += 1
        return handle(*args, **kwargs)

    server.api.handle = counting
    per_turn: list[int] = []
    ticking = [True]

    def tick(last: int = 0) -> None:
        per_turn.append(handled[0] - last)
        if ticking[0]:
            server.loop.call_soon(tick, handled[0])

    server.loop.call_soon_threadsafe(tick)
    try:
        with Conn(server.addr, timeout=10) as c:
            sender = threading.Thread(target=c.send, args=(burst,))
            sender.start()
            received = read_to_eof(c.sock, timeout=10)
            sender.join()
    finally:
        ticking[0] = False
        del server.api.handle
    assert received.count(b"HTTP/1.1 200 OK") == n
    assert handled[0] == n
    assert max(per_turn) <= 256, f"{max(per_turn)} requests answered in one loop turn"


def test_close_ends_everything(api):
    s = ServerThread(api, FAST)
    idle = Conn(s.addr)
    idle.ask("GET", "/healthz")
    partial = Conn(s.addr)
    partial.send(b"GET /hea")
    s.wait_connections(2)
    s.call(s.server.close)
    assert idle.closed() and partial.closed()
    s.run(s.server.wait_closed())
    with pytest.raises(OSError):
        Conn(s.addr, timeout=0.5)
    s.loop.call_soon_threadsafe(s.loop.stop)
    s.thread.join(5)
    s.loop.close()


def test_bug_in_the_api_is_500_and_the_server_lives_on(server, caplog):
    def broken(*args):
        raise RuntimeError("a bug")
    server.call(lambda: setattr(server.api, "handle", broken))
    try:
        with Conn(server.addr) as c:
            r = c.ask("GET", "/healthz")
            assert (r.status, r.json) == (500, {"error": "internal error"})
            assert c.ask("GET", "/healthz").status == 500    # (still keep-alive)
    finally:
        server.call(lambda: delattr(server.api, "handle"))
    assert any("unexpected error" in r.getMessage() for r in caplog.records)


def test_bug_in_the_reader_is_500_and_the_server_lives_on(server, monkeypatch, caplog):
    def broken(self, name, value):
        raise RuntimeError("a bug")
    monkeypatch.setattr(RequestReader, "on_header", broken)
    with Conn(server.addr) as c:
        r = c.ask("GET", "/healthz")
        assert (r.status, r.json) == (500, {"error": "internal error"})
        assert r.headers["connection"] == "close" and c.closed()
    assert any("parser callback" in r.getMessage() for r in caplog.records)
    monkeypatch.undo()


def test_limits_defaults():
    assert Limits() == Limits(max_connections=256, max_head=16384, max_target=4096,
                              max_body=65536, request_timeout=10.0, idle_timeout=60.0,
                              linger=2.0)


# -- fuzzing ------------------------------------------------------------------------------

FUZZ = settings(max_examples=120, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
FUZZ_LIMITS = Limits(request_timeout=1.0, idle_timeout=2.0, linger=0.3, max_connections=64)
# What a server may answer to anything; never 500.
STATUSES = {200, 400, 401, 404, 405, 408, 413, 414, 431, 505}
PREFIXES = [
    b"",
    b"GET /healthz HTTP/1.1\r\n",
    b"GET /clusters/app HTTP/1.1\r\nHost: a\r\n\r\n",
    b"PUT /clusters/app/backends/127.0.0.1:9001/weight HTTP/1.1\r\nHost: a\r\n"
    b"Content-Length: 13\r\n\r\n",
    b"POST /reload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"GET /healthz HTTP/1.0\r\n",
]


@pytest.fixture
def fuzz_server(api):
    yield from serve(api, FUZZ_LIMITS)


@FUZZ
@given(prefix=st.sampled_from(PREFIXES), noise=st.binary(max_size=1024),
       pieces=st.integers(1, 4))
def test_fuzz_random_bytes(fuzz_server, prefix, noise, pieces):
    """Whatever bytes arrive, the server answers with well-formed responses of known
    statuses, or closes, at once when the client is done; and it stays up."""
    data = prefix + noise
    with Conn(fuzz_server.addr) as c:
        step = max(1, len(data) // pieces)
        try:
            for i in range(0, len(data), step):
                c.send(data[i:i + step])
            c.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass                # (the server may have refused and closed already)
        replies = parse_replies(read_to_eof(c.sock))
    assert {r.status for r in replies} <= STATUSES
    healthy(fuzz_server.addr)


_NAMES = st.sampled_from(["app", "api", "nope", "a%2Fb", "%61pp"]) | st.text(max_size=8).map(
    lambda s: quote(s, safe=""))
_ADDRESSES = st.sampled_from(["127.0.0.1:9001", "[::1]:9002", "%5B%3A%3A1%5D%3A9002",
                              "10.0.0.1:80", "x:1"]) | st.text(max_size=8).map(
    lambda s: quote(s, safe=""))
_PATHS = st.one_of(
    st.sampled_from(["/healthz", "/clusters", "/config", "/reload", "/workers",
                     "/openapi.json", "/", "/nope"]),
    st.builds("/clusters/{}".format, _NAMES),
    st.builds("/clusters/{}/backends/{}/{}".format, _NAMES, _ADDRESSES,
              st.sampled_from(["drain", "enable", "weight", "frob"])),
)
_BODIES = st.sampled_from([b"", b'{"weight": 3}', b'{"weight": 0}', b'{"weight": true}',
                           b"[]"]) | st.binary(max_size=64)
_TOKEN = string.ascii_letters + string.digits + "-"
_VISIBLE = "".join(map(chr, range(0x21, 0x7F)))


@st.composite
def _requests(draw) -> tuple[bytes, tuple[str, str, list[tuple[bytes, bytes]], bytes]]:
    """A valid HTTP/1.1 request's bytes and what the API should be asked."""
    method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"]))
    target = draw(_PATHS) + draw(st.sampled_from(["", "?x=1", "?"]))
    headers = [(b"Host", b"admin")]
    auth = draw(st.sampled_from([None, b"Bearer tok", b"Bearer nope", b"bearer tok"]))
    if auth is not None:
        headers.append((b"Authorization", auth))
    for _ in range(draw(st.integers(0, 3))):
        name = "X-" + draw(st.text(_TOKEN, min_size=1, max_size=12))
        value = draw(st.text(_VISIBLE, min_size=1, max_size=30))
        headers.append((name.encode(), value.encode()))
    body = draw(_BODIES)
    chunked = bool(body) and draw(st.booleans())
    if chunked:
        headers.append((b"Transfer-Encoding", b"chunked"))
        framed = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 7]), body[i:i + 7])
                          for i in range(0, len(body), 7)) + b"0\r\n\r\n"
    else:
        if body or method in ("POST", "PUT"):
            headers.append((b"Content-Length", str(len(body)).encode()))
        framed = body
    head = f"{method} {target} HTTP/1.1\r\n".encode() + b"".join(
        n + b": " + v + b"\r\n" for n, v in headers) + b"\r\n"
    return head + framed, (method, target, headers, body)


@pytest.fixture
def twin_servers():
    """A server with a token, and a reference API over its own fake ops in the same
    state: fed the same requests, the two must answer alike."""
    server_api, reference = AdminApi(FakeOps(), "tok"), AdminApi(FakeOps(), "tok")
    for s in serve(server_api, FUZZ_LIMITS):
        yield s, reference


@FUZZ
@given(requests=st.lists(_requests(), min_size=1, max_size=6), cut=st.integers(1, 97))
def test_fuzz_requests_reach_the_api_as_sent(twin_servers, requests, cut):
    """Pipelined valid requests, sent in arbitrary pieces, are answered in order with
    exactly what the API answers to them."""
    server, reference = twin_servers
    data = b"".join(raw for raw, _ in requests)
    with Conn(server.addr) as c:
        c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(0, len(data), cut):
            c.send(data[i:i + cut])
        for _, (method, target, headers, body) in requests:
            got = c.reply()
            want = reference.handle(method, target, headers, body)
            assert (got.status, got.body) == (want.status, want.body)
            for name, value in want.headers:
                assert got.headers[name] == value
