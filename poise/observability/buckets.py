"""Latency histogram buckets shared by workers (counting) and the control plane
(Prometheus exposition, dashboard quantiles).

A histogram is a list of ``len(BOUNDS) + 1`` counts: ``counts[i]`` holds observations
``<= BOUNDS[i]`` (and above ``BOUNDS[i-1]``), the last one those above every bound
(``+Inf``).  Counts are per bucket, not cumulative; the exposition accumulates them.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence

# Seconds.  Dense below 100 ms, where a proxy's own latency lives; up to a minute for
# slow backends.
BOUNDS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0, 30.0, 60.0,
)
SIZE = len(BOUNDS) + 1


def bucket_of(seconds: float) -> int:
    """The index of the bucket ``seconds`` falls in."""
    return bisect_left(BOUNDS, seconds)


def quantile(counts: Sequence[int], q: float) -> float | None:
    """The ``q`` quantile (0..1) of per-bucket ``counts``, interpolated linearly inside
    its bucket as Prometheus' ``histogram_quantile`` does (the ``+Inf`` bucket answers
    its lower bound).  None when there are no observations."""
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for i, count in enumerate(counts):
        if count and seen + count >= rank:
            if i == len(BOUNDS):
                return BOUNDS[-1]
            lower = BOUNDS[i - 1] if i else 0.0
            return lower + (BOUNDS[i] - lower) * (rank - seen) / count
        seen += count
    return BOUNDS[-1]
