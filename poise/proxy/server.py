"""One worker's data plane: build runtime objects from config, bind listeners, serve,
and shut down gracefully."""

from __future__ import annotations

import asyncio
import logging

from poise.config.model import Config
from poise.config.units import parse_address
from poise.proxy.http.protocol import ClientConnection
from poise.proxy.http.site import ClusterRuntime, Site

log = logging.getLogger("poise")
_SWEEP_INTERVAL = 1.0


class ProxyServer:
    """Listeners, sites and clusters of one worker process."""

    def __init__(self, config: Config, loop: asyncio.AbstractEventLoop) -> None:
        self.config = config
        self.loop = loop
        self.clusters = {c.name: ClusterRuntime(c, loop) for c in config.clusters}
        self.sites = [Site(spec, self.clusters, loop) for spec in config.listeners]
        self.servers: list[asyncio.Server] = []
        self._sweeper: asyncio.TimerHandle | None = None

    async def start(self, reuse_port: bool = True) -> None:
        """Bind every listener (SO_REUSEPORT so that workers share ports)."""
        for spec, site in zip(self.config.listeners, self.sites, strict=True):
            host, port = parse_address(spec.bind)
            server = await self.loop.create_server(
                lambda site=site: ClientConnection(site), host, port,
                reuse_port=reuse_port, backlog=4096)
            self.servers.append(server)
        self._sweeper = self.loop.call_later(_SWEEP_INTERVAL, self._sweep)
        for cluster in self.clusters.values():
            cluster.start()

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [s.sockets[0].getsockname()[:2] for s in self.servers]

    def _sweep(self) -> None:
        now = self.loop.time()
        for cluster in self.clusters.values():
            for pool in cluster.pools.values():
                pool.expire(now)
        self._sweeper = self.loop.call_later(_SWEEP_INTERVAL, self._sweep)

    async def shutdown(self, drain_timeout: float) -> bool:
        """Stop accepting, let requests in flight finish (up to ``drain_timeout``),
        close the rest. Returns True when nothing had to be cut off."""
        for server in self.servers:
            server.close()
        for site in self.sites:
            for conn in list(site.connections):
                conn.drain()
        deadline = self.loop.time() + drain_timeout
        while any(site.connections for site in self.sites) and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        clean = not any(site.connections for site in self.sites)
        for site in self.sites:
            for conn in list(site.connections):
                conn.abort()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for cluster in self.clusters.values():
            cluster.stop()
            for pool in cluster.pools.values():
                pool.close_idle()
        return clean
