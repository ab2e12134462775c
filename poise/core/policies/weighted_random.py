"""random: each request goes to a backend drawn with probability proportional to its
(effective) weight.

A pick is one ``rng.random()`` and, when weights differ, a ``bisect`` over cumulative
weights: O(log n).  Load-unaware, stateless between picks, and the same in every worker
without coordination, which makes it a fair default for many proxies in front of the
same backends.  Supports ``slow_start`` (see :mod:`.slow_start`).
"""

from __future__ import annotations

import random
from bisect import bisect_right
from collections.abc import Callable, Iterator, Sequence
from itertools import accumulate

from poise.core.backend import Backend
from poise.core.clock import Clock
from poise.core.cluster import ClusterSnapshot
from poise.core.context import RequestContext
from poise.core.policies.slow_start import Ramp, RampedPolicy, Ramping


class WeightedRandom(RampedPolicy):
    """Policy ``random``.  Options: ``slow_start`` (seconds or a duration such as
    ``"30s"``; default 0 = off)."""

    def build(self, snapshot: ClusterSnapshot) -> RandomPicker:
        return RandomPicker(snapshot.backends, self._ramp(snapshot), self._rng, self._clock)

    def __repr__(self) -> str:
        return f"<WeightedRandom slow_start={self.slow_start:g}s>"


def cumulative(weights: Sequence[float]) -> tuple[list[float], float]:
    """``(bounds, total)`` for :func:`draw`: the running sums of ``weights`` but the last
    one, and the sum.  Leaving the last sum out means a draw can never land past the last
    backend, however ``random() * total`` rounds."""
    sums = list(accumulate(weights))
    return sums[:-1], sums[-1]


def draw(bounds: list[float], total: float, random: Callable[[], float]) -> int:
    """A backend index, with probability proportional to its weight."""
    return bisect_right(bounds, random() * total)


def weighted_rest(seen: set[int], weights: Sequence[float], bounds: list[float],
                  total: float, random: Callable[[], float]) -> Iterator[int]:
    """The indices not in ``seen`` (which it extends), each once, in a weighted random
    order: repeated draws skipping those seen while at least half the total weight is
    unseen (so at most two draws per index on average), then the remainder shuffled."""
    n = len(weights)
    left = total - sum(weights[i] for i in seen)
    while len(seen) < n and left * 2 >= total:
        i = bisect_right(bounds, random() * total)
        if i not in seen:
            seen.add(i)
            left -= weights[i]
            yield i
    rest = [i for i in range(n) if i not in seen]
    for k in range(len(rest)):          # Fisher-Yates, one step per candidate taken
        j = k + int(random() * (len(rest) - k))
        rest[k], rest[j] = rest[j], rest[k]
        yield rest[k]


class RandomPicker(Ramping):
    """Weighted random over one snapshot's backends."""

    __slots__ = ("_backends", "_n", "_weights", "_bounds", "_total", "_uniform", "_random")

    def __init__(self, backends: tuple[Backend, ...], ramp: Ramp | None, rng: random.Random,
                 clock: Clock) -> None:
        self._backends = backends
        self._n = len(backends)
        self._random = rng.random
        weights = self._start_ramp(ramp, clock) or tuple(b.weight for b in backends)
        self._apply(weights)

    def _apply(self, weights: Sequence[float]) -> None:
        self._weights = weights
        # Equal weights need no table: a pick is one multiplication.
        self._uniform = not weights or min(weights) == max(weights)
        self._bounds, self._total = cumulative(weights) if weights else ([], 0)

    def _index(self) -> int:
        if self._ramp is not None:
            self._follow_ramp()
        if self._uniform:
            return int(self._random() * self._n)
        return bisect_right(self._bounds, self._random() * self._total)

    def pick(self, ctx: RequestContext | None = None) -> Backend:
        if self._ramp is not None:
            self._follow_ramp()
        if self._uniform:
            return self._backends[int(self._random() * self._n)]
        return self._backends[bisect_right(self._bounds, self._random() * self._total)]

    def candidates(self, ctx: RequestContext | None = None) -> Iterator[Backend]:
        """The pick, then every other backend once in a weighted random order."""
        if not self._n:
            return
        first = self._index()
        backends = self._backends
        yield backends[first]
        for i in weighted_rest({first}, self._weights, self._bounds, self._total, self._random):
            yield backends[i]

    def __repr__(self) -> str:
        ramping = f" ramping={self.ramping}" if self._ramp is not None else ""
        return f"<RandomPicker backends={self._n}{ramping}>"
