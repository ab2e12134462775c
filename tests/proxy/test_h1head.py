"""The one-call head parser (h1head.c) against httptools (llhttp).

The fast path may decline anything, but every head it accepts must be one llhttp
accepts with the same meaning: method, target, version, the same header list, the
same keep-alive decision and the same framing (where the body ends).  It also sorts
the fields as the Python path does (RequestHead.add_watched for requests, hop-by-hop
removal for responses): the sorted result must be what that path makes of llhttp's
header list.  Generated heads
mix the common form with the constructs that must go the slow way, and random byte
mutations of both.
"""

from __future__ import annotations

import gc

import httptools
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from poise.proxy.http import fasthead
from poise.proxy.http.headers import CRLF, HOP_BY_HOP, split_block
from poise.proxy.http.request import WATCH_FIRST, RequestHead

pytestmark = pytest.mark.skipif(fasthead.parse_request is None,
                                reason="the C head parser is not built (or interpreted run)")

# Each pool: the common form, weighted up (repeated) so that most generated heads are
# ones the fast path accepts, then what it must decline or llhttp refuses.
METHODS = [b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH"] * 4 + [
    b"get", b"CONNECT", b"PROPFIND", b"G ET", b""]
NAMES = [b"Host", b"host", b"Content-Length", b"content-LENGTH", b"Connection", b"Accept",
         b"X-Forwarded-For", b"Cookie", b"a", b"User-Agent", b"Expect", b"Keep-Alive",
         b"TE", b"x-\x21~", b"Trailer", b"Proxy-Connection", b"proxy-authenticate",
         b"Proxy-Authorization", b"X-Forwarded-Proto", b"x-forwarded-host", b"Hosts",
         b"X-Forwarded-Fo", b"Expec", b"Tee", b"Connections"] * 3 + [
    b"Transfer-Encoding", b"Upgrade", b"Content-Length ", b" Host", b"X\x00Y", b"X Y",
    b"x-\xe9", b"", b"\"q\"",
    # long names (scanned sixteen bytes at a time): other tchars and bad bytes late
    b"X-Custom_Header.Name!", b"X-Request-Identifier-Of-The-Client",
    b"X-Long-Header-Name-With A-Space", b"X-Sixteen-Bytes-\xe9-Name", b"X-0123456789abcdef:"]
VALUES = [b"x", b"", b"  x  ", b"\tv\t", b"close", b"Close", b"keep-alive", b"Keep-Alive",
          b"KEEP-ALIVE", b"12", b"0", b"007", b"5 ", b" 5", b"caf\xc3\xa9", b"100-continue",
          b"a, b;q=1", b"100-Continue", b"100-continue \t", b"100-continued"] * 3 + [
    b"close, foo", b"upgrade", b"chunked", b"1 2", b"-1", b"99999999999999999999",
    b"a\x00b", b"a\rb", b"a\nb", b"\x7f", b"a\x01", b"websocket"]
TARGETS = [b"/", b"/a?b=c", b"*", b"http://h/p", b"/a#f", b"/\"{}|\\^`", b"/%zz"] * 3 + [
    b"/\x7f", b"/a b", b"", b"/\xff"]
VERSIONS = [b"HTTP/1.1", b"HTTP/1.0"] * 6 + [b"HTTP/2.0", b"HTTP/1.2", b"http/1.1",
                                              b"HTTP/1.1 "]
EOLS = [b"\r\n"] * 30 + [b"\n", b"\r", b"\r\n "]
COLONS = [b":", b": ", b":\t", b":  "] * 3 + [b" :", b""]


@st.composite
def request_heads(draw: st.DrawFn) -> bytes:
    eol = st.sampled_from(EOLS)
    line = (draw(st.sampled_from(METHODS)) + b" " + draw(st.sampled_from(TARGETS)) + b" "
            + draw(st.sampled_from(VERSIONS)) + draw(eol))
    fields = draw(st.lists(st.tuples(st.sampled_from(NAMES), st.sampled_from(COLONS),
                                     st.sampled_from(VALUES), eol), max_size=6))
    head = line + b"".join(n + c + v + e for n, c, v, e in fields) + draw(eol)
    return draw(mutated(head))


@st.composite
def response_heads(draw: st.DrawFn) -> bytes:
    eol = st.sampled_from(EOLS)
    status = draw(st.sampled_from([b"200", b"204", b"304", b"404", b"503", b"599"] * 3 + [
        b"101", b"100", b"600", b"20", b"2000", b"099"]))
    reason = draw(st.sampled_from([b" OK", b" ", b" Not\tFound", b" caf\xc3\xa9"] * 3 + [
        b"", b" \x00"]))
    line = draw(st.sampled_from(VERSIONS)) + b" " + status + reason + draw(eol)
    fields = draw(st.lists(st.tuples(st.sampled_from(NAMES), st.sampled_from(COLONS),
                                     st.sampled_from(VALUES), eol), max_size=6))
    head = line + b"".join(n + c + v + e for n, c, v, e in fields) + draw(eol)
    return draw(mutated(head))


@st.composite
def mutated(draw: st.DrawFn, head: bytes) -> bytes:
    """``head``, or it with a few bytes replaced, inserted or deleted."""
    data = bytearray(head)
    for _ in range(draw(st.sampled_from([0, 0, 0, 0, 1, 2]))):
        if not data:
            break
        i = draw(st.integers(0, len(data) - 1))
        kind = draw(st.sampled_from(["replace", "insert", "delete"]))
        byte = draw(st.sampled_from([0, 9, 10, 13, 32, 58, 0x7f, 0x80, 0xff, ord("a"), ord(",")]))
        if kind == "replace":
            data[i] = byte
        elif kind == "insert":
            data.insert(i, byte)
        else:
            del data[i]
    return bytes(data)


class Recorder:
    """httptools callbacks, recorded."""

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[bytes] = []
        self.heads = 0
        self.complete = 0
        self.body = b""
        self.parser: httptools.HttpRequestParser | httptools.HttpResponseParser | None = None
        self.keep_alive: bool | None = None

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers += (name, value)

    def on_headers_complete(self) -> None:
        self.heads += 1
        # (Only meaningful during the message: llhttp resets it after its end.)
        assert self.parser is not None
        self.keep_alive = self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.complete += 1


BODY = b"0123456789" * 3


def new_head() -> RequestHead:
    head = RequestHead()
    head.fields = []
    head.host = head.xff = head.upgrade = head.connection = None
    head.content_length = -1
    head.chunked = head.te = head.expect_continue = False
    head.max_body = 1 << 62
    return head


def python_sorted(headers: list[bytes]) -> RequestHead:
    """A request's fields as ClientConnection.on_header sorts them."""
    head = new_head()
    for i in range(0, len(headers), 2):
        name, value = headers[i], headers[i + 1]
        if (name[0] | 0x20) in WATCH_FIRST:
            head.add_watched(name, value)
        else:
            head.fields += (name, b": ", value, CRLF)
    return head


def head_state(head: RequestHead) -> tuple:
    return (head.fields, head.host, head.content_length, head.chunked, head.te,
            head.expect_continue, head.xff, head.connection, head.upgrade)


def llhttp_request(data: bytes) -> tuple[Recorder, httptools.HttpRequestParser]:
    rec = Recorder()
    parser = rec.parser = httptools.HttpRequestParser(rec)
    parser.feed_data(data)
    return rec, parser


@settings(max_examples=5000, suppress_health_check=[HealthCheck.too_slow])
@given(request_heads(), st.integers(0, 3))
@example(b"GET /a HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n", 0)
@example(b"GET /a HTTP/1.1\r\nConnection: close, foo\r\n\r\n", 0)
@example(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 007\r\n\r\n", 0)
def test_accepted_requests_mean_what_llhttp_says(head: bytes, offset: int) -> None:
    data = b"x" * offset + head + BODY
    fast = fasthead.parse_request(data, offset)
    if fast is None:
        return
    (method, target, http11, keep_alive, fields, watched, body_start, length, header_block,
     host, expect_continue, count) = fast
    assert head[:body_start - offset].endswith(b"\r\n\r\n")
    body = BODY[:max(length, 0)]
    message = head[:body_start - offset] + body
    rec, parser = llhttp_request(message)
    assert rec.heads == 1 and rec.complete == 1, "llhttp must frame the same message"
    assert rec.body == body
    assert parser.get_method() == method
    assert rec.url == target
    assert parser.get_http_version() == ("1.1" if http11 else "1.0")
    assert rec.keep_alive == keep_alive
    assert count == len(rec.headers) // 2
    # What the Python path makes of llhttp's fields, and of the C parser's sorting.
    reference = python_sorted(rec.headers)
    sorted_fast = new_head()
    sorted_fast.take_sorted(fields, watched, host, expect_continue, length)
    assert head_state(sorted_fast) == head_state(reference)
    first_line_end = head.index(b"\r\n") + 2
    assert header_block == body_start - offset - first_line_end - 2


@settings(max_examples=5000, suppress_health_check=[HealthCheck.too_slow])
@given(response_heads())
@example(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 3\r\n\r\n")
def test_accepted_responses_mean_what_llhttp_says(head: bytes) -> None:
    fast = fasthead.parse_response(head + BODY, 0)
    if fast is None:
        return
    status, http11, keep_alive, block, body_start, length = fast
    assert head[:body_start].endswith(b"\r\n\r\n")
    head = head[:body_start]    # (a mutation may have added bytes after the head)
    rec = Recorder()
    parser = rec.parser = httptools.HttpResponseParser(rec)
    if status in (204, 304):
        length = 0      # (no body, whatever Content-Length says: the caller knows)
    if length >= 0:
        parser.feed_data(head + BODY[:length])
        assert rec.complete == 1 and rec.body == BODY[:length]
        assert rec.keep_alive == keep_alive
    else:
        parser.feed_data(head)
        assert rec.heads == 1
    assert parser.get_status_code() == status
    assert parser.get_http_version() == ("1.1" if http11 else "1.0")
    pairs = [(rec.headers[i], rec.headers[i + 1]) for i in range(0, len(rec.headers), 2)]
    assert block == b"".join(name + b": " + value + CRLF for name, value in pairs
                             if name.lower() not in HOP_BY_HOP)
    assert (fast[5] >= 0) == any(name.lower() == b"content-length" for name, _ in pairs)


@pytest.mark.parametrize("head", [
    b"GET / HTTP/1.1\r\nHost: x\r\n",                           # incomplete
    b"GET / HTTP/1.1\r\nHost: x\r\n\r",
    b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",    # framing: slow path
    b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
    b"GET / HTTP/1.1\r\nUpgrade: websocket\r\n\r\n",
    b"GET / HTTP/1.1\r\nConnection: close, upgrade\r\n\r\n",
    b"GET / HTTP/1.1\r\nConnection: close\r\nConnection: close\r\n\r\n",
    b"GET / HTTP/1.1\r\nA: b\r\n c\r\n\r\n",                     # obs-fold
    b"GET / HTTP/1.1\nHost: x\n\n",                             # bare LF
    b"GET  / HTTP/1.1\r\n\r\n",                                 # not canonical
    b"\r\nGET / HTTP/1.1\r\n\r\n",                              # leading empty line
    b"CONNECT h:1 HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1\r\nContent-Length: 1234567890123456\r\n\r\n",
    b"GET / HTTP/1.0\r\nProxy-Connection: keep-alive\r\n\r\n",  # llhttp: keep-alive
    b"GET / HTTP/1.1\r\nHost: a\r\nhost: a\r\n\r\n",          # Python answers 400
    b"GET / HTTP/1.1\r\n" + b"A: b\r\n" * 129 + b"\r\n",         # many: Python answers
])
def test_declines_what_the_slow_path_must_see(head: bytes) -> None:
    assert fasthead.parse_request(head, 0) is None


def test_rejects_bad_arguments() -> None:
    with pytest.raises(TypeError):
        fasthead.parse_request(bytearray(b"GET / HTTP/1.1\r\n\r\n"), 0)
    with pytest.raises(ValueError):
        fasthead.parse_request(b"GET", 4)


def test_accepts_the_common_form() -> None:
    """What browsers, wrk and curl send: the fast path must take it (else it saves
    nothing), pipelined ones one after another."""
    one = (b"GET /index.html?q=1 HTTP/1.1\r\nHost: example.com\r\nUser-Agent: curl/8\r\n"
           b"Accept: */*\r\n\r\n")
    post = b"POST /api HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nok"
    data = one + post
    first = fasthead.parse_request(data, 0)
    assert first == (b"GET", b"/index.html?q=1", True, True,
                     [b"Host", b": ", b"example.com", CRLF, b"User-Agent", b": ", b"curl/8",
                      CRLF, b"Accept", b": ", b"*/*", CRLF],
                     None, len(one), -1, len(one) - 30 - 2, b"example.com", False, 3)
    second = fasthead.parse_request(data, len(one))
    assert second is not None and second[0] == b"POST" and second[7] == 2
    assert second[6] == len(data) - 2
    response = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello"
    assert fasthead.parse_response(response, 0) == (
        200, True, True, b"Content-Type: text/plain\r\nContent-Length: 5\r\n",
        len(response) - 5, 5)


def test_fields_are_sorted_as_the_python_path_does() -> None:
    request = (b"GET / HTTP/1.1\r\nHost: h\r\nConnection: keep-alive\r\nKeep-Alive: 5\r\n"
               b"X-Forwarded-For: 1.2.3.4\r\nX-Forwarded-Proto: https\r\nExpect: nope\r\n"
               b"TE: trailers\r\nExpect: 100-continue\r\nAccept: */*\r\n\r\n")
    (_, _, _, _, fields, watched, _, _, _, host, expect_continue,
     count) = fasthead.parse_request(request, 0)
    assert fields == [b"Host", b": ", b"h", CRLF, b"Expect", b": ", b"100-continue", CRLF,
                      b"Accept", b": ", b"*/*", CRLF]
    assert watched == [b"Connection", b"keep-alive", b"X-Forwarded-For", b"1.2.3.4"]
    assert (host, expect_continue, count) == (b"h", True, 9)
    response = (b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n"
                b"X-Forwarded-For: kept\r\nProxy-Authenticate: Basic\r\nTrailer: x\r\n"
                b"Expect: whatever\r\nContent-Length: 0\r\n\r\n")
    block = fasthead.parse_response(response, 0)[3]
    assert block == b"X-Forwarded-For: kept\r\nExpect: whatever\r\nContent-Length: 0\r\n"
    assert split_block(block) == [b"X-Forwarded-For", b": ", b"kept", CRLF, b"Expect", b": ",
                                  b"whatever", CRLF, b"Content-Length", b": ", b"0", CRLF]
    assert split_block(b"") == []


@pytest.mark.parametrize("bad", [0x00, 0x01, 0x0b, 0x1f, 0x7f, 0x0a])
def test_a_control_byte_anywhere_in_a_long_value_is_declined(bad: int) -> None:
    """(Values are scanned eight bytes at a time: every position of a word counts.)"""
    for length in range(1, 40):
        for at in range(length):
            value = bytearray(b"v" * length)
            value[at] = bad
            head = b"GET / HTTP/1.1\r\nA: " + bytes(value) + b"\r\n\r\n"
            assert fasthead.parse_request(head, 0) is None, (length, at)
    for clean in (b"\t" * 9, b"\x80\xff" * 9, b"x" * 17 + b"\t"):
        head = b"GET / HTTP/1.1\r\nA: b" + clean + b"\r\n\r\n"
        assert fasthead.parse_request(head, 0)[4] == [b"A", b": ", b"b" + clean, CRLF]


def test_a_result_its_caller_keeps_is_never_changed_by_a_later_parse() -> None:
    """h1head.c reuses its result tuple once the caller has let go of it (reference
    count 1): a kept one must stay as it was, a reused one must hold the new head and
    stay tracked by the collector (it holds a list)."""
    a = b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n"
    b = b"POST /b HTTP/1.0\r\nHost: b\r\nContent-Length: 3\r\n\r\nabc"
    kept = fasthead.parse_request(a, 0)
    snapshot = list(kept)
    other = fasthead.parse_request(b, 0)
    assert other is not kept and list(kept) == snapshot
    assert other[:4] == (b"POST", b"/b", False, False) and other[7] == 3
    del kept, other
    gc.collect()
    for data, target, length in ((a, b"/a", -1), (b, b"/b", 3)) * 3:
        result = fasthead.parse_request(data, 0)
        assert (result[1], result[7], result[9]) == (target, length, target[1:])
        assert gc.is_tracked(result)
        del result
    response = b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\nno"
    kept_response = fasthead.parse_response(response, 0)
    assert fasthead.parse_response(b"HTTP/1.0 200 OK\r\n\r\n", 0)[:3] == (200, False, False)
    assert kept_response == (404, True, True, b"Content-Length: 2\r\n", len(response) - 2, 2)


def test_join_parts_joins_bytes_and_lists_in_order() -> None:
    parts = (b"GET", b" ", [b"a", b"", b"bc"], [], b"", [b"\r\n"] * 3, b"end")
    assert fasthead.join_parts(*parts) == b"GET abc\r\n\r\n\r\nend"
    assert fasthead.join_parts(*parts) == fasthead._join_parts(*parts)
    assert fasthead.join_parts() == b"" == fasthead._join_parts()
    for bad in ((b"a", "text"), ([b"a", bytearray(b"b")],), ((b"a",),), (None,)):
        with pytest.raises(TypeError):
            fasthead.join_parts(*bad)


def test_clock_is_time_monotonic_clock() -> None:
    import time
    before = time.monotonic()
    now = fasthead.clock()
    after = time.monotonic()
    assert before - 1e-6 <= now <= after + 1e-6
