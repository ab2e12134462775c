"""GCRA and the shared rate table (poise.core.ratelimit), with a fake clock.

Keys are given as 64-bit hashes: tests that care which bucket a key lands in build them
with :func:`key` (bucket bits 8.., a distinct tag above), the others hash bytes with
xxh3 as the data path does.
"""

from __future__ import annotations

import math
import random
import tracemalloc
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from xxhash import xxh3_64_intdigest

from poise.core import ratelimit
from poise.core.clock import FakeClock
from poise.core.ratelimit import NS, SLOT_BYTES, WAYS, limit_ns, parse_rate, table_bytes

# The core counts in integer nanoseconds; these tests speak seconds (floats) through
# the thin adapters below, which convert exactly (values here are far below 2**53 ns).


def _ns(seconds: float) -> int:
    return round(seconds * NS)


def gcra(tat: float, now: float, interval: float, span: float) -> tuple[float, float]:
    """poise.core.ratelimit.gcra in seconds."""
    new, wait = ratelimit.gcra(_ns(tat), _ns(now), _ns(interval), _ns(span))
    return new / NS, wait / NS


_KEY_MASK = (1 << ratelimit.KEY_BITS) - 1


class RateTable:
    """poise.core.ratelimit.RateTable in seconds; 64-bit keys are cut to KEY_BITS bits
    (as the data path's hashes are)."""

    def __init__(self, buffer, slots: int) -> None:
        self.table = ratelimit.RateTable(buffer, slots)

    def take(self, k: int, now: float, interval: float, span: float) -> float:
        return self.table.take(k & _KEY_MASK, _ns(now), _ns(interval), _ns(span)) / NS

    def peek(self, k: int) -> float | None:
        tat = self.table.peek(k & _KEY_MASK)
        return None if tat is None else tat / NS

    def clear(self) -> None:
        self.table.clear()

    @property
    def evictions(self) -> int:
        return self.table.evictions

    @property
    def slots(self) -> int:
        return self.table.slots

    def __repr__(self) -> str:
        return repr(self.table)


def key(bucket: int, n: int) -> int:
    """A key hash that lands in ``bucket`` (of a table of at most 2**26 slots), the
    ``n``-th such key."""
    return (n + 1) << 40 | bucket << 8


def table(slots: int = 1024) -> tuple[RateTable, bytearray]:
    buf = bytearray(table_bytes(slots))
    return RateTable(buf, slots), buf


def limit(count: int, per: float = 1.0, burst: int | None = None) -> tuple[float, float]:
    """``(interval, span)`` in seconds of ``count`` per ``per`` seconds with ``burst``
    (default ``count``), as the proxy computes them (limit_ns)."""
    interval, span = limit_ns(count / per, count if burst is None else burst)
    return interval / NS, span / NS


def burst_now(tab: RateTable, k: int, now: float, interval: float, span: float,
              most: int = 100_000) -> int:
    """How many requests of ``k`` are admitted at the one instant ``now``."""
    n = 0
    while n < most and tab.take(k, now, interval, span) == 0.0:
        n += 1
    return n


# -- parse_rate ------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("100/s", (100, 1.0)), ("20/m", (20, 60.0)), ("1000/h", (1000, 3600.0)),
    ("1/sec", (1, 1.0)), ("5/second", (5, 1.0)), ("7/min", (7, 60.0)),
    ("8/minute", (8, 60.0)), ("9/hour", (9, 3600.0)), (" 7 / MIN ", (7, 60.0)),
    ("3/S", (3, 1.0)),
])
def test_parse_rate(text, expected):
    assert parse_rate(text) == expected


@pytest.mark.parametrize("text", [
    "", "100", "100/", "/s", "0/s", "-1/s", "1.5/s", "abc/s", "100/d", "100/ms",
    "100/s/x", "100 per second", "1e3/s", "+5/s", "²/s",
])
def test_parse_rate_rejects_with_a_config_fit_message(text):
    with pytest.raises(ValueError) as info:
        parse_rate(text)
    assert str(info.value) == f"expected a rate like 100/s, 20/m or 1000/h, not {text!r}"


# -- gcra: one step ----------------------------------------------------------------------------


def test_gcra_of_a_fresh_key_admits_and_sets_tat_one_interval_ahead():
    assert gcra(0.0, 50.0, 0.1, 0.3) == (pytest.approx(50.1), 0.0)


def test_gcra_exact_burst_then_the_wait_for_the_next():
    interval, span = limit(10, burst=3)         # 10/s, burst 3
    tat, now = 0.0, 100.0
    for i in range(3):
        tat, wait = gcra(tat, now, interval, span)
        assert wait == 0.0
        assert tat == pytest.approx(now + (i + 1) * interval)
    denied_tat, wait = gcra(tat, now, interval, span)
    assert denied_tat == tat, "a denied request must not move the TAT"
    assert wait == pytest.approx(0.1)
    # 40 ms later the wait is 60 ms; 100 ms later one is admitted, and only one
    assert gcra(tat, now + 0.04, interval, span)[1] == pytest.approx(0.06)
    tat, wait = gcra(tat, now + 0.1, interval, span)
    assert wait == 0.0
    assert gcra(tat, now + 0.1, interval, span)[1] == pytest.approx(0.1)


def test_gcra_a_stale_tat_counts_as_now():
    # a key idle for longer than its span is as good as fresh
    assert gcra(10.0, 1000.0, 0.5, 1.0) == (pytest.approx(1000.5), 0.0)


@pytest.mark.parametrize("count", [1, 3, 7, 10, 30, 100, 300, 1000, 10_000])
@pytest.mark.parametrize("per", [1.0, 60.0, 3600.0])
@pytest.mark.parametrize("burst", [1, 2, 3, 10, None])
def test_burst_is_exact_from_a_fresh_clock(count, per, burst):
    # burst * interval need not round-trip through floating point: still exactly burst
    interval, span = limit(count, per, burst)
    tab, _ = table()
    assert burst_now(tab, 7, 0.5, interval, span) == (count if burst is None else burst)


@pytest.mark.parametrize("now", [86_400.0, 1e6], ids=["1-day-uptime", "11-days-uptime"])
def test_burst_is_exact_at_realistic_monotonic_times(now):
    """The data path passes time.monotonic() (seconds since boot): after a day of uptime
    an idle key of 1000/s must still get its whole burst of 1000 at one instant.

    BUG (poise/core/ratelimit.py): the admission test's slack ``_EPSILON = 1e-9`` is
    absolute, but TATs near ``now`` carry rounding errors relative to ``now``'s
    magnitude (one ulp of 86400.0 is 1.5e-11, summed over 1000 additions), so the
    1000th request is denied (999 admitted); at now=1e7 even 3/s with burst 3 admits
    only 2.  A slack relative to ``now`` (or TATs kept relative to an epoch) fixes it.
    """
    interval, span = limit(1000)
    assert burst_now(RateTable(bytearray(table_bytes(1024)), 1024), 7, now,
                     interval, span) == 1000
    tat, admitted = 0.0, 0
    while admitted <= 1000:
        new, wait = gcra(tat, now, interval, span)
        if wait:
            break
        tat, admitted = new, admitted + 1
    assert admitted == 1000


# -- gcra over time: the rate --------------------------------------------------------------------


def admitted_over(count: int, per: float, burst: int, step: float, duration: float,
                  start: float = 0.0) -> int:
    """Requests of one idle key admitted when one arrives every ``step`` seconds for
    ``duration`` seconds (both ends included)."""
    clock = FakeClock(start)
    tab, _ = table()
    interval, span = limit(count, per, burst)
    admitted = 0
    for _ in range(round(duration / step) + 1):
        if tab.take(99, clock.now(), interval, span) == 0.0:
            admitted += 1
        clock.advance(step)
    return admitted


@pytest.mark.parametrize(("count", "per", "burst", "step", "duration"), [
    (10, 1.0, 5, 0.001, 10.0),
    (10, 1.0, 1, 0.001, 10.0),
    (100, 1.0, 100, 0.0005, 3.0),
    (3, 1.0, 2, 0.01, 20.0),
    (60, 60.0, 10, 0.05, 30.0),
    (7, 1.0, 3, 0.013, 12.345),
    (1000, 3600.0, 50, 1.0, 7200.0),
])
def test_admitted_over_a_window_is_burst_plus_rate_times_duration(count, per, burst, step,
                                                                  duration):
    expected = burst + math.floor(count / per * duration)
    got = admitted_over(count, per, burst, step, duration)
    assert abs(got - expected) <= 1, (got, expected)


def test_requests_slower_than_the_rate_are_all_admitted():
    # 10/s, burst 1: one every 0.1 s exactly is at the rate, all admitted
    assert admitted_over(10, 1.0, 1, 0.1, 100.0) == 1001
    assert admitted_over(10, 1.0, 1, 0.25, 100.0) == 401


def test_denied_requests_do_not_consume():
    clock = FakeClock(1000.0)
    tab, _ = table()
    interval, span = limit(10, burst=2)
    assert burst_now(tab, 5, clock.now(), interval, span) == 2
    tat = tab.peek(5)
    for _ in range(1000):           # a client that hammers while denied ...
        clock.advance(0.00009)
        assert tab.take(5, clock.now(), interval, span) > 0.0
    assert tab.peek(5) == tat       # ... gains no debt
    clock.advance(0.1 - 0.09)       # 0.1 s after the burst: exactly one more
    assert tab.take(5, clock.now(), interval, span) == 0.0
    assert tab.take(5, clock.now(), interval, span) > 0.0


def test_wait_values_count_down_to_zero():
    clock = FakeClock(10.0)
    tab, _ = table()
    interval, span = limit(4, burst=1)          # one per 0.25 s
    assert tab.take(1, clock.now(), interval, span) == 0.0
    for elapsed in (0.0, 0.05, 0.1, 0.2, 0.24):
        wait = tab.take(1, 10.0 + elapsed, interval, span)
        assert wait == pytest.approx(0.25 - elapsed)
    clock.advance(0.25)
    assert tab.take(1, clock.now(), interval, span) == 0.0


def test_the_wait_is_the_time_until_admission():
    clock = FakeClock(3.0)
    tab, _ = table()
    interval, span = limit(5, burst=5)
    burst_now(tab, 1, clock.now(), interval, span)
    wait = tab.take(1, clock.now(), interval, span)
    clock.advance(wait * 0.999)
    assert tab.take(1, clock.now(), interval, span) > 0.0
    clock.advance(wait * 0.001)
    assert tab.take(1, clock.now(), interval, span) == 0.0


def test_a_long_idle_restores_the_burst_and_no_more():
    clock = FakeClock(500.0)
    tab, _ = table()
    interval, span = limit(100, 60.0, burst=20)
    assert burst_now(tab, 3, clock.now(), interval, span) == 20
    clock.advance(3600.0)
    assert burst_now(tab, 3, clock.now(), interval, span) == 20
    clock.advance(10 * interval + 1e-6)
    assert burst_now(tab, 3, clock.now(), interval, span) == 10


# -- hypothesis: GCRA agrees with a token bucket ----------------------------------------------


class TokenBucket:
    """The reference: ``burst`` tokens, refilled at ``rate`` per second, exactly."""

    def __init__(self, rate: Fraction, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = Fraction(burst)
        self.last: Fraction | None = None

    def take(self, now: Fraction) -> Fraction:
        if self.last is not None:
            self.tokens = min(Fraction(self.burst), self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1:
            self.tokens -= 1
            return Fraction(0)
        return (1 - self.tokens) / self.rate


@settings(max_examples=300, deadline=None)
@given(count=st.sampled_from([1, 2, 3, 5, 7, 10, 60, 100, 1000]),
       per=st.sampled_from([1, 60, 3600]),
       burst=st.integers(1, 12),
       start_ms=st.integers(0, 100_000),
       events=st.lists(st.tuples(st.integers(0, 3000), st.integers(0, 2)),
                       min_size=1, max_size=120))
def test_gcra_table_agrees_with_a_token_bucket(count, per, burst, start_ms, events):
    tab, _ = table()
    rate = Fraction(count, per)
    interval, span = limit(count, per, burst)
    buckets = [TokenBucket(rate, burst) for _ in range(3)]
    now_ms = start_ms
    for dt_ms, k in events:
        now_ms += dt_ms
        wait = tab.take(key(k, 0), now_ms / 1000, interval, span)
        expected = buckets[k].take(Fraction(now_ms, 1000))
        if expected == 0:
            assert wait == 0.0, (now_ms, k)
        else:
            assert wait == pytest.approx(float(expected), rel=1e-9, abs=1e-9), (now_ms, k)
    assert tab.evictions == 0


# -- RateTable --------------------------------------------------------------------------------


@pytest.mark.parametrize(("slots", "nbytes", "message"), [
    (1000, 16_000, "power of two"), (2, 1024, "power of two"), (0, 0, "power of two"),
    (1024, 1024 * SLOT_BYTES - 1, "too small"),
])
def test_rate_table_rejects_bad_sizes(slots, nbytes, message):
    with pytest.raises(ValueError, match=message):
        RateTable(bytearray(nbytes), slots)


def test_rate_table_uses_only_its_slots_of_a_larger_buffer():
    buf = bytearray(table_bytes(WAYS) + 64)
    tab = RateTable(buf, WAYS)
    interval, span = limit(1, burst=1)
    for n in range(50):
        tab.take(key(0, n), 10.0, interval, span)
    assert buf[table_bytes(WAYS):] == bytes(64)
    assert repr(tab) == f"<RateTable slots=4 evictions={50 - WAYS}>"


def test_many_keys_each_their_own_limit():
    clock = FakeClock(100.0)
    tab, _ = table(1 << 14)
    interval, span = limit(10, burst=3)
    keys = [key(b, n) for b in range(1 << 12) for n in range(2)]        # half the slots
    for k in keys:
        assert burst_now(tab, k, clock.now(), interval, span) == 3
    assert tab.evictions == 0
    clock.advance(0.1)
    assert all(tab.take(k, clock.now(), interval, span) == 0.0 for k in keys)
    assert all(tab.take(k, clock.now(), interval, span) > 0.0 for k in keys)
    assert tab.evictions == 0


def test_peek_and_clear():
    tab, _ = table()
    assert tab.peek(key(3, 0)) is None
    tab.take(key(3, 0), 7.0, 0.5, 1.0)
    assert tab.peek(key(3, 0)) == 7.5
    assert tab.peek(key(3, 1)) is None
    tab.clear()
    assert tab.peek(key(3, 0)) is None
    assert burst_now(tab, key(3, 0), 7.0, 0.5, 1.0) == 2


def test_a_full_bucket_evicts_the_earliest_tat_and_counts_it():
    tab, _ = table()
    clock = FakeClock(50.0)
    interval, span = limit(1, burst=10)
    # four keys in one bucket, the second one with the earliest TAT
    for n, requests in enumerate([3, 1, 5, 2]):
        for _ in range(requests):
            assert tab.take(key(9, n), clock.now(), interval, span) == 0.0
    assert tab.evictions == 0
    assert tab.take(key(9, 4), clock.now(), interval, span) == 0.0
    assert tab.evictions == 1
    assert tab.peek(key(9, 1)) is None
    assert all(tab.peek(key(9, n)) is not None for n in (0, 2, 3, 4))
    # another bucket is untouched by all this
    assert tab.take(key(10, 0), clock.now(), interval, span) == 0.0
    assert tab.evictions == 1


def test_expired_keys_are_replaced_without_counting_an_eviction():
    tab, _ = table()
    clock = FakeClock(50.0)
    interval, span = limit(1, burst=1)
    for n in range(WAYS):
        tab.take(key(0, n), clock.now(), interval, span)
    clock.advance(interval)             # every TAT is now: expired, as good as absent
    for n in range(WAYS, 3 * WAYS):
        assert tab.take(key(0, n), clock.now(), interval, span) == 0.0
        clock.advance(interval)
    assert tab.evictions == 0
    # the expired one is preferred over a live one, whatever their order
    tab.clear()
    tab.take(key(0, 0), 100.0, 10.0, 10.0)      # live until 110
    tab.take(key(0, 1), 100.0, 1.0, 1.0)        # expired at 101
    tab.take(key(0, 2), 100.0, 10.0, 10.0)
    tab.take(key(0, 3), 100.0, 10.0, 10.0)
    tab.take(key(0, 4), 105.0, 10.0, 10.0)
    assert tab.evictions == 0
    assert tab.peek(key(0, 1)) is None
    assert tab.peek(key(0, 0)) is not None


def test_an_evicted_hot_key_errs_towards_admitting():
    """A limited key whose slot is taken by others starts afresh: admitted again, for
    at most one more burst (never denied because of another key)."""
    tab, _ = table()
    now = 1000.0
    hot = key(4, 0)
    interval, span = limit(10, burst=5)
    assert burst_now(tab, hot, now, interval, span) == 5
    assert tab.take(hot, now, interval, span) > 0.0
    # keys of a slower limit (later TATs) fill the bucket: the hot key goes
    for n in range(1, WAYS + 1):
        assert tab.take(key(4, n), now, 60.0, 60.0) == 0.0
    assert tab.evictions == 1
    assert tab.peek(hot) is None
    assert burst_now(tab, hot, now, interval, span) == 5, "a fresh burst, no more"
    assert tab.evictions == 2


def test_a_flood_of_fresh_keys_does_not_evict_a_limited_hot_key():
    """Fresh keys' TATs (now + interval) are earlier than a limited key's (about now +
    burst * interval): they evict one another and the hot key stays limited."""
    tab, _ = table(1024)
    now = 2000.0
    hot = xxh3_64_intdigest(b"203.0.113.9", 1)
    interval, span = limit(10, burst=5)
    assert burst_now(tab, hot, now, interval, span) == 5
    tat = tab.peek(hot)
    rng = random.Random(7)
    flood = 200_000
    for _ in range(flood):
        assert tab.take(rng.getrandbits(64), now, interval, span) == 0.0
    # every insertion into a full bucket evicted a live key: all but the first
    # (slots - 1) insertions, which found an empty slot
    assert tab.evictions == flood - (1024 - 1)
    assert tab.peek(hot) == tat
    assert tab.take(hot, now, interval, span) > 0.0


def test_a_million_distinct_keys_in_a_fixed_buffer():
    """1,000,000 distinct keys over 10 simulated seconds into 1024 slots: evictions
    are counted, and a hot key hammering along is still held to burst + rate *
    duration (fresh keys, whose TATs are earlier, are evicted before it)."""
    slots = 1024
    buf = bytearray(table_bytes(slots))
    tab = RateTable(buf, slots)
    clock = FakeClock(10_000.0)
    interval, span = limit(100, burst=10)
    hot = xxh3_64_intdigest(b"hot client", 42)
    bits = random.Random(1).getrandbits
    take, now, advance = tab.take, clock.now, clock.advance
    hot_admitted = 0
    for _ in range(10_000):             # the hot key: every 1 ms ...
        if take(hot, now(), interval, span) == 0.0:
            hot_admitted += 1
        for _ in range(100):            # ... among 100 new keys
            take(bits(64), now(), interval, span)
            advance(0.00001)
    assert len(buf) == table_bytes(slots)
    assert 0 < tab.evictions < 1_000_000
    expected = 10 + math.floor(100 * 9.999)        # 10,000 tries 1 ms apart
    assert abs(hot_admitted - expected) <= 1, (hot_admitted, expected)


def test_the_table_allocates_nothing_per_key():
    tab, buf = table(1024)
    bits = random.Random(2).getrandbits
    keys = [bits(64) for _ in range(50_000)]
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        for i, k in enumerate(keys):
            tab.take(k, 1.0 + i * 1e-4, 0.01, 0.05)
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert after - before < 16 * 1024, "the table grew with the number of keys"
    assert len(buf) == table_bytes(1024)
    assert sum(tab.peek(k) is not None for k in keys) <= 1024


def test_limits_with_different_seeds_are_independent():
    tab, _ = table()
    now = 300.0
    strict = limit(1, burst=1)
    loose = limit(100, burst=100)
    ip = b"198.51.100.7"
    a, b = xxh3_64_intdigest(ip, 1111), xxh3_64_intdigest(ip, 2222)
    assert a != b
    assert burst_now(tab, a, now, *strict) == 1
    assert burst_now(tab, b, now, *loose) == 100
    # and the other client of the strict limit is a key of its own
    assert burst_now(tab, xxh3_64_intdigest(b"198.51.100.8", 1111), now, *strict) == 1
    assert tab.evictions == 0
