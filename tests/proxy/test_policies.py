"""Balancing policies through the real proxy: what a client can observe end to end.

ip_hash from clients bound to different loopback source addresses, hash on a header,
and sticky-cookie round trips (the pure policy logic is tested in tests/core)."""

from __future__ import annotations

import socket

import pytest

from tests.support.client import RawReader

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
