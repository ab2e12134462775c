"""An HTTP/2 request's header list → the exchange's request head (HTTP/1.1 towards
the backend): pseudo-headers to method, target and Host, cookie crumbs joined
(RFC 9113 §8.2.3), a body of unknown length chunked, the listener's limits applied."""

from __future__ import annotations

from typing import Any

from poise.errors import BadRequest, HeadersTooLarge, UriTooLong
from poise.proxy.http.h2stream import H2Exchange
from poise.proxy.http.headers import CRLF
from poise.proxy.http.request import WATCH_FIRST


def fill_request(ex: H2Exchange, site: Any, headers: Any, ended: bool) -> None:
    """Fill ``ex`` from a request's header list (the codec has checked the
    pseudo-headers and that no connection-specific field is there)."""
    method = target = authority = b""
    cookies: list[bytes] = []
    ex.method = ex.target = b""
    size = 0
    for name, value in headers:
        size += len(name) + len(value) + 32
        if name[0] == 58:           # ":"
            if name == b":method":
                method = value
            elif name == b":path":
                target = value
            elif name == b":authority":
                authority = value
        elif name == b"cookie":     # (split into crumbs in HTTP/2: RFC 9113 §8.2.3)
            cookies.append(value)
        elif name[0] in WATCH_FIRST:
            ex.add_watched(name, value)
        else:
            ex.fields += (name, b": ", value, CRLF)
    ex.method, ex.target = method, target
    if size > site.max_header_size:
        raise HeadersTooLarge(f"header list larger than {site.max_header_size} bytes")
    if len(headers) > site.max_headers + 4:
        raise HeadersTooLarge(f"more than {site.max_headers} headers")
    if len(target) > site.max_request_line:
        raise UriTooLong(f"request target longer than {site.max_request_line} bytes")
    if method == b"CONNECT":
        raise BadRequest("CONNECT is not supported")
    if authority:
        if ex.host is None:
            ex.add_watched(b"host", authority)
        elif ex.host != authority:
            ex.set_host(authority)      # :authority wins (RFC 9113 §8.3.1)
    if cookies:
        ex.fields += (b"cookie", b": ", b"; ".join(cookies), CRLF)
    if not ended and ex.content_length < 0:
        ex.chunked = True           # a body of unknown length: chunked upstream
    ex.head_complete(method, target, True, True)
