"""Balancing policies through the real proxy: what a client can observe end to end.

ip_hash from clients bound to different loopback source addresses, hash on a header,
and sticky-cookie round trips (the pure policy logic is tested in tests/core)."""

from __future__ import annotations

import socket

import pytest

from tests.support.client import RawReader
from tests.support.h2 import H2Client

SOURCES = [f"127.0.0.{i}" for i in range(2, 10)]


def _get(px, *, source: str | None = None, headers: list[tuple[bytes, bytes]] = ()):
    """One request on a fresh connection; the response."""
    with socket.socket() as s:
        s.settimeout(5)
        if source is not None:
            s.bind((source, 0))
        s.connect(px.addr)
        head = b"".join(n + b": " + v + b"\r\n" for n, v in headers)
        s.sendall(b"GET /echo HTTP/1.1\r\nHost: x\r\n" + head + b"Connection: close\r\n\r\n")
        response = RawReader(s).read_response()
    assert response.status == 200, response.body
    return response


@pytest.fixture
def three(stack):
    return [stack.backend(f"b{i}") for i in range(3)]


def test_ip_hash_keeps_each_client_address_on_one_backend(stack, three):
    px = stack.poise([b.address for b in three], cluster={"policy": "ip_hash"})
    chosen = {}
    for source in SOURCES:
        names = {_get(px, source=source).header("x-backend") for _ in range(4)}
        assert len(names) == 1, f"{source} was sent to {names}"
        chosen[source] = names.pop()
    assert len(set(chosen.values())) >= 2, f"every address went to one backend: {chosen}"


def test_hash_on_a_header_is_stable_per_value(stack, three):
    px = stack.poise([b.address for b in three],
                     cluster={"policy": {"type": "hash", "key": "header:x-user",
                                         "algorithm": "maglev"}})
    chosen = {}
    for user in range(12):
        value = b"user-%d" % user
        names = {_get(px, headers=[(b"X-User", value)]).header("x-backend") for _ in range(3)}
        assert len(names) == 1, f"{value!r} was sent to {names}"
        chosen[value] = names.pop()
    assert len(set(chosen.values())) >= 2, chosen


def test_sticky_cookie_round_trip(stack, three):
    px = stack.poise([b.address for b in three],
                     cluster={"policy": {"type": "sticky", "secret": "s3cret-for-the-tests!"}})
    first = _get(px)
    cookie = first.header("set-cookie")
    assert cookie is not None and cookie.startswith("poise_sticky="), cookie
    assert "HttpOnly" in cookie and "Path=/" in cookie
    value = cookie.split(";", 1)[0].encode()
    home = first.header("x-backend")
    for _ in range(9):                     # round robin would rotate; the cookie pins
        r = _get(px, headers=[(b"Cookie", value)])
        assert r.header("x-backend") == home
        assert r.header("set-cookie") is None, "a valid cookie is not re-issued"


def test_sticky_ignores_a_tampered_cookie_and_reissues(stack, three):
    px = stack.poise([b.address for b in three],
                     cluster={"policy": {"type": "sticky", "secret": "s3cret-for-the-tests!"}})
    value = _get(px).header("set-cookie").split(";", 1)[0]
    name, _, signed = value.partition("=")
    tampered = f"{name}={signed[:-2]}{'AA' if not signed.endswith('AA') else 'BB'}".encode()
    r = _get(px, headers=[(b"Cookie", tampered)])
    assert r.header("set-cookie") is not None, "a tampered cookie must be replaced"


@pytest.mark.parametrize("policy", ["least_conn", "p2c", "peak_ewma"])
def test_load_aware_policies_avoid_a_backend_busy_with_a_slow_request(stack, policy):
    # Two backends; a slow request holds one of them.  With only two backends, p2c and
    # peak_ewma always compare both, so like least_conn they must pick the idle one.
    backends = [stack.backend("b0"), stack.backend("b1")]
    px = stack.poise([b.address for b in backends], cluster={"policy": policy})
    with socket.create_connection(px.addr, timeout=10) as slow:
        slow.sendall(b"GET /slow?delay=1.5 HTTP/1.1\r\nHost: x\r\n\r\n")
        _wait_until(lambda: sum(len(b.stats()["requests"]) for b in backends) == 1)
        busy = next(b.name for b in backends if b.stats()["requests"])
        names = [_get(px).header("x-backend") for _ in range(6)]
        assert busy not in names, f"{policy} sent requests to the busy backend: {names}"
        assert RawReader(slow).read_response().status == 200


def _wait_until(condition, timeout: float = 5.0) -> None:
    import time
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_sticky_cookie_reaches_an_http2_client(stack, three):
    """Regression: the cookie was added to the response fields as one line, which an
    HTTP/2 client's response (read a name and value at a time) could not take."""
    px = stack.poise([b.address for b in three], listener={"http2": {}},
                     cluster={"policy": {"type": "sticky", "secret": "s3cret-for-the-tests!"}})
    with H2Client(px.addr) as c:
        first = c.response(c.request("GET", "/echo"))
        cookie = first.header("set-cookie")
        assert first.status == 200 and cookie is not None, first.headers
        assert cookie.startswith("poise_sticky="), cookie
        home = first.header("x-backend")
        value = cookie.split(";", 1)[0]
        for _ in range(5):
            r = c.response(c.request("GET", "/echo", headers=[("cookie", value)]))
            assert r.header("x-backend") == home
