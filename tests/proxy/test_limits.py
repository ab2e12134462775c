"""Size limits on the request: line (414), header block and count (431), body (413,
checked against Content-Length before any body byte is read)."""

from __future__ import annotations

import pytest

from tests.support.client import H11Client, RawReader, connect, read_until_close, status_of

MAX_BODY = 1 << 20


@pytest.fixture(scope="module")
def proxy(module_stack):
    backend = module_stack.backend("limits")
    px = module_stack.poise([backend], listener={"max_request_body": "1MiB"})
    return px, backend


def rejected(proxy, raw: bytes, *, split: int | None = None) -> int:
    """Send ``raw`` (optionally in two writes), expect an answer and a close; check the
    backend saw nothing and the proxy still serves.  Returns the status."""
    px, backend = proxy
    backend.reset()
    with connect(px.addr, timeout=5) as s:
        try:
            if split:
                s.sendall(raw[:split])
                s.sendall(raw[split:])
            else:
                s.sendall(raw)
        except (BrokenPipeError, ConnectionResetError):
            pass    # rejected and closed before we finished sending: fine
        data = read_until_close(s, timeout=5)
    with H11Client(px.addr) as c:
        assert c.get("/echo?after").status == 200
    assert backend.targets() == ["/echo?after"], "a rejected request reached the backend"
    return status_of(data)


def get(target: bytes, headers: bytes = b"") -> bytes:
    return b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n"


def test_request_line_just_under_8kib_is_served(proxy):
    px, _ = proxy
    target = "/echo?" + "a" * (8000 - len("GET /echo? HTTP/1.1"))
    with H11Client(px.addr) as c:
        r = c.get(target)
        assert r.status == 200 and r.json()["target"] == target


@pytest.mark.parametrize("length", [8300, 20_000, 100_000])
def test_request_line_over_8kib_is_414(proxy, length):
    assert rejected(proxy, get(b"/" + b"a" * length)) == 414


def test_request_line_over_8kib_in_pieces_is_414(proxy):
    raw = get(b"/" + b"b" * 9000)
    assert rejected(proxy, raw, split=4000) == 414


def test_header_block_just_under_64kib_is_served(proxy):
    px, _ = proxy
    headers = [(f"X-Big-{i}", "v" * 1000) for i in range(60)]
    with H11Client(px.addr) as c:
        r = c.get("/echo", headers)
        assert r.status == 200 and len(r.json()["headers"]) >= 61


@pytest.mark.parametrize("split", [None, 30_000])
def test_header_block_over_64kib_is_431(proxy, split):
    headers = b"".join(b"X-Big-%d: %b\r\n" % (i, b"v" * 1000) for i in range(70))
    assert rejected(proxy, get(b"/", headers), split=split) == 431


def test_single_huge_header_is_431(proxy):
    assert rejected(proxy, get(b"/", b"X-Huge: " + b"h" * 70_000 + b"\r\n")) == 431


def test_100_headers_are_served(proxy):
    px, _ = proxy
    headers = [(f"X-H-{i}", "1") for i in range(99)]       # + Host = 100
    with H11Client(px.addr) as c:
        assert c.get("/echo", headers).status == 200


def test_more_than_100_headers_is_431(proxy):
    headers = b"".join(b"X-H-%d: 1\r\n" % i for i in range(100))   # + Host = 101
    assert rejected(proxy, get(b"/", headers)) == 431


def test_content_length_over_max_request_body_is_413_before_the_body(proxy):
    # Only the head is sent: the answer must come without waiting for the body.
    raw = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY + 1)
    assert rejected(proxy, raw) == 413


def test_huge_content_length_is_413(proxy):
    raw = b"PUT /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (1 << 62)
    assert rejected(proxy, raw) == 413


def test_content_length_equal_to_max_request_body_is_served(proxy):
    px, _ = proxy
    with H11Client(px.addr) as c:
        r = c.request("POST", "/echo", body=b"m" * MAX_BODY)
        assert r.status == 200 and r.json()["body_len"] == MAX_BODY


def test_chunked_body_over_max_request_body_is_413(proxy):
    px, _ = proxy
    with connect(px.addr, timeout=5) as s:
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        piece = b"c" * 65536
        try:
            for _ in range(MAX_BODY // len(piece) + 2):
                s.sendall(b"%x\r\n%b\r\n" % (len(piece), piece))
            s.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        data = RawReader(s).read_head()
    assert data.status == 413
