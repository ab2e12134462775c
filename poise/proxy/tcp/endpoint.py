"""Both sides of an L4 relay: :class:`Endpoint` (reading into the shared buffer,
writing to the other side, back-pressure, half-close, resets) and the backend side,
:class:`TcpUpstream`, with how it is opened and counted (the client side is
:mod:`poise.proxy.tcp.relay`)."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from typing import TYPE_CHECKING, Any

from poise.proxy.dial import dial

if TYPE_CHECKING:
    from poise.proxy.http.cluster import ClusterRuntime
    from poise.proxy.http.pool import UpstreamPool

BUFFER_SIZE = 256 * 1024
# Bytes kept from one side before the other is connected; reading pauses beyond.
EARLY_LIMIT = 256 * 1024
# Write buffer high-water mark of every relayed transport (low: a quarter of it).
HIGH_WATER = 1024 * 1024
# SO_LINGER on, 0 seconds: close() sends a reset.
_LINGER_RESET = struct.pack("ii", 1, 0)
# Reasons to stop reading (bit flags).
_EARLY = 1          # the other side is not connected yet and enough is kept
PEER_FULL = 2      # the other side's write buffer is over its high-water mark


class _ReadBuffer:
    """The buffer every relay of this process reads into.

    Reads never overlap (the loop hands one read at a time to ``get_buffer`` and then
    ``buffer_updated``) and what was read is written on at once; so one buffer serves
    every connection, and an idle connection holds no buffer at all.  When the other
    side could not send everything at once, its transport keeps a view of the buffer:
    the buffer is then left to it and a new one made."""

    __slots__ = ("view",)

    def __init__(self) -> None:
        self.view = memoryview(bytearray(BUFFER_SIZE))

    def renew(self) -> None:
        self.view = memoryview(bytearray(BUFFER_SIZE))


READ_BUFFER = _ReadBuffer()


class Endpoint(asyncio.BufferedProtocol):
    """One side of a relay: reads into the shared buffer and writes to ``peer``'s
    transport."""

    def __init__(self) -> None:
        self.transport: Any = None
        self.peer: Endpoint | None = None
        self.received = 0           # bytes read from this side
        self.eof = False            # this side sent its FIN
        self.closed = False
        self._blocked = 0
        self._early: list[bytes] | None = None     # read before ``peer`` was linked
        self._early_size = 0
        # A TLS transport (set before connection_made by whoever knows): no half-close,
        # and no writing to its socket directly.
        self.tls = False
        # The socket's descriptor, to write to directly (-1: through the transport).
        self.fd = -1

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if not self.tls:
                self.fd = sock.fileno()
        transport.set_write_buffer_limits(high=HIGH_WATER)  # type: ignore[attr-defined]

    def get_buffer(self, sizehint: int) -> memoryview:
        return READ_BUFFER.view

    def buffer_updated(self, nbytes: int) -> None:
        self.received += nbytes
        peer = self.peer
        view = READ_BUFFER.view
        if peer is None:
            self.keep(bytes(view[:nbytes]))
            return
        out = peer.transport
        if peer.fd >= 0 and not out.get_write_buffer_size() and not out.is_closing():
            # Nothing queued before it: send straight from the shared buffer, and give
            # the transport a copy of what the socket did not take (it would keep a
            # view of the buffer otherwise).  One syscall, no allocation, no copy
            # when the socket keeps up.
            try:
                sent = os.write(peer.fd, view[:nbytes])
            except OSError:     # (EAGAIN; or a failure the transport will meet itself)
                sent = 0
            if sent < nbytes:
                out.write(bytes(view[sent:nbytes]))
            return
        out.write(view[:nbytes])
        if out.get_write_buffer_size():
            READ_BUFFER.renew()           # (the transport keeps a view of what it holds)

    def keep(self, data: bytes) -> None:
        """Keep ``data``, read before the other side was linked (sent first then)."""
        if self._early is None:
            self._early = []
        self._early.append(data)
        self._early_size += len(data)
        if self._early_size >= EARLY_LIMIT:
            self.block(_EARLY)

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer
        if self.tls:
            # TLS has no half-close: the transport closes, and connection_lost
            # closes the other side once its data is flushed.
            return False
        if peer is None:
            return True         # passed on once linked
        return self._pass_eof(peer)

    def _pass_eof(self, peer: Endpoint) -> bool:
        """Half-close ``peer``'s transport (True: keep ours open to write to it), or
        close both when that cannot be (TLS) or both sides are done."""
        out = peer.transport
        if peer.eof or not out.can_write_eof():
            out.close()         # (flushes first)
            return False
        out.write_eof()
        return True

    def link(self, peer: Endpoint) -> None:
        """Relay between this side and ``peer`` from now on: what either read before
        goes first, and a FIN either received is passed on."""
        self.peer = peer
        peer.peer = self
        for side in (self, peer):
            other = side.peer
            assert other is not None
            if side._early:
                other.transport.write(b"".join(side._early))
            side._early = None
            side.unblock(_EARLY)
            if side.eof and not side.closed:
                side._pass_eof(other)

    # -- flow control ---------------------------------------------------------------------

    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer.block(PEER_FULL)

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer.unblock(PEER_FULL)

    def block(self, reason: int) -> None:
        if not self._blocked and not self.closed:
            self.transport.pause_reading()
        self._blocked |= reason

    def unblock(self, reason: int) -> None:
        if not self._blocked & reason:
            return
        self._blocked &= ~reason
        if not self._blocked and not self.closed:
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        peer = self.peer
        if peer is not None and not peer.closed:
            if exc is not None:
                peer.reset()                # a reset is passed on as a reset
            else:
                peer.transport.close()

    def abort(self) -> None:
        """Close at once, dropping what was not sent yet (a FIN)."""
        if not self.closed and self.transport is not None:
            self.transport.abort()

    def reset(self) -> None:
        """Close at once with a TCP reset (SO_LINGER 0), as the other side did."""
        if self.closed or self.transport is None:
            return
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            except OSError:
                pass
        self.transport.abort()


class TcpUpstream(Endpoint):
    """The backend side of a relay (or a warm spare, until a client takes it)."""

    def __init__(self, pool: UpstreamPool) -> None:
        super().__init__()
        self.pool = pool
        self.attached = False       # counted in the backend's in_flight
        # Called when a spare's connection is lost (the warm pool forgets it).
        self.on_lost: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.pool.stats.active_connections += 1

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        pool = self.pool
        pool.stats.active_connections -= 1
        if self.attached:
            self.attached = False
            detach(pool)
        pool.closed()
        if self.on_lost is not None:
            self.on_lost(self)

    def eof_received(self) -> bool:
        if self.peer is None and self.on_lost is not None:
            # A spare the backend closed: forgotten now, never handed out.
            self.on_lost(self)
            self.on_lost = None
            return False
        return Endpoint.eof_received(self)

    @property
    def usable(self) -> bool:
        """Open, and the backend has not closed its side (a spare that may be used)."""
        return not self.closed and not self.eof and not self.transport.is_closing()


def attach(pool: UpstreamPool) -> None:
    """A client connection now uses a connection of ``pool``'s backend."""
    pool.stats.in_flight += 1
    pool.requests += 1
    cluster = pool.cluster
    if cluster is not None and cluster.load_changed is not None:
        cluster.load_changed(pool.backend)


def detach(pool: UpstreamPool) -> None:
    pool.stats.in_flight -= 1
    cluster = pool.cluster
    if cluster is not None and cluster.load_changed is not None:
        cluster.load_changed(pool.backend)


async def open_upstream(pool: UpstreamPool, cluster: ClusterRuntime,
                        preamble: bytes = b"") -> TcpUpstream:
    """Connect to ``pool``'s backend within the cluster's connect_timeout: send
    ``preamble`` (a PROXY header) first, in the clear, then TLS if the cluster
    originates it. Counted in the pool's connections from the start. Raises OSError,
    TimeoutError or ssl.SSLError."""
    up = TcpUpstream(pool)
    backend = pool.backend
    pool.opening()
    tls = cluster.stream_tls_context()
    up.tls = tls is not None
    timeout = cluster.spec.connect_timeout
    try:
        async with asyncio.timeout(timeout):
            await dial(pool.loop, lambda: up, backend.host, backend.port, tls=tls,
                       server_name=cluster.server_name(backend), preamble=preamble,
                       handshake_timeout=timeout)
    except BaseException:
        if up.transport is None:    # (else its connection_lost does the accounting)
            pool.closed()
        else:
            up.transport.abort()
        raise
    return up
