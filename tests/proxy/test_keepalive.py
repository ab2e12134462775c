"""Client-side connection semantics: HTTP/1.1 and 1.0 keep-alive, Connection: close,
and pipelined requests answered in order."""

from __future__ import annotations

import pytest

from tests.support.client import H11Client, RawReader, connect, is_closed

CLOSE_WAIT = 3.0


@pytest.fixture(scope="module")
def proxy(module_stack):
    backend = module_stack.backend("ka")
    return module_stack.poise([backend]), backend


def test_http11_connection_is_kept_alive(proxy):
    px, _ = proxy
    with H11Client(px.addr) as c:
        for i in range(10):
            r = c.get(f"/echo?i={i}")
            assert r.status == 200 and r.json()["target"] == f"/echo?i={i}"
            assert r.header("connection") in (None, "keep-alive")
            assert c.reusable


def test_http11_connection_close_is_honoured(proxy):
    px, _ = proxy
    with connect(px.addr) as s:
        s.sendall(b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        r = RawReader(s).read_response()
        assert r.status == 200
        assert "close" in r.header("connection").lower()
        assert is_closed(s, CLOSE_WAIT), "the proxy must close after answering Connection: close"


def test_requests_pipelined_after_connection_close_are_not_served(proxy):
    px, backend = proxy
    backend.reset()
    with connect(px.addr) as s:
        s.sendall(b"GET /echo?a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                  b"GET /echo?b HTTP/1.1\r\nHost: x\r\n\r\n")
        reader = RawReader(s)
        assert reader.read_response().json()["target"] == "/echo?a"
        assert reader.eof or is_closed(s, CLOSE_WAIT)
    assert backend.targets() == ["/echo?a"]


def test_http10_without_keep_alive_is_closed_after_the_response(proxy):
    px, _ = proxy
    with connect(px.addr) as s:
        s.sendall(b"GET /echo HTTP/1.0\r\n\r\n")
        reader = RawReader(s)
        r = reader.read_response()
        assert r.status == 200 and r.json()["method"] == "GET"
        assert r.header("transfer-encoding") is None, "HTTP/1.0 clients cannot read chunked"
        assert reader.eof or is_closed(s, CLOSE_WAIT)


def test_http10_response_to_a_request_with_host(proxy):
    px, _ = proxy
    with connect(px.addr) as s:
        s.sendall(b"GET /echo HTTP/1.0\r\nHost: old.example\r\n\r\n")
        r = RawReader(s).read_response()
        assert r.status == 200
        assert ["Host", "old.example"] in r.json()["headers"]


def test_http10_with_keep_alive_stays_open(proxy):
    px, _ = proxy
    with connect(px.addr) as s:
        reader = RawReader(s)
        for i in range(3):
            s.sendall(b"GET /echo?n=%d HTTP/1.0\r\nConnection: keep-alive\r\n\r\n" % i)
            r = reader.read_response()
            assert r.status == 200 and r.json()["target"] == f"/echo?n={i}"
            assert (r.header("connection") or "").lower() == "keep-alive", \
                "an HTTP/1.0 keep-alive response must say so"
            assert r.header("content-length") is not None
        # the last request without keep-alive ends the connection
        s.sendall(b"GET /echo?last HTTP/1.0\r\n\r\n")
        r = reader.read_response()
        assert r.status == 200
        assert reader.eof or is_closed(s, CLOSE_WAIT)


def test_pipelined_requests_are_answered_in_order(proxy):
    px, _ = proxy
    body = b"pipelined body \x00\xff" * 100
    requests = [
        ("GET", "/echo?p=1", None, None),
        ("POST", "/echo?p=2", [("Content-Type", "application/octet-stream")], body),
        ("HEAD", "/bytes/777", None, None),
        ("GET", "/status/204", None, None),
        ("GET", "/bytes/5000?te=chunked", None, None),
        ("GET", "/echo?p=6", None, None),
    ]
    with H11Client(px.addr) as c:
        rs = c.pipeline(requests)
        assert [r.status for r in rs] == [200, 200, 200, 204, 200, 200]
        assert rs[0].json()["target"] == "/echo?p=1"
        assert rs[1].json()["target"] == "/echo?p=2"
        assert rs[1].json()["body_len"] == len(body)
        assert rs[1].json()["body"] == body.decode("latin-1")
        assert rs[2].body == b"" and rs[2].header("content-length") == "777"
        assert rs[3].body == b""
        assert len(rs[4].body) == 5000
        assert rs[5].json()["target"] == "/echo?p=6"
        assert c.reusable and c.get("/echo?after").status == 200


def test_request_pipelined_directly_after_a_content_length_body(proxy):
    # The next request line starts right after the last body byte (no CRLF between).
    px, _ = proxy
    with connect(px.addr) as s:
        s.sendall(b"POST /echo?a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
                  b"GET /echo?b HTTP/1.1\r\nHost: x\r\n\r\n")
        reader = RawReader(s)
        a, b = reader.read_response(), reader.read_response()
        assert (a.status, b.status) == (200, 200), b.body
        assert a.json()["body"] == "abc" and b.json()["target"] == "/echo?b"


def test_pipelined_order_holds_when_the_first_response_is_slow(proxy):
    px, _ = proxy
    requests = [("GET", "/slow?delay=0.5", None, None),
                ("GET", "/echo?fast", None, None),
                ("POST", "/echo?post", None, b"x" * 70000)]
    with H11Client(px.addr) as c:
        rs = c.pipeline(requests)
        assert [r.json()["target"] for r in rs] == ["/slow?delay=0.5", "/echo?fast", "/echo?post"]
        assert rs[2].json()["body_len"] == 70000


def test_pipelined_chunked_request_and_final_close(proxy):
    px, _ = proxy
    raw = (b"POST /echo?a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"3\r\nabc\r\n4;ext=1\r\ndefg\r\n0\r\n\r\n"
           b"GET /echo?b HTTP/1.1\r\nHost: x\r\n\r\n"
           b"GET /echo?c HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    with connect(px.addr) as s:
        s.sendall(raw)
        reader = RawReader(s)
        a, b, c = (reader.read_response() for _ in range(3))
        assert a.json()["target"] == "/echo?a" and a.json()["body"] == "abcdefg"
        assert b.json()["target"] == "/echo?b"
        assert c.json()["target"] == "/echo?c"
        assert "close" in c.header("connection").lower()
        assert is_closed(s, CLOSE_WAIT)


def test_many_pipelined_requests(proxy):
    px, _ = proxy
    raw = b"".join(b"GET /echo?i=%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(50))
    with connect(px.addr) as s:
        s.sendall(raw)
        reader = RawReader(s)
        targets = [reader.read_response().json()["target"] for _ in range(50)]
    assert targets == [f"/echo?i={i}" for i in range(50)]


def test_half_closed_client_still_gets_its_responses(module_stack, proxy):
    """With abort_on_client_close off, a FIN is a half-close: the requests sent before
    it are answered (by default a FIN cancels them: tests/e2e/test_resilience.py)."""
    px = module_stack.poise([proxy[1]], listener={"abort_on_client_close": False})
    with connect(px.addr) as s:
        s.sendall(b"GET /slow?delay=0.2 HTTP/1.1\r\nHost: x\r\n\r\n"
                  b"GET /echo?two HTTP/1.1\r\nHost: x\r\n\r\n")
        s.shutdown(1)  # SHUT_WR
        reader = RawReader(s)
        assert reader.read_response().status == 200
        assert reader.read_response().json()["target"] == "/echo?two"
        assert is_closed(s, CLOSE_WAIT)
