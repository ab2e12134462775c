"""History: points from the deltas of cumulative samples, quantiles over a short window,
a bounded span, counters that start over, keys that disappear."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from poise.observability.buckets import BOUNDS, SIZE, bucket_of
from poise.observability.history import History, Point

try:
    from poise.observability.book import Sample
except ImportError:                     # (until the metrics book lands: the same shape)
    @dataclass(frozen=True, slots=True)
    class Sample:                       # type: ignore[no-redef]
        requests: int
        errors: int
        buckets: tuple[int, ...]

KEY = ("app", "127.0.0.1:9001")


def hist(**seconds_count: int) -> list[int]:
    """Per-bucket counts from ``ms<latency>=count`` keywords, e.g. ``ms3=10``."""
    counts = [0] * SIZE
    for name, n in seconds_count.items():
        counts[bucket_of(float(name[2:]) / 1000)] += n
    return counts


class Feed:
    """Cumulative counts of one backend, advanced a second of traffic at a time."""

    def __init__(self, history: History, start: float = 1000.0) -> None:
        self.history = history
        self.now = start
        self.requests = self.errors = 0
        self.buckets = [0] * SIZE

    def tick(self, requests: int = 0, errors: int = 0, latency: list[int] | None = None,
             dt: float = 1.0) -> None:
        self.now += dt
        self.requests += requests
        self.errors += errors
        if latency is not None:
            self.buckets = [a + b for a, b in zip(self.buckets, latency, strict=True)]
        sample = Sample(self.requests, self.errors, tuple(self.buckets))
        self.history.record(self.now, {KEY: sample}, {"web": sample})


def test_rate_and_error_rate_come_from_the_last_interval():
    h = History()
    feed = Feed(h)
    feed.tick(100, 0, hist(ms3=100))            # the first sample gives no point
    assert h.backend_series(KEY) == []
    feed.tick(50, 5, hist(ms3=50))
    feed.tick(200, 0, hist(ms3=200), dt=2.0)
    points = h.backend_series(KEY)
    assert [p.t for p in points] == [1002.0, 1004.0]
    assert [p.rps for p in points] == [50.0, 100.0]
    assert [p.error_rate for p in points] == [0.1, 0.0]
    assert h.listener_series("web") == points


def test_no_requests_means_no_error_rate_and_no_latency():
    h = History()
    feed = Feed(h)
    feed.tick()
    feed.tick()
    (point,) = h.backend_series(KEY)
    assert point == Point(1002.0, 0.0, None, None, None)


def test_quantiles_cover_the_window_not_just_the_last_second():
    h = History(quantile_window=5.0)
    feed = Feed(h)
    feed.tick()
    # One slow request, then fast ones: the slow one stays in p99 while it is in the
    # 5 s window, although each later second alone holds only fast ones.
    feed.tick(1, 0, hist(ms2000=1))
    for _ in range(4):
        feed.tick(9, 0, hist(ms1=9))
    points = h.backend_series(KEY)
    assert len(points) == 5
    assert 1000 < points[0].p50_ms <= 2500 and 1000 < points[0].p99_ms <= 2500
    for p in points[1:]:                    # 1 slow and 9, 18, 27, 36 fast
        assert 0.5 < p.p50_ms <= 1.0
        assert 1000 < p.p99_ms <= 2500
    # Five seconds of fast requests later, the slow one is out of the window.
    feed.tick(9, 0, hist(ms1=9))
    assert 0.5 < h.backend_series(KEY)[-1].p99_ms <= 1.0


def test_quantiles_use_the_shortest_history_there_is():
    h = History(quantile_window=5.0)
    feed = Feed(h)
    feed.tick(0, 0)
    feed.tick(10, 0, hist(ms30=10))         # only one second since the first sample
    (point,) = h.backend_series(KEY)
    assert BOUNDS[5] * 1000 < point.p50_ms <= BOUNDS[6] * 1000


def test_points_older_than_the_span_are_dropped():
    h = History(span=10.0)
    feed = Feed(h)
    for _ in range(30):
        feed.tick(1, 0, hist(ms1=1))
    points = h.backend_series(KEY)
    assert [p.t for p in points] == [1020.0 + i for i in range(11)]
    # and the samples kept for the quantiles stay few
    assert len(h.backends[KEY].samples) <= 6


def test_a_counter_that_goes_backwards_starts_over():
    h = History()
    feed = Feed(h)
    feed.tick(1000, 10, hist(ms5=1000))
    feed.tick(10, 1, hist(ms5=10))
    # The backend was forgotten and found again: its counts restart from zero.
    feed.requests, feed.errors, feed.buckets = 0, 0, [0] * SIZE
    feed.tick(7, 7, hist(ms100=7))
    last = h.backend_series(KEY)[-1]
    assert (last.rps, last.error_rate) == (7.0, 1.0)
    assert 50 < last.p50_ms <= 100


def test_keys_that_disappear_are_forgotten():
    h = History()
    s = Sample(1, 0, tuple([0] * SIZE))
    other = ("app", "127.0.0.1:9002")
    h.record(1.0, {KEY: s, other: s}, {"web": s})
    h.record(2.0, {KEY: s, other: s}, {"web": s})
    assert h.backend_series(other)
    h.record(3.0, {KEY: s}, {})
    assert h.backend_series(other) == [] and other not in h.backends
    assert h.listener_series("web") == []
    assert len(h.backend_series(KEY)) == 2
    # Back again: a new series, with no delta against the old counts.
    h.record(4.0, {KEY: s, other: Sample(500, 0, tuple([0] * SIZE))}, {})
    assert h.backend_series(other) == []
    assert repr(h) == "<History span=300s backends=2 listeners=0>"


def test_a_clock_that_does_not_move_adds_nothing():
    h = History()
    feed = Feed(h)
    feed.tick(1)
    feed.tick(1)
    feed.tick(5, dt=0.0)
    assert len(h.backend_series(KEY)) == 1


def test_bad_settings():
    with pytest.raises(ValueError):
        History(span=0)
    with pytest.raises(ValueError):
        History(quantile_window=-1)
