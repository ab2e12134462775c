"""round_robin: smooth weighted interleaving (as nginx and Envoy do), with slow start.

Equal weights give plain rotation.  Unequal weights follow earliest-deadline-first
scheduling: backend *i* is due every ``1/w_i``; the one due soonest is picked (ties to
the earlier backend).  This spreads a heavy backend's turns evenly instead of in bursts,
so no backend is picked more than ``ceil(w_max / w_min)`` times in a row.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator, Sequence
from functools import reduce
from math import gcd
from typing import Any

from poise.core.backend import Backend
from poise.core.clock import Clock
from poise.core.cluster import ClusterSnapshot
from poise.core.policies.rotation import RotationPicker
from poise.core.policies.slow_start import Ramp, RampedPolicy, Ramping

# Up to this many picks per cycle the whole schedule is precomputed, so a pick is an
# index into a tuple; beyond it (huge weight sums) the heap is advanced live instead.
_MAX_PRECOMPUTED = 4096


class RoundRobin(RampedPolicy):
    """Policy ``round_robin``.  Options: ``slow_start`` (seconds or a duration such as
    ``"30s"``; default 0 = off)."""

    def build(
        self, snapshot: ClusterSnapshot
    ) -> RotationPicker | DeadlinePicker | RampingDeadlinePicker:
        ramp = self._ramp(snapshot)
        if ramp is not None:
            return RampingDeadlinePicker(snapshot.backends, ramp, self._clock)
        backends = snapshot.backends
        weights = [b.weight for b in backends]
        if not backends:
            return RotationPicker(())
        if len(set(weights)) == 1:
            return RotationPicker(backends)
        period = sum(weights) // reduce(gcd, weights)
        if period <= _MAX_PRECOMPUTED:
            schedule = DeadlinePicker(backends)
            return RotationPicker(tuple(schedule.pick() for _ in range(period)))
        return DeadlinePicker(backends)


class DeadlinePicker:
    """Earliest-deadline-first over a heap: O(log n) per pick, for large weight sums."""

    __slots__ = ("_heap", "_backends")

    def __init__(self, backends: tuple[Backend, ...]) -> None:
        self._backends = backends
        # (deadline, index, picks so far).  The deadline is recomputed as
        # (picks + 1) / weight rather than accumulated: a correctly rounded division
        # gives equal floats for equal fractions, so ties stay ties and the index
        # breaks them deterministically; accumulated sums drift apart.
        self._heap = [(1 / b.weight, i, 0) for i, b in enumerate(backends)]
        heapq.heapify(self._heap)

    def pick(self, ctx: Any = None) -> Backend:
        _, i, picks = self._heap[0]
        backend = self._backends[i]
        picks += 1
        heapq.heapreplace(self._heap, ((picks + 1) / backend.weight, i, picks))
        return backend

    def candidates(self, ctx: Any = None) -> Iterator[Backend]:
        first = self.pick(ctx)
        yield first
        yield from itertools.filterfalse(first.__eq__, self._backends)

    def __repr__(self) -> str:
        return f"<DeadlinePicker backends={len(self._backends)}>"


class RampingDeadlinePicker(Ramping):
    """Earliest-deadline-first with effective weights that change during slow start.

    A weight change only alters the step of a backend's *future* turns; deadlines
    already scheduled stand, so a ramping backend's share grows smoothly instead of
    arriving as a burst of consecutive picks."""

    __slots__ = ("_backends", "_heap", "_steps")

    def __init__(self, backends: tuple[Backend, ...], ramp: Ramp, clock: Clock) -> None:
        self._backends = backends
        weights = self._start_ramp(ramp, clock) or tuple(b.weight for b in backends)
        self._steps = [1.0 / w for w in weights]
        self._heap = [(step, i) for i, step in enumerate(self._steps)]
        heapq.heapify(self._heap)

    def _apply(self, weights: Sequence[float]) -> None:
        self._steps = [1.0 / w for w in weights]

    def pick(self, ctx: Any = None) -> Backend:
        if self._ramp is not None:
            self._follow_ramp()
        deadline, i = self._heap[0]
        heapq.heapreplace(self._heap, (deadline + self._steps[i], i))
        return self._backends[i]

    def candidates(self, ctx: Any = None) -> Iterator[Backend]:
        first = self.pick(ctx)
        yield first
        yield from itertools.filterfalse(first.__eq__, self._backends)

    def __repr__(self) -> str:
        ramping = f" ramping={self.ramping}" if self._ramp is not None else ""
        return f"<RampingDeadlinePicker backends={len(self._backends)}{ramping}>"
