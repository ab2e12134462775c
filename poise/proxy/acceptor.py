"""Accepting connections that begin with a PROXY protocol header.

A listener with ``proxy_protocol: true`` cannot hand its sockets straight to a
protocol: the header comes before anything else, TLS handshakes included, and not one
byte after it may be taken from the connection before its protocol (or TLS) gets it.
So :class:`ProxyProtocolServer` accepts on its own listening socket and reads each
connection's header itself: it peeks at what has arrived and consumes exactly the
header's bytes (what is consumed before the header is complete is known to belong to
it), then gives the socket to the event loop with ``connect_accepted_socket``, with
TLS if the listener terminates it.

A connection without a valid header within ``timeout`` seconds is closed; nothing of
it ever reaches a backend.  This costs a Task per connection (never per request).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
from collections.abc import Callable
from typing import Any

from poise.proxy.proxy_protocol import V1_MAX, V2_MAX_LENGTH, ProxyProtocolError, addresses_of
from poise.proxy.proxy_protocol import parse as parse_header

log = logging.getLogger("poise")
Addresses = tuple[tuple[str, int], tuple[str, int]]
# What a peek asks for: a whole v2 header at most (16 fixed bytes and its length).
_PEEK = max(V1_MAX, 16 + V2_MAX_LENGTH)
# Errors of accept() that concern one connection (the listener is fine).
_TRANSIENT = {errno.ECONNABORTED, errno.EAGAIN, errno.EWOULDBLOCK, errno.EPROTO,
              errno.EINTR}


class ProxyProtocolServer:
    """A listening socket whose connections start with a PROXY header.

    ``factory(addresses)`` makes the protocol of a connection whose header was read:
    ``addresses`` is ``(client, local)`` as the header carried them, or None when it
    carried none (LOCAL, UNKNOWN: the socket's own apply).  ``on_reject(reason)`` is
    called for each connection closed for a bad or missing header.  Looks like an
    ``asyncio.Server`` to its owner: ``sockets`` and ``close()``.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
                 factory: Callable[[Addresses | None], asyncio.BaseProtocol], *,
                 ssl_context: ssl.SSLContext | None, timeout: float,
                 on_reject: Callable[[str], None] | None = None) -> None:
        self.loop = loop
        self.sockets = [sock]
        self._sock = sock
        self._factory = factory
        self._ssl = ssl_context
        self._timeout = timeout
        self._on_reject = on_reject
        # Connections whose header is being read: socket → (bytes so far, timer).
        self._reading: dict[socket.socket, tuple[bytearray, asyncio.TimerHandle]] = {}
        self._handing: set[asyncio.Task[Any]] = set()
        self._closed = False
        sock.setblocking(False)
        loop.add_reader(sock.fileno(), self._accept)

    def _accept(self) -> None:
        for _ in range(64):     # a burst at a time, then let the loop run
            try:
                conn, _addr = self._sock.accept()
            except OSError as e:
                if e.errno not in _TRANSIENT:
                    # EMFILE and friends: the next readiness retries.
                    log.error("accept failed: %s", e.strerror or e)
                return
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            timer = self.loop.call_later(self._timeout, self._reject, conn,
                                         f"no PROXY header within {self._timeout:g}s")
            self._reading[conn] = (bytearray(), timer)
            self.loop.add_reader(conn.fileno(), self._readable, conn)

    def _readable(self, conn: socket.socket) -> None:
        got, _timer = self._reading[conn]
        try:
            peeked = conn.recv(_PEEK - len(got), socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._drop(conn, f"read failed: {e.strerror or e}")
            return
        if not peeked:
            self._drop(conn, "closed before its PROXY header")
            return
        try:
            header, consumed = parse_header(bytes(got) + peeked)
        except ProxyProtocolError as e:
            self._reject(conn, str(e))
            return
        # Take what belongs to the header: all of it while incomplete (the header has
        # not ended yet), exactly up to its end once complete.
        take = len(peeked) if header is None else consumed - len(got)
        got += conn.recv(take)
        if header is None:
            return
        self._forget(conn)
        task = self.loop.create_task(self._hand_over(conn, addresses_of(header)))
        self._handing.add(task)
        task.add_done_callback(self._handing.discard)

    async def _hand_over(self, conn: socket.socket, addresses: Addresses | None) -> None:
        try:
            await self.loop.connect_accepted_socket(  # type: ignore[call-overload]
                lambda: self._factory(addresses), conn, ssl=self._ssl,
                ssl_handshake_timeout=self._timeout if self._ssl is not None else None)
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as e:
            # (A failed handshake: the loop closed the socket.)
            log.debug("connection after its PROXY header failed: %s", e)

    def _reject(self, conn: socket.socket, reason: str) -> None:
        if self._on_reject is not None:
            self._on_reject(reason)
        log.debug("connection closed: %s", reason)
        self._drop(conn, reason)

    def _drop(self, conn: socket.socket, _reason: str) -> None:
        self._forget(conn)
        conn.close()

    def _forget(self, conn: socket.socket) -> None:
        entry = self._reading.pop(conn, None)
        if entry is not None:
            entry[1].cancel()
            self.loop.remove_reader(conn.fileno())

    def close(self) -> None:
        """Stop accepting; connections still sending their header are closed."""
        if self._closed:
            return
        self._closed = True
        self.loop.remove_reader(self._sock.fileno())
        self._sock.close()
        for conn in list(self._reading):
            self._drop(conn, "listener closed")


def listening_socket(host: str, port: int, reuse_port: bool, backlog: int = 4096) -> socket.socket:
    """A bound, listening, non-blocking TCP socket (SO_REUSEPORT when asked, so that
    workers share the port)."""
    family, _, _, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
