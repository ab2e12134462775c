"""peak_ewma: latency-aware power of two choices (as Finagle and Linkerd balance).

Each backend carries a latency estimate *E* in its :class:`BackendStats` (``ewma_rtt``,
stamped ``ewma_at``), so it survives snapshot rebuilds.  A pick draws two distinct
backends at random and takes the one with the lower cost::

    cost = E_now × (in_flight + 1)

The estimate is *peak-sensitive*: an answer slower than ``E`` replaces it at once, while
a faster one only pulls it down gradually, ``E ← E·w + rtt·(1 − w)`` with
``w = exp(−Δt / decay)`` and ``Δt`` the time since the previous answer.  Slowness is
believed immediately and recovery cautiously, so a backend that starts to struggle
sheds load before its queue grows.

``E_now`` is ``E`` itself while the backend has requests in flight.  Once it is idle the
estimate ages toward zero, ``E·exp(−idle / decay)``: a backend that stopped receiving
traffic after a spike looks cheaper and cheaper until one request probes it again,
and that single answer restores its estimate.  (Finagle and Linkerd age every
estimate on each read; ageing only idle ones keeps a hung backend, whose answers never
come, from looking cheaper while its requests pile up.)  Until its first answer a
backend is costed at ``default_rtt``, aged in the same way from when it was first seen.

Failures are samples too: a failed attempt counts as ``max(rtt, failure_penalty)``, so
a backend answering fast 5xx does not look fast.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from math import exp
from typing import Any

from poise.core.backend import Backend, BackendStats
from poise.core.clock import Clock
from poise.core.cluster import ClusterSnapshot
from poise.core.units import duration_option

# Samples are clamped into this range: a zero (or NaN) sample would read as "no data"
# and an infinite one would stick forever.
_MIN_RTT = 1e-6
_MAX_RTT = 3600.0
# candidates(): above this many backends, the next _SAMPLED proposals after the first
# are sampled rather than ranked (see EwmaPicker.candidates).
_SAMPLE_ABOVE = 16
_SAMPLED = 3


def _seconds(name: str, value: object, *, zero_ok: bool = False) -> float:
    """A finite duration in seconds from a number or a string such as ``250ms``."""
    seconds = duration_option(name, value)
    if seconds == 0 and not zero_ok:
        raise ValueError(f"{name}: expected a positive finite duration, got {value!r}")
    return seconds


class PeakEwma:
    """Policy factory for ``peak_ewma``.

    Options (durations in seconds, or strings such as ``"250ms"``):

    - ``decay`` (default 10 s): the time constant of the moving average and of the
      idle ageing.  Longer remembers slowness longer.
    - ``default_rtt`` (default 30 ms, as Linkerd): the estimate of a backend that has
      not answered yet.  Lower tries new backends sooner.
    - ``failure_penalty`` (default 1 s): a failed attempt counts as an answer taking
      ``max(rtt, failure_penalty)``.  0 counts failures at their real latency.

    The proxy reports every completed attempt with :meth:`observe`.
    """

    needs_context = False

    def __init__(self, *, decay: float | str = 10.0, default_rtt: float | str = 0.030,
                 failure_penalty: float | str = 1.0, rng: random.Random,
                 clock: Clock) -> None:
        self.decay = _seconds("decay", decay)
        self.default_rtt = _seconds("default_rtt", default_rtt)
        self.failure_penalty = _seconds("failure_penalty", failure_penalty, zero_ok=True)
        self.rng = rng
        self.clock = clock

    def build(self, snapshot: ClusterSnapshot) -> EwmaPicker:
        now = self.clock.now()
        for stats in snapshot.stats.values():
            if not stats.ewma_rtt and not stats.ewma_at:
                # First seen now: default_rtt starts ageing from here, not from t=0.
                stats.ewma_at = now
        return EwmaPicker(snapshot, self)

    def observe(self, stats: BackendStats, rtt: float, ok: bool = True) -> None:
        """Fold one completed attempt into a backend's estimate (stamped ``clock.now()``).

        ``rtt`` is in seconds, from sending the attempt (connect included) to its
        response head or its failure; ``ok`` is False for a connect failure, reset,
        timeout or 5xx.  A sample at or above the estimate replaces it (a peak); a lower
        one is averaged in with weight ``1 − exp(−Δt / decay)``, ``Δt`` being the time
        since the previous sample.
        """
        if not rtt >= _MIN_RTT:     # also NaN
            rtt = _MIN_RTT
        elif rtt > _MAX_RTT:
            rtt = _MAX_RTT
        if not ok and rtt < self.failure_penalty:
            rtt = self.failure_penalty
        now = self.clock.now()
        old = stats.ewma_rtt
        if rtt >= old:
            stats.ewma_rtt = rtt
        else:
            age = now - stats.ewma_at
            w = exp(-age / self.decay) if age > 0 else 1.0
            stats.ewma_rtt = old * w + rtt * (1.0 - w)
        stats.ewma_at = now

    def cost(self, stats: BackendStats, now: float) -> float:
        """The balancing cost of a backend at ``now`` (what pickers compare)."""
        e = stats.ewma_rtt or self.default_rtt
        if not stats.in_flight:
            age = now - stats.ewma_at
            if age > 0:
                e *= exp(-age / self.decay)
        return e * (stats.in_flight + 1)

    def __repr__(self) -> str:
        return (f"<PeakEwma decay={self.decay:g}s default_rtt={self.default_rtt:g}s "
                f"failure_penalty={self.failure_penalty:g}s>")


class EwmaPicker:
    """Power of two choices on :meth:`PeakEwma.cost` over one snapshot: O(1) per pick."""

    __slots__ = ("_backends", "_stats", "_stats_of", "_n", "_random", "_now",
                 "_default", "_rate", "_policy")

    def __init__(self, snapshot: ClusterSnapshot, policy: PeakEwma) -> None:
        self._backends = snapshot.backends
        self._stats = tuple(snapshot.stats[b] for b in snapshot.backends)
        self._stats_of = snapshot.stats
        self._n = len(self._backends)
        self._random = policy.rng.random
        self._now = policy.clock.now
        self._default = policy.default_rtt
        self._rate = 1.0 / policy.decay
        self._policy = policy

    def pick(self, ctx: Any = None) -> Backend:
        return self._backends[self._index()]

    def _index(self) -> int:
        """The index of the cheaper of two distinct backends drawn at random."""
        n = self._n
        if n < 2:
            return 0
        rnd = self._random
        i = int(rnd() * n)
        j = int(rnd() * (n - 1))
        if j >= i:
            j += 1
        return self._cheaper(i, j)

    def _cheaper(self, i: int, j: int) -> int:
        """The index of the cheaper of backends i and j; i on a tie (i is random, so
        ties break at random)."""
        # PeakEwma.cost, inlined: this is the request path.
        now = self._now()
        s = self._stats[i]
        inflight = s.in_flight
        ci = s.ewma_rtt or self._default
        if inflight:
            ci *= inflight + 1
        elif now > s.ewma_at:
            ci *= exp((s.ewma_at - now) * self._rate)
        s = self._stats[j]
        inflight = s.in_flight
        cj = s.ewma_rtt or self._default
        if inflight:
            cj *= inflight + 1
        elif now > s.ewma_at:
            cj *= exp((s.ewma_at - now) * self._rate)
        return i if ci <= cj else j

    def candidates(self, ctx: Any = None) -> Iterator[Backend]:
        """``pick``'s choice, then every other backend once, cheapest first.

        Beyond :data:`_SAMPLE_ABOVE` backends the first :data:`_SAMPLED` of the others
        are themselves power-of-two choices among those not yet proposed, so a caller
        that skips an unready backend pays O(1); only a caller that goes further has
        all the rest ranked by cost (O(n log n)).
        """
        n = self._n
        if not n:
            return
        backends = self._backends
        first = self._index()
        yield backends[first]
        seen = {first}
        if n > _SAMPLE_ABOVE:
            rnd = self._random
            for _ in range(_SAMPLED):
                i = int(rnd() * n)
                while i in seen:
                    i = int(rnd() * n)
                j = int(rnd() * n)
                while j in seen or j == i:
                    j = int(rnd() * n)
                k = self._cheaper(i, j)
                seen.add(k)
                yield backends[k]
        now = self._now()
        cost = self._policy.cost
        stats = self._stats
        rest = sorted((k for k in range(n) if k not in seen),
                      key=lambda k: cost(stats[k], now))
        for k in rest:
            yield backends[k]

    def observe(self, backend: Backend, rtt: float, ok: bool = True) -> None:
        """:meth:`PeakEwma.observe` by backend; ignored for one not in this snapshot."""
        stats = self._stats_of.get(backend)
        if stats is not None:
            self._policy.observe(stats, rtt, ok)

    def __repr__(self) -> str:
        return (f"<EwmaPicker backends={self._n} decay={self._policy.decay:g}s "
                f"default_rtt={self._policy.default_rtt:g}s>")
