"""The L4 relay: bytes from a client connection to a backend connection and back.

Each direction reads into a large buffer of its own (``asyncio.BufferedProtocol``:
the loop reads straight into it) and writes a view of it to the other side; the
buffer is only replaced when the other side could not send everything at once and
still holds a view of it.  Back-pressure both ways: when one side's write buffer
passes its high-water mark, the other side stops reading until it drains.  A FIN is
passed on as a half-close (``write_eof``) where the transport allows it (not TLS, which
has no half-close: there the other side is closed once its data is flushed); a reset
is passed on as a reset.

A client connection is routed when it arrives (by the TLS server name if the listener
terminates TLS), or once its ClientHello has been read (``tls_passthrough``); then a
backend is picked by the cluster's policy and connected to — a spare of the warm pool
if there is one — trying the next backend after a failed connect (nothing was sent
yet).  Bytes the client sends meanwhile are kept (up to ``EARLY_LIMIT``, then reading
pauses) and sent first, after the PROXY header if the cluster sends one.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import TYPE_CHECKING, Any

from poise.core.context import RequestContext
from poise.core.limits import Overflow
from poise.core.outlier import Outcome
from poise.errors import NoBackendAvailable
from poise.proxy.dial import tls_failure, warn_tls
from poise.proxy.proxy_protocol import connection_addresses, header_for
from poise.proxy.tcp.client_hello import ClientHelloError, peek
from poise.proxy.tcp.endpoint import Endpoint, TcpUpstream, attach, open_upstream

if TYPE_CHECKING:
    from poise.proxy.http.cluster import ClusterRuntime
    from poise.proxy.http.pool import UpstreamPool
    from poise.proxy.tcp.site import TcpSite

log = logging.getLogger("poise")


class TcpClient(Endpoint):
    """A client connection of a tcp listener."""

    def __init__(self, site: TcpSite) -> None:
        super().__init__()
        self.site = site
        self.loop = site.loop
        # ``(client, local)`` from a PROXY header (set before connection_made) or None.
        self.proxied: Any = None
        self.peer_ip = ""
        self.sni: str | None = None
        self.upstream: TcpUpstream | None = None
        self.tls = site.tls is not None
        self._guard: Any = None
        self._held: tuple[int, int] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._quiet_since = 0.0
        self._last_moved = -1
        self._connecting: asyncio.Task[None] | None = None

    # -- arrival and routing -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        site = self.site
        peer = transport.get_extra_info("peername")
        if self.proxied is not None:
            self.peer_ip = self.proxied[0][0]
        elif isinstance(peer, tuple):
            self.peer_ip = peer[0]
        else:               # reset before we could ask who it was
            self._close()
            return
        guard = site.guard
        if guard is not None:
            self._held = guard.admit(self.peer_ip.encode())
            if self._held is None:      # over max_connections(_per_ip)
                self._close()
                return
            self._guard = guard
        super().connection_made(transport)
        site.connections.add(self)
        site.accepted += 1
        if site.passthrough:
            self._arm(site.header_timeout, self._hello_timed_out)
            return
        if site.tls is not None:
            ssl_object = transport.get_extra_info("ssl_object")
            # (Recorded by ServerTls' SNI callback: server_hostname is the client's.)
            self.sni = getattr(ssl_object, "sni_name", None)
        self._route()

    def keep(self, data: bytes) -> None:
        Endpoint.keep(self, data)
        if self.site.passthrough and self.cluster_pending:
            self._read_hello()

    def eof_received(self) -> bool:
        if self.site.passthrough and self.cluster_pending:
            # Closed before its ClientHello was complete: there is nothing to route.
            self.site.reject("bad_client_hello")
            self._close()
            return False
        return Endpoint.eof_received(self)

    @property
    def cluster_pending(self) -> bool:
        """Passthrough: still reading the ClientHello to route by."""
        return self._connecting is None and not self.closed

    def _read_hello(self) -> None:
        early = self._early or []
        try:
            hello, _needed = peek(b"".join(early))
        except ClientHelloError as e:
            log.debug("tcp %s: closing %s: %s", self.site.name, self.peer_ip, e)
            self.site.reject("bad_client_hello")
            self._close()
            return
        if hello is not None:
            self.sni = hello.server_name
            self._route()

    def _hello_timed_out(self) -> None:
        self.site.reject("client_hello_timeout")
        self._close()

    def _route(self) -> None:
        site = self.site
        cluster = site.catch_all or site.cluster_for(self.sni)
        if cluster is None:
            log.debug("tcp %s: no route for server name %r", site.name, self.sni)
            site.reject("no_route")
            self._close()
            return
        self._arm(site.idle_timeout / 4, self._check_idle)
        self._connecting = self.loop.create_task(self._connect(cluster))

    def context(self) -> RequestContext:
        """What a balancing policy may know of a connection: its client address."""
        return RequestContext(self.peer_ip)

    # -- connecting ----------------------------------------------------------------------

    async def _connect(self, cluster: ClusterRuntime) -> None:
        try:
            await self._connect_to(cluster)
        except Exception:       # a bug: logged, and the client is not left hanging
            log.exception("tcp %s: relay setup failed", self.site.name)
            self._close()

    async def _connect_to(self, cluster: ClusterRuntime) -> None:
        try:
            pool: UpstreamPool | None = cluster.choose(self)
        except NoBackendAvailable:
            self._give_up(cluster, "no_backend", "no backend available")
            return
        version = cluster.send_proxy_protocol
        preamble = header_for(version, *self.addresses()) if version is not None else b""
        tried: list[UpstreamPool] = []
        limits = cluster.limits
        full: Overflow | None = None      # the last cap met (counted once, on giving up)
        up: TcpUpstream | None = None
        while pool is not None:
            up = self._spare(pool)      # (a spare is counted already: no cap to check)
            if up is not None:
                break
            over = limits.can_connect(pool.active, pool.max_connections) \
                if limits is not None else None
            if over is not None:
                full = over
                if over is Overflow.MAX_CONNECTIONS:
                    break               # (cluster-wide: no other backend has room)
                tried.append(pool)
                pool = cluster.fallback(self, tried)
                continue
            started = self.loop.time()
            try:
                up = await open_upstream(pool, cluster, preamble)
            except (OSError, TimeoutError, ssl.SSLError) as e:
                self._connect_failed(cluster, pool, started, e)
                if self.closed:
                    return
                tried.append(pool)
                pool = cluster.fallback(self, tried)
                continue
            if cluster.observe is not None:
                cluster.observe(pool.backend, self.loop.time() - started, True)
            if pool.failing:
                cluster.report(pool, Outcome.SUCCESS)
            break
        if up is None:
            if full is not None and limits is not None:
                limits.trip(full)
                self._give_up(cluster, "overflow", "connection limit reached")
            else:
                self._give_up(cluster, "connect_failed", "no backend could be connected to")
            return
        self._attach(up)

    def _spare(self, pool: UpstreamPool) -> TcpUpstream | None:
        warm = self.site.warm
        return warm.take(pool) if warm is not None else None

    def _connect_failed(self, cluster: ClusterRuntime, pool: UpstreamPool, started: float,
                        e: BaseException) -> None:
        pool.errors += 1
        pool.tries.connect_errors += 1
        if cluster.observe is not None:
            cluster.observe(pool.backend, self.loop.time() - started, False)
        if cluster.failure_statuses is not None:
            cluster.report(pool, Outcome.GATEWAY_ERROR)
        handshake = tls_failure(e)
        if handshake is not None:
            warn_tls(pool.backend.address, handshake)
            return
        reason = "timed out" if isinstance(e, TimeoutError) else (
            getattr(e, "strerror", None) or str(e) or type(e).__name__)
        log.warning("tcp %s: connect to %s (cluster %s) failed: %s", self.site.name,
                    pool.backend.address, cluster.name, reason)

    def _give_up(self, cluster: ClusterRuntime, reason: str, message: str) -> None:
        if not self.closed:
            log.warning("tcp %s: closing %s: cluster %s: %s", self.site.name, self.peer_ip,
                        cluster.name, message)
            self.site.reject(reason)
            self._close()

    def _attach(self, up: TcpUpstream) -> None:
        if self.closed:
            up.transport.close()
            return
        self.upstream = up
        up.attached = True
        attach(up.pool)
        self.link(up)
        if self.transport.is_closing() and not self.closed:
            up.transport.close()

    def addresses(self) -> tuple[Any, Any]:
        """``(client, local)`` addresses of this connection, PROXY header first."""
        return connection_addresses(self.proxied, self.transport)

    # -- counting, idling and closing ----------------------------------------------------

    def _arm(self, delay: float, callback: Any) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_later(delay, callback)

    def _check_idle(self) -> None:
        """Every quarter of idle_timeout: close when nothing moved for idle_timeout."""
        self._timer = None
        if self.closed:
            return
        up = self.upstream
        moved = self.received + (up.received if up is not None else 0)
        now = self.loop.time()
        if moved != self._last_moved:
            self._last_moved = moved
            self._quiet_since = now
        elif now - self._quiet_since >= self.site.idle_timeout:
            log.debug("tcp %s: %s idle for %gs: closing", self.site.name, self.peer_ip,
                      self.site.idle_timeout)
            self.abort()
            if up is not None:
                up.abort()
            return
        self._arm(self.site.idle_timeout / 4, self._check_idle)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        site = self.site
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        held = self._held
        if held is not None:
            self._held = None
            self._guard.release(held)
        if self in site.connections:
            site.connections.discard(self)
            site.closed_in += self.received
            if self.upstream is not None:
                site.closed_out += self.upstream.received

    def _close(self) -> None:
        if not self.closed:
            self.closed = True
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self.transport.close()

    def drain(self) -> None:
        """Graceful shutdown: a byte stream cannot be told to finish; it carries on
        until it ends or the drain timeout cuts it off."""

    def retire(self, grace: float) -> None:
        """Its listener was removed: as :meth:`drain`."""

    def abort(self) -> None:
        up = self.upstream
        Endpoint.abort(self)
        if up is not None:
            up.abort()

    def __repr__(self) -> str:
        return f"<TcpClient {self.peer_ip} sni={self.sni} upstream={self.upstream!r}>"
