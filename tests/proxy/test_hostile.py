"""Hostile and ambiguous requests are answered with 400 (or 505 for unknown versions)
and the connection is closed — never forwarded, never a hang — and the proxy keeps
serving.  Each request is sent in one write, so a proxy that forwarded the head before
noticing the problem would show up in the backend's counters."""

from __future__ import annotations

import pytest

from tests.support.client import H11Client, connect, read_until_close, status_of

H = b"Host: x\r\n"


def req(head: bytes, body: bytes = b"") -> bytes:
    return head + b"\r\n" + body


CASES = {
    # -- framing ---------------------------------------------------------------------------
    "cl-and-te": req(b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5\r\n"
                     b"Transfer-Encoding: chunked\r\n", b"0\r\n\r\n"),
    "te-and-cl": req(b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n"
                     b"Content-Length: 5\r\n", b"0\r\n\r\n"),
    "duplicate-cl-same": req(b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5\r\n"
                             b"Content-Length: 5\r\n", b"hello"),
    "duplicate-cl-different": req(b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5\r\n"
                                  b"Content-Length: 6\r\n", b"hello!"),
    "cl-list": req(b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5, 5\r\n", b"hello"),
    "cl-letters": req(b"POST / HTTP/1.1\r\n" + H + b"Content-Length: abc\r\n", b"hello"),
    "cl-negative": req(b"POST / HTTP/1.1\r\n" + H + b"Content-Length: -1\r\n", b"hello"),
    "cl-plus": req(b"POST / HTTP/1.1\r\n" + H + b"Content-Length: +5\r\n", b"hello"),
    "cl-hex": req(b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 0x5\r\n", b"hello"),
    "cl-inner-space": req(b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 1 2\r\n", b"x" * 12),
    "cl-empty": req(b"POST / HTTP/1.1\r\n" + H + b"Content-Length: \r\n", b"hello"),
    "te-gzip": req(b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip\r\n", b"hello"),
    "te-gzip-chunked": req(b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip, chunked\r\n",
                           b"0\r\n\r\n"),
    "te-chunked-gzip": req(b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked, gzip\r\n",
                           b"0\r\n\r\n"),
    "te-identity": req(b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: identity\r\n", b""),
    "te-chunked-typo": req(b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunkedx\r\n",
                           b"0\r\n\r\n"),
    "te-http10": req(b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n"),
    "te-http10-with-cl": req(b"POST / HTTP/1.0\r\nContent-Length: 5\r\n"
                             b"Transfer-Encoding: chunked\r\n", b"0\r\n\r\n"),
    "chunk-size-not-hex": req(b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n",
                              b"zz\r\nhello\r\n0\r\n\r\n"),
    "chunk-too-long": req(b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n",
                          b"5\r\nhelloXX\r\n0\r\n\r\n"),
    "chunk-no-crlf": req(b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n",
                         b"5\r\nhello0\r\n\r\n"),
    "chunk-size-overflow": req(b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n",
                               b"fffffffffffffffff\r\nx\r\n0\r\n\r\n"),
    "chunk-size-space": req(b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n",
                            b"5 5\r\nhello\r\n0\r\n\r\n"),
    # -- header syntax -----------------------------------------------------------------------
    "obs-fold": req(b"GET / HTTP/1.1\r\n" + H + b"X-A: one\r\n two\r\n"),
    "obs-fold-tab": req(b"GET / HTTP/1.1\r\n" + H + b"X-A: one\r\n\ttwo\r\n"),
    "bare-cr-in-value": req(b"GET / HTTP/1.1\r\n" + H + b"X-A: a\rb\r\n"),
    "bare-cr-line-end": req(b"GET / HTTP/1.1\r\n" + H + b"X-A: a\rX-B: b\r\n"),
    "nul-in-value": req(b"GET / HTTP/1.1\r\n" + H + b"X-A: a\x00b\r\n"),
    "ctl-0x01-in-value": req(b"GET / HTTP/1.1\r\n" + H + b"X-A: a\x01b\r\n"),
    "ctl-esc-in-value": req(b"GET / HTTP/1.1\r\n" + H + b"X-A: a\x1b[31mb\r\n"),
    "ctl-del-in-value": req(b"GET / HTTP/1.1\r\n" + H + b"X-A: a\x7fb\r\n"),
    "nul-in-host": req(b"GET / HTTP/1.1\r\nHost: x\x00y\r\n"),
    "space-in-name": req(b"GET / HTTP/1.1\r\n" + H + b"X A: b\r\n"),
    "space-before-colon": req(b"GET / HTTP/1.1\r\n" + H + b"X-A : b\r\n"),
    "leading-space-name": req(b"GET / HTTP/1.1\r\n" + H + b" X-A: b\r\n"),
    "empty-name": req(b"GET / HTTP/1.1\r\n" + H + b": b\r\n"),
    "paren-in-name": req(b"GET / HTTP/1.1\r\n" + H + b"X(A): b\r\n"),
    "quote-in-name": req(b"GET / HTTP/1.1\r\n" + H + b"X\"A: b\r\n"),
    "slash-in-name": req(b"GET / HTTP/1.1\r\n" + H + b"X/A: b\r\n"),
    "nonascii-name": req(b"GET / HTTP/1.1\r\n" + H + "Xé: b\r\n".encode()),
    "no-colon": req(b"GET / HTTP/1.1\r\n" + H + b"X-A b\r\n"),
    # -- Host ------------------------------------------------------------------------------------
    "missing-host": req(b"GET / HTTP/1.1\r\n"),
    "duplicate-host-same": req(b"GET / HTTP/1.1\r\nHost: x\r\nHost: x\r\n"),
    "duplicate-host-different": req(b"GET / HTTP/1.1\r\nHost: x\r\nHost: evil.example\r\n"),
    # -- request line ------------------------------------------------------------------------------
    "double-space-after-method": req(b"GET  / HTTP/1.1\r\n" + H),
    "double-space-before-version": req(b"GET /  HTTP/1.1\r\n" + H),
    "tab-separator": req(b"GET\t/ HTTP/1.1\r\n" + H),
    "trailing-space": req(b"GET / HTTP/1.1 \r\n" + H),
    "trailing-tab": req(b"GET / HTTP/1.1\t\r\n" + H),
    "leading-space": req(b" GET / HTTP/1.1\r\n" + H),
    "space-in-target": req(b"GET /a b HTTP/1.1\r\n" + H),
    # the canonical line "POST /echo HTTP/1.1" appears later, at a line start (in the
    # body, or in a pipelined request): the malformed line itself must still be rejected
    "double-space-canonical-line-in-body": req(
        b"POST  /echo HTTP/1.1\r\n" + H + b"Content-Length: 22\r\n",
        b"\nPOST /echo HTTP/1.1\r\n"),
    "double-space-canonical-line-pipelined": req(b"GET  /echo HTTP/1.1\r\n" + H)
    + req(b"GET /echo HTTP/1.1\r\n" + H),
    "lowercase-version": req(b"GET / http/1.1\r\n" + H),
    "unsupported-scheme": req(b"GET ftp://x/ HTTP/1.1\r\n" + H),
    "connect": req(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n"),
    "connect-http10": req(b"CONNECT example.com:443 HTTP/1.0\r\n"),
}

VERSIONS = {
    "http-1.2": req(b"GET / HTTP/1.2\r\n" + H),
    "http-2.0": req(b"GET / HTTP/2.0\r\n" + H),
    "http-3.0": req(b"GET / HTTP/3.0\r\n" + H),
    "http-1.9": req(b"GET / HTTP/1.9\r\n" + H),
}


@pytest.fixture(scope="module")
def proxy(module_stack):
    backend = module_stack.backend("hostile")
    return module_stack.poise([backend]), backend


def send_hostile(proxy, raw: bytes) -> bytes:
    """Send ``raw`` in one write; return everything until the proxy closes.  Then prove
    the backend saw nothing and the proxy still serves."""
    px, backend = proxy
    backend.reset()
    with connect(px.addr, timeout=5) as s:
        s.sendall(raw)
        data = read_until_close(s, timeout=5)   # AssertionError on a hang
    assert px.alive()
    with H11Client(px.addr, timeout=5) as c:
        assert c.get("/echo?after").status == 200
    assert backend.targets() == ["/echo?after"], "the hostile request reached the backend"
    return data


@pytest.mark.parametrize("raw", CASES.values(), ids=CASES.keys())
def test_hostile_request_is_400_and_closed(proxy, raw):
    data = send_hostile(proxy, raw)
    assert data, "closed without an answer"
    assert status_of(data) == 400, data[:200]
    assert b"\r\nconnection: close\r\n" in data.lower()


@pytest.mark.parametrize("raw", VERSIONS.values(), ids=VERSIONS.keys())
def test_unknown_http_version_is_505_and_closed(proxy, raw):
    data = send_hostile(proxy, raw)
    assert data and status_of(data) == 505, data[:200]


def test_request_line_without_version_is_rejected(proxy):
    data = send_hostile(proxy, b"GET /\r\n\r\n")
    assert data and status_of(data) in (400, 505), data[:200]


def test_http2_preface_is_rejected(proxy):
    data = send_hostile(proxy, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    assert data and status_of(data) in (400, 505), data[:200]


@pytest.mark.parametrize("name", ["cl-and-te", "obs-fold", "missing-host", "chunk-too-long"])
def test_hostile_request_after_a_good_one_on_the_same_connection(proxy, name):
    """The good request is answered, then the hostile one gets its 400 and the close."""
    px, backend = proxy
    backend.reset()
    with connect(px.addr, timeout=5) as s:
        s.sendall(b"GET /echo?good HTTP/1.1\r\nHost: x\r\n\r\n" + CASES[name])
        data = read_until_close(s, timeout=5)
    first, _, rest = data.partition(b"\r\n\r\n")
    assert status_of(data) == 200
    assert b"HTTP/1.1 400 " in rest, rest[-300:]
    assert backend.targets() == ["/echo?good"]


def test_request_smuggling_attempt_is_not_split_into_two_requests(proxy):
    """CL.TE: a front end trusting Content-Length would forward a second, hidden request."""
    px, backend = proxy
    backend.reset()
    hidden = b"GET /echo?smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
    body = b"0\r\n\r\n" + hidden
    raw = (b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n"
           b"Transfer-Encoding: chunked\r\n\r\n" % len(body)) + body
    with connect(px.addr, timeout=5) as s:
        s.sendall(raw)
        data = read_until_close(s, timeout=5)
    assert status_of(data) == 400 and data.count(b"HTTP/1.1 ") == 1
    assert "/echo?smuggled" not in backend.targets()
