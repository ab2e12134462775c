"""Client-side deadlines over real sockets: the request head's total deadline
(`client_header_timeout` → 408 + close) and the idle keep-alive timeout."""

from __future__ import annotations

import socket
import time

import pytest

from tests.support.client import (
    H11Client,
    RawReader,
    connect,
    is_closed,
    read_until_close,
    status_of,
)

HEADER_TIMEOUT = 1.0
IDLE_TIMEOUT = 0.6
SLACK = 0.75


@pytest.fixture(scope="module")
def proxy(module_stack):
    backend = module_stack.backend("timeouts")
    px = module_stack.poise([backend], listener={"client_header_timeout": f"{HEADER_TIMEOUT}s",
                                                 "client_idle_timeout": f"{IDLE_TIMEOUT}s"})
    return px, backend


def test_partial_head_gets_408_and_close_at_the_deadline(proxy):
    px, backend = proxy
    with connect(px.addr) as s:
        t0 = time.monotonic()
        s.sendall(b"GET /echo HTTP/1.1\r\nHost: x\r\n")
        raw = read_until_close(s, timeout=HEADER_TIMEOUT + 5)
        elapsed = time.monotonic() - t0
    assert status_of(raw) == 408
    assert HEADER_TIMEOUT - 0.1 <= elapsed <= HEADER_TIMEOUT + SLACK, f"after {elapsed:.2f}s"


def test_slow_drip_head_gets_408_at_the_total_deadline(proxy):
    """Bytes keep arriving every 100 ms; the deadline is total, not inactivity."""
    px, _ = proxy
    with connect(px.addr) as s:
        t0 = time.monotonic()
        s.sendall(b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Drip: ")
        got = b""
        s.settimeout(0.1)
        while time.monotonic() - t0 < HEADER_TIMEOUT + 5:
            try:
                s.sendall(b"a")
            except OSError:
                break               # closed under us; the response was already sent
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                continue
            except ConnectionResetError:
                break
            if not chunk:
                break
            got += chunk
        elapsed = time.monotonic() - t0
    assert got, f"no response to a slow-drip head after {elapsed:.2f}s"
    assert status_of(got) == 408
    assert elapsed <= HEADER_TIMEOUT + SLACK, f"closed after {elapsed:.2f}s"


def test_connection_without_any_bytes_is_closed_at_the_header_deadline(proxy):
    px, _ = proxy
    with connect(px.addr) as s:
        t0 = time.monotonic()
        raw = read_until_close(s, timeout=HEADER_TIMEOUT + 5)
        elapsed = time.monotonic() - t0
    assert raw == b"" or status_of(raw) == 408
    assert elapsed <= HEADER_TIMEOUT + SLACK


def test_partial_second_head_on_a_keep_alive_connection_gets_408(proxy):
    px, _ = proxy
    with connect(px.addr) as s:
        s.sendall(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
        reader = RawReader(s)
        assert reader.read_response().status == 200
        t0 = time.monotonic()
        s.sendall(b"GET /echo?second HTTP/1.1\r\nHo")
        raw = bytes(reader.buf) + read_until_close(s, timeout=HEADER_TIMEOUT + 5)
        elapsed = time.monotonic() - t0
    assert status_of(raw) == 408
    assert elapsed <= HEADER_TIMEOUT + SLACK


def test_header_deadline_does_not_apply_once_the_head_is_complete(proxy):
    px, _ = proxy
    with H11Client(px.addr) as c:
        r = c.get(f"/slow?delay={HEADER_TIMEOUT + 0.5}")
        assert r.status == 200
        assert c.reusable and c.get("/echo").status == 200


def test_header_deadline_does_not_apply_to_a_slow_body(proxy):
    px, _ = proxy
    with connect(px.addr) as s:
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n")
        for _ in range(10):
            time.sleep((HEADER_TIMEOUT + 0.5) / 10)
            s.sendall(b"z")
        r = RawReader(s).read_response()
        assert r.status == 200 and r.json()["body"] == "z" * 10


def test_idle_keep_alive_connection_is_closed_after_the_idle_timeout(proxy):
    px, _ = proxy
    with H11Client(px.addr) as c:
        assert c.get("/echo").status == 200
        t0 = time.monotonic()
        assert is_closed(c.sock, IDLE_TIMEOUT + 5), "an idle keep-alive connection must close"
        elapsed = time.monotonic() - t0
    assert IDLE_TIMEOUT - 0.1 <= elapsed <= IDLE_TIMEOUT + SLACK, f"closed after {elapsed:.2f}s"


def test_a_busy_keep_alive_connection_is_not_closed(proxy):
    px, _ = proxy
    with H11Client(px.addr) as c:
        # 18 × 0.1 s = 1.8 s > both timeouts, never idle for long: a pause would have
        # to stretch by 0.5 s to reach the idle timeout (with 0.3 s pauses a loaded CI
        # box had only 0.3 s to spare).
        for i in range(18):
            assert c.get(f"/echo?{i}").status == 200
            time.sleep(IDLE_TIMEOUT / 6)


def test_idle_timeout_does_not_cut_a_slow_response(proxy):
    px, _ = proxy
    with H11Client(px.addr) as c:
        assert c.get(f"/slow?delay={IDLE_TIMEOUT + 0.5}").status == 200


def test_many_partial_heads_each_get_408(proxy):
    px, _ = proxy
    socks = [connect(px.addr) for _ in range(20)]
    try:
        for s in socks:
            s.sendall(b"GET /echo HTTP/1.1\r\nHost: x\r\n")
        for s in socks:
            assert status_of(read_until_close(s, HEADER_TIMEOUT + 5)) == 408
    finally:
        for s in socks:
            s.close()
    with H11Client(px.addr) as c:
        assert c.get("/echo").status == 200


def test_a_closed_client_socket_does_not_disturb_the_proxy(proxy):
    px, _ = proxy
    s = socket.create_connection(px.addr)
    s.sendall(b"GET /echo HTTP/1.1\r\nHost: x")
    s.close()
    time.sleep(HEADER_TIMEOUT + 0.2)
    assert px.alive()
    with H11Client(px.addr) as c:
        assert c.get("/echo").status == 200
