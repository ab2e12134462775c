"""TCP check: the backend is up if a connect completes within the timeout.

It needs no transport: a non-blocking socket, ``connect_ex`` and one writer callback
for the completion, then an immediate close.  Only a backend named by host name (not
an IP literal) costs a Task per probe, for ``loop.getaddrinfo``.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import struct

from poise.checks.probe import ResultCallback, connect_errno, connect_failure
from poise.checks.settings import CheckSettings
from poise.core.backend import Backend

# Close with RST, not FIN: the prober would otherwise leave a TIME_WAIT socket behind
# for every probe (HAProxy's checks do the same).
_LINGER_RST = struct.pack("ii", 1, 0)


class TcpProbe:
    """Connect-only probe of one backend; reports ``"ok"`` or a connect failure
    (``"connect refused"``, ``"connect timeout"``, ...)."""

    __slots__ = ("_loop", "_backend", "_timeout", "_on_result", "_addr", "_sock", "_fd",
                 "_deadline", "_resolving")

    def __init__(self, backend: Backend, settings: CheckSettings, on_result: ResultCallback,
                 *, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._backend = backend
        self._timeout = settings.timeout
        self._on_result = on_result
        self._addr = _numeric_address(backend.host, backend.port)
        self._sock: socket.socket | None = None
        self._fd = -1
        self._deadline: asyncio.TimerHandle | None = None
        self._resolving: asyncio.Task | None = None

    def run(self) -> None:
        loop = self._loop
        self._deadline = loop.call_at(loop.time() + self._timeout, self._timed_out)
        if self._addr is not None:
            self._connect(*self._addr)
            return
        task = self._resolving = loop.create_task(loop.getaddrinfo(
            self._backend.host, self._backend.port, type=socket.SOCK_STREAM))
        task.add_done_callback(self._resolved)

    def close(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if self._resolving is not None:
            self._resolving.cancel()
            self._resolving = None
        self._drop()

    # -- steps -------------------------------------------------------------------------

    def _resolved(self, task: asyncio.Task) -> None:
        if task.cancelled():
            return
        exc = task.exception()      # retrieved even when abandoned: no "never retrieved"
        if task is not self._resolving:
            return                  # abandoned (timed out or closed)
        self._resolving = None
        if exc is not None:
            self._finish(False, connect_failure(exc))
            return
        infos = task.result()
        if not infos:
            self._finish(False, "dns error")
            return
        family, _, _, _, sockaddr = infos[0]
        self._connect(family, sockaddr)

    def _connect(self, family: int, sockaddr: tuple) -> None:
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as e:
            self._finish(False, f"socket error: {errno.errorcode.get(e.errno or 0, e)}")
            return
        self._sock = sock
        try:
            sock.setblocking(False)
            err = sock.connect_ex(sockaddr)
            if err in _IN_PROGRESS:
                self._fd = sock.fileno()
                self._loop.add_writer(self._fd, self._writable)
                return
        except OSError as e:
            err = e.errno or errno.EIO
        self._drop()
        self._finish(err == 0, "ok" if err == 0 else connect_errno(err))

    def _writable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        try:
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except OSError as e:
            err = e.errno or errno.EIO
        self._drop()
        self._finish(err == 0, "ok" if err == 0 else connect_errno(err))

    def _timed_out(self) -> None:
        self._deadline = None
        reason = "connect timeout"
        if self._resolving is not None:
            self._resolving.cancel()
            self._resolving = None
            reason = "dns timeout"
        self._drop()
        self._finish(False, reason)

    def _finish(self, ok: bool, reason: str) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._on_result(ok, reason)

    def _drop(self) -> None:
        sock = self._sock
        if sock is None:
            return
        self._sock = None
        if self._fd >= 0:
            self._loop.remove_writer(self._fd)
            self._fd = -1
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        except OSError:
            pass                    # e.g. the connect failed: nothing to linger over
        sock.close()

    def __repr__(self) -> str:
        state = "connecting" if self._sock or self._resolving else "idle"
        return f"<TcpProbe {self._backend.address} {state}>"


_IN_PROGRESS = frozenset({errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN})


def _numeric_address(host: str, port: int) -> tuple[int, tuple] | None:
    """``(family, sockaddr)`` for an IP literal, else None (the name needs resolving).
    ``AI_NUMERICHOST`` makes this a parse, never a blocking lookup."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_NUMERICHOST)
    except (socket.gaierror, UnicodeError):
        return None
    family, _, _, _, sockaddr = infos[0]
    return family, sockaddr
