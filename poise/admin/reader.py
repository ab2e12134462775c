"""Bytes → admin requests: httptools (llhttp, strict) plus the admin API's own rules and
limits.  The reader knows nothing of sockets, deadlines or answers: it tells its
:class:`Sink` when a request begins, when its head is in and when it is complete, and
raises a :class:`~poise.errors.DownstreamError` (whose ``status`` is the answer) for
what it refuses.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Protocol

import httptools

from poise.admin.api import Response
from poise.errors import (
    BadRequest,
    HeadersTooLarge,
    InternalError,
    PayloadTooLarge,
    PoiseError,
    UriTooLong,
    VersionNotSupported,
)

log = logging.getLogger("poise")


@dataclass(frozen=True, slots=True)
class Limits:
    """What one admin client may cost; the defaults suit an operator's API."""

    max_connections: int = 256
    max_head: int = 16 * 1024       # request line and header fields, in bytes
    max_target: int = 4 * 1024
    max_body: int = 64 * 1024
    request_timeout: float = 10.0   # seconds from a request's first byte to its end
    idle_timeout: float = 60.0      # seconds a keep-alive connection may wait for one
    linger: float = 2.0             # seconds to discard input after the last response


@dataclass(slots=True)
class Request:
    """A request as it is parsed, then as it waits for its answer."""

    target: bytearray = field(default_factory=bytearray)
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    head_size: int = 0          # of the head as parsed so far (canonical form)
    head_read: int = 0          # bytes read while the head was incomplete (at least)
    head_done: bool = False
    method: str = ""
    http10: bool = False
    keep_alive: bool = True
    hosts: int = 0
    length: int = 0             # Content-Length
    chunked: bool = False
    expect_continue: bool = False
    answer: Response | None = None  # a refusal, sent instead of asking the API


class _Stop(Exception):
    """Raised in a parser callback to stop parsing input nobody will answer."""


class Sink(Protocol):
    """Who the reader reports to."""

    def request_begun(self) -> None: ...

    def head_received(self, request: Request) -> None: ...

    def request_received(self, request: Request) -> None: ...


class RequestReader:
    """Parses one connection's input.  After it raised, or once ``finished`` (a request
    that closes the connection, or an Upgrade offer, was read: nothing after it is), it
    must not be fed again; ``current`` is then the request refused, if one had begun."""

    def __init__(self, limits: Limits, sink: Sink) -> None:
        self.limits = limits
        self.sink = sink
        self.parser = httptools.HttpRequestParser(self)
        self.current: Request | None = None     # begun, not yet complete
        self.finished = False

    def feed(self, data: bytes | memoryview) -> None:
        """Parse ``data``; a PoiseError with the status to answer when it is refused
        (InternalError for a bug of ours, logged)."""
        in_head = self._head_in_progress()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.finished = True                # (the offer was answered as declined)
        except httptools.HttpParserError as e:
            if self.finished:
                return      # (llhttp refuses data after `Connection: close` by itself)
            raise self._translate(e) from None
        if in_head is not None and in_head is self._head_in_progress():
            # httptools keeps a header line that spans reads to itself until it ends,
            # so the head's size as parsed lags behind; bytes read while the head
            # stayed incomplete bound it from below, and keep that buffer small.
            in_head.head_read = max(in_head.head_read + len(data), in_head.head_size)
            if in_head.head_read > self.limits.max_head:
                raise self._head_too_large()

    def _translate(self, e: httptools.HttpParserError) -> PoiseError:
        cause = e.__context__       # (httptools chains what a callback raised)
        if isinstance(cause, PoiseError):
            return cause
        if isinstance(e, httptools.HttpParserCallbackError) and cause is not None:
            log.error("admin API: error in a parser callback", exc_info=cause)
            return InternalError("internal error")
        return BadRequest(f"malformed request: {e}")

    def _head_in_progress(self) -> Request | None:
        req = self.current
        return req if req is not None and not req.head_done else None

    def _head_too_large(self) -> HeadersTooLarge:
        return HeadersTooLarge(f"request head larger than {self.limits.max_head} bytes")

    # -- parser callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.finished:
            raise _Stop
        self.current = Request()
        self.sink.request_begun()

    def on_url(self, url: bytes) -> None:
        req = self._request()
        req.target += url
        if len(req.target) > self.limits.max_target:
            raise UriTooLong(f"request target longer than {self.limits.max_target} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        req = self._request()
        req.head_size += len(name) + len(value) + 4
        if req.head_size > self.limits.max_head:
            raise self._head_too_large()
        req.headers.append((name, value))
        lname = name.lower()
        if lname == b"host":
            req.hosts += 1
        elif lname == b"content-length":
            req.length = int(value)         # (llhttp accepted it: digits only, once)
        elif lname == b"transfer-encoding":
            req.chunked = True              # (llhttp refuses any but chunked here)
        elif lname == b"expect":
            req.expect_continue = value.strip().lower() == b"100-continue"

    def on_headers_complete(self) -> None:
        req = self._request()
        parser = self.parser
        req.method = parser.get_method().decode("ascii")
        version = parser.get_http_version()
        # the request line (method SP target SP HTTP/x.y CRLF) and the empty line
        req.head_size += len(req.method) + len(req.target) + 12 + 2
        req.head_done = True
        req.http10 = version == "1.0"
        if version not in ("1.0", "1.1"):
            raise VersionNotSupported(f"HTTP/{version} is not supported")
        if req.head_size > self.limits.max_head:
            raise self._head_too_large()
        if req.hosts > 1 or (req.hosts == 0 and not req.http10):
            raise BadRequest("expected exactly one Host header")
        if req.chunked and req.http10:
            raise BadRequest("Transfer-Encoding is not allowed in HTTP/1.0")
        if req.length > self.limits.max_body:
            raise PayloadTooLarge(f"request body larger than {self.limits.max_body} bytes")
        if parser.should_upgrade() and (req.length or req.chunked):
            # llhttp does not read the body of an upgrade offer, so we would answer
            # without it: refuse rather than ignore a body.
            raise BadRequest("an Upgrade offer cannot carry a body here")
        self.sink.head_received(req)

    def on_body(self, body: bytes) -> None:
        req = self._request()
        req.body += body
        if len(req.body) > self.limits.max_body:
            raise PayloadTooLarge(f"request body larger than {self.limits.max_body} bytes")

    def on_message_complete(self) -> None:
        req = self._request()
        self.current = None
        # An upgrade offer is declined by answering it and closing.
        req.keep_alive = self.parser.should_keep_alive() and not self.parser.should_upgrade()
        self.finished = not req.keep_alive
        self.sink.request_received(req)

    def _request(self) -> Request:
        req = self.current
        if req is None:     # (llhttp always begins a message first)
            raise _Stop
        return req
