"""Graceful shutdown of a real `poise run` process: SIGTERM stops accepting, lets
requests in flight finish, closes idle keep-alives and exits 0."""

from __future__ import annotations

import signal
import socket
import time

from tests.support.client import H11Client, RawReader, connect, is_closed


def wait_for_backend(backend, target: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if target in backend.targets():
            return
        time.sleep(0.02)
    raise AssertionError(f"the backend never saw {target}")


def refused_within(addr, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(addr, timeout=0.5).close()
        except ConnectionRefusedError:
            return True
        time.sleep(0.02)
    return False


def test_sigterm_finishes_in_flight_request_refuses_new_ones_and_exits_0(stack):
    b = stack.backend()
    px = stack.poise([b])
    idle = H11Client(px.addr)
    assert idle.get("/echo?idle").status == 200
    busy = H11Client(px.addr)
    busy.send("GET", "/slow?delay=1.5")
    wait_for_backend(b, "/slow?delay=1.5")

    px.signal(signal.SIGTERM)
    t0 = time.monotonic()
    assert refused_within(px.addr, 1.0), "new connections must be refused once draining"
    assert is_closed(idle.sock, 1.0), "idle keep-alive connections must be closed"
    r = busy.read_response()
    assert r.status == 200 and r.json()["target"] == "/slow?delay=1.5"
    assert len(r.body) == int(r.header("content-length"))
    assert is_closed(busy.sock, 2.0), "the drained connection is closed after its response"
    assert px.proc.wait(10) == 0
    assert time.monotonic() - t0 < 5.0
    assert refused_within(px.addr, 0.1)
    idle.close()
    busy.close()


def test_sigterm_during_an_upload_lets_it_finish(stack):
    b = stack.backend()
    px = stack.poise([b])
    with connect(px.addr) as s:
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nhello")
        time.sleep(0.2)
        px.signal(signal.SIGTERM)
        time.sleep(0.3)
        s.sendall(b"world")
        r = RawReader(s).read_response()
        assert r.status == 200 and r.json()["body"] == "helloworld"
    assert px.proc.wait(10) == 0


def test_sigterm_answers_requests_already_pipelined(stack):
    b = stack.backend()
    px = stack.poise([b])
    with connect(px.addr) as s:
        s.sendall(b"GET /slow?delay=0.8 HTTP/1.1\r\nHost: x\r\n\r\n"
                  b"GET /echo?queued HTTP/1.1\r\nHost: x\r\n\r\n")
        wait_for_backend(b, "/slow?delay=0.8")
        px.signal(signal.SIGTERM)
        reader = RawReader(s)
        assert reader.read_response().status == 200
        second = reader.read_response()
        assert second.status == 200 and second.json()["target"] == "/echo?queued"
    assert px.proc.wait(10) == 0


def test_drain_timeout_bounds_the_wait(stack):
    b = stack.backend()
    px = stack.poise([b], drain_timeout="1s")
    with H11Client(px.addr) as c:
        c.send("GET", "/slow?delay=10")
        wait_for_backend(b, "/slow?delay=10")
        t0 = time.monotonic()
        px.signal(signal.SIGTERM)
        assert px.proc.wait(10) == 0
        elapsed = time.monotonic() - t0
        assert 0.9 <= elapsed < 3.0, f"exited {elapsed:.2f}s after SIGTERM with drain_timeout 1s"
        assert is_closed(c.sock, 1.0)


def test_sigint_is_a_graceful_stop_too(stack):
    b = stack.backend()
    px = stack.poise([b])
    with H11Client(px.addr) as c:
        c.send("GET", "/slow?delay=0.5")
        wait_for_backend(b, "/slow?delay=0.5")
        px.signal(signal.SIGINT)
        assert c.read_response().status == 200
    assert px.proc.wait(10) == 0


def test_idle_process_exits_0_promptly(stack):
    b = stack.backend()
    px = stack.poise([b])
    with H11Client(px.addr) as c:
        assert c.get("/echo").status == 200
        t0 = time.monotonic()
        px.signal(signal.SIGTERM)
        assert px.proc.wait(10) == 0
        assert time.monotonic() - t0 < 1.5
