"""The control plane's sums of what workers report (see :mod:`poise.observability.shipper`).

Counters are the sum of every delta any worker sent, so what a worker counted stays
after it exits; gauges are the latest value of each live worker, summed, and leave
with the worker.  The exposition (:mod:`poise.observability.exposition`) and the
dashboard read from here.  Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Any

from poise.observability.buckets import SIZE

Key = tuple[Any, ...]
# Series whose second and third key items are (cluster, backend).
_BACKEND_SERIES = frozenset({"upstream", "upstream_bucket", "upstream_seconds",
                             "connect_errors", "timeouts", "ejections",
                             "health_transitions"})


@dataclass(frozen=True, slots=True)
class Sample:
    """Cumulative counts of one listener or backend: responses (tries, for a backend),
    those that failed (a 5xx, or a try without a response), and their latency
    histogram (``SIZE`` per-bucket counts)."""

    requests: int = 0
    errors: int = 0
    buckets: tuple[int, ...] = (0,) * SIZE


class MetricsBook:
    """Counter sums and the live workers' gauges."""

    def __init__(self) -> None:
        self.counters: dict[Key, float] = defaultdict(float)
        self._gauges: dict[Hashable, dict[Key, float]] = {}

    # -- input ---------------------------------------------------------------------------

    def add(self, worker: Hashable, deltas: Iterable[list[Any]],
            gauges: Iterable[list[Any]] | None = None) -> None:
        """One report of ``worker``: counter ``deltas`` and (when given) its gauges,
        both ``[[key, value], ...]`` with keys as lists."""
        counters = self.counters
        for key, value in deltas:
            counters[tuple(key)] += value
        if gauges is not None:
            self._gauges[worker] = {tuple(key): value for key, value in gauges}

    def retire(self, worker: Hashable) -> None:
        """``worker`` is gone: what it counted stays, what it held goes."""
        self._gauges.pop(worker, None)

    def count(self, key: Key, n: float = 1) -> None:
        """A counter the control plane keeps itself (reloads, health transitions)."""
        self.counters[key] += n

    def forget(self, wanted: Callable[[Key], bool]) -> None:
        """Drop the counters whose key ``wanted`` rejects (series of removed backends
        and listeners, so that they leave the exposition)."""
        for key in [k for k in self.counters if not wanted(k)]:
            del self.counters[key]

    # -- output --------------------------------------------------------------------------

    def gauges(self) -> dict[Key, float]:
        """Every gauge summed over the live workers."""
        total: dict[Key, float] = defaultdict(float)
        for values in self._gauges.values():
            for key, value in values.items():
                total[key] += value
        return total

    def series(self, name: str) -> Iterable[tuple[Key, float]]:
        """``(rest of the key, value)`` of every counter of the series ``name``."""
        for key, value in list(self.counters.items()):
            if key[0] == name:
                yield key[1:], value

    def backend_samples(self) -> dict[tuple[str, str], Sample]:
        """Per ``(cluster, backend)``: tries, failed tries and try latency."""
        return self._samples("upstream", "upstream_bucket")

    def listener_samples(self) -> dict[str, Sample]:
        """Per listener: responses, 5xx responses and request latency."""
        merged: dict[str, list[Any]] = {}
        for (listener, _cluster, code), n in self.series("requests"):
            row = merged.setdefault(listener, [0, 0, [0] * SIZE])
            row[0] += int(n)
            if int(code) >= 500:
                row[1] += int(n)
        for (listener, _cluster, i), n in self.series("request_bucket"):
            merged.setdefault(listener, [0, 0, [0] * SIZE])[2][int(i)] += int(n)
        return {k: Sample(r[0], r[1], tuple(r[2])) for k, r in merged.items()}

    def _samples(self, count_series: str, bucket_series: str) -> dict[Any, Sample]:
        merged: dict[Any, list[Any]] = {}
        for (cluster, backend, code), n in self.series(count_series):
            row = merged.setdefault((cluster, backend), [0, 0, [0] * SIZE])
            row[0] += int(n)
            if int(code) == 0 or int(code) >= 500:
                row[1] += int(n)
        for (cluster, backend, i), n in self.series(bucket_series):
            merged.setdefault((cluster, backend), [0, 0, [0] * SIZE])[2][int(i)] += int(n)
        return {k: Sample(r[0], r[1], tuple(r[2])) for k, r in merged.items()}


def backend_of(key: Key) -> tuple[str, str] | None:
    """``(cluster, backend)`` of a per-backend counter key, else None."""
    return (key[1], key[2]) if key[0] in _BACKEND_SERIES else None
