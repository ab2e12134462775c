"""Runtime objects compiled from config for the HTTP data path: a :class:`Site` per
listener and a :class:`ClusterRuntime` per cluster. Built once; the request path only
reads attributes."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from poise.config.load import policy_spec
from poise.config.model import Cluster, Listener
from poise.config.units import parse_address
from poise.core.backend import Backend
from poise.core.cluster import ClusterSnapshot
from poise.core.policies import build_picker, create_policy
from poise.errors import NoBackendAvailable
from poise.proxy.http.router import Router
from poise.proxy.http.upstream import UpstreamPool

if TYPE_CHECKING:
    from poise.proxy.http.exchange import Exchange


class ClusterRuntime:
    """A cluster's snapshot, picker and per-backend connection pools (one worker)."""

    __slots__ = ("name", "snapshot", "picker", "pools", "_pool_of", "needs_context",
                 "observe", "set_cookie", "load_changed")

    def __init__(self, spec: Cluster, loop: asyncio.AbstractEventLoop) -> None:
        self.name = spec.name
        backends = [Backend(*parse_address(b.address), weight=b.weight, backup=b.backup)
                    for b in spec.backends]
        self.snapshot = ClusterSnapshot.build(spec.name, backends)
        name, options = policy_spec(spec.policy)
        policy = create_policy(name, options)
        self.needs_context = policy.needs_context
        self.picker = build_picker(policy, self.snapshot)
        # Optional policy hooks (see poise.core.policies): None when the policy has none.
        self.observe = self.picker.observe if hasattr(type(policy), "observe") else None
        self.set_cookie = self.picker.set_cookie if hasattr(type(policy), "set_cookie") else None
        inner = getattr(self.picker, "_primary", self.picker)
        self.load_changed = self.picker.load_changed if hasattr(inner, "load_changed") else None
        self.pools = {
            b: UpstreamPool(b, self.snapshot.stats[b], max_idle=spec.keepalive_max_idle,
                            idle_timeout=spec.keepalive_idle_timeout,
                            connect_timeout=spec.connect_timeout,
                            response_timeout=spec.response_header_timeout, loop=loop)
            for b in self.snapshot.backends
        }
        # Keyed by identity: the picker returns this snapshot's own Backend objects,
        # and id() skips hashing a dataclass on every request.
        self._pool_of = {id(b): pool for b, pool in self.pools.items()}

    def choose(self, ex: Exchange) -> UpstreamPool:
        """The pool of the backend the policy prefers for ``ex`` among those ready."""
        ctx = ex.context() if self.needs_context else None
        snapshot = self.snapshot
        if snapshot.all_ready:
            return self._pool_of[id(self.picker.pick(ctx))]
        for backend in self.picker.candidates(ctx):
            if snapshot.ready(backend):
                return self._pool_of[id(backend)]
        raise NoBackendAvailable(f"cluster {self.name}: no backend available")

    def fallback(self, ex: Exchange, tried: list[UpstreamPool]) -> UpstreamPool | None:
        """The next ready backend's pool for ``ex`` that is not in ``tried``, or None."""
        ctx = ex.context() if self.needs_context else None
        snapshot = self.snapshot
        for backend in self.picker.candidates(ctx):
            pool = self._pool_of[id(backend)]
            if pool not in tried and snapshot.ready(backend):
                return pool
        return None

    def __repr__(self) -> str:
        return f"<ClusterRuntime {self.name} {self.snapshot!r}>"


class Site:
    """Everything a client connection on one listener needs, precomputed."""

    def __init__(self, spec: Listener, clusters: dict[str, ClusterRuntime],
                 loop: asyncio.AbstractEventLoop) -> None:
        self.name = spec.name
        self.loop = loop
        self.router = Router(spec.routes, clusters)
        self.header_timeout = spec.client_header_timeout
        self.idle_timeout = spec.client_idle_timeout
        self.max_request_line = spec.max_request_line
        self.max_header_size = spec.max_header_size
        self.max_headers = spec.max_headers
        self.max_request_body = spec.max_request_body
        self.forwarded_headers = spec.forwarded_headers
        self.xfp = b"x-forwarded-proto: http\r\n"
        self.connections: set = set()

    def __repr__(self) -> str:
        return f"<Site {self.name} connections={len(self.connections)}>"
