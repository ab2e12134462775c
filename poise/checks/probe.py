"""The seam between the scheduler and the probes: one small :class:`Probe` protocol,
and the translation of connect errors into short result texts."""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable
from typing import Protocol

from poise.proxy.dial import tls_failure

# ``on_result(ok, reason)``: the outcome of one probe; ``reason`` is short human text
# ("ok 200", "status 503", "timeout", "connect refused", ...).
ResultCallback = Callable[[bool, str], None]


class Probe(Protocol):
    """Probes one backend, one probe at a time.

    After :meth:`run`, ``on_result`` (given at construction) is called exactly once —
    possibly before ``run`` returns — unless :meth:`close` is called first.  A probe
    never raises: every failure is a failed result with a reason.
    """

    def run(self) -> None:
        """Start one probe (the previous one has reported)."""
        ...

    def close(self) -> None:
        """Abandon any probe in flight without reporting it and release sockets and
        timers; idempotent.  ``run`` may be called again afterwards."""
        ...


_CONNECT_REASONS = {
    errno.ECONNREFUSED: "connect refused",
    errno.ETIMEDOUT: "connect timeout",
    errno.EHOSTUNREACH: "host unreachable",
    errno.ENETUNREACH: "network unreachable",
    errno.ECONNRESET: "connect reset",
}


def connect_failure(exc: BaseException) -> str:
    """Short text for an exception raised while opening a connection."""
    if isinstance(exc, socket.gaierror):
        return "dns error"
    if isinstance(exc, TimeoutError):
        return "connect timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "connect refused"
    tls = tls_failure(exc)      # (an ssl.SSLError is an OSError whose errno says nothing)
    if tls is not None:
        return tls
    if isinstance(exc, OSError):
        return connect_errno(exc.errno)
    return f"connect error: {type(exc).__name__}"


def connect_errno(code: int | None) -> str:
    """Short text for a connect's ``errno`` (``SO_ERROR`` or ``OSError.errno``)."""
    if code in _CONNECT_REASONS:
        return _CONNECT_REASONS[code]
    name = errno.errorcode.get(code or 0)
    return f"connect error: {name}" if name else "connect error"
