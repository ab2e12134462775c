"""Lookup structures and the load bound behind the ``hash`` and ``ip_hash`` policies.

Each structure is a pure function of the members' *node ids* and weights (never of
their order in the config, never of ``hash()``): every worker, process and restart that
sees the same membership builds the same structure and maps a key the same way.

- :class:`Ring` — Ketama-like: ``points_per_weight × weight`` points per backend on a
  64-bit circle; a key belongs to the first point at or after its hash.
- :class:`MaglevTable` — Maglev (Eisenbud et al., NSDI '16, §3.4): a prime-sized table
  filled by backends taking turns along their own permutations of the slots.
- :class:`Rendezvous` — highest random weight: a per-backend seed, scored per key.

A structure is built once per membership and weights (the policy caches it), so a
health change or a snapshot swap with the same members costs no rebuild.
:class:`LoadBound` implements ``bounded_load`` over any of them.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from fractions import Fraction
from itertools import chain, repeat
from math import isqrt
from operator import mul
from typing import Any

from xxhash import xxh3_64_intdigest

from poise.core.backend import Backend, BackendStats

# Fixed seeds: changing any of them remaps every key, so they are part of the format.
_MAGLEV_OFFSET_SEED = 0x6D61676C65762D6F   # "maglev-o"
_MAGLEV_SKIP_SEED = 0x6D61676C65762D73     # "maglev-s"
_RENDEZVOUS_SEED = 0x72656E64657A766F      # "rendezvo"

#: Above this many ring points a build is refused: memory and build time grow with it.
MAX_RING_POINTS = 1 << 21
#: Largest accepted Maglev table (population cost is about M·ln M steps in Python).
MAX_TABLE_SIZE = 1_000_003
#: A Maglev table needs at least this many slots per backend (see MaglevTable).
MIN_SLOTS_PER_BACKEND = 10

_RING_END = 1 << 64          # above every 64-bit hash: a sentinel point that wraps to 0
_TWO_POW_M64 = 2.0 ** -64


def node_ids(backends: Sequence[Backend]) -> list[bytes]:
    """The identity each backend is hashed by: its ``hash_key`` metadata if set, else
    ``host:port``.  A repeated identity gets ``#2``, ``#3``… in config order."""
    ids: list[bytes] = []
    seen: dict[bytes, int] = {}
    for b in backends:
        node = dict(b.meta).get("hash_key", b.address).encode()
        count = seen[node] = seen.get(node, 0) + 1
        ids.append(node if count == 1 else node + b"#%d" % count)
    return ids


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    return all(n % d for d in range(3, isqrt(n) + 1, 2))


def walk(owners: Sequence[int], start: int, size: int, n: int) -> Iterator[int]:
    """The ``n`` distinct values of ``owners[start:size]`` then ``owners[:start]``, in
    that order.  Lazy: callers usually stop after one or two."""
    seen: set[int] = set()
    for j in chain(range(start, size), range(start)):
        i = owners[j]
        if i not in seen:
            seen.add(i)
            yield i
            if len(seen) == n:
                return


class Ring:
    """A consistent-hash ring.

    ``points`` is sorted and ends with a sentinel above every hash, so
    ``bisect_left(points, h)`` is always a valid index into ``owners`` (the sentinel's
    owner is the first point's: the circle wraps).  Ties between equal points are
    broken by node id, not config order.
    """

    __slots__ = ("points", "owners")

    def __init__(self, ids: Sequence[bytes], weights: Sequence[int],
                 points_per_weight: int) -> None:
        total = points_per_weight * sum(weights)
        if total > MAX_RING_POINTS:
            raise ValueError(
                f"the ring would have {total:,} points (limit {MAX_RING_POINTS:,}): lower "
                f"points_per_weight ({points_per_weight}) or the backend weights")
        # Point j of a backend is its id hashed with seed j: raising a weight adds points
        # and keeps the old ones, so only keys landing on new points move.  Each point is
        # packed with its owner's rank in node-id order below it, so one sort of plain
        # ints orders the ring and breaks (astronomically rare) ties by node id.
        ranked = sorted(range(len(ids)), key=ids.__getitem__)
        shift = max(len(ids), 1).bit_length()
        packed = sorted([(xxh3_64_intdigest(ids[i], j) << shift) | r
                         for r, i in enumerate(ranked)
                         for j in range(points_per_weight * weights[i])])
        mask = (1 << shift) - 1
        self.points = [v >> shift for v in packed]
        self.owners = [ranked[v & mask] for v in packed]
        self.points.append(_RING_END)
        self.owners.append(self.owners[0])

    def order(self, h: int, n: int) -> Iterator[int]:
        """Backend indices clockwise from the point owning hash ``h``."""
        return self.walk_from(bisect_left(self.points, h), n)

    def walk_from(self, start: int, n: int) -> Iterator[int]:
        """Backend indices clockwise from ring position ``start`` (as ``bisect_left``
        gives: the sentinel position means point 0)."""
        size = len(self)
        return walk(self.owners, start if start < size else 0, size, n)

    def __len__(self) -> int:
        """Points on the ring, without the sentinel."""
        return len(self.points) - 1


class MaglevTable:
    """A Maglev lookup table: ``slots[h % size]`` is the index of the key's backend.

    Every backend derives a permutation of the slots, ``offset + j·skip (mod size)``,
    from two hashes of its id, and backends take turns claiming their next free slot
    until the table is full, so shares differ by at most one slot (equal weights).  A
    heavier backend takes turns more often: each round every backend earns its weight
    in credit and claims one slot per ``max weight`` of credit (integer arithmetic, so
    every process fills the table identically).

    Backends take turns in node-id order, not config order: two processes that list the
    same members differently still build the same table.
    """

    __slots__ = ("slots", "size")

    def __init__(self, ids: Sequence[bytes], weights: Sequence[int], size: int) -> None:
        n = len(ids)
        if size < MIN_SLOTS_PER_BACKEND * n:
            # Below ~10 slots per backend one slot more or less is a >10% share
            # difference; the Maglev paper recommends M > 100·N for ~1%.
            raise ValueError(
                f"maglev table_size {size} is too small for {n} backends: use a prime of "
                f"at least {MIN_SLOTS_PER_BACKEND * n} (ideally above {100 * n})")
        self.size = size
        self.slots = _populate(ids, weights, size)

    def order(self, h: int, n: int) -> Iterator[int]:
        """Backend indices in table order from the key's slot: the secondary choices of
        a key are the owners of the slots after its own, so a backend's keys spread over
        all the others when it is skipped."""
        return self.walk_from(h % self.size, n)

    def walk_from(self, slot: int, n: int) -> Iterator[int]:
        return walk(self.slots, slot, self.size, n)


def _populate(ids: Sequence[bytes], weights: Sequence[int], size: int) -> list[int]:
    # The table size must be prime: then every skip in 1..size-1 is coprime with it, so
    # each backend's sequence offset + j·skip visits every slot exactly once and a
    # backend never runs out of candidate slots (with a composite size, a skip sharing a
    # factor with it would cycle through a fraction of the table only).
    turns = sorted(range(len(ids)), key=ids.__getitem__)
    nxt = [xxh3_64_intdigest(ids[i], _MAGLEV_OFFSET_SEED) % size for i in turns]
    skip = [xxh3_64_intdigest(ids[i], _MAGLEV_SKIP_SEED) % (size - 1) + 1 for i in turns]
    weight = [weights[i] for i in turns]
    top = max(weight)
    credit = [0] * len(turns)
    slots = [-1] * size
    filled = 0
    while True:
        for t, i in enumerate(turns):
            credit[t] += weight[t]
            if credit[t] < top:
                continue
            credit[t] -= top
            c, s = nxt[t], skip[t]
            while slots[c] >= 0:
                c += s
                if c >= size:
                    c -= size
            slots[c] = i
            c += s
            nxt[t] = c - size if c >= size else c
            filled += 1
            if filled == size:
                return slots


class Rendezvous:
    """Highest random weight: a key scores every backend and takes the best.

    Backend *i* scores ``u_i = xxh3(key, seed_i)`` scaled into [0, 1].  With weights
    the score is ``u_i ** (1 / w_i)`` (the weighted variant: its maximum falls on
    backend *i* with probability ``w_i / Σw``, the same order as minimising
    ``-ln(u_i) / w_i``, computed without a logarithm); with equal weights the plain hash
    is compared.  Adding or removing a backend moves only the keys it wins or won.
    Every pick scores every backend: O(n), inherent to the algorithm.
    """

    __slots__ = ("seeds", "exponents", "n")

    def __init__(self, ids: Sequence[bytes], weights: Sequence[int]) -> None:
        self.seeds = [xxh3_64_intdigest(node, _RENDEZVOUS_SEED) for node in ids]
        self.n = len(ids)
        self.exponents = [1 / w for w in weights] if len(set(weights)) > 1 else None

    def scores(self, key: bytes) -> list[int] | list[float]:
        hashes = map(xxh3_64_intdigest, repeat(key, self.n), self.seeds)
        if self.exponents is None:
            return list(hashes)
        return list(map(pow, map(mul, hashes, repeat(_TWO_POW_M64)), self.exponents))

    def order(self, key: bytes) -> list[int]:
        """Every backend index, best first (ties: lower index first, as ``index(max)``)."""
        return sorted(range(self.n), key=self.scores(key).__getitem__, reverse=True)

    @staticmethod
    def walk_scores(scores: list[int] | list[float], n: int) -> Iterator[int]:
        """Every backend index by these ``scores``, best first (ties: lower index)."""
        return iter(sorted(range(n), key=scores.__getitem__, reverse=True))


class LoadBound:
    """Consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam, 2018).

    Backend *i* may take a request while ``in_flight_i < c × (T + 1) × w_i / W`` (T: the
    requests in flight over all backends, W: their total weight; with equal weights
    that is ``in_flight_i < ceil(c × (T + 1) / n)``).  The loads sum to T < c × (T + 1),
    so some backend always has room.  The factor is kept as an exact fraction of the
    decimal written in the config, so boundaries do not depend on float rounding.

    An idle backend always has room, so the total is summed (O(n)) only when the key's
    first choice is busy.
    """

    __slots__ = ("factor", "_stats", "_weights", "_num", "_den")

    def __init__(self, factor: float, stats: Sequence[BackendStats],
                 weights: Sequence[int]) -> None:
        self.factor = factor
        exact = Fraction(repr(factor))
        self._stats = tuple(stats)
        self._weights = tuple(weights)
        self._num = exact.numerator
        self._den = exact.denominator * sum(weights)

    def choose(self, first: int, walk: Callable[[Any, int], Iterator[int]], start: Any) -> int:
        """``first`` if it has room, else the first index with room of the key's order,
        ``walk(start, n)`` (called only then)."""
        stats, weights = self._stats, self._weights
        load = stats[first].in_flight
        if not load:
            return first
        room = self._num * (sum([s.in_flight for s in stats]) + 1)
        den = self._den
        if load * den < room * weights[first]:
            return first
        for i in walk(start, len(stats)):
            if stats[i].in_flight * den < room * weights[i]:
                return i
        return first        # unreachable while in_flight counts are non-negative

    def arrange(self, order: Iterator[int]) -> Iterator[int]:
        """``order`` with the indices that have room first (``choose``'s answer leads),
        then the full ones, each group in its original order."""
        stats, weights = self._stats, self._weights
        room = self._num * (sum([s.in_flight for s in stats]) + 1)
        den = self._den
        full = []
        for i in order:
            if stats[i].in_flight * den < room * weights[i]:
                yield i
            else:
                full.append(i)
        yield from full
