"""Access log lines: JSON lines and the Combined Log Format, built by hand for speed.

A line costs a few microseconds (callgrind: about 19,000 instructions for JSON, 11,000
for Combined; timings in ``bench/micro_access_log.py``) next to a request's 15–40 µs, so
nothing here builds a dict or calls ``json.dumps`` per request: the line is one
``bytes % tuple`` over a template, and the bytes that came from the client are joined and
checked in one C loop for the common case of printable ASCII without ``"`` or ``\\``.
Only a line with something to escape takes the slow path.  The clock is read once per
line; the date is formatted once per second.

Escaping — every line is pure printable ASCII plus its final ``\\n``, whatever the client
sent, so any line-oriented tool splits it right:

- JSON: client bytes are decoded as UTF-8, a byte that is not part of valid UTF-8 becomes
  U+FFFD (as Go, browsers and Caddy do; the Combined format is the lossless one); then
  ``"``, ``\\``, control characters and everything outside ASCII are escaped the JSON way
  (``\\"``, ``\\\\``, ``\\n``, ``\\u00e9``).  An empty method or path (a request that could
  not be parsed) is ``null``, as are an absent ``user_agent``/``referer``, ``upstream``
  and ``trace_id``.
- Combined: nginx's rule — ``"``, ``\\``, control bytes, DEL and bytes ≥ 0x80 become
  ``\\xHH`` (upper-case hex), so a quoted field never ends early and the original bytes
  can be recovered.  Empty or absent values are ``-``; a request with neither method nor
  path is ``"-"``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from json.encoder import encode_basestring_ascii
from typing import Any, Final, Protocol

# Printable ASCII but the two bytes that would end or escape a quoted string.
_SAFE: Final = bytes(c for c in range(0x20, 0x7F) if c not in (0x22, 0x5C))
# Maps every safe byte to itself and every other byte to another one: ``v.translate(_KEEP)
# == v`` says "nothing to escape" with the cheapest C loop bytes have (no table to build,
# and the unchanged input itself comes back, so the comparison is by identity).
_KEEP: Final = bytes(c if c in _SAFE else c ^ 0x80 for c in range(256))
_CLF_ESCAPED: Final = tuple(bytes([c]) if c in _SAFE else b"\\x%02X" % c for c in range(256))
_MONTHS: Final = (b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun",
           b"Jul", b"Aug", b"Sep", b"Oct", b"Nov", b"Dec")
# The protocol versions as logged, by (HTTP/2, HTTP/1.1) of the request.
HTTP10: Final = b"HTTP/1.0"
HTTP11: Final = b"HTTP/1.1"
HTTP2: Final = b"HTTP/2.0"
# The token cache (cluster and backend names) is cleared past this many entries, so a
# discovery source that keeps inventing addresses cannot grow it without bound.
_TOKENS_MAX: Final = 4096

def _plain_template(trace_null: bool, ua_null: bool, referer_null: bool) -> bytes:
    """The JSON line for values that need no escaping.  A null field still takes its
    (empty) argument, as ``%.0b``, so that all eight variants take the same tuple."""
    def text(null: bool) -> bytes:
        return b"null%.0b" if null else b'"%b"'
    return (b'{"ts":"%b.%03dZ","listener":%b,"client":"%b","method":"%b","path":"%b",'
            b'"protocol":"%b","status":%d,"bytes_sent":%d,"duration_ms":%.3f,"cluster":%b,'
            b'"upstream":%b,"attempts":%d,"trace_id":' + text(trace_null) +
            b',"user_agent":' + text(ua_null) + b',"referer":' + text(referer_null) + b"}\n")


# Indexed by (trace_id is None) | (user_agent is None) << 1 | (referer is None) << 2.
_JSON_PLAIN: Final = tuple(_plain_template(bool(i & 1), bool(i & 2), bool(i & 4)) for i in range(8))

_JSON_ANY: Final = (
    b'{"ts":"%b.%03dZ","listener":%b,"client":%b,"method":%b,"path":%b,"protocol":"%b",'
    b'"status":%d,"bytes_sent":%d,"duration_ms":%.3f,"cluster":%b,"upstream":%b,'
    b'"attempts":%d,"trace_id":%b,"user_agent":%b,"referer":%b}\n')
_CLF: Final = b'%b - - [%b] "%b %b %b" %d %d "%b" "%b"\n'
_CLF_NO_REQUEST: Final = b'%b - - [%b] "-" %d %d "%b" "%b"\n'

_time: Final = time.time


def json_text(value: str) -> bytes:
    """``value`` as a JSON string token (quotes included), ASCII only."""
    return encode_basestring_ascii(value).encode("ascii")


def json_bytes(value: bytes | None) -> bytes:
    """Client bytes as a JSON token: ``null`` for None, else a string (see module doc)."""
    if value is None:
        return b"null"
    if value.translate(_KEEP) == value:
        return b'"' + value + b'"'
    return json_text(value.decode("utf-8", "replace"))


def _trace_token(trace_id: str | None) -> bytes:
    if trace_id is None:
        return b"null"
    if trace_id.isascii() and trace_id.isalnum():
        return b'"' + trace_id.encode("ascii") + b'"'
    return json_text(trace_id)


def clf_escape(value: bytes) -> bytes:
    """``value`` escaped as nginx escapes log variables (lossless, printable ASCII)."""
    if value.translate(_KEEP) == value:
        return value
    return b"".join([_CLF_ESCAPED[c] for c in value])


class LineBuffer(Protocol):
    """Where a logger appends its lines (an :class:`.access_writer.Sink`)."""

    buf: list[bytes]
    size: int


class AccessLogger:
    """The access log of one listener: formats a line per response into its sink's buffer.

    Obtained from :meth:`AccessLogs.for_listener`; the format and sink may change in place
    on a reload (the next line uses the new ones)."""

    __slots__ = ("listener", "format", "_json", "_sink", "_flush", "_flush_bytes",
                 "_listener_token", "_tokens", "_second", "_iso", "_clf")

    def __init__(self, listener: str, fmt: str, sink: LineBuffer, flush: Callable[[Any], None],
                 flush_bytes: int) -> None:
        self.listener = listener
        self._listener_token = json_text(listener)
        self._flush = flush
        self._flush_bytes = flush_bytes
        self._tokens: dict[str | None, bytes] = {None: b"null"}
        self._second = -1
        self._iso = self._clf = b""
        self.format = fmt
        self._json = fmt == "json"
        self._sink = sink

    def _use(self, fmt: str, sink: LineBuffer) -> None:
        self.format = fmt
        self._json = fmt == "json"
        self._sink = sink

    def __repr__(self) -> str:
        return f"<AccessLogger {self.listener} {self.format}>"

    def log(self, client: bytes, method: bytes, path: bytes, version: bytes, status: int,
            bytes_sent: int, duration: float, cluster: str, upstream: str | None,
            attempts: int, trace_id: str | None, referer: bytes | None,
            user_agent: bytes | None) -> None:
        """Append one line for a response (timestamped now) to the buffer; never does I/O.

        ``version`` is the protocol as logged (``HTTP_VERSIONS``); ``duration`` is in
        seconds; ``method``/``path`` are ``b""`` when the request could not be parsed; ``referer``/``user_agent`` None when the header was absent."""
        now = _time()
        second = int(now)
        if second != self._second:
            self._new_second(second)
        if self._json:
            trace = b"" if trace_id is None else trace_id.encode("utf-8", "replace")
            given = b"".join((client, method, path, referer or b"", user_agent or b"", trace))
            if method and path and given.translate(_KEEP) == given:
                tokens = self._tokens
                line = _JSON_PLAIN[(trace_id is None) | (user_agent is None) << 1
                                   | (referer is None) << 2] % (
                    self._iso, int((now - second) * 1000.0), self._listener_token, client,
                    method, path, version, status, bytes_sent,
                    duration * 1000.0, tokens.get(cluster) or self._token(cluster),
                    tokens.get(upstream) or self._token(upstream), attempts, trace,
                    user_agent or b"", referer or b"")
            else:
                line = self._escaped_json(now - second, client, method, path, version, status,
                                          bytes_sent, duration, cluster, upstream, attempts,
                                          trace_id, referer, user_agent)
        else:
            given = b"".join((client, method, path, referer or b"", user_agent or b""))
            if method and path and given.translate(_KEEP) == given:
                line = _CLF % (client or b"-", self._clf, method, path,
                               version, status, bytes_sent,
                               referer or b"-", user_agent or b"-")
            else:
                line = self._escaped_combined(client, method, path, version, status,
                                              bytes_sent, referer, user_agent)
        sink = self._sink
        sink.buf.append(line)
        sink.size += len(line)
        if sink.size >= self._flush_bytes:
            self._flush(sink)

    def _escaped_json(self, fraction: float, client: bytes, method: bytes, path: bytes,
                      version: bytes, status: int, bytes_sent: int, duration: float,
                      cluster: str, upstream: str | None, attempts: int,
                      trace_id: str | None, referer: bytes | None,
                      user_agent: bytes | None) -> bytes:
        tokens = self._tokens
        return _JSON_ANY % (
            self._iso, int(fraction * 1000.0), self._listener_token, json_bytes(client),
            json_bytes(method or None), json_bytes(path or None),
            version, status, bytes_sent, duration * 1000.0,
            tokens.get(cluster) or self._token(cluster),
            tokens.get(upstream) or self._token(upstream), attempts, _trace_token(trace_id),
            json_bytes(user_agent), json_bytes(referer))

    def _escaped_combined(self, client: bytes, method: bytes, path: bytes, version: bytes,
                          status: int, bytes_sent: int, referer: bytes | None,
                          user_agent: bytes | None) -> bytes:
        client = clf_escape(client) or b"-"
        referer = clf_escape(referer) if referer else b"-"
        user_agent = clf_escape(user_agent) if user_agent else b"-"
        if not method and not path:
            return _CLF_NO_REQUEST % (client, self._clf, status, bytes_sent, referer, user_agent)
        return _CLF % (client, self._clf, clf_escape(method) or b"-", clf_escape(path) or b"-",
                       version, status, bytes_sent, referer, user_agent)

    def _token(self, name: str | None) -> bytes:
        tokens = self._tokens
        if len(tokens) >= _TOKENS_MAX:
            tokens.clear()
            tokens[None] = b"null"
        token = tokens[name] = b"null" if name is None else json_text(name)
        return token

    def _new_second(self, second: int) -> None:
        t = time.gmtime(second)
        self._second = second
        self._iso = b"%04d-%02d-%02dT%02d:%02d:%02d" % (
            t.tm_year, t.tm_mon, t.tm_mday, t.tm_hour, t.tm_min, t.tm_sec)
        self._clf = b"%02d/%b/%04d:%02d:%02d:%02d +0000" % (
            t.tm_mday, _MONTHS[t.tm_mon - 1], t.tm_year, t.tm_hour, t.tm_min, t.tm_sec)
