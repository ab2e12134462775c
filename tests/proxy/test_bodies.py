"""Bodies in both directions: Content-Length and chunked requests, chunked /
Content-Length / close-delimited responses, HEAD, 204, 304 and 100-continue."""

from __future__ import annotations

import hashlib
import random

import pytest

from tests.support import pattern
from tests.support.client import H11Client, RawReader, connect, echo_headers, is_closed


@pytest.fixture(scope="module")
def proxy(module_stack):
    backend = module_stack.backend("bodies")
    return module_stack.poise([backend]), backend


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- request bodies ------------------------------------------------------------------------

@pytest.mark.parametrize("size", [0, 1, 65535, 65536, 300_001, 3_000_000])
def test_content_length_request_body_is_forwarded_intact(proxy, size):
    px, _ = proxy
    body = random.Random(size).randbytes(size)
    with H11Client(px.addr) as c:
        r = c.request("POST", "/echo", body=body)
        seen = r.json()
        assert (seen["body_len"], seen["body_sha256"]) == (size, sha(body))
        assert echo_headers(seen, "content-length") == [str(size)]
        assert not echo_headers(seen, "transfer-encoding")
        assert c.get("/echo").status == 200


@pytest.mark.parametrize("sizes", [[1], [5, 0x10, 4096, 1], [65536] * 20, [100_000, 7, 333_333]])
def test_chunked_request_body_is_forwarded_intact(proxy, sizes):
    px, _ = proxy
    rng = random.Random(len(sizes))
    parts = [rng.randbytes(n) for n in sizes]
    with H11Client(px.addr) as c:
        r = c.request("PUT", "/echo", chunks=parts)
        seen = r.json()
        whole = b"".join(parts)
        assert (seen["body_len"], seen["body_sha256"]) == (len(whole), sha(whole))
        assert c.get("/echo").status == 200


@pytest.mark.parametrize("chunked", [False, True])
def test_large_body_sent_before_the_upstream_connection_exists(stack, chunked):
    # No pooling: every request waits for a fresh connect while its body streams in.
    b = stack.backend()
    px = stack.poise([b], cluster={"keepalive_max_idle": 0})
    body = pattern.prefix(5_000_000)
    with connect(px.addr) as s:
        for _ in range(3):
            if chunked:
                s.sendall(b"POST /sink HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                          b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body))
            else:
                s.sendall(b"POST /sink HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%b"
                          % (len(body), body))
            r = RawReader(s).read_response()
            assert r.json() == {"received": len(body), "pattern_ok": True}


def test_chunked_request_with_extensions_and_trailers(proxy):
    px, _ = proxy
    with connect(px.addr) as s:
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"4;name=value\r\nWiki\r\n5\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n"
                  b"0\r\nX-Trailer: 1\r\n\r\n"
                  b"GET /echo?next HTTP/1.1\r\nHost: x\r\n\r\n")
        reader = RawReader(s)
        assert reader.read_response().json()["body"] == "Wikipedia in\r\n\r\nchunks."
        assert reader.read_response().json()["target"] == "/echo?next"


def test_empty_chunked_request_body(proxy):
    px, _ = proxy
    with H11Client(px.addr) as c:
        assert c.request("POST", "/echo", chunks=[]).json()["body_len"] == 0


# -- response bodies -------------------------------------------------------------------------

@pytest.mark.parametrize("te", ["cl", "chunked"])
@pytest.mark.parametrize("size", [0, 1, 70_000, 2_500_000])
def test_framed_response_bodies_arrive_intact(proxy, te, size):
    px, _ = proxy
    with H11Client(px.addr) as c:
        r = c.get(f"/bytes/{size}?te={te}&piece=10007")
        assert r.status == 200 and len(r.body) == size and pattern.matches(0, r.body)
        if te == "cl":
            assert r.header("content-length") == str(size)
        assert c.reusable and c.get("/echo").status == 200


@pytest.mark.parametrize("size", [0, 5, 1_000_000])
def test_close_delimited_response_is_rechunked_for_http11(proxy, size):
    px, _ = proxy
    with H11Client(px.addr) as c:
        r = c.get(f"/bytes/{size}?te=close&piece=4099")
        assert r.status == 200 and len(r.body) == size and pattern.matches(0, r.body)
        assert r.header("transfer-encoding") == "chunked"
        # re-framed, so the client connection survives the backend's close
        assert c.reusable and c.get("/echo?after").json()["target"] == "/echo?after"


def test_close_delimited_response_to_http10_is_close_delimited(proxy):
    px, _ = proxy
    with connect(px.addr) as s:
        s.sendall(b"GET /bytes/300000?te=close HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        reader = RawReader(s)
        r = reader.read_response()
        assert r.status == 200
        assert r.header("transfer-encoding") is None and r.header("content-length") is None
        assert len(r.body) == 300000 and pattern.matches(0, r.body)
        assert reader.eof


def test_chunked_response_to_http10_is_not_chunked(proxy):
    px, _ = proxy
    with connect(px.addr) as s:
        s.sendall(b"GET /bytes/100000?te=chunked HTTP/1.0\r\n\r\n")
        reader = RawReader(s)
        r = reader.read_response()
        assert r.header("transfer-encoding") is None
        assert len(r.body) == 100000 and pattern.matches(0, r.body)


# -- responses without a body ----------------------------------------------------------------

@pytest.mark.parametrize("target", ["/bytes/5000?te=cl", "/bytes/5000?te=chunked",
                                    "/status/404", "/echo"])
def test_head_response_has_no_body_and_connection_stays_usable(proxy, target):
    px, _ = proxy
    with H11Client(px.addr, timeout=5) as c:
        for _ in range(3):
            r = c.request("HEAD", target)
            assert r.status == (404 if "404" in target else 200)
            assert r.body == b""
            if "te=cl" in target:
                assert r.header("content-length") == "5000"
            assert c.reusable
            r = c.get("/echo?after-head")
            assert r.status == 200 and r.json()["target"] == "/echo?after-head"


def test_head_response_then_pipelined_get(proxy):
    px, _ = proxy
    with connect(px.addr, timeout=5) as s:
        s.sendall(b"HEAD /bytes/1234 HTTP/1.1\r\nHost: x\r\n\r\n"
                  b"GET /bytes/10 HTTP/1.1\r\nHost: x\r\n\r\n")
        reader = RawReader(s)
        head = reader.read_response("HEAD")
        assert head.status == 200 and head.header("content-length") == "1234"
        get = reader.read_response()
        assert get.status == 200 and get.body == pattern.prefix(10)


@pytest.mark.parametrize("target", ["/status/204", "/status/304", "/status/304?cl=1234"])
def test_204_and_304_have_no_body(proxy, target):
    px, _ = proxy
    with connect(px.addr, timeout=5) as s:
        s.sendall(b"GET %b HTTP/1.1\r\nHost: x\r\n\r\nGET /echo?after HTTP/1.1\r\nHost: x\r\n\r\n"
                  % target.encode())
        reader = RawReader(s)
        r = reader.read_response()
        assert r.status == int(target[8:11])
        assert r.header("transfer-encoding") is None, "no framing may be added to a 204/304"
        if "cl=1234" in target:
            assert r.header("content-length") == "1234"
        nxt = reader.read_response()
        assert nxt.status == 200 and nxt.json()["target"] == "/echo?after", \
            "bytes after the 204/304 head must be the next response"
    with H11Client(px.addr, timeout=5) as c:
        assert c.get(target).body == b"" and c.reusable and c.get("/echo").status == 200


# -- 100-continue ----------------------------------------------------------------------------

def test_expect_100_continue_round_trip(proxy):
    px, _ = proxy
    body = b"sent only after 100 Continue" * 1000
    with H11Client(px.addr, timeout=5) as c:
        c.send_head("POST", "/echo", [("Expect", "100-continue"),
                                      ("Content-Length", str(len(body)))])
        interim = c.read_response(stop_after_informational=True)
        assert interim.status == 100, "the backend's 100 Continue must reach the client"
        c.send_body(body)
        r = c.read_response()
        assert r.status == 200
        seen = r.json()
        assert seen["body_sha256"] == sha(body)
        assert echo_headers(seen, "expect") == ["100-continue"]
        assert c.reusable and c.get("/echo").status == 200


def test_expect_100_continue_with_chunked_body(proxy):
    px, _ = proxy
    with connect(px.addr, timeout=5) as s:
        s.sendall(b"POST /sink HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n")
        reader = RawReader(s)
        line = reader._line()
        assert line == b"HTTP/1.1 100 Continue", line
        assert reader._line() == b""
        data = pattern.prefix(50_000)
        s.sendall(b"%x\r\n%b\r\n0\r\n\r\n" % (len(data), data))
        r = reader.read_response()
        assert r.json() == {"received": 50_000, "pattern_ok": True}


def test_http10_expect_is_not_answered_with_100(proxy):
    px, _ = proxy
    with connect(px.addr, timeout=5) as s:
        s.sendall(b"POST /echo HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nhi")
        reader = RawReader(s)
        r = reader.read_response()
        assert r.status == 200 and r.json()["body"] == "hi"
        assert r.informational == [], "HTTP/1.0 clients must not get 1xx responses"
        assert reader.eof or is_closed(s, 3)
