"""Slow start for random, p2c and least_conn: effective weights ramp from 10 % to 100 %
over the window, driven by a FakeClock (poise.core.policies.slow_start).

Shares are measured over 50k picks with a fixed seed: ± 1 % (absolute) unless stated.
"""

import random
from collections import Counter

import pytest

from poise.core.backend import Backend
from poise.core.clock import FakeClock
from poise.core.cluster import ClusterSnapshot
from poise.core.policies.least_conn import LeastConn
from poise.core.policies.p2c import PowerOfTwo
from poise.core.policies.slow_start import MIN_FRACTION, STEPS, Ramp, ramp_fraction
from poise.core.policies.weighted_random import RandomPicker, WeightedRandom

CLASSES = {"random": WeightedRandom, "least_conn": LeastConn, "p2c": PowerOfTwo}
# least_conn twice: in scan mode and in indexed mode (after a first load_changed).
VARIANTS = ["random", "p2c", "least_conn", "least_conn/indexed"]
WINDOW = 100.0


class CountingClock(FakeClock):
    """A FakeClock that counts how often it is read."""

    __slots__ = ("reads",)

    def __init__(self, start: float = 0.0) -> None:
        super().__init__(start)
        self.reads = 0

    def now(self) -> float:
        self.reads += 1
        return super().now()


def cluster(weights, ready_since=None, loads=None):
    """Backends a, b, c, … with these weights; ``ready_since`` maps index → time."""
    backends = [Backend(f"10.0.0.{i}", 80, weight=w) for i, w in enumerate(weights)]
    since = {backends[i]: t for i, t in (ready_since or {}).items()}
    snap = ClusterSnapshot.build("c", backends, ready_since=since)
    for b, load in zip(backends, loads or [0] * len(backends), strict=True):
        snap.stats[b].in_flight = load
    return snap


def build(variant, snap, clock, window=WINDOW, seed=1):
    name, _, mode = variant.partition("/")
    picker = CLASSES[name](slow_start=window, rng=random.Random(seed), clock=clock).build(snap)
    if mode == "indexed":
        picker.load_changed(snap.backends[0])
    return picker


def shares(picker, snap, picks=50_000):
    counts = Counter(picker.pick() for _ in range(picks))
    return [counts[b] / picks for b in snap.backends]


# -- the curve -----------------------------------------------------------------------------------


@pytest.mark.parametrize("elapsed, fraction", [
    (-5.0, 0.1), (0.0, 0.1), (10.0, 0.19), (50.0, 0.55), (90.0, 0.91), (99.999, 1.0),
    (100.0, 1.0), (1e9, 1.0),
])
def test_ramp_is_a_line_from_ten_percent(elapsed, fraction):
    assert MIN_FRACTION == 0.1
    assert ramp_fraction(elapsed, WINDOW) == pytest.approx(fraction, abs=1e-4)


def test_no_ramp_when_off_unknown_or_over():
    clock = FakeClock(500.0)
    assert Ramp.plan(cluster([1, 1], {1: 450.0}), 0.0, clock) is None        # off
    assert Ramp.plan(cluster([1, 1]), WINDOW, clock) is None                  # long ago
    assert Ramp.plan(cluster([1, 1], {1: 400.0}), WINDOW, clock) is None     # over
    ramp = Ramp.plan(cluster([1, 1], {1: 450.0}), WINDOW, clock)
    assert ramp is not None and ramp.starts == {1: 450.0} and ramp.end == 550.0
    assert repr(ramp) == "<Ramp window=100s ramping=1 end=550.000>"


# -- shares over time ----------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_new_backend_ramps_from_ten_percent_to_its_weight(variant):
    # b became ready at t=0 next to an old a (equal weights, idle):
    # t=0: 0.1/1.1 = 9.1 %, t=50: 0.55/1.55 = 35.5 %, t>=100: 50 %.
    clock = FakeClock(0.0)
    snap = cluster([1, 1], {1: 0.0})
    picker = build(variant, snap, clock)
    assert shares(picker, snap)[1] == pytest.approx(0.1 / 1.1, abs=0.01)
    clock.advance(50.0)
    assert shares(picker, snap)[1] == pytest.approx(0.55 / 1.55, abs=0.01)
    clock.advance(50.0)
    assert shares(picker, snap)[1] == pytest.approx(0.5, abs=0.01)
    clock.advance(1000.0)
    assert shares(picker, snap)[1] == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("variant", VARIANTS)
def test_ramps_scale_each_backends_own_weight_and_start(variant):
    # a (w=1) old; b (w=3) ready at 0; c (w=2) ready at 50.  At t=60:
    # a = 1, b = 3 * 0.64 = 1.92, c = 2 * 0.19 = 0.38 of a total 3.30.
    clock = FakeClock(60.0)
    snap = cluster([1, 3, 2], {1: 0.0, 2: 50.0})
    got = shares(build(variant, snap, clock), snap)
    for share, weight in zip(got, [1.0, 1.92, 0.38], strict=True):
        assert share == pytest.approx(weight / 3.30, abs=0.01)


@pytest.mark.parametrize("variant", VARIANTS)
def test_ready_since_in_the_future_counts_as_just_ready(variant):
    clock = FakeClock(10.0)
    snap = cluster([1, 1], {1: 40.0})
    assert shares(build(variant, snap, clock), snap)[1] == pytest.approx(0.1 / 1.1, abs=0.01)


@pytest.mark.parametrize("variant", ["p2c", "least_conn", "least_conn/indexed"])
def test_loads_are_compared_to_the_effective_weight(variant):
    # b has 1 request in flight at 10 % of weight 1 (relative load 10), a has 5 (5): a
    # wins; once b's ramp is over its relative load is 1 and it wins.
    clock = FakeClock(0.0)
    snap = cluster([1, 1], {1: 0.0}, loads=[5, 1])
    picker = build(variant, snap, clock)
    assert {picker.pick() for _ in range(200)} == {snap.backends[0]}
    clock.advance(WINDOW)
    assert {picker.pick() for _ in range(200)} == {snap.backends[1]}


# -- cost: the clock is read only while something ramps ------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("window, since", [(0.0, {1: 0.0}), (WINDOW, {}), (WINDOW, {1: -500.0})])
def test_no_clock_reads_per_pick_without_a_ramp(variant, window, since):
    clock = CountingClock(0.0)
    snap = cluster([1, 2, 3], since)
    picker = build(variant, snap, clock, window=window)
    reads = clock.reads
    assert reads <= 1                                   # at build, at most
    for _ in range(1000):
        picker.pick()
    list(picker.candidates())
    assert clock.reads == reads


@pytest.mark.parametrize("variant", VARIANTS)
def test_clock_reads_stop_when_the_ramp_ends(variant):
    clock = CountingClock(0.0)
    snap = cluster([1, 1], {1: 0.0})
    picker = build(variant, snap, clock)
    assert picker.ramping == 1
    before = clock.reads
    for _ in range(100):
        picker.pick()
    assert clock.reads == before + 100
    clock.advance(WINDOW)
    picker.pick()                                       # notices the end
    assert picker.ramping == 0
    after = clock.reads
    for _ in range(1000):
        picker.pick()
    assert clock.reads == after


def test_weights_are_recomputed_once_per_step(monkeypatch):
    applied = []
    original = RandomPicker._apply

    def counting(self, weights):
        applied.append(list(weights))
        original(self, weights)

    monkeypatch.setattr(RandomPicker, "_apply", counting)
    clock = FakeClock(0.0)
    snap = cluster([1, 1], {1: 0.0})
    picker = build("random", snap, clock)
    for _ in range(10 * STEPS):
        clock.advance(WINDOW / (10 * STEPS))
        picker.pick()
    clock.advance(1.0)              # the float sum above may fall just short of WINDOW
    picker.pick()
    # One at build, then at most one per WINDOW / STEPS (here every 10 or 11 picks, as
    # the clock's float sums fall); the last one restores the full weight.
    assert 0.9 * STEPS <= len(applied) <= STEPS + 2
    assert applied[0] == [1, 0.1]
    assert applied[-1] == [1, 1]
    fractions = [w[1] for w in applied]
    assert fractions == sorted(fractions)


def test_repr_shows_backends_still_ramping():
    clock = FakeClock(0.0)
    snap = cluster([1, 1, 1], {1: 0.0, 2: 60.0})
    picker = build("random", snap, clock)
    assert repr(picker) == "<RandomPicker backends=3 ramping=2>"
    clock.advance(120.0)
    picker.pick()
    assert repr(picker) == "<RandomPicker backends=3 ramping=1>"
    clock.advance(100.0)
    picker.pick()
    assert repr(picker) == "<RandomPicker backends=3>"
    lc = build("least_conn/indexed", snap, FakeClock(130.0))
    assert repr(lc) == "<LeastConnPicker backends=3 mode=indexed ramping=1>"
