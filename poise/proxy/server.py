"""One worker's data plane: build runtime objects from config, bind listeners, serve,
apply the control plane's snapshots and reloads, and shut down gracefully."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from poise.config.model import Config, Listener
from poise.config.units import parse_address
from poise.control.state import Member
from poise.observability.access_log import AccessLogger, AccessLogs
from poise.observability.tracing import Tracer
from poise.proxy.acceptor import ProxyProtocolServer, listening_socket
from poise.proxy.http.parking import close_lot
from poise.proxy.http.protocol import ClientConnection
from poise.proxy.http.site import ClusterRuntime, Site
from poise.proxy.http2.sniff import Http2Sniffer
from poise.proxy.ratelimits import Limiters
from poise.proxy.tcp.relay import TcpClient
from poise.proxy.tcp.site import TcpSite
from poise.proxy.tcp.warm import WarmSpares
from poise.ratelimit.shared import SharedState

log = logging.getLogger("poise")
_SWEEP_INTERVAL = 1.0


def bind_key(bind: str) -> tuple[str, int]:
    """A listener's identity across reloads: where it is bound."""
    return parse_address(bind)


def binding_of(spec: Listener) -> tuple[object, ...]:
    """What a bound socket cannot change without being bound again."""
    return spec.protocol, spec.tls is not None, spec.proxy_protocol


def connection_factory(spec: Listener, site: Any) -> Callable[[Any], Any]:
    """``make(addresses)``: the protocol of a new connection of ``site``; ``addresses``
    are ``(client, local)`` from its PROXY header, or None."""
    connection = TcpClient if spec.protocol == "tcp" else ClientConnection

    def make(addresses: Any) -> Any:
        # (An http listener's http2 is read per connection: a reload may turn it on.)
        conn = connection(site) if connection is TcpClient or site.http2 is None \
            else Http2Sniffer(site)
        if addresses is not None:
            conn.proxied = addresses
        return conn

    return make


# Loop turns _finish waits for aborted connections to report their loss.
_LOSS_TURNS = 10


class ProxyServer:
    """Listeners, sites and clusters of one worker process.

    ``members`` gives clusters their backends as the control plane sees them (by
    cluster name; a cluster absent from it takes the backends of its config, all up).
    ``shared``: the memory this worker shares with the others of its poise (rate-limit
    table, connection counts); None: a private one (a single process).
    """

    def __init__(self, config: Config, loop: asyncio.AbstractEventLoop,
                 members: Mapping[str, Sequence[Member]] | None = None,
                 shared: SharedState | None = None) -> None:
        self.config = config
        self.loop = loop
        self.shared = shared or SharedState.create(config.rate_limit_table_slots,
                                                   shareable=False)
        self.shared.set_workers(config.workers)
        self.limiters = Limiters(self.shared)
        self.limiters.begin([spec.name for spec in config.listeners])
        members = members or {}
        self.clusters = {c.name: ClusterRuntime(c, loop, members.get(c.name))
                         for c in config.clusters}
        # Connected spares of the clusters with warm_connections (tcp listeners).
        self.warm = WarmSpares(loop)
        self.access_logs = AccessLogs(loop)
        self.access_logs.configure(config)
        self.tracer: Tracer | None = Tracer(config.tracing) if config.tracing else None
        self.sites: dict[tuple[str, int], Any] = {
            bind_key(spec.bind): self._site(spec) for spec in config.listeners}
        # What each bound socket was bound for (a change rebinds: see binding_of).
        self._bindings: dict[tuple[str, int], tuple[object, ...]] = {}
        self.limiters.end()
        self.servers: dict[tuple[str, int], asyncio.Server] = {}
        # Sites of removed listeners whose connections are still finishing.
        self.retiring: list[Site] = []
        self._reuse_port = True
        self._sweeper: asyncio.TimerHandle | None = None

    async def start(self, reuse_port: bool = True) -> None:
        """Bind every listener (SO_REUSEPORT so that workers share ports)."""
        self._reuse_port = reuse_port
        for spec in self.config.listeners:
            await self._bind(spec)
        self._sweeper = self.loop.call_later(_SWEEP_INTERVAL, self._sweep)

    async def _bind(self, spec: Listener) -> None:
        key = bind_key(spec.bind)
        self.servers[key] = await self._serve(spec, self.sites[key])
        self._bindings[key] = binding_of(spec)

    async def _serve(self, spec: Listener, site: Any) -> Any:
        """Bind ``spec``'s address for ``site``: an asyncio server, or a
        ProxyProtocolServer when connections start with a PROXY header."""
        host, port = bind_key(spec.bind)
        make = connection_factory(spec, site)
        tls = site.tls.context if site.tls is not None else None
        if spec.proxy_protocol:
            sock = listening_socket(host, port, self._reuse_port)
            return ProxyProtocolServer(self.loop, sock, make, ssl_context=tls,
                                       timeout=spec.client_header_timeout,
                                       on_reject=site.reject_proxy_header)
        return await self.loop.create_server(
            lambda: make(None), host, port, reuse_port=self._reuse_port, backlog=4096,
            ssl=tls, ssl_handshake_timeout=spec.client_header_timeout if tls else None)

    def _site(self, spec: Listener) -> Any:
        """A new Site (http) or TcpSite (tcp) for ``spec``."""
        if spec.protocol == "tcp":
            return TcpSite(spec, self.clusters, self.loop, limiters=self.limiters,
                           warm=self.warm)
        return Site(spec, self.clusters, self.loop, *self._observers(spec),
                    limiters=self.limiters)

    def _configure(self, site: Any, spec: Listener) -> None:
        if spec.protocol == "tcp":
            site.configure(spec, self.clusters, limiters=self.limiters, warm=self.warm)
        else:
            site.configure(spec, self.clusters, *self._observers(spec),
                           limiters=self.limiters)

    def _observers(self, spec: Listener) -> tuple[bool, AccessLogger | None, Tracer | None]:
        """What a listener's requests are seen by: counting (metrics), its access log
        and the tracer (Site's ``counting``, ``access_log`` and ``tracer``)."""
        return (self.config.metrics.enabled, self.access_logs.for_listener(spec.name),
                self.tracer)

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [s.sockets[0].getsockname()[:2] for s in self.servers.values()]

    # -- what the control plane sends ----------------------------------------------------

    def apply_members(self, cluster: str, members: Sequence[Member]) -> None:
        """A new snapshot of one cluster's backends (ignored for an unknown cluster:
        it was removed by a reload this snapshot crossed)."""
        runtime = self.clusters.get(cluster)
        if runtime is not None:
            runtime.apply_members(members)

    async def apply_config(self, config: Config,
                           members: Mapping[str, Sequence[Member]] | None = None) -> list[str]:
        """Apply a reloaded config without dropping a connection or a request.

        Clusters: new ones are built (backends from ``members``, else from their
        config), changed ones reconfigured in place, removed ones stopped once no route
        leads to them (requests in flight finish).  Listeners, by bind address: new
        ones are bound first, kept ones take their new settings and routes, removed
        ones stop accepting and retire their connections (``Connection: close`` on the
        next response; closed after ``drain_timeout`` at the latest).  Returns the
        problems met (a new listener that could not be bound), already logged."""
        members = members or {}
        # First what may fail (a log file that cannot be opened): then nothing changed.
        self.access_logs.configure(config)
        old_clusters = self.clusters
        clusters: dict[str, ClusterRuntime] = {}
        for spec in config.clusters:
            runtime = old_clusters.get(spec.name)
            if runtime is None:
                runtime = ClusterRuntime(spec, self.loop, members.get(spec.name))
            elif spec != runtime.spec or spec.tls is not None:     # (TLS files: read again)
                runtime.reconfigure(spec)
            clusters[spec.name] = runtime
        self.clusters = clusters
        old_config = self.config
        self.config = config
        if config.tracing != old_config.tracing:
            self._replace_tracer(Tracer(config.tracing) if config.tracing else None)
        self.shared.set_workers(config.workers)
        if config.rate_limit_table_slots != self.shared.slots:
            log.warning("rate_limit_table_slots %d takes effect at the next start (the "
                        "shared table keeps %d slots)", config.rate_limit_table_slots,
                        self.shared.slots)
        self.limiters.begin([spec.name for spec in config.listeners])
        problems = await self._apply_listeners(config)
        self.limiters.end()
        for name, runtime in old_clusters.items():
            if name not in clusters:
                runtime.stop()
        return problems

    async def _apply_listeners(self, config: Config) -> list[str]:
        problems = []
        wanted = {bind_key(spec.bind): spec for spec in config.listeners}
        for key, spec in wanted.items():
            site = self.sites.get(key)
            if site is not None and self._bindings.get(key) == binding_of(spec):
                try:
                    self._configure(site, spec)
                except ValueError as e:     # (a certificate file changed since checked)
                    problems.append(f"listener {spec.name}: {e}")
                    log.error("%s", problems[-1])
                continue
            # New, or bound differently (protocol, TLS on/off, PROXY header): a new
            # socket and site; the old one's connections finish as a removed listener's.
            try:
                new_site = self._site(spec)
                if site is not None and not self._reuse_port:
                    self._retire(key, config.drain_timeout, "rebound")  # (port needed)
                    site = None
                server = await self._serve(spec, new_site)
            except (OSError, ValueError) as e:
                problems.append(f"listener {spec.name}: cannot bind {spec.bind}: "
                                f"{getattr(e, 'strerror', None) or e}")
                log.error("%s", problems[-1])
                continue
            if site is not None:
                self._retire(key, config.drain_timeout, "rebound")
            self.sites[key] = new_site
            self.servers[key] = server
            self._bindings[key] = binding_of(spec)
        for key in [k for k in self.sites if k not in wanted]:
            self._retire(key, config.drain_timeout)
        return problems

    def _replace_tracer(self, tracer: Tracer | None) -> None:
        """Trace with ``tracer`` from now on; the old one flushes what it has, off the
        event loop (requests it traces that end later lose their spans)."""
        old, self.tracer = self.tracer, tracer
        if old is not None:
            self.loop.run_in_executor(None, old.shutdown)

    def _retire(self, key: tuple[str, int], grace: float, why: str = "removed") -> None:
        site = self.sites.pop(key)
        self._bindings.pop(key, None)
        server = self.servers.pop(key, None)
        if server is not None:
            server.close()
        site.retire(grace)
        if site.connections:
            self.retiring.append(site)
            self.loop.call_later(grace, self._cut_off, site)
        log.info("listener %s on %s:%d %s: %d connection(s) finishing", site.name,
                 key[0], key[1], why, len(site.connections))

    def _cut_off(self, site: Site) -> None:
        """drain_timeout after its listener was removed: close what is left."""
        if site in self.retiring:
            self.retiring.remove(site)
        for conn in list(site.connections):
            conn.abort()

    def counters(self) -> dict[str, dict[str, object]]:
        """Per cluster: ``{"panic": bool, "backends": {address: [in_flight, requests,
        errors, ejected]}}`` in this worker (see :mod:`poise.control.stats`)."""
        return {name: {"panic": runtime.health.panic, "backends": runtime.counters()}
                for name, runtime in self.clusters.items()}

    # -- housekeeping and shutdown ---------------------------------------------------------

    def _sweep(self) -> None:
        now = self.loop.time()
        for cluster in self.clusters.values():
            for pool in cluster.pools.values():
                pool.expire(now)
        self.retiring = [site for site in self.retiring if site.connections]
        self.warm.sweep(self.clusters)
        self._sweeper = self.loop.call_later(_SWEEP_INTERVAL, self._sweep)

    def _all_sites(self) -> list[Site]:
        return [*self.sites.values(), *self.retiring]

    async def shutdown(self, drain_timeout: float) -> bool:
        """Stop accepting, let requests in flight finish (up to ``drain_timeout``),
        close the rest. Returns True when nothing had to be cut off."""
        for server in self.servers.values():
            server.close()
        sites = self._all_sites()
        for site in sites:
            for conn in list(site.connections):
                conn.drain()
        return await self._finish(sites, drain_timeout)

    async def retire(self, grace: float) -> bool:
        """Leave while other workers serve on (a reload lowered ``workers``): stop
        accepting, and treat every connection as a removed listener's: what is in
        flight finishes, and the next response says ``Connection: close`` so that the
        client reconnects (to another worker) instead of finding its connection cut.
        Returns True when nothing had to be cut off after ``grace`` seconds."""
        for server in self.servers.values():
            server.close()
        sites = self._all_sites()
        for site in sites:
            site.retire(grace)
        return await self._finish(sites, grace)

    async def _finish(self, sites: list[Site], timeout: float) -> bool:
        """Wait until ``sites`` have no connection or ``timeout`` passed; abort the
        rest, release timers and idle upstream connections."""
        deadline = self.loop.time() + timeout
        while any(site.connections for site in sites) and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        clean = not any(site.connections for site in sites)
        for site in sites:
            for conn in list(site.connections):
                conn.abort()
        # What was cut off is counted and logged (499, a WebSocket's 101) as its
        # connections' losses are reported: a few loop turns, before the logs close.
        for _ in range(_LOSS_TURNS):
            if not any(site.connections for site in sites):
                break
            await asyncio.sleep(0)
        if self._sweeper is not None:
            self._sweeper.cancel()
        self.warm.close()
        for cluster in self.clusters.values():
            cluster.stop()
        # (Pools closed their parked connections above: this closes any left over,
        # and the lot's own epoll set.)
        close_lot(self.loop)
        await self.access_logs.close()
        self.limiters.close()
        if self.tracer is not None:
            await self.loop.run_in_executor(None, self.tracer.shutdown)
        return clean
