"""A worker's counters as the control plane receives them: deltas and gauges.

The data plane keeps plain cumulative integers on its own objects (see
:mod:`poise.proxy.http.accounting`).  Every second the worker reads them into one
flat mapping, ``{key: value}``, and sends what changed since the last report
(:meth:`Shipper.deltas`) together with its gauges (:meth:`Shipper.gauges`).  Keys are
tuples whose first item names the series (JSON turns them into lists)::

    ("requests", listener, cluster, code)      ("request_bucket", listener, cluster, i)
    ("request_seconds", listener, cluster)     ("connections", listener)
    ("bytes_in", listener)  ("bytes_out", listener)
    ("upstream", cluster, backend, code)       ("upstream_bucket", cluster, backend, i)
    ("upstream_seconds", cluster, backend)     ("connect_errors", cluster, backend)
    ("timeouts", cluster, backend)  ("ejections", cluster, backend)
    ("retries", cluster)  ("overflow", cluster, limit)  ("access_log_dropped",)
    ("rate_limited", listener, route, mode)  ("connections_rejected", listener, reason)
    ("rate_limit_evictions",)  ("redis_errors", redis)  ("redis_fallbacks", limit)

Gauges, whole each time::

    ("open", listener)  ("in_flight", cluster, backend)  ("idle", cluster, backend)
    ("parked", cluster, backend)  ("active", cluster, backend)
    ("ejected", cluster, backend)  ("panic", cluster)
    ("redis_up", redis)  ("redis_down", redis)

A counter that went down belongs to an object built anew (a backend removed and
added again): its whole value is the delta.  Counts of an object removed by a reload
since the last report are lost (at most a second of a removed listener, cluster or
backend); everything else is exact, the last report included (sent at shutdown).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from poise.core.health import HealthFlag

if TYPE_CHECKING:
    from poise.proxy.http.accounting import Counts
    from poise.proxy.http.cluster import ClusterRuntime
    from poise.proxy.http.site import Site
    from poise.proxy.server import ProxyServer

Key = tuple[Any, ...]
Flat = dict[Key, float]


class Shipper:
    """Turns one worker's cumulative counters into deltas, report after report."""

    def __init__(self, server: ProxyServer) -> None:
        self.server = server
        self._last: Flat = {}

    def deltas(self) -> list[list[Any]]:
        """``[[key, delta], ...]`` for every counter that changed since the last call."""
        now = counters(self.server)
        last = self._last
        out: list[list[Any]] = []
        for key, value in now.items():
            before = last.get(key, 0)
            if value != before:
                out.append([list(key), value - before if value > before else value])
        self._last = now
        return out

    def gauges(self) -> list[list[Any]]:
        """``[[key, value], ...]`` for every gauge (zeros left out)."""
        return [[list(k), v] for k, v in gauges(self.server).items() if v]


def counters(server: ProxyServer) -> Flat:
    """Every cumulative counter of ``server``'s listeners and clusters."""
    flat: Flat = {}
    for site in [*server.sites.values(), *server.retiring]:
        _site_counters(flat, site)
    for name, cluster in server.clusters.items():
        _cluster_counters(flat, name, cluster)
    _add(flat, ("access_log_dropped",), server.access_logs.dropped)
    _limit_counters(flat, server)
    return flat


def _limit_counters(flat: Flat, server: ProxyServer) -> None:
    limiters = server.limiters
    for route in limiters.routes:
        _add(flat, ("rate_limited", route.listener, route.label, "enforce"), route.denied)
        _add(flat, ("rate_limited", route.listener, route.label, "shadow"), route.shadowed)
    for name, guard in limiters.guards.items():
        _add(flat, ("connections_rejected", name, "max_connections"), guard.rejected_total)
        _add(flat, ("connections_rejected", name, "max_connections_per_ip"),
             guard.rejected_per_ip)
    _add(flat, ("rate_limit_evictions",), server.shared.rates.evictions)
    for remote in limiters.remotes():
        _add(flat, ("redis_fallbacks", remote.name), remote.book.fallbacks)
    for redis, store in _redis_stores(server).items():
        _add(flat, ("redis_errors", redis), store.errors)


def _redis_stores(server: ProxyServer) -> dict[str, Any]:
    """The Redis stores of the global limits, by URL (password hidden)."""
    from poise.ratelimit.redis_store import redact

    return {redact(remote.store.url): remote.store for remote in server.limiters.remotes()}


def _site_counters(flat: Flat, site: Site) -> None:
    name = site.name
    _add(flat, ("connections", name), site.accepted)
    _add(flat, ("bytes_in", name), site.bytes_in)
    _add(flat, ("bytes_out", name), site.bytes_out)
    for reason, n in site.rejected.items():
        _add(flat, ("connections_rejected", name, reason), n)
    for cluster, served in site.served.items():
        for code, n in served.by_code().items():
            _add(flat, ("requests", name, cluster, code), n)
        _histogram(flat, ("request_bucket", name, cluster), ("request_seconds", name, cluster),
                   served)


def _cluster_counters(flat: Flat, name: str, cluster: ClusterRuntime) -> None:
    _add(flat, ("retries", name), cluster.retries)
    if cluster.limits is not None:
        for limit, n in cluster.limits.overflows.items():
            _add(flat, ("overflow", name, limit.value), n)
    for address, n in cluster.health.ejections.items():
        _add(flat, ("ejections", name, address), n)
    for pool in _pools(cluster):
        address = pool.backend.address
        tries = pool.tries
        for code, n in tries.by_code().items():
            _add(flat, ("upstream", name, address, code), n)
        _histogram(flat, ("upstream_bucket", name, address), ("upstream_seconds", name, address),
                   tries)
        _add(flat, ("connect_errors", name, address), tries.connect_errors)
        _add(flat, ("timeouts", name, address), tries.timeouts)


def gauges(server: ProxyServer) -> Flat:
    """What ``server`` holds now: open client connections per listener, and per
    backend requests in flight, idle (parked ones included), parked and open upstream
    connections, ejection."""
    flat: Flat = {}
    for site in [*server.sites.values(), *server.retiring]:
        _add(flat, ("open", site.name), len(site.connections))
    for name, cluster in server.clusters.items():
        _add(flat, ("panic", name), 1 if cluster.health.panic else 0)
        for pool in _pools(cluster):
            address = pool.backend.address
            _add(flat, ("in_flight", name, address), pool.stats.in_flight)
            # (Parked connections are idle ones too, kept as bare sockets: counted in
            # both.)
            parked = len(pool.parked)
            _add(flat, ("idle", name, address), len(pool.idle) + parked)
            _add(flat, ("parked", name, address), parked)
            _add(flat, ("active", name, address), pool.active)
            ejected = HealthFlag.OUTLIER_EJECTED in cluster.health.flags(pool.backend)
            _add(flat, ("ejected", name, address), 1 if ejected else 0)
    for redis, store in _redis_stores(server).items():
        _add(flat, ("redis_up" if store.up else "redis_down", redis), 1)
    return flat


def _pools(cluster: ClusterRuntime) -> Iterable[Any]:
    """The pools of the cluster's backends, then those of removed backends whose
    requests are still finishing (not in ``pools`` any more)."""
    yield from cluster.pools.values()
    yield from cluster._retired


def _histogram(flat: Flat, bucket_key: Key, sum_key: Key, counts: Counts) -> None:
    for i, n in enumerate(counts.buckets):
        if n:
            _add(flat, (*bucket_key, i), n)
    if counts.total:
        _add(flat, sum_key, counts.total)


def _add(flat: Flat, key: Key, value: float) -> None:
    # (A listener renamed or a retired pool may repeat a key: their counts add up.)
    flat[key] = flat.get(key, 0) + value
