"""MessageBounds / ChunkScanner: where pipelined requests start (pure, no sockets)."""

import random

import pytest

from poise.proxy.http.bounds import ChunkScanner, MessageBounds

BODY = b"3;ext=1\r\nabc\r\n10\r\n" + b"x" * 16 + b"\r\n0\r\nTrailer-A: 1\r\n\r\n"


def test_chunk_scanner_finds_the_end_in_one_read():
    data = BODY + b"GET /next HTTP/1.1\r\n"
    assert ChunkScanner().feed(data, 0) == len(BODY)


@pytest.mark.parametrize("seed", range(20))
def test_chunk_scanner_finds_the_end_across_any_split(seed):
    rng = random.Random(seed)
    data = BODY + b"GET /"
    cuts = sorted(rng.sample(range(1, len(data)), 4))
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    scanner = ChunkScanner()
    consumed = 0
    for piece in pieces:
        end = scanner.feed(piece, 0)
        if end >= 0:
            assert consumed + end == len(BODY)
            return
        consumed += len(piece)
    pytest.fail("the end of the chunked body was not found")


def test_first_request_of_a_read_must_start_it():
    bounds = MessageBounds()
    bounds.read(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert bounds.check_head(b"GET", b"/", chunked=False) >= 0


def test_empty_lines_before_a_request_are_allowed():
    bounds = MessageBounds()
    bounds.read(b"\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert bounds.check_head(b"GET", b"/", chunked=False) >= 0


def test_http10_is_recognised_and_other_versions_refused():
    bounds = MessageBounds()
    bounds.read(b"GET / HTTP/1.0\r\n\r\n")
    assert bounds.check_head(b"GET", b"/", chunked=False) == 0
    assert bounds.http11 is False
    bounds = MessageBounds()
    bounds.read(b"GET / HTTP/1.2\r\nHost: a\r\n\r\n")
    assert bounds.check_head(b"GET", b"/", chunked=False) == -1


def test_double_space_is_refused():
    bounds = MessageBounds()
    bounds.read(b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert bounds.check_head(b"GET", b"/", chunked=False) == -1


def test_pipelined_request_after_a_body_that_contains_a_canonical_line():
    first = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 20\r\n\r\nGET /x HTTP/1.1\r\nab\r\n"
    bounds = MessageBounds()
    bounds.read(first + b"GET  /x HTTP/1.1\r\nHost: a\r\n\r\n")
    assert bounds.check_head(b"POST", b"/", chunked=False) >= 0
    bounds.body_len += 20
    bounds.message_done()
    assert bounds.check_head(b"GET", b"/x", chunked=False) == -1


def test_pipelined_request_after_a_chunked_body():
    first = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + BODY
    bounds = MessageBounds()
    bounds.read(first + b"GET /y HTTP/1.1\r\nHost: a\r\n\r\n")
    assert bounds.check_head(b"POST", b"/", chunked=True) >= 0
    bounds.message_done()
    assert bounds.check_head(b"GET", b"/y", chunked=False) >= 0
