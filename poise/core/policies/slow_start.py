"""Slow start: a backend that just became ready gets a growing share of traffic.

With ``slow_start: W`` (seconds, or a duration such as ``30s``; 0 = off), a backend that
became ready at ``snapshot.ready_since[b]`` (absent: long ago) has the effective weight::

    weight * (MIN_FRACTION + (1 - MIN_FRACTION) * elapsed / W)    while 0 <= elapsed < W
    weight                                                        afterwards

a straight line from 10 % to 100 % of its weight (a ``ready_since`` in the future counts
as elapsed 0).  The line starts at 10 % rather than 0 so that the backend is tried at
once (its caches and pools warm up) and starts climbing at once (Envoy's default curve
instead holds a 10 % floor for the first tenth of the window).

Cost: pickers compute effective weights when built and then at most once per
``W / STEPS`` seconds while some backend is ramping: one ``clock.now()`` per pick and an
O(n) table rebuild per step.  When no backend is ramping (the common case) there is no
clock read per pick at all, and a ramp that ends switches the picker back to that case.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

from poise.core.clock import Clock, MonotonicClock
from poise.core.cluster import ClusterSnapshot
from poise.core.units import duration_option

#: Share of its weight a backend gets the moment it becomes ready.
MIN_FRACTION = 0.1
#: A ramp moves in this many steps: weights are recomputed every ``window / STEPS``.
STEPS = 100


def check_slow_start(value: Any) -> float:
    """The window in seconds from a number or a duration string such as ``30s`` (0 =
    off); a ValueError saying why for anything else (negative, infinite, not a time)."""
    try:
        return duration_option("slow_start", value)
    except TypeError as e:          # config errors are ValueErrors for this option
        raise ValueError(str(e)) from None


def ramp_fraction(elapsed: float, window: float) -> float:
    """The share of its weight a backend has ``elapsed`` seconds after becoming ready."""
    if elapsed >= window:
        return 1.0
    if elapsed <= 0:
        return MIN_FRACTION
    return MIN_FRACTION + (1.0 - MIN_FRACTION) * elapsed / window


class Ramp:
    """The slow-start schedule of one snapshot's backends (by index in
    ``snapshot.backends``).  Immutable; build one with :meth:`plan`."""

    __slots__ = ("base", "starts", "window", "end", "_step")

    def __init__(self, base: tuple[int, ...], starts: dict[int, float], window: float) -> None:
        self.base = base
        #: index → when that backend became ready, for the backends still ramping.
        self.starts = starts
        self.window = window
        #: From this time on every backend has its full weight.
        self.end = max(starts.values()) + window
        self._step = window / STEPS

    @classmethod
    def plan(cls, snapshot: ClusterSnapshot, window: float, clock: Clock) -> Ramp | None:
        """The ramp of ``snapshot`` seen from now, or None when no backend ramps (window 0,
        or every backend has been ready for at least ``window`` seconds)."""
        since = snapshot.ready_since
        if window <= 0 or not since:
            return None
        now = clock.now()
        starts = {i: since[b] for i, b in enumerate(snapshot.backends)
                  if b in since and since[b] + window > now}
        if not starts:
            return None
        return cls(tuple(b.weight for b in snapshot.backends), starts, window)

    def weights(self, now: float) -> tuple[Sequence[float], float | None]:
        """Effective weights at ``now`` and when to recompute them; None instead of a time
        means the ramp is over and the weights are the full ones (``base``) for good."""
        if now >= self.end:
            return self.base, None
        window = self.window
        weights: list[float] = list(self.base)
        for i, start in self.starts.items():
            weights[i] = weights[i] * ramp_fraction(now - start, window)
        return weights, min(now + self._step, self.end)

    def __repr__(self) -> str:
        return f"<Ramp window={self.window:g}s ramping={len(self.starts)} end={self.end:.3f}>"


class Ramping:
    """Base of the pickers that follow a :class:`Ramp`: ``pick`` calls
    ``_follow_ramp()`` only while ``_ramp`` is not None; subclasses implement
    ``_apply(weights)`` to rebuild whatever they derive from effective weights."""

    __slots__ = ("_ramp", "_clock", "_due", "_ramp_now")

    def _start_ramp(self, ramp: Ramp | None, clock: Clock) -> Sequence[float]:
        """Effective weights to build with; remembers when to recompute them."""
        self._clock = clock
        self._ramp = ramp
        self._due = math.inf
        if ramp is None:
            return ()
        self._ramp_now = now = clock.now()
        weights, due = ramp.weights(now)
        if due is None:
            self._ramp = None
        else:
            self._due = due
        return weights

    def _follow_ramp(self) -> None:
        now = self._clock.now()
        if now < self._due:
            return
        ramp = self._ramp
        assert ramp is not None
        self._ramp_now = now
        weights, due = ramp.weights(now)
        if due is None:
            self._ramp = None
            self._due = math.inf
        else:
            self._due = due
        self._apply(weights)

    def _apply(self, weights: Sequence[float]) -> None:
        raise NotImplementedError

    @property
    def ramping(self) -> int:
        """How many backends were below full weight at the last weight update (0: the
        weights are final and the clock is no longer read)."""
        ramp = self._ramp
        if ramp is None:
            return 0
        return sum(1 for start in ramp.starts.values() if start + ramp.window > self._ramp_now)


class RampedPolicy:
    """Base of the policies that take ``slow_start``: keeps the option, the injected
    rng and clock, and plans each snapshot's ramp."""

    needs_context = False

    def __init__(self, *, slow_start: float = 0.0, rng: random.Random | None = None,
                 clock: Clock | None = None) -> None:
        self.slow_start = check_slow_start(slow_start)
        self._rng = rng if rng is not None else random.Random()
        self._clock = clock if clock is not None else MonotonicClock()

    def _ramp(self, snapshot: ClusterSnapshot) -> Ramp:
        return Ramp.plan(snapshot, self.slow_start, self._clock)
