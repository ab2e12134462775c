"""Opening a connection to a backend with a PROXY header and/or TLS, and saying why
a TLS handshake failed.

A PROXY protocol header comes before everything else on the connection, TLS handshake
included, so it cannot be written through a TLS transport. :func:`dial` therefore
connects a plain socket, sends the header on it, and only then hands the socket to the
event loop (with TLS if asked). Without a header it is ``loop.create_connection``.

Used by the upstream pools (new connections only: the request path never gets here)
and by the health checks, so that a probe reaches a backend exactly as traffic does.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

from poise.errors import UpstreamConnectError, UpstreamConnectTimeout

log = logging.getLogger("poise")

# A handshake failure is logged at most this often per backend and reason (seconds):
# a wrong CA fails every connect, and the reason is the same each time.
_WARN_EVERY = 10.0
# (backend, reason) → when it was last logged (monotonic). Cleared past this size.
_warned: dict[tuple[str, str], float] = {}
_WARNED_MAX = 4096


async def dial(loop: asyncio.AbstractEventLoop, factory: Callable[[], Any],
               host: str, port: int, *, tls: ssl.SSLContext | None = None,
               server_name: str | None = None, preamble: bytes = b"",
               handshake_timeout: float | None = None) -> tuple[Any, Any]:
    """Connect to ``host:port``, send ``preamble`` (a PROXY header; ``b""``: none) in
    the clear, then run TLS with ``tls`` if given, verifying ``server_name`` (also the
    SNI name sent; an IP address is verified but not sent, as TLS wants).

    Returns ``(transport, protocol)`` like ``loop.create_connection``; the protocol's
    ``connection_made`` runs once, after the handshake. Raises OSError (``ssl.SSLError``
    for a failed handshake: see :func:`tls_failure`); the caller bounds the whole with
    its own timeout (``handshake_timeout`` only caps the handshake).
    """
    hs_timeout = max(handshake_timeout, 0.001) if tls is not None and handshake_timeout \
        else None
    name = (server_name or host) if tls is not None else None
    if not preamble:
        return await loop.create_connection(  # type: ignore[type-var]
            factory, host, port, ssl=tls, server_hostname=name,
            ssl_handshake_timeout=hs_timeout)
    sock = await _connected(loop, host, port)
    try:
        await loop.sock_sendall(sock, preamble)
    except BaseException:
        sock.close()
        raise
    # (From here the loop owns the socket, and closes it if this fails.)
    return await loop.create_connection(  # type: ignore[type-var]
        factory, sock=sock, ssl=tls, server_hostname=name, ssl_handshake_timeout=hs_timeout)


async def _connected(loop: asyncio.AbstractEventLoop, host: str, port: int) -> socket.socket:
    """A non-blocking socket connected to ``host:port`` (each address of a name in turn,
    as ``create_connection`` does; TCP_NODELAY set)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_NUMERICHOST)  # a parse, never a lookup
    except (socket.gaierror, UnicodeError):
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    error: OSError | None = None
    for family, kind, proto, _, address in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await loop.sock_connect(sock, address)
            return sock
        except OSError as e:
            sock.close()
            error = e
        except BaseException:
            sock.close()
            raise
    raise error or OSError(f"no address for {host}")


def tls_failure(exc: BaseException) -> str | None:
    """Short text for a failed TLS handshake (``"certificate verify failed: ..."``,
    ``"TLS handshake failed: ..."``), or None when ``exc`` is not a TLS error."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message or exc.reason}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed: {exc.reason or exc.strerror or type(exc).__name__}"
    return None


def warn_tls(address: str, reason: str) -> None:
    """Log a handshake failure with ``address``, once per ``_WARN_EVERY`` seconds per
    backend and reason (it is a configuration problem: operators must see it, but
    not once per request)."""
    now = time.monotonic()
    key = (address, reason)
    last = _warned.get(key)
    if last is not None and now - last < _WARN_EVERY:
        return
    if len(_warned) >= _WARNED_MAX:
        _warned.clear()
    _warned[key] = now
    log.warning("TLS to backend %s failed: %s", address, reason)


def connect_error(e: BaseException, address: str) -> Any:
    """The poise error for a failure opening a connection to backend ``address`` (a
    timeout, a TLS failure, logged at most once per 10 s by :func:`warn_tls`, or a
    socket error), or None for anything else (a bug, a cancellation: re-raise it)."""
    if isinstance(e, TimeoutError):
        return UpstreamConnectTimeout(f"connect to {address} timed out")
    if isinstance(e, ssl.SSLError):
        # (Before OSError, its base: errno means nothing for a TLS failure.)
        reason = tls_failure(e) or str(e)
        warn_tls(address, reason)
        return UpstreamConnectError(f"TLS to {address} failed: {reason}")
    if isinstance(e, OSError):
        reason = errno.errorcode.get(e.errno or 0, str(e))
        return UpstreamConnectError(f"connect to {address} failed: {reason}")
    return None
