"""WebSocket relays: after a ``101 Switching Protocols``, the client connection and the
backend connection become the two sides of an L4 relay.

The transports stay; only their protocols change (``transport.set_protocol``) to the
tcp proxy's :class:`~poise.proxy.tcp.endpoint.Endpoint`, so a WebSocket gets the same
relay as a ``protocol: tcp`` listener: the shared read buffer, back-pressure both
ways, half-close and resets passed on.  poise does not parse frames: extensions
(``permessage-deflate``) and subprotocols are the two ends' business.

While the relay lasts:

- the backend counts it as a request in flight (``least_conn``, ``peak_ewma``), and
  the cluster's ``max_requests``/``max_connections`` slots stay held;
- the client connection stays in its listener's connections, so a graceful stop or a
  reload lets it carry on until ``drain_timeout`` and then closes it;
- the route's ``websocket.idle_timeout`` closes it when nothing moved either way for
  that long, and ``websocket.max_lifetime`` closes it that long after the switch.

When both sides have closed, the exchange ends: it is counted (status 101, with the
handshake's latency) and logged with the bytes relayed to the client.
"""

from __future__ import annotations

import asyncio
import logging
from time import monotonic
from typing import TYPE_CHECKING

from poise.core.outlier import Outcome
from poise.proxy.http.accounting import end_try
from poise.proxy.http.resilience import end_exchange
from poise.proxy.tcp.endpoint import PEER_FULL, Endpoint

if TYPE_CHECKING:
    from poise.proxy.http.exchange import Exchange
    from poise.proxy.http.upstream import UpstreamConnection

log = logging.getLogger("poise")


def open_tunnel(ex: Exchange, conn: UpstreamConnection, rest: bytes) -> Tunnel:
    """The backend answered ``ex``'s WebSocket handshake with 101 (its head is in
    ``ex._out``; ``rest`` is what followed it in the same read): send both to the
    client and relay from now on."""
    conn.deadline.cancel()
    conn.exchange = None
    conn.usable = False             # (never back to the pool)
    if rest:
        ex._out.append(rest)
    ex.flush_client()
    # The handshake's latency is what is counted and logged as the request's.
    now = ex.ended = monotonic()
    end_try(ex, 101, None, now)
    cluster = ex.cluster
    if cluster.observe is not None:
        ex._observe(True)
    if cluster.failure_statuses is not None and ex.pool.failing:
        cluster.report(ex.pool, Outcome.SUCCESS)
    return Tunnel(ex, conn)


class TunnelEnd(Endpoint):
    """One side of a WebSocket relay."""

    def __init__(self, tunnel: Tunnel) -> None:
        super().__init__()
        self.tunnel = tunnel

    def connection_lost(self, exc: Exception | None) -> None:
        Endpoint.connection_lost(self, exc)
        self.tunnel.side_closed()


class Tunnel:
    """A WebSocket relayed between a client connection and a backend connection."""

    def __init__(self, ex: Exchange, conn: UpstreamConnection) -> None:
        self.ex = ex
        self.conn = conn
        client = ex.client
        self.loop = client.loop
        settings = ex.websocket
        self.idle_timeout: float = settings.idle_timeout
        self.ended = False
        self._last_moved = 0
        self._quiet_since = self.loop.time()
        self._idle_timer: asyncio.TimerHandle | None = None
        self._life_timer: asyncio.TimerHandle | None = None
        client.deadline.cancel()
        down = self.down = TunnelEnd(self)
        up = self.up = TunnelEnd(self)
        down.tls = client.transport.get_extra_info("ssl_object") is not None
        up.tls = conn.transport.get_extra_info("ssl_object") is not None
        early = client.early
        client.early = None
        client.transport.set_protocol(down)
        down.connection_made(client.transport)
        conn.transport.set_protocol(up)
        up.connection_made(conn.transport)
        if early:                   # what the client sent before the 101: first
            down.keep(b"".join(early))
        down.link(up)
        # Reading resumes on both sides (the client's stopped after the handshake;
        # the backend's may have stopped for a slow client, which still holds).
        if not down._blocked:
            client.transport.resume_reading()
        if conn.reading_paused:
            conn.reading_paused = False
            conn.transport.resume_reading()
        if client.write_paused:
            up.block(PEER_FULL)
        self._idle_timer = self.loop.call_later(self.idle_timeout / 4, self._check_idle)
        if settings.max_lifetime is not None:
            self._life_timer = self.loop.call_later(settings.max_lifetime, self._expired)

    def _check_idle(self) -> None:
        """Every quarter of idle_timeout: close when nothing moved for idle_timeout."""
        self._idle_timer = None
        if self.ended:
            return
        moved = self.down.received + self.up.received
        now = self.loop.time()
        if moved != self._last_moved:
            self._last_moved = moved
            self._quiet_since = now
        elif now - self._quiet_since >= self.idle_timeout:
            log.debug("websocket from %s idle for %gs: closing",
                      self.ex.client.peer_ip.decode(), self.idle_timeout)
            self.abort()
            return
        self._idle_timer = self.loop.call_later(self.idle_timeout / 4, self._check_idle)

    def _expired(self) -> None:
        self._life_timer = None
        log.debug("websocket from %s reached its max_lifetime: closing",
                  self.ex.client.peer_ip.decode())
        self.abort()

    def abort(self) -> None:
        """Close both sides at once."""
        self.down.abort()
        self.up.abort()

    def side_closed(self) -> None:
        """One side's connection is lost; once both are, the exchange ends."""
        if self.ended or not (self.down.closed and self.up.closed):
            return
        self.ended = True
        for timer in (self._idle_timer, self._life_timer):
            if timer is not None:
                timer.cancel()
        ex = self.ex
        client = ex.client
        client.site.bytes_in += self.down.received
        ex.bytes_sent += self.up.received
        ex.conn = None
        ex.finished = True
        end_exchange(ex)
        # The two connections' own endings (pools, limits, listener), which their
        # transports no longer report to them.
        client.current = None
        self.conn.connection_lost(None)
        client.connection_lost(None)

    def __repr__(self) -> str:
        return f"<Tunnel {self.ex.client.peer_ip.decode()} ↔ {self.conn.pool.backend.address}>"

