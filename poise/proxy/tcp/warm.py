"""Warm connections: connected spares per backend, so that a new client connection
of a tcp listener skips the connect (and the TLS handshake, for TLS backends).

A cluster's ``warm_connections: N`` keeps up to N spares per ready backend in each
worker.  A spare is handed out by :meth:`WarmSpares.take` for the backend the policy
chose, and a replacement is opened at once; the sweep (every second) opens what is
missing, and closes the spares of backends that are gone, not ready, or whose
cluster no longer wants them.  A spare the backend closed (or half-closed) is
forgotten as soon as the loop sees it, and never handed out; bytes a backend sends
first (a greeting) wait in the spare and reach the client that takes it.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import deque
from typing import TYPE_CHECKING

from poise.proxy.tcp.endpoint import TcpUpstream, open_upstream

if TYPE_CHECKING:
    from poise.proxy.http.cluster import ClusterRuntime
    from poise.proxy.http.pool import UpstreamPool

log = logging.getLogger("poise")


class WarmSpares:
    """The spares of every cluster with ``warm_connections``, in one worker."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._spares: dict[UpstreamPool, deque[TcpUpstream]] = {}
        self._opening: dict[UpstreamPool, int] = {}
        self._clusters: dict[UpstreamPool, ClusterRuntime] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    def take(self, pool: UpstreamPool) -> TcpUpstream | None:
        """A connected spare of ``pool``'s backend, or None; a replacement is opened."""
        spares = self._spares.get(pool)
        if not spares:
            return None
        while spares:
            up = spares.popleft()
            up.on_lost = None
            if up.usable:
                self._open(pool, self._clusters[pool])
                return up
            up.transport.close()
        return None

    def sweep(self, clusters: dict[str, ClusterRuntime]) -> None:
        """Open the spares missing; close those no longer wanted."""
        if self._closed:
            return
        wanted: dict[UpstreamPool, ClusterRuntime] = {}
        for cluster in clusters.values():
            if cluster.spec.warm_connections <= 0:
                continue
            snapshot = cluster.health.snapshot
            for backend, pool in cluster.pools.items():
                if snapshot.ready(backend):
                    wanted[pool] = cluster
        for pool in [p for p in self._spares if p not in wanted]:
            for up in self._spares.pop(pool):
                up.on_lost = None
                up.transport.close()
        self._clusters = wanted
        for pool, cluster in wanted.items():
            have = len(self._spares.get(pool, ())) + self._opening.get(pool, 0)
            for _ in range(cluster.spec.warm_connections - have):
                self._open(pool, cluster)

    def _open(self, pool: UpstreamPool, cluster: ClusterRuntime) -> None:
        self._opening[pool] = self._opening.get(pool, 0) + 1
        task = self.loop.create_task(self._connect(pool, cluster))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(self, pool: UpstreamPool, cluster: ClusterRuntime) -> None:
        try:
            up = await open_upstream(pool, cluster)
        except (OSError, TimeoutError, ssl.SSLError) as e:
            # (Active checks and client connections judge the backend; a spare that
            # cannot be opened is simply tried again at the next sweep.)
            log.debug("warm connection to %s failed: %s", pool.backend.address, e)
            return
        finally:
            self._opening[pool] -= 1
        if self._closed or self._clusters.get(pool) is not cluster or not up.usable:
            up.transport.close()
            return
        up.on_lost = self._lost
        self._spares.setdefault(pool, deque()).append(up)

    def _lost(self, up: TcpUpstream) -> None:
        spares = self._spares.get(up.pool)
        if spares is not None and up in spares:
            spares.remove(up)

    def count(self, pool: UpstreamPool) -> int:
        """Spares ready for ``pool``'s backend."""
        return len(self._spares.get(pool, ()))

    def close(self) -> None:
        """Close every spare and stop opening new ones."""
        self._closed = True
        for task in self._tasks:
            task.cancel()
        for spares in self._spares.values():
            for up in spares:
                up.on_lost = None
                up.transport.close()
        self._spares.clear()

    def __repr__(self) -> str:
        return f"<WarmSpares {sum(len(s) for s in self._spares.values())} spare(s)>"
