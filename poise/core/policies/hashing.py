"""hash and ip_hash: the same request key goes to the same backend.

``hash`` takes its key from the request (``key:``), maps it with one of three consistent
hashing algorithms (``algorithm:``) and, optionally, caps each backend's share of the
requests in flight (``bounded_load:``).  ``ip_hash`` is ``hash`` on the client address.
Keys are hashed with xxhash, never ``hash()``, so every worker, process and restart
maps a key the same way.  Tables are built once per membership (see
:mod:`poise.core.policies.hash_tables`); a pick is a key lookup, a hash and an index.

As every picker, these never judge health: ``candidates()`` gives the key's backends in
preference order and the caller skips the unready ones.
"""

from __future__ import annotations

import re
from bisect import bisect_left
from collections.abc import Callable, Iterator
from functools import partial
from math import isfinite
from operator import attrgetter, methodcaller
from typing import Any

from xxhash import xxh3_64_intdigest

from poise.core.backend import Backend
from poise.core.cluster import ClusterSnapshot
from poise.core.context import RequestContext
from poise.core.policies import POLICIES, Picker, Policy, create_policy
from poise.core.policies.hash_tables import (
    MAX_TABLE_SIZE,
    LoadBound,
    MaglevTable,
    Rendezvous,
    Ring,
    is_prime,
    node_ids,
)

ALGORITHMS = ("ring", "maglev", "rendezvous")
KEYS = "ip, path, uri, header:NAME, cookie:NAME or query:NAME"
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")      # RFC 9110 token
_QUERY_NAME = re.compile(r"[!-\"$%'-<>-~]+\Z")    # printable ASCII but # & =
_MAPPED_V4 = "::ffff:"
_CACHED_TABLES = 4      # memberships remembered per policy (primaries, backups, …)

KeyFn = Callable[[RequestContext], "bytes | None"]


def _client_ip(ctx: RequestContext) -> bytes:
    ip = ctx.client_ip
    # A dual-stack listener reports IPv4 clients as ::ffff:a.b.c.d; hash them as a.b.c.d
    # so a client keeps its backend whichever listener it came through.
    if ip.startswith(_MAPPED_V4) and "." in ip:
        ip = ip[len(_MAPPED_V4):]
    return ip.encode()


def _query(name: bytes, ctx: RequestContext) -> bytes | None:
    try:
        return ctx.query(name)
    except UnicodeError:
        # RequestContext.query cannot represent some percent-decoded text (e.g. %E2%82%AC)
        # and raises: treat the key as missing rather than fail the request.
        return None


def parse_key(spec: object) -> tuple[str, KeyFn]:
    """``(canonical spec, extractor)`` for a ``key:`` option; ValueError if malformed.

    The extractor returns the key's bytes, or None/empty when the request has none.
    """
    if not isinstance(spec, str):
        raise ValueError(f"key must be a string: {KEYS}")
    if spec == "ip":
        return spec, _client_ip
    if spec == "path":
        return spec, attrgetter("path")
    if spec == "uri":
        return spec, attrgetter("target")
    kind, sep, name = spec.partition(":")
    if sep and kind in ("header", "cookie"):
        if not _TOKEN.match(name):
            raise ValueError(f"key {spec!r}: {kind} name must be a non-empty token "
                             "(letters, digits, !#$%&'*+-.^_`|~)")
        if kind == "header":
            name = name.lower()
        return f"{kind}:{name}", methodcaller(kind, name.encode("ascii"))
    if sep and kind == "query":
        if not _QUERY_NAME.match(name):
            raise ValueError(f"key {spec!r}: query parameter name must be non-empty "
                             "printable ASCII without spaces, '&', '=' or '#'")
        return spec, partial(_query, name.encode("ascii"))
    raise ValueError(f"key must be one of {KEYS}; got {spec!r}")


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value


def _integer(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low:,} and {high:,}, got {value:,}")
    return value


class Hash:
    """Consistent hashing on a request key.

    Options (defaults):

    - ``key`` (required): ``ip`` (client address, IPv4 or IPv6), ``path`` (without the
      query), ``uri`` (path and query as sent), ``header:NAME``, ``cookie:NAME``,
      ``query:NAME``.  A missing or empty key uses ``fallback``.
    - ``algorithm`` (``ring``): ``ring`` — Ketama-like ring with ``points_per_weight``
      points per weight unit, O(log points) per pick; ``maglev`` — lookup table of
      ``table_size`` slots (a prime), O(1) per pick, near-perfect balance, slightly more
      keys move on membership changes; ``rendezvous`` — highest random weight, minimal
      movement and exact weights with no table, but **O(n) per pick** (every backend is
      scored for every key: inherent to the algorithm).
    - ``points_per_weight`` (160): ring points per unit of backend weight (1-1000).
    - ``table_size`` (65537): Maglev table size; a prime, at least 10 × backends.
    - ``bounded_load`` (None): a factor ≥ 1.0.  A backend whose requests in flight
      reach ``factor × (total in flight + 1) × weight / total weight`` is passed over for
      the next one in the algorithm's order (consistent hashing with bounded loads).
    - ``fallback`` (``round_robin``): the policy (a name) for requests without the key.
    """

    needs_context = True

    def __init__(self, *, key: str, algorithm: str = "ring", points_per_weight: int = 160,
                 table_size: int = 65537, bounded_load: float | None = None,
                 fallback: str = "round_robin", rng: Any = None, clock: Any = None) -> None:
        self.key, self._extract = parse_key(key)
        if algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {', '.join(ALGORITHMS)}; "
                             f"got {algorithm!r}")
        self.algorithm = algorithm
        self.points_per_weight = _integer("points_per_weight", points_per_weight, 1, 1000)
        self.table_size = _integer("table_size", table_size, 3, MAX_TABLE_SIZE)
        if not is_prime(table_size):
            raise ValueError(f"table_size must be a prime (e.g. 65537, 655373), "
                             f"got {table_size:,}")
        if bounded_load is not None and _number("bounded_load", bounded_load) < 1.0:
            raise ValueError(f"bounded_load must be at least 1.0, got {bounded_load!r}")
        self.bounded_load = bounded_load
        if not isinstance(fallback, str) or fallback not in POLICIES:
            raise ValueError(f"fallback must be a policy name "
                             f"({', '.join(sorted(POLICIES))}), got {fallback!r}")
        if fallback == "hash":
            raise ValueError("fallback cannot be hash: it would need its own key")
        self.fallback = fallback
        self._rng = rng
        self._clock = clock
        self._fallback_policy: Policy | None = None
        self._tables: dict[tuple[tuple[bytes, int], ...], Ring | MaglevTable | Rendezvous] = {}

    def build(self, snapshot: ClusterSnapshot) -> Picker:
        if self._fallback_policy is None:
            self._fallback_policy = create_policy(self.fallback, rng=self._rng,
                                                  clock=self._clock)
        backends = snapshot.backends
        if not backends:
            return NoBackends()
        weights = [b.weight for b in backends]
        if min(weights) < 1:
            raise ValueError(f"hash on {self.key}: backend weights must be at least 1")
        fallback = self._fallback_policy.build(snapshot)
        ids = node_ids(backends)
        table = self._table(ids, weights)
        bound = (None if self.bounded_load is None else
                 LoadBound(self.bounded_load, [snapshot.stats[b] for b in backends], weights))
        cls = {"ring": RingPicker, "maglev": MaglevPicker,
               "rendezvous": RendezvousPicker}[self.algorithm]
        return cls(backends, table, self.key, self._extract, fallback, bound)

    def _table(self, ids: list[bytes], weights: list[int]) -> Ring | MaglevTable | Rendezvous:
        """The structure for this membership, reused while members and weights stay."""
        signature = tuple(zip(ids, weights, strict=True))
        table = self._tables.get(signature)
        if table is None:
            if self.algorithm == "ring":
                table = Ring(ids, weights, self.points_per_weight)
            elif self.algorithm == "maglev":
                table = MaglevTable(ids, weights, self.table_size)
            else:
                table = Rendezvous(ids, weights)
            if len(self._tables) >= _CACHED_TABLES:
                del self._tables[next(iter(self._tables))]
            self._tables[signature] = table
        return table

    def __repr__(self) -> str:
        extra = {"ring": f" points_per_weight={self.points_per_weight}",
                 "maglev": f" table_size={self.table_size}", "rendezvous": ""}[self.algorithm]
        bound = f" bounded_load={self.bounded_load}" if self.bounded_load is not None else ""
        return (f"<{type(self).__name__} key={self.key} algorithm={self.algorithm}{extra}"
                f"{bound} fallback={self.fallback}>")


class IpHash(Hash):
    """``hash`` with ``key: ip``: the client address (IPv4 or IPv6; IPv4-mapped IPv6
    addresses count as their IPv4 address).  Same options as ``hash`` except ``key``."""

    def __init__(self, *, algorithm: str = "ring", points_per_weight: int = 160,
                 table_size: int = 65537, bounded_load: float | None = None,
                 fallback: str = "round_robin", rng: Any = None, clock: Any = None) -> None:
        super().__init__(key="ip", algorithm=algorithm, points_per_weight=points_per_weight,
                         table_size=table_size, bounded_load=bounded_load, fallback=fallback,
                         rng=rng, clock=clock)


class _KeyedPicker:
    """What the three pickers share: key extraction, fallback, bounded load, repr."""

    __slots__ = ("_backends", "_table", "_key", "_extract", "_fallback", "_bound")

    def __init__(self, backends: tuple[Backend, ...], table: Any, key: str, extract: KeyFn,
                 fallback: Picker, bound: LoadBound | None) -> None:
        self._backends = backends
        self._table = table
        self._key = key
        self._extract = extract
        self._fallback = fallback
        self._bound = bound

    def candidates(self, ctx: RequestContext | None = None) -> Iterator[Backend]:
        key = self._extract(ctx) if ctx is not None else None
        if not key:
            yield from self._fallback.candidates(ctx)
            return
        order = self._order(key)
        if self._bound is not None:
            order = self._bound.arrange(order)
        yield from map(self._backends.__getitem__, order)

    def _order(self, key: bytes) -> Iterator[int]:
        raise NotImplementedError

    def _describe(self) -> str:
        return ""

    def __repr__(self) -> str:
        bound = f" bounded_load={self._bound.factor}" if self._bound is not None else ""
        return (f"<{type(self).__name__} key={self._key} backends={len(self._backends)}"
                f"{self._describe()}{bound} fallback={self._fallback!r}>")


class RingPicker(_KeyedPicker):
    """A key takes the first ring point at or after its hash; candidates walk on."""

    __slots__ = ("_points", "_at")

    def __init__(self, backends: tuple[Backend, ...], table: Ring, *args: Any) -> None:
        super().__init__(backends, table, *args)
        self._points = table.points
        self._at = [backends[i] for i in table.owners]       # ring position → backend

    def pick(self, ctx: RequestContext | None = None) -> Backend:
        key = self._extract(ctx) if ctx is not None else None
        if not key:
            return self._fallback.pick(ctx)
        at = bisect_left(self._points, xxh3_64_intdigest(key))
        if self._bound is None:
            return self._at[at]
        table = self._table
        return self._backends[self._bound.choose(table.owners[at], table.walk_from, at)]

    def _order(self, key: bytes) -> Iterator[int]:
        return self._table.order(xxh3_64_intdigest(key), len(self._backends))

    def _describe(self) -> str:
        return f" points={len(self._table)}"


class MaglevPicker(_KeyedPicker):
    """A key takes the backend in its table slot; candidates continue along the table."""

    __slots__ = ("_at", "_size")

    def __init__(self, backends: tuple[Backend, ...], table: MaglevTable, *args: Any) -> None:
        super().__init__(backends, table, *args)
        self._at = [backends[i] for i in table.slots]         # slot → backend
        self._size = table.size

    def pick(self, ctx: RequestContext | None = None) -> Backend:
        key = self._extract(ctx) if ctx is not None else None
        if not key:
            return self._fallback.pick(ctx)
        slot = xxh3_64_intdigest(key) % self._size
        if self._bound is None:
            return self._at[slot]
        table = self._table
        return self._backends[self._bound.choose(table.slots[slot], table.walk_from, slot)]

    def _order(self, key: bytes) -> Iterator[int]:
        return self._table.order(xxh3_64_intdigest(key), len(self._backends))

    def _describe(self) -> str:
        return f" table={self._size}"


class RendezvousPicker(_KeyedPicker):
    """A key takes its highest-scoring backend; candidates follow the scores. O(n)."""

    __slots__ = ()

    def pick(self, ctx: RequestContext | None = None) -> Backend:
        key = self._extract(ctx) if ctx is not None else None
        if not key:
            return self._fallback.pick(ctx)
        table = self._table
        scores = table.scores(key)
        first = scores.index(max(scores))
        if self._bound is None:
            return self._backends[first]
        return self._backends[self._bound.choose(first, table.walk_scores, scores)]

    def _order(self, key: bytes) -> Iterator[int]:
        return iter(self._table.order(key))

    def _describe(self) -> str:
        return " weighted" if self._table.exponents is not None else ""


class NoBackends:
    """The picker of an empty snapshot: no candidates (``pick`` must not be called)."""

    __slots__ = ()

    def pick(self, ctx: RequestContext | None = None) -> Backend:
        raise LookupError("pick() on a picker without backends")

    def candidates(self, ctx: RequestContext | None = None) -> Iterator[Backend]:
        return iter(())

    def __repr__(self) -> str:
        return "<NoBackends>"
