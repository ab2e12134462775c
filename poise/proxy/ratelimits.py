"""Build one worker's rate limits and connection limits from config (a slow path, run
at start and on reload); the request path uses what this returns
(:mod:`poise.proxy.http.limiting`, ``ClientConnection.connection_made``).

Identity across reloads: a local limit's state is its keys' TATs in the shared table,
found by a seed made of the limit's name and settings, so a reload that keeps them
keeps the state (and one that changes the rate starts afresh).  A global limit's lease
book lives in this object, kept by the same identity.
"""

from __future__ import annotations

from typing import Any

from xxhash import xxh64_intdigest

from poise.config.limits import RateLimit
from poise.config.model import Listener, Route
from poise.core.ratelimit import parse_rate
from poise.proxy.http.limiting import CLIENT_IP, CONSTANT, HEADER, RouteLimits, Rule
from poise.proxy.trust import TrustedProxies
from poise.ratelimit.shared import SharedState

# Connection-count buckets kept for listeners' totals; client addresses hash into the
# others.
TOTAL_BUCKETS = 256


def route_label(route: Route) -> str:
    """A route's name in metrics and default limit names: its ``name`` or cluster."""
    return route.name or route.cluster


def limit_name(spec: RateLimit, listener: str, route: str | None, index: int) -> str:
    """``name`` or one derived from where the limit is written (``route``: the route's
    label, see :func:`route_places`)."""
    if spec.name:
        return spec.name
    where = listener if route is None else f"{listener}.{route}"
    return f"{where}.{index}"


def route_places(spec: Listener) -> list[str]:
    """Each route's label, followed by ``#N`` (its position) when another route of the
    listener has the same label: default limit names must not collide."""
    labels = [route_label(r) for r in spec.routes]
    return [label if labels.count(label) == 1 else f"{label}#{i}"
            for i, label in enumerate(labels)]


class Limiters:
    """The limits of one worker: rules per listener/route, connection guards."""

    def __init__(self, shared: SharedState) -> None:
        self.shared = shared
        # Global rules' lease books by identity (kept across reloads).
        self._remotes: dict[tuple, Any] = {}
        self._used: set[tuple] = set()
        self._ranks: dict[str, int] = {}
        self._previous: dict[tuple[str, str], list[RouteLimits]] = {}
        # Every RouteLimits built by the last configure, for metrics.
        self.routes: list[RouteLimits] = []
        self.guards: dict[str, ConnectionGuard] = {}

    # -- rate limits ---------------------------------------------------------------------

    def route_limits(self, spec: Listener) -> list[RouteLimits | None]:
        """Per route of ``spec``, its limits (None: it has none)."""
        trust = TrustedProxies(spec.trusted_proxies) if spec.trusted_proxies else None
        inherited = self._rules(spec.rate_limit or [], spec.name, None)
        out: list[RouteLimits | None] = []
        for route, place in zip(spec.routes, route_places(spec), strict=True):
            rules = inherited if route.rate_limit is None else \
                self._rules(route.rate_limit, spec.name, place)
            if not rules:
                out.append(None)
                continue
            limits = RouteLimits(rules, spec.name, route_label(route), route.cluster, trust)
            before = self._previous.get((spec.name, limits.label))
            if before:      # the same route before a reload: its counts go on
                old = before.pop(0)
                limits.denied, limits.shadowed = old.denied, old.shadowed
            self.routes.append(limits)
            out.append(limits)
        return out

    def _rules(self, specs: list[RateLimit], listener: str, route: str | None) -> list[Rule]:
        return [self._rule(s, limit_name(s, listener, route, i)) for i, s in enumerate(specs)]

    def _rule(self, spec: RateLimit, name: str) -> Rule:
        count, seconds = parse_rate(spec.rate)
        burst = spec.burst_size()
        identity = (name, spec.key, spec.rate, burst, spec.scope, spec.redis,
                    spec.redis_timeout, spec.on_redis_error)
        if spec.key == "client_ip":
            kind, header, const_of = CLIENT_IP, b"", ""
        elif spec.key.startswith("header:"):
            kind, header, const_of = HEADER, spec.key[7:].encode(), ""
        else:
            kind, header, const_of = CONSTANT, b"", spec.key
        remote = None
        if spec.scope == "global":
            remote = self._remote(identity, spec, name, count / seconds, burst)
        return Rule(name, kind, header, xxh64_intdigest(repr(identity).encode()), count / seconds,
                    burst, int(seconds), count, spec.mode == "shadow",
                    self.shared.rates if remote is None else None, remote, const_of)

    def _remote(self, identity: tuple, spec: RateLimit, name: str, per_second: float,
                burst: int) -> Any:
        self._used.add(identity)
        remote = self._remotes.get(identity)
        if remote is None:
            from poise.ratelimit.redis_store import global_limit  # the [redis] extra
            remote = self._remotes[identity] = global_limit(
                name=name, per_second=per_second, burst=burst, url=spec.redis,
                timeout=spec.redis_timeout, on_error=spec.on_redis_error)
        return remote

    def begin(self, listeners: list[str]) -> None:
        """Before building the limits of every listener (named ``listeners``), at start
        and on reload."""
        self._previous: dict[tuple[str, str], list[RouteLimits]] = {}
        for old in self.routes:
            self._previous.setdefault((old.listener, old.label), []).append(old)
        self.routes = []
        self._used = set()
        # A listener's total count has a bucket of its own: its rank by name, the same
        # in every worker running this config.
        self._ranks = {name: i % TOTAL_BUCKETS for i, name in enumerate(sorted(listeners))}

    def end(self) -> None:
        """After: global limits no longer configured are closed."""
        for identity in [i for i in self._remotes if i not in self._used]:
            self._remotes.pop(identity).close()

    def remotes(self) -> list[Any]:
        return list(self._remotes.values())

    # -- connection limits ---------------------------------------------------------------

    def guard(self, spec: Listener) -> ConnectionGuard | None:
        """The connection guard of ``spec`` (None: no connection limit), kept across
        reloads by listener name so that its rejection counts go on."""
        if spec.max_connections is None and spec.max_connections_per_ip is None:
            self.guards.pop(spec.name, None)
            return None
        guard = self.guards.get(spec.name)
        if guard is None:
            guard = self.guards[spec.name] = ConnectionGuard(spec.name, self.shared)
        guard.configure(self._ranks.get(spec.name, 0), spec.max_connections,
                        spec.max_connections_per_ip)
        return guard

    def close(self) -> None:
        for remote in self._remotes.values():
            remote.close()
        self._remotes.clear()


class ConnectionGuard:
    """``max_connections`` and ``max_connections_per_ip`` of one listener, counted by
    all workers together (:class:`~poise.core.connlimit.ConnectionCounts`).

    :meth:`admit` is called once per accepted connection: it returns the buckets the
    connection holds (to :meth:`release` when it closes) or None when a limit is
    reached, and the connection is then closed at once (``rejected`` counts it)."""

    __slots__ = ("listener", "counts", "total_bucket", "max_total", "max_per_ip",
                 "rejected_total", "rejected_per_ip", "_seed")

    def __init__(self, listener: str, shared: SharedState) -> None:
        self.listener = listener
        self.counts = shared.connections
        self._seed = xxh64_intdigest(f"connections:{listener}".encode())
        self.total_bucket = 0
        self.max_total: int | None = None
        self.max_per_ip: int | None = None
        self.rejected_total = 0
        self.rejected_per_ip = 0

    def configure(self, total_bucket: int, max_total: int | None,
                  max_per_ip: int | None) -> None:
        self.total_bucket = total_bucket
        self.max_total = max_total
        self.max_per_ip = max_per_ip

    def admit(self, peer_ip: bytes) -> tuple[int, int] | None:
        counts = self.counts
        if self.max_total is not None and counts.total(self.total_bucket) >= self.max_total:
            self.rejected_total += 1
            return None
        ip_bucket = -1
        if self.max_per_ip is not None:
            ip_bucket = TOTAL_BUCKETS + xxh64_intdigest(peer_ip, self._seed) % (
                counts.buckets - TOTAL_BUCKETS)
            if counts.total(ip_bucket) >= self.max_per_ip:
                self.rejected_per_ip += 1
                return None
            counts.add(ip_bucket, 1)
        counts.add(self.total_bucket, 1)
        return self.total_bucket, ip_bucket

    def release(self, held: tuple[int, int]) -> None:
        total, ip_bucket = held
        self.counts.add(total, -1)
        if ip_bucket >= 0:
            self.counts.add(ip_bucket, -1)

    def open_connections(self) -> int:
        """This listener's open connections, all workers together."""
        return self.counts.total(self.total_bucket)

    def __repr__(self) -> str:
        return (f"<ConnectionGuard {self.listener} open={self.open_connections()} "
                f"max={self.max_total} per_ip={self.max_per_ip}>")
