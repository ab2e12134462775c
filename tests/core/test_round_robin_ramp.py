"""round_robin under changing weights: slow start, and a weight change at runtime.

Fixed inputs, no randomness (round robin has none); tolerances stated per test."""

from __future__ import annotations

from collections import Counter
from itertools import groupby
from math import ceil

from poise.core.backend import Backend
from poise.core.clock import FakeClock
from poise.core.cluster import ClusterSnapshot
from poise.core.policies import create_policy

A, B, C = (Backend("10.0.0.1", 80), Backend("10.0.0.2", 80), Backend("10.0.0.3", 80))


def longest_run(picks: list[Backend], backend: Backend) -> int:
    return max((len(list(g)) for b, g in groupby(picks) if b == backend), default=0)


def share(picks: list[Backend], backend: Backend) -> float:
    return Counter(picks)[backend] / len(picks)


def test_slow_start_ramps_a_new_backends_share_over_the_window():
    clock = FakeClock(1000.0)
    snap = ClusterSnapshot.build("app", [A, B], ready_since={B: 1000.0})
    picker = create_policy("round_robin", {"slow_start": "30s"}, clock=clock).build(snap)
    early = [picker.pick() for _ in range(1100)]
    clock.advance(15)
    middle = [picker.pick() for _ in range(1550)]
    clock.advance(20)           # past the window: full weight
    late = [picker.pick() for _ in range(1000)]
    # Effective weight of B: 10% at the start, 55% mid-window (linear), 100% after.
    assert abs(share(early, B) - 0.10 / 1.10) < 0.02
    assert abs(share(middle, B) - 0.55 / 1.55) < 0.02
    assert abs(share(late, B) - 0.5) < 0.01


def test_slow_start_never_bursts_onto_the_ramping_backend():
    clock = FakeClock(0.0)
    snap = ClusterSnapshot.build("app", [A, B, C], ready_since={C: 0.0})
    picker = create_policy("round_robin", {"slow_start": 10}, clock=clock).build(snap)
    picks = []
    for _ in range(200):
        picks += [picker.pick() for _ in range(20)]
        clock.advance(0.1)
    # C ramps from 10% to 100% of the others' weight: it never gets two turns in a row,
    # and the others never more than ceil(1 / 0.1) = 10 while C is at its floor.
    assert longest_run(picks, C) == 1
    assert max(longest_run(picks, A), longest_run(picks, B)) <= 10


def test_slow_start_off_or_settled_keeps_the_precomputed_rotation():
    clock = FakeClock(100.0)
    settled = ClusterSnapshot.build("app", [A, B], ready_since={B: 0.0})
    picker = create_policy("round_robin", {"slow_start": 30}, clock=clock).build(settled)
    assert "RotationPicker" in repr(picker)
    assert [picker.pick() for _ in range(4)] == [A, B, A, B]


def test_a_weight_change_at_runtime_takes_effect_without_a_burst():
    policy = create_policy("round_robin")
    first = ClusterSnapshot.build("app", [A, B, C])
    picker = policy.build(first)
    before = [picker.pick() for _ in range(7)]
    heavy_c = Backend("10.0.0.3", 80, weight=5)
    second = ClusterSnapshot.build("app", [A, B, heavy_c], previous=first)
    assert second.stats[heavy_c] is first.stats[C]     # the same server, same live stats
    picker = policy.build(second)
    after = [picker.pick() for _ in range(70)]         # ten full cycles of 1+1+5
    # New shares exactly from the first cycle on; no run longer than the smooth bound
    # (ceil(w_max / w_min)), even across the switch.
    assert Counter(after[:7]) == {A: 1, B: 1, heavy_c: 5}
    assert Counter(after) == {A: 10, B: 10, heavy_c: 50}
    joined = [b if b != heavy_c else C for b in before + after]
    assert longest_run(joined, C) <= ceil(5 / 1)
