"""An HTTP/2 request's header list → the exchange's request head: pseudo-headers to
method, target and Host, cookie crumbs joined (RFC 9113 §8.2.3), a body of unknown
length marked chunked (for HTTP/1.1 backends), the listener's limits applied.

The codec does not validate inbound header lists (that cost a third of its time per
request); :func:`fill_request` does, in the same pass, and a malformed request
(RFC 9113 §8.1.1: upper-case or invalid names, connection-specific fields, bad or
missing pseudo-headers, control characters or edge whitespace in values, a bad
Content-Length) raises :class:`Malformed`: the stream is reset with PROTOCOL_ERROR and
nothing is forwarded.
"""

from __future__ import annotations

from typing import Any

from poise.errors import BadRequest, HeadersTooLarge, UriTooLong
from poise.proxy.http.h2stream import H2Exchange
from poise.proxy.http.headers import CRLF
from poise.proxy.http.request import WATCH_FIRST

# Bytes a field name may hold (RFC 9110 tchar, lower-case only in HTTP/2), and a
# method (any tchar).
_NAME_BYTES = bytes(b for b in range(256) if chr(b) in
                    "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz")
_METHOD_BYTES = _NAME_BYTES + b"ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_PSEUDO = frozenset({b":method", b":scheme", b":path", b":authority"})
# Fields that only mean something on an HTTP/1.x connection (RFC 9113 §8.2.2).
_CONNECTION_SPECIFIC = frozenset({b"connection", b"keep-alive", b"proxy-connection",
                                  b"transfer-encoding", b"upgrade"})


class Malformed(Exception):
    """A request RFC 9113 calls malformed: a stream error (PROTOCOL_ERROR)."""


def _check_field(name: bytes, value: bytes) -> None:
    if not name or name.translate(None, _NAME_BYTES):
        raise Malformed(f"invalid field name {name[:40]!r}")
    if b"\0" in value or b"\r" in value or b"\n" in value:
        raise Malformed(f"control character in the value of {name.decode()}")
    if value[:1] in (b" ", b"\t") or value[-1:] in (b" ", b"\t"):
        raise Malformed(f"leading or trailing whitespace in the value of {name.decode()}")
    if name in _CONNECTION_SPECIFIC:
        raise Malformed(f"connection-specific field {name.decode()}")


def fill_request(ex: H2Exchange, site: Any, headers: Any, ended: bool) -> None:
    """Fill ``ex`` from a request's header list; raises :class:`Malformed`, or a
    PoiseError to answer (413, 414, 431, 400)."""
    method = target = authority = scheme = None
    cookies: list[bytes] = []
    ex.method = ex.target = b""
    ex.head_only = False
    size = 0
    regular = False
    lengths = 0
    for name, value in headers:
        size += len(name) + len(value) + 32
        if name[:1] == b":":
            if regular or name not in _PSEUDO:
                raise Malformed(f"pseudo-header {name[:40]!r} misplaced or unknown")
            if b"\0" in value or b"\r" in value or b"\n" in value:
                raise Malformed(f"control character in {name.decode()}")
            if name == b":method":
                if method is not None:
                    raise Malformed("two :method")
                method = value
            elif name == b":path":
                if target is not None:
                    raise Malformed("two :path")
                target = value
            elif name == b":authority":
                if authority is not None:
                    raise Malformed("two :authority")
                authority = value
            else:
                if scheme is not None:
                    raise Malformed("two :scheme")
                scheme = value
            continue
        regular = True
        _check_field(name, value)
        if name == b"cookie":       # (split into crumbs in HTTP/2: RFC 9113 §8.2.3)
            cookies.append(value)
        elif name[0] in WATCH_FIRST:
            if name == b"te":
                if value != b"trailers":
                    raise Malformed("te other than trailers")
                continue
            if name == b"content-length":
                lengths += 1
                if lengths > 1 or not value.isdigit():
                    raise Malformed("bad or repeated content-length")
            ex.add_watched(name, value)
        else:
            ex.fields += (name, b": ", value, CRLF)
    if method is None or not method or method.translate(None, _METHOD_BYTES):
        raise Malformed("missing or invalid :method")
    if method == b"CONNECT":
        ex.method = method
        raise BadRequest("CONNECT is not supported")
    if scheme is None or not target:
        raise Malformed("missing :scheme or :path")
    if target[:1] != b"/" and not (target == b"*" and method == b"OPTIONS"):
        raise Malformed("a :path must start with /")
    ex.method, ex.target = method, target
    ex.head_only = method == b"HEAD"
    if size > site.max_header_size:
        raise HeadersTooLarge(f"header list larger than {site.max_header_size} bytes")
    if len(headers) > site.max_headers + 4:
        raise HeadersTooLarge(f"more than {site.max_headers} headers")
    if len(target) > site.max_request_line:
        raise UriTooLong(f"request target longer than {site.max_request_line} bytes")
    if authority:
        if ex.host is None:
            ex.add_watched(b"host", authority)
        elif ex.host != authority:      # (RFC 9113 §8.3.1: "SHOULD treat as malformed")
            raise Malformed("host differs from :authority")
    if cookies:
        ex.fields += (b"cookie", b": ", b"; ".join(cookies), CRLF)
    if not ended and ex.content_length < 0:
        ex.chunked = True           # a body of unknown length: chunked upstream
    ex.head_complete(method, target, True, True)
