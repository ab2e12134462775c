"""Header rewriting between client and backend: hop-by-hop removal, re-framing,
X-Forwarded-*.

Heads are rebuilt from the parsed ``(name, value)`` pairs because every hop-by-hop
header must go and the body may be re-framed; names and values are passed through as
bytes, untouched.
"""

from __future__ import annotations

from typing import Final

# Hop-by-hop headers (RFC 9110 §7.6.1) plus the framing header we always re-derive.
HOP_BY_HOP: Final = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
    b"transfer-encoding", b"upgrade", b"proxy-authenticate", b"proxy-authorization",
})
# Names a client or backend may list in Connection without us removing them: framing
# and routing would otherwise become ambiguous.
PROTECTED: Final = frozenset({b"content-length", b"transfer-encoding", b"host"})

CRLF: Final = b"\r\n"
CHUNKED: Final = b"transfer-encoding: chunked\r\n"
LAST_CHUNK: Final = b"0\r\n\r\n"


def connection_tokens(values: list[bytes]) -> frozenset[bytes]:
    """Lower-cased option names from every Connection header value, minus protected names."""
    tokens = set()
    for value in values:
        for token in value.split(b","):
            token = token.strip().lower()
            if token:
                tokens.add(token)
    return frozenset(tokens - PROTECTED)


def split_block(block: bytes) -> list[bytes]:
    """Header lines ("name: value\r\n" each, as h1head.c's response blocks have them)
    as flat name, ": ", value, CRLF groups."""
    fields: list[bytes] = []
    for line in block.split(CRLF)[:-1]:
        name, _, value = line.partition(b": ")
        fields += (name, b": ", value, CRLF)
    return fields


def drop_listed(fields: list[bytes], connection_values: list[bytes]) -> list[bytes]:
    """``fields`` (flat name, ": ", value, CRLF groups) without the headers that the
    Connection header values nominate (framing headers and Host are never dropped)."""
    names = connection_tokens(connection_values) - {b"close", b"keep-alive"}
    if not names:
        return fields
    out: list[bytes] = []
    for i in range(0, len(fields), 4):
        if fields[i].lower() not in names:
            out += fields[i:i + 4]
    return out


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body."""
    return b"%x\r\n%b\r\n" % (len(data), data)


_REASONS: Final = {
    100: b"Continue", 101: b"Switching Protocols", 103: b"Early Hints",
    200: b"OK", 201: b"Created", 202: b"Accepted", 204: b"No Content",
    206: b"Partial Content", 301: b"Moved Permanently", 302: b"Found",
    303: b"See Other", 304: b"Not Modified", 307: b"Temporary Redirect",
    308: b"Permanent Redirect", 400: b"Bad Request", 401: b"Unauthorized",
    403: b"Forbidden", 404: b"Not Found", 405: b"Method Not Allowed",
    408: b"Request Timeout", 409: b"Conflict", 410: b"Gone", 411: b"Length Required",
    413: b"Content Too Large", 414: b"URI Too Long", 415: b"Unsupported Media Type",
    417: b"Expectation Failed", 429: b"Too Many Requests",
    431: b"Request Header Fields Too Large", 500: b"Internal Server Error",
    501: b"Not Implemented", 502: b"Bad Gateway", 503: b"Service Unavailable",
    504: b"Gateway Timeout", 505: b"HTTP Version Not Supported",
}
STATUS_LINES: Final[dict[int, bytes]] = {}


def status_line(code: int) -> bytes:
    """``HTTP/1.1 <code> <reason>\\r\\n``, cached per code."""
    line = STATUS_LINES.get(code)
    if line is None:
        line = b"HTTP/1.1 %d %b\r\n" % (code, _REASONS.get(code, b"Status"))
        STATUS_LINES[code] = line
    return line


def body_slice(data: bytes, pos: int, left: int) -> tuple[bytes, int]:
    """The next body bytes in ``data[pos:]``, at most ``left`` of them, and the offset
    where they end (for Content-Length bodies framed by the fast path)."""
    end = pos + left
    n = len(data)
    if end >= n:
        return (data[pos:] if pos else data), n
    return data[pos:end], end
