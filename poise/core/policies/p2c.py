"""p2c: power of two choices on in-flight requests (Envoy's least_request).

Draw ``choices`` distinct backends at random, each with probability proportional to its
(effective) weight, and send the request to the one with the lowest
``in_flight / weight``; on a tie the first drawn wins, so with equal relative loads the
traffic split is exactly the weights.  O(choices · log n) per pick, O(1) with equal
weights.  Two random choices already avoid nearly all of the herding that "always the
least loaded" causes when many proxies see the same counts, while reading only two
counters per request (Mitzenmacher, "The Power of Two Choices in Randomized Load
Balancing").  Supports ``slow_start`` (see :mod:`.slow_start`).
"""

from __future__ import annotations

import random
from bisect import bisect_right, insort
from collections.abc import Iterator, Sequence

from poise.core.backend import Backend, BackendStats
from poise.core.clock import Clock
from poise.core.cluster import ClusterSnapshot
from poise.core.context import RequestContext
from poise.core.policies.slow_start import Ramp, RampedPolicy, Ramping
from poise.core.policies.weighted_random import cumulative


class PowerOfTwo(RampedPolicy):
    """Policy ``p2c``.  Options: ``choices`` (backends compared per pick, int >= 2,
    default 2) and ``slow_start`` (seconds or a duration such as ``"30s"``; default 0 =
    off)."""

    def __init__(self, *, choices: int = 2, slow_start: float = 0.0, rng: random.Random,
                 clock: Clock) -> None:
        if isinstance(choices, bool) or not isinstance(choices, int) or choices < 2:
            raise ValueError(f"choices must be an integer >= 2, got {choices!r}")
        self.choices = choices
        super().__init__(slow_start=slow_start, rng=rng, clock=clock)

    def build(self, snapshot: ClusterSnapshot) -> P2CPicker:
        return P2CPicker(snapshot, self.choices, self._ramp(snapshot), self._rng, self._clock)

    def __repr__(self) -> str:
        return f"<PowerOfTwo choices={self.choices} slow_start={self.slow_start:g}s>"


class P2CPicker(Ramping):
    """Best of ``choices`` weighted random draws over one snapshot's backends."""

    __slots__ = ("_backends", "_stats", "_n", "_k", "_weights", "_bounds", "_total",
                 "_uniform", "_random")

    def __init__(self, snapshot: ClusterSnapshot, choices: int, ramp: Ramp | None,
                 rng: random.Random, clock: Clock) -> None:
        backends = self._backends = snapshot.backends
        self._stats: tuple[BackendStats, ...] = tuple(snapshot.stats[b] for b in backends)
        self._n = len(backends)
        self._k = min(choices, self._n)
        self._random = rng.random
        self._apply(self._start_ramp(ramp, clock) or tuple(b.weight for b in backends))

    def _apply(self, weights: Sequence[float]) -> None:
        self._weights = weights
        self._uniform = not weights or min(weights) == max(weights)
        self._bounds, self._total = cumulative(weights) if weights else ([], 0)

    def pick(self, ctx: RequestContext | None = None) -> Backend:
        if self._ramp is not None:
            self._follow_ramp()
        if self._k != 2:
            return self._backends[self._choose()]
        # Two choices, inlined: the common case.
        rnd = self._random
        stats = self._stats
        if self._uniform:
            n = self._n
            i = int(rnd() * n)
            j = int(rnd() * (n - 1))
            if j >= i:
                j += 1
            return self._backends[j if stats[j].in_flight < stats[i].in_flight else i]
        weights, bounds = self._weights, self._bounds
        i = bisect_right(bounds, rnd() * self._total)
        wi = weights[i]
        # The second draw excludes the first: a point on the line without i's interval,
        # moved past that interval when it lies beyond its start.
        x = rnd() * (self._total - wi)
        if x >= (bounds[i - 1] if i else 0):
            x += wi
        j = bisect_right(bounds, x)
        if j == i:                      # only by float rounding at the interval's edge
            j = i - 1 if i else 1
        # in_flight_j / w_j < in_flight_i / w_i, multiplied out: exact for integer weights.
        return self._backends[j if stats[j].in_flight * wi < stats[i].in_flight * weights[j]
                              else i]

    def _choose(self) -> int:
        """Index of the best of ``k`` distinct weighted draws (ties: the first drawn)."""
        if self._n < 2:
            return 0
        drawn = self._draw_distinct(self._k)
        stats, weights = self._stats, self._weights
        best = drawn[0]
        load, weight = stats[best].in_flight, weights[best]
        for i in drawn[1:]:
            # in_flight_i / w_i < load / weight, multiplied out: exact for integer weights.
            if stats[i].in_flight * weight < load * weights[i]:
                best, load, weight = i, stats[i].in_flight, weights[i]
        return best

    def _draw_distinct(self, k: int) -> list[int]:
        """``k`` distinct indices, each drawn with probability proportional to its weight
        among those not drawn yet: a point on the line of the remaining weight is mapped
        onto the full line by stepping over the intervals already taken."""
        weights, bounds, rnd = self._weights, self._bounds, self._random
        drawn: list[int] = []
        taken: list[int] = []           # drawn, ascending
        left = self._total
        for _ in range(k):
            x = rnd() * left
            for i in taken:
                if x < (bounds[i - 1] if i else 0):
                    break
                x += weights[i]
            i = bisect_right(bounds, x)
            if i in drawn:              # only by float rounding at an interval's edge
                i = next(j for j in range(self._n) if j not in drawn)
            drawn.append(i)
            insort(taken, i)
            left -= weights[i]
        return drawn

    def candidates(self, ctx: RequestContext | None = None) -> Iterator[Backend]:
        """The pick, then the others: each next one the best of ``choices`` weighted draws
        among those not proposed yet while they hold at least half the total weight,
        then the rest from least to most loaded (relative to weight)."""
        n = self._n
        if not n:
            return
        if self._ramp is not None:
            self._follow_ramp()
        backends, stats, weights = self._backends, self._stats, self._weights
        first = self._choose()
        yield backends[first]
        seen = {first}
        bounds, total, rnd = self._bounds, self._total, self._random
        left = total - weights[first]
        while len(seen) < n and left * 2 >= total:
            # Draws with replacement among the unseen: each is accepted with
            # probability >= 1/2, whatever the weights of the few left.
            best = -1
            for _ in range(self._k):
                i = bisect_right(bounds, rnd() * total)
                while i in seen:
                    i = bisect_right(bounds, rnd() * total)
                if best < 0 or stats[i].in_flight * weights[best] < \
                        stats[best].in_flight * weights[i]:
                    best = i
            seen.add(best)
            left -= weights[best]
            yield backends[best]
        rest = sorted((stats[i].in_flight / weights[i], rnd(), i)
                      for i in range(n) if i not in seen)
        for _, _, i in rest:
            yield backends[i]

    def __repr__(self) -> str:
        ramping = f" ramping={self.ramping}" if self._ramp is not None else ""
        return f"<P2CPicker backends={self._n} choices={self._k}{ramping}>"
