"""The heads poise writes: an exchange's request head for the backend, and the lines
that end its response head to the client (compiled with the hot path)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from poise.proxy.http import fasthead
from poise.proxy.http.headers import CHUNKED, CRLF

if TYPE_CHECKING:
    from poise.proxy.http.exchange import Exchange

# (Final: a C static when compiled, not a module dict lookup per call.)
join_parts: Final[Any] = fasthead.join_parts
_SP: Final = b" "
_HTTP11_CRLF: Final = b" HTTP/1.1\r\n"
_XFH: Final = b"x-forwarded-host: "
_CLOSE: Final = b"connection: close\r\n"
_KEEP_ALIVE: Final = b"connection: keep-alive\r\n"
# A response head's last lines (after the backend's fields), by framing and connection.
_CLOSE_END: Final = _CLOSE + CRLF
_KEEP_ALIVE_END: Final = _KEEP_ALIVE + CRLF
_CHUNKED_END: Final = CHUNKED + CRLF
_CHUNKED_CLOSE_END: Final = CHUNKED + _CLOSE + CRLF


def upstream_head(ex: Exchange) -> bytes:
    """``ex``'s request head as the backend gets it (HTTP/1.1, its fields, a Host if it
    had none, X-Forwarded-* unless the listener turns them off, a trace context per
    try, chunked framing for a chunked body); made again for each try."""
    client = ex.client
    host = ex.host
    if client.forwarded and ex.xff is None and host is not None and not ex.chunked \
            and ex.trace is None:
        # The common case in one C call: X-Forwarded-For/-Proto are per connection.
        return join_parts(ex.method, _SP, ex.target, _HTTP11_CRLF, ex.fields, _XFH,
                          host, CRLF, client.forwarded, CRLF)
    site = client.site
    parts = [ex.method, b" ", ex.target, b" HTTP/1.1\r\n"]
    parts += ex.fields
    if ex.trace is not None:
        parts.append(ex.trace.try_headers(ex.pool.backend.address, ex.attempts + 1))
    if host is None:
        parts.append(b"host: " + ex.pool.backend.address.encode() + CRLF)
    if site.forwarded_headers:
        peer = client.peer_ip
        parts += (b"x-forwarded-for: ", peer if ex.xff is None else ex.xff + b", " + peer,
                  CRLF, site.xfp)
        if host is not None:
            parts += (b"x-forwarded-host: ", host, CRLF)
    if ex.chunked:
        parts.append(CHUNKED)
    parts.append(CRLF)
    return b"".join(parts)


def response_end(close: bool, chunked: bool, http11: bool) -> bytes:
    """The last lines of a response head to the client, after the backend's fields:
    ``Transfer-Encoding: chunked`` when poise chunks the body, the Connection field
    when the connection closes (or stays open for an HTTP/1.0 client), the empty
    line."""
    if close:
        return _CHUNKED_CLOSE_END if chunked else _CLOSE_END
    if chunked:
        return _CHUNKED_END
    return CRLF if http11 else _KEEP_ALIVE_END
