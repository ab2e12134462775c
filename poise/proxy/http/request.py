"""Request-head inspection: the checks httptools (llhttp) does not make, and the
forwarded header lines, in one pass over the parsed headers.

llhttp already rejects CL+TE, duplicate or malformed Content-Length, obs-fold, bare CR,
NUL/CTL in values, invalid names and malformed chunk framing; this module adds the
rules a proxy needs on top: Host, Transfer-Encoding, HTTP/1.0 framing, size limits.
"""

from __future__ import annotations

from poise.errors import BadRequest, PayloadTooLarge
from poise.proxy.http.headers import HOP_BY_HOP, PROTECTED

_SPECIAL = frozenset({
    b"host", b"content-length", b"transfer-encoding", b"connection", b"expect",
    b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host",
}) | HOP_BY_HOP
_NOT_HEADER_NAMES = frozenset({b"close", b"keep-alive"})


class RequestHead:
    """What the proxy needs from a request head, and its forwardable header lines."""

    __slots__ = ("lines", "host", "content_length", "chunked", "expect_continue", "xff")

    def __init__(self) -> None:
        self.lines: list[bytes] = []
        self.host: bytes | None = None
        self.content_length = -1
        self.chunked = False
        self.expect_continue = False
        self.xff: bytes | None = None


def inspect_head(headers: list[tuple[bytes, bytes]], http11: bool,
                 max_body: int) -> RequestHead:
    """Validate ``headers`` and split them into forwardable lines and facts.

    Raises BadRequest (400) or PayloadTooLarge (413).
    """
    head = RequestHead()
    lines = head.lines
    listed: list[bytes] | None = None
    for name, value in headers:
        low = name.lower()
        if low not in _SPECIAL:
            lines.append(name + b": " + value + b"\r\n")
        elif low == b"host":
            if head.host is not None:
                raise BadRequest("duplicate Host header")
            head.host = value
            lines.append(name + b": " + value + b"\r\n")
        elif low == b"content-length":
            head.content_length = int(value)  # llhttp has checked it is digits only
            if head.content_length > max_body:
                raise PayloadTooLarge(f"Content-Length {head.content_length} exceeds {max_body}")
            lines.append(name + b": " + value + b"\r\n")
        elif low == b"transfer-encoding":
            if not http11:
                raise BadRequest("Transfer-Encoding is not allowed in HTTP/1.0")
            if value.strip().lower() != b"chunked":
                raise BadRequest("only 'Transfer-Encoding: chunked' is accepted")
            head.chunked = True
        elif low == b"expect":
            if value.strip().lower() == b"100-continue" and http11:
                head.expect_continue = True
                lines.append(name + b": " + value + b"\r\n")
        elif low == b"x-forwarded-for":
            head.xff = value if head.xff is None else head.xff + b", " + value
        elif low == b"connection":
            listed = (listed or []) + [t.strip().lower() for t in value.split(b",")]
        # other hop-by-hop and X-Forwarded-Proto/-Host: dropped, poise sets its own
    if http11 and head.host is None:
        raise BadRequest("HTTP/1.1 request without Host")
    if listed:
        names = set(listed) - _NOT_HEADER_NAMES - PROTECTED
        if names:
            head.lines = [line for line in lines
                          if line[: line.index(b":")].lower() not in names]
    return head
