"""HTTP check over a kept-alive HTTP/1.1 connection.

:class:`HttpProbe` owns at most one connection to its backend and reuses it from probe
to probe while the backend allows keep-alive (Envoy's way: a thousand backends then
cost a thousand idle sockets, not a thousand connects a second).  A reused probe is a
write, one read callback and a parse — no Task, no new timer besides the deadline.

:class:`_Conn` is the ``asyncio.Protocol`` of one connection: its parser callbacks
only record what the response says; :meth:`_Conn.data_received` judges after the
parser returns and hands the verdict to the probe.
"""

from __future__ import annotations

import asyncio
import logging
from functools import partial

import httptools

from poise.checks.probe import ResultCallback, connect_failure
from poise.checks.settings import BODY_CAP, CheckSettings
from poise.core.backend import Backend
from poise.proxy.dial import dial

log = logging.getLogger("poise")


class HttpProbe:
    """``METHOD path HTTP/1.1`` to one backend; reports ``"ok <status>"`` or why not
    (``"status 503"``, ``"body mismatch"``, ``"body too large"``, ``"timeout"``,
    ``"connect refused"``, ``"connection closed"``, ``"bad response"``, ...).

    With ``settings.tls`` and/or ``settings.preamble`` the connection is opened as the
    cluster's traffic opens it (PROXY header, then TLS: :func:`poise.proxy.dial.dial`);
    a failed handshake fails the probe (``"certificate verify failed: ..."``).

    The deadline covers connect (and handshake), request and the complete response.  A connection is
    reopened only when the last one was closed or broken; a probe that times out closes
    its connection.  If a reused connection turns out to have been closed by the
    backend before answering (its idle timeout raced the probe), the request is retried
    once on a new connection within the same deadline.
    """

    __slots__ = ("_loop", "backend", "settings", "_on_result", "_request", "needle",
                 "head_only", "_conn", "_connecting", "_deadline", "_busy", "_retried")

    def __init__(self, backend: Backend, settings: CheckSettings, on_result: ResultCallback,
                 *, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.backend = backend
        self.settings = settings
        self._on_result = on_result
        host = settings.host or backend.address
        # Settings are validated printable ASCII, so this cannot inject a header.
        self._request = (f"{settings.method} {settings.path} HTTP/1.1\r\nHost: {host}\r\n"
                         "User-Agent: poise-health-check\r\nAccept: */*\r\n\r\n").encode()
        self.needle = settings.expect_body.encode() if settings.expect_body else None
        self.head_only = settings.method == "HEAD"
        self._conn: _Conn | None = None
        self._connecting: asyncio.Task | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._busy = False
        self._retried = False

    def run(self) -> None:
        loop = self._loop
        self._busy = True
        self._retried = False
        self._deadline = loop.call_at(loop.time() + self.settings.timeout, self._timed_out)
        conn = self._conn
        if conn is not None and conn.usable:
            conn.send(self._request)
        else:
            self._open()

    def close(self) -> None:
        self._busy = False
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if self._connecting is not None:
            self._connecting.cancel()
            self._connecting = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    @property
    def connected(self) -> bool:
        """Whether a connection is open (idle or busy)."""
        return self._conn is not None and self._conn.usable

    # -- connecting (the slow path: one Task per new connection) ----------------------

    def _open(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        loop = self._loop
        b = self.backend
        s = self.settings
        try:
            if s.tls is None and not s.preamble:
                connecting = loop.create_connection(partial(_Conn, self), b.host, b.port)
            else:
                connecting = dial(loop, partial(_Conn, self), b.host, b.port, tls=s.tls,
                                  server_name=s.server_name, preamble=s.preamble,
                                  handshake_timeout=s.timeout)
            task = loop.create_task(connecting)
        except Exception as e:
            self._finish(False, connect_failure(e))
            return
        self._connecting = task
        task.add_done_callback(self._connected)

    def _connected(self, task: asyncio.Task) -> None:
        if task.cancelled():
            return
        exc = task.exception()      # retrieved even when abandoned: no "never retrieved"
        if task is not self._connecting:
            if exc is None:         # finished just as it was abandoned
                task.result()[0].close()
            return
        self._connecting = None
        if exc is not None:
            self._finish(False, connect_failure(exc))
            return
        conn = self._conn = task.result()[1]
        if conn.usable:
            conn.send(self._request)
        else:                       # the backend hung up before we asked anything
            self._conn = None
            self._finish(False, "connection closed")

    # -- what the connection reports ---------------------------------------------------

    def _answered(self, conn: _Conn, ok: bool, reason: str) -> None:
        if conn is not self._conn or not self._busy:
            return
        if not conn.usable:
            self._conn = None
        self._finish(ok, reason)

    def _broken(self, conn: _Conn) -> None:
        """``conn`` closed or failed while a request was outstanding."""
        if conn is not self._conn:
            return
        self._conn = None
        if not self._busy:
            return
        if conn.reused and not conn.got_data and not self._retried:
            self._retried = True
            self._open()
            return
        self._finish(False, "truncated response" if conn.got_data else "connection closed")

    def _forget(self, conn: _Conn) -> None:
        """``conn`` closed while idle: the next probe opens a new one."""
        if conn is self._conn:
            self._conn = None

    def _timed_out(self) -> None:
        self._deadline = None
        if not self._busy:
            return
        if self._connecting is not None:
            self._connecting.cancel()
            self._connecting = None
            reason = "connect timeout"
        else:
            reason = "timeout"
        if self._conn is not None:
            self._conn.abort()
            self._conn = None
        self._finish(False, reason)

    def _finish(self, ok: bool, reason: str) -> None:
        self._busy = False
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._on_result(ok, reason)

    def __repr__(self) -> str:
        state = ("connecting" if self._connecting else
                 "busy" if self._busy else "idle" if self.connected else "closed")
        return f"<HttpProbe {self.backend.address} {state}>"


class _Conn(asyncio.Protocol):
    """One HTTP/1.1 connection of an :class:`HttpProbe`, one exchange at a time."""

    __slots__ = ("probe", "transport", "parser", "usable", "waiting", "exchanges", "reused",
                 "got_data", "status", "informational", "framed", "keep", "complete", "stop",
                 "desync", "ok", "reason", "body", "body_len")

    def __init__(self, probe: HttpProbe) -> None:
        self.probe = probe
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.usable = False
        self.waiting = False        # a request is outstanding
        self.exchanges = 0
        self.reused = False
        self._reset()

    def _reset(self) -> None:
        self.got_data = False
        self.status = 0
        self.informational = False
        self.framed = False         # Content-Length or chunked: EOF cannot end the body
        self.keep = False
        self.complete = False
        self.stop = False           # verdict reached mid-body: stop reading, close
        self.desync = False         # bytes beyond the response: unsafe to reuse
        self.ok: bool | None = None
        self.reason = ""
        self.body = bytearray()
        self.body_len = 0

    def send(self, request: bytes) -> None:
        self._reset()
        self.reused = self.exchanges > 0
        self.waiting = True
        try:
            self.transport.write(request)
        except Exception:           # closed under us (uvloop raises; asyncio logs)
            self.usable = False
            self.waiting = False
            self.probe._broken(self)

    # -- asyncio callbacks -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.usable = True

    def data_received(self, data: bytes) -> None:
        if not self.waiting:        # bytes nobody asked for: the connection is unsafe
            self.close()
            return
        self.got_data = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._judge(False, f"status {self.status or 101}")
            return
        except httptools.HttpParserError as e:
            if isinstance(e, httptools.HttpParserCallbackError) and e.__context__ is not None:
                log.error("bug while parsing a health check response", exc_info=e.__context__)
            if self.complete:       # junk after a complete response: judge the response
                self._judge(self.ok, self.reason)
            else:
                self._judge(False, "bad response")
            return
        if self.complete:
            if self.probe.head_only:    # httptools would wait for a HEAD's body
                self.parser = httptools.HttpResponseParser(self)
            self._judge(self.ok, self.reason, keep=self.keep and not self.desync)
        elif self.stop:
            self._judge(self.ok, self.reason)

    def eof_received(self) -> bool:
        self.usable = False
        if self.waiting and self.status and not self.complete and not self.framed:
            # A body delimited by the connection's close ends here.
            if self.ok is None:
                self.ok, self.reason = False, "body mismatch"
            self._judge(self.ok, self.reason)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.usable = False
        if self.waiting:
            self.waiting = False
            self.probe._broken(self)
        else:
            self.probe._forget(self)

    # -- parser callbacks: record, don't act ------------------------------------------

    def on_message_begin(self) -> None:
        if self.complete:
            self.desync = True      # a second response nobody asked for

    def on_header(self, name: bytes, value: bytes) -> None:
        # Only two names matter; their lengths rule out nearly all others cheaply.
        n = len(name)
        if n == 14 and name.lower() == b"content-length":
            self.framed = True
        elif n == 17 and name.lower() == b"transfer-encoding" and b"chunked" in value.lower():
            self.framed = True

    def on_headers_complete(self) -> None:
        if self.complete:
            return                  # of a response nobody asked for (desync is set)
        parser = self.parser
        status = parser.get_status_code()
        if status < 200:
            self.informational = True
            self.framed = False
            return
        self.status = status
        if not parser.get_http_version().startswith("1."):
            self.ok, self.reason, self.stop = False, "not HTTP/1.x", True
            return
        self.keep = parser.should_keep_alive()
        probe = self.probe
        if not probe.settings.status_ok(status):
            self.ok, self.reason = False, f"status {status}"
        elif probe.needle is None:
            self.ok, self.reason = True, f"ok {status}"
        if probe.head_only:
            self._complete()

    def on_body(self, body: bytes) -> None:
        if self.informational:
            return
        if self.complete:
            self.desync = True      # body bytes after a HEAD response
            return
        self.body_len += len(body)
        if self.ok is None:         # looking for the expected substring
            needle = self.probe.needle
            buf = self.body
            start = max(0, len(buf) - len(needle) + 1)
            buf += body[:BODY_CAP - len(buf)]
            if buf.find(needle, start) >= 0:
                self.ok, self.reason = True, f"ok {self.status}"
                self.stop = True    # found: the rest of the body is not needed
                self.body = bytearray()
            elif self.body_len > BODY_CAP:
                self.ok, self.reason = False, "body too large"
        if self.body_len > BODY_CAP:
            self.stop = True

    def on_message_complete(self) -> None:
        if self.informational:
            self.informational = False
        elif not self.complete:
            self._complete()

    def _complete(self) -> None:
        self.complete = True
        if self.ok is None:
            self.ok, self.reason = False, "body mismatch"

    # -- decisions ---------------------------------------------------------------------

    def _judge(self, ok: bool | None, reason: str, *, keep: bool = False) -> None:
        self.waiting = False
        self.exchanges += 1
        if not keep:
            self.close()
        self.probe._answered(self, bool(ok), reason)

    def close(self) -> None:
        self.usable = False
        self.waiting = False
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.usable = False
        self.waiting = False
        if self.transport is not None:
            self.transport.abort()

    def __repr__(self) -> str:
        state = "busy" if self.waiting else ("idle" if self.usable else "closed")
        return f"<_Conn {self.probe.backend.address} {state}>"
