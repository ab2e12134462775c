"""The last few minutes of traffic, per backend and per listener, for the dashboard.

:class:`History` is fed about once a second with cumulative counts (anything with
``requests``, ``errors`` and ``buckets``, such as :class:`poise.observability.book.Sample`)
and keeps, per key, the points of the last ``span`` seconds (default 300)::

    Point(t, rps, error_rate, p50_ms, p99_ms)

computed from the deltas between samples, when the sample arrives (reading a series
costs nothing but a copy):

- ``rps`` and ``error_rate`` cover the interval since the previous sample (about a
  second): requests per second, and errors / requests (None when there were none:
  an idle backend has no error rate, rather than a perfect one).
- ``p50_ms`` and ``p99_ms`` are taken over the latency histogram of a longer
  ``quantile_window`` (default 5 s: the delta to the newest sample at least that much
  older, or to the oldest one kept), interpolated in their bucket by
  :func:`poise.observability.buckets.quantile`.  One second of a quiet backend holds a
  handful of requests, or none, which would draw a line of gaps and jumps; five
  seconds smooth that while still following a change within seconds.  None when the
  window saw no request.

A counter that goes backwards (the control plane forgot a backend and found it again,
say) starts over: the new value is the delta, as Prometheus' ``rate`` does.  A key
missing from a :meth:`History.record` call is forgotten with its series.

Pure: no I/O, and time is whatever clock the caller passes (seconds, monotonic).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Mapping, Sequence
from typing import NamedTuple, Protocol

from poise.observability.buckets import quantile

SPAN = 300.0
QUANTILE_WINDOW = 5.0


class Counts(Protocol):
    """Cumulative counts since some start (the shape of ``book.Sample``)."""

    @property
    def requests(self) -> int: ...

    @property
    def errors(self) -> int: ...

    @property
    def buckets(self) -> Sequence[int]: ...


class Point(NamedTuple):
    """One point of a series (see the module doc for what each value covers)."""

    t: float
    rps: float
    error_rate: float | None
    p50_ms: float | None
    p99_ms: float | None


class Series:
    """The samples and points of one key."""

    __slots__ = ("samples", "points")

    def __init__(self) -> None:
        # (t, counts) newest last; only as far back as the quantile window needs.
        self.samples: deque[tuple[float, Counts]] = deque()
        self.points: deque[Point] = deque()

    def add(self, now: float, counts: Counts, span: float, window: float) -> None:
        samples = self.samples
        if samples:
            last_t, last = samples[-1]
            if now <= last_t:
                return                      # (a clock that did not move: nothing to say)
            requests = _delta(counts.requests, last.requests)
            errors = _delta(counts.errors, last.errors)
            base = samples[0][1]
            for t, sample in samples:
                if now - t < window:
                    break
                base = sample
            latency = _bucket_delta(counts.buckets, base.buckets)
            self.points.append(Point(
                now, requests / (now - last_t),
                errors / requests if requests else None,
                _ms(quantile(latency, 0.5)), _ms(quantile(latency, 0.99))))
        samples.append((now, counts))
        # Keep the newest sample at least `window` old (the base of the next point's
        # quantiles) and everything after it.
        while len(samples) > 1 and now - samples[1][0] >= window:
            samples.popleft()
        points = self.points
        while points and now - points[0].t > span:
            points.popleft()


class History:
    """Per backend key and per listener name, the points of the last ``span`` seconds;
    quantiles over ``quantile_window`` seconds (see the module doc)."""

    def __init__(self, span: float = SPAN, quantile_window: float = QUANTILE_WINDOW) -> None:
        if span <= 0 or quantile_window <= 0:
            raise ValueError("span and quantile_window must be positive")
        self.span = span
        self.quantile_window = quantile_window
        self.backends: dict[Hashable, Series] = {}
        self.listeners: dict[Hashable, Series] = {}

    def __repr__(self) -> str:
        return (f"<History span={self.span:g}s backends={len(self.backends)} "
                f"listeners={len(self.listeners)}>")

    def record(self, now: float, backends: Mapping[Hashable, Counts],
               listeners: Mapping[Hashable, Counts]) -> None:
        """Add the cumulative counts of every backend key and listener at ``now``;
        keys absent from this call are forgotten."""
        self._record(self.backends, now, backends)
        self._record(self.listeners, now, listeners)

    def _record(self, table: dict[Hashable, Series], now: float,
                counts: Mapping[Hashable, Counts]) -> None:
        for key in table.keys() - counts.keys():
            del table[key]
        for key, sample in counts.items():
            series = table.get(key)
            if series is None:
                series = table[key] = Series()
            series.add(now, sample, self.span, self.quantile_window)

    def backend_series(self, key: Hashable) -> list[Point]:
        """The points of backend ``key`` (e.g. ``(cluster, address)``), oldest first;
        empty when unknown."""
        series = self.backends.get(key)
        return list(series.points) if series is not None else []

    def listener_series(self, name: Hashable) -> list[Point]:
        """The points of listener ``name``, oldest first; empty when unknown."""
        series = self.listeners.get(name)
        return list(series.points) if series is not None else []


def _delta(now: int, before: int) -> int:
    return now - before if now >= before else now


def _bucket_delta(now: Sequence[int], before: Sequence[int]) -> Sequence[int]:
    if len(now) != len(before) or any(a < b for a, b in zip(now, before, strict=True)):
        return now                          # started over
    return [a - b for a, b in zip(now, before, strict=True)]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0
