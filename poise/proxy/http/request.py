"""Request-head inspection: the checks httptools (llhttp) does not make, done as each
header is parsed, plus the forwardable header fields.

llhttp already rejects CL+TE, duplicate or malformed Content-Length, obs-fold, bare CR,
NUL/CTL in values, invalid names and malformed chunk framing; this module adds the
rules a proxy needs on top: one Host, only ``chunked`` as Transfer-Encoding and never
on HTTP/1.0, the body size limit, and hop-by-hop removal.
"""

from __future__ import annotations

from typing import Final

from poise.errors import BadRequest, PayloadTooLarge
from poise.proxy.http.headers import CRLF, HOP_BY_HOP, drop_listed

_SPECIAL: Final = frozenset({
    b"host", b"content-length", b"transfer-encoding", b"connection", b"expect",
    b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host",
}) | HOP_BY_HOP
# Lower-cased first letters of the names above: other headers skip lower-casing.
WATCH_FIRST: Final = frozenset(name[0] for name in _SPECIAL)


class RequestHead:
    """Accumulates one request head: forwardable fields (flat ``name, ": ", value,
    CRLF`` groups, hop-by-hop and X-Forwarded-* removed) and the facts the proxy needs.

    The base of :class:`~poise.proxy.http.exchange.Exchange`: a request's exchange
    starts life as its head being parsed, and ``Exchange.__init__`` sets these slots.
    ClientConnection.on_header sends names whose first letter is in WATCH_FIRST to
    ``add_watched`` and appends the rest to ``fields`` itself.
    """

    __slots__ = ("fields", "host", "content_length", "chunked", "te", "expect_continue",
                 "xff", "connection", "upgrade", "max_body")
    fields: list[bytes]
    host: bytes | None
    content_length: int
    chunked: bool
    te: bool
    expect_continue: bool
    xff: bytes | None
    connection: list[bytes] | None
    upgrade: bytes | None       # the Upgrade header's value (None: none)
    max_body: int

    def add_watched(self, name: bytes, value: bytes) -> None:
        """A header whose name starts like one that needs attention (WATCH_FIRST)."""
        low = name.lower()
        if low not in _SPECIAL:
            self.fields += (name, b": ", value, CRLF)
        elif low == b"host":
            if self.host is not None:
                raise BadRequest("duplicate Host header")
            self.host = value
            self.fields += (name, b": ", value, CRLF)
        elif low == b"content-length":
            self.set_content_length(int(value))   # llhttp has checked it is digits only
            self.fields += (name, b": ", value, CRLF)
        elif low == b"transfer-encoding":
            if value.strip().lower() != b"chunked":
                raise BadRequest("only 'Transfer-Encoding: chunked' is accepted")
            self.te = self.chunked = True
        elif low == b"expect":
            if value.strip().lower() == b"100-continue":
                self.expect_continue = True
                self.fields += (name, b": ", value, CRLF)
        elif low == b"x-forwarded-for":
            self.xff = value if self.xff is None else self.xff + b", " + value
        elif low == b"connection":
            self.connection = (self.connection or []) + [value]
        elif low == b"upgrade":
            self.upgrade = value
        # other hop-by-hop and X-Forwarded-Proto/-Host: dropped, poise sets its own

    def take_sorted(self, fields: list[bytes], watched: list[bytes] | None, host: bytes | None,
                    expect_continue: bool, content_length: int) -> None:
        """A head's fields as the C head parser sorted them (h1head.c): what
        ``add_watched`` and ClientConnection.on_header make of them one at a time.
        Only ``watched`` (flat name, value pairs: Connection, X-Forwarded-For; None:
        neither) still goes through add_watched.  Raises as they do."""
        self.fields = fields
        self.host = host
        self.expect_continue = expect_continue
        if content_length >= 0:
            self.set_content_length(content_length)
        if watched is not None:
            for i in range(0, len(watched), 2):
                self.add_watched(watched[i], watched[i + 1])

    def set_content_length(self, length: int) -> None:
        """The request's Content-Length. Raises PayloadTooLarge over ``max_body``."""
        self.content_length = length
        if length > self.max_body:
            raise PayloadTooLarge(f"Content-Length {length} exceeds {self.max_body}")

    def finish_head(self, http11: bool) -> None:
        """Checks that need the whole head. Raises BadRequest."""
        if not http11:
            if self.te:
                raise BadRequest("Transfer-Encoding is not allowed in HTTP/1.0")
            self.expect_continue = False
        elif self.host is None:
            raise BadRequest("HTTP/1.1 request without Host")
        if self.connection is not None:
            self.fields = drop_listed(self.fields, self.connection)

    def pairs(self) -> list[tuple[bytes, bytes]]:
        """Forwardable ``(name, value)`` pairs (for header-matching routes)."""
        f = self.fields
        return [(f[i], f[i + 2]) for i in range(0, len(f), 4)]

    def take_trace_context(self) -> tuple[bytes | None, bytes | None]:
        """Remove ``traceparent`` and ``tracestate`` from the forwardable fields and
        return their values (the last traceparent, the tracestate lines joined; None
        when absent).  Only for traced
        listeners: poise sends its own per try."""
        f = self.fields
        traceparent: bytes | None = None
        tracestate: bytes | None = None
        kept: list[bytes] = []
        for i in range(0, len(f), 4):
            name = f[i]
            if name[:5].lower() == b"trace":
                low = name.lower()
                if low == b"traceparent":
                    traceparent = f[i + 2]
                    continue
                if low == b"tracestate":    # (several are one list, in order)
                    value = f[i + 2]
                    tracestate = value if tracestate is None else tracestate + b"," + value
                    continue
            kept += f[i:i + 4]
        self.fields = kept
        return traceparent, tracestate

    def set_host(self, host: bytes) -> None:
        """Replace Host (absolute-form request targets carry their own authority)."""
        f = self.fields
        kept: list[bytes] = []
        for i in range(0, len(f), 4):
            if f[i].lower() != b"host":
                kept += f[i:i + 4]
        kept += (b"host", b": ", host, CRLF)
        self.fields = kept
        self.host = host


def origin_form(target: bytes, head: RequestHead, method: bytes) -> bytes:
    """Absolute-form (``http://host/path``) → origin-form; its authority becomes Host."""
    if target == b"*" and method == b"OPTIONS":
        return target
    scheme, sep, rest = target.partition(b"://")
    if not sep or scheme.lower() not in (b"http", b"https"):
        raise BadRequest("unsupported request target")
    authority, slash, path = rest.partition(b"/")
    if not authority:
        raise BadRequest("absolute URI without host")
    head.set_host(authority)
    return slash + path if slash else b"/"
