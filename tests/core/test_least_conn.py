"""least_conn: always a least-loaded backend relative to weight, random ties, in both
scan mode and indexed mode (poise.core.policies.least_conn).

Statistical tests use fixed seeds; tolerances are stated next to each figure.
"""

import random
from collections import Counter

import pytest

from poise.core.backend import Backend
from poise.core.clock import FakeClock
from poise.core.cluster import ClusterSnapshot
from poise.core.policies.least_conn import LeastConn, LeastConnPicker

MODES = ["scan", "indexed"]


def snapshot(weights, loads=None):
    backends = [Backend(f"10.0.{i // 250}.{i % 250}", 8000 + i, weight=w)
                for i, w in enumerate(weights)]
    snap = ClusterSnapshot.build("c", backends)
    for b, load in zip(backends, loads or [0] * len(backends), strict=True):
        snap.stats[b].in_flight = load
    return snap


def build(snap, mode="scan", seed=1) -> LeastConnPicker:
    picker = LeastConn(rng=random.Random(seed), clock=FakeClock(1000.0)).build(snap)
    if mode == "indexed" and snap.backends:
        picker.load_changed(snap.backends[0])
    assert picker.indexed == (mode == "indexed" and bool(snap.backends))
    return picker


def keys(snap):
    return {b: snap.stats[b].in_flight / b.weight for b in snap.backends}


def set_load(snap, picker, backend, load):
    """Change a count, reporting it as a proxy would, unless the picker is scanning."""
    snap.stats[backend].in_flight = load
    if picker.indexed:
        picker.load_changed(backend)


# -- always a minimum ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_picks_a_minimum_of_load_over_weight(mode):
    rng = random.Random(11)
    for _ in range(300):
        n = rng.randint(1, 30)
        weights = [rng.choice([1, 1, 2, 3, 5, 8]) for _ in range(n)]
        snap = snapshot(weights, [rng.randrange(12) for _ in range(n)])
        picker = build(snap, mode, seed=rng.randrange(1000))
        key = keys(snap)
        low = min(key.values())
        for _ in range(5):
            assert key[picker.pick()] == low


@pytest.mark.parametrize("mode", MODES)
def test_follows_loads_that_change_between_picks(mode):
    # A proxy's life: each pick adds one in-flight request, some finish; every change is
    # reported.  Each pick must be a minimum of the counts as they are then.
    rng = random.Random(5)
    snap = snapshot([rng.choice([1, 2, 4]) for _ in range(40)])
    picker = build(snap, mode)
    in_flight = []
    for _ in range(5000):
        key = keys(snap)
        chosen = picker.pick()
        assert key[chosen] == min(key.values())
        set_load(snap, picker, chosen, snap.stats[chosen].in_flight + 1)
        in_flight.append(chosen)
        while in_flight and rng.random() < 0.5:
            done = in_flight.pop(rng.randrange(len(in_flight)))
            set_load(snap, picker, done, snap.stats[done].in_flight - 1)
    assert picker.drift() == []


def test_indexed_mode_copes_with_coalesced_and_large_jumps():
    snap = snapshot([1, 2, 1, 2, 3])
    picker = build(snap, "indexed")
    rng = random.Random(2)
    for _ in range(3000):
        b = rng.choice(snap.backends)
        set_load(snap, picker, b, rng.choice([0, 1, 2, 50, 1000, rng.randrange(100)]))
        key = keys(snap)
        assert key[picker.pick()] == min(key.values())
    assert picker.drift() == []


# -- ties ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_equal_weight_ties_are_uniform(mode):
    snap = snapshot([1] * 5, loads=[2, 2, 7, 2, 2])
    picker = build(snap, mode)
    counts = Counter(picker.pick() for _ in range(40_000))
    assert counts[snap.backends[2]] == 0
    for i in (0, 1, 3, 4):
        assert counts[snap.backends[i]] / 40_000 == pytest.approx(0.25, abs=0.01)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("loads", [[0, 0], [1, 3], [2, 6]])
def test_ties_follow_weights(mode, loads):
    # An idle cluster (or equal relative loads) splits by weight: 25/75 ± 2%.
    snap = snapshot([1, 3], loads)
    picker = build(snap, mode)
    counts = Counter(picker.pick() for _ in range(100_000))
    assert counts[snap.backends[0]] / 100_000 == pytest.approx(0.25, abs=0.02)


@pytest.mark.parametrize("mode", MODES)
def test_ties_across_weight_classes_count_backends(mode):
    # Tied: four of weight 1 (load 1) and one of weight 2 (load 2): 1/6 each, 2/6.
    snap = snapshot([1, 1, 1, 1, 2, 1], loads=[1, 1, 1, 1, 2, 3])
    picker = build(snap, mode)
    counts = Counter(picker.pick() for _ in range(60_000))
    assert counts[snap.backends[4]] / 60_000 == pytest.approx(2 / 6, abs=0.015)
    assert counts[snap.backends[0]] / 60_000 == pytest.approx(1 / 6, abs=0.015)
    assert counts[snap.backends[5]] == 0


# -- indexed mode: the caller's contract ------------------------------------------------------


def test_first_report_switches_to_the_index_and_reads_every_count():
    snap = snapshot([1, 1, 1], loads=[3, 0, 5])
    picker = build(snap)
    assert repr(picker) == "<LeastConnPicker backends=3 mode=scan>"
    snap.stats[snap.backends[1]].in_flight = 9          # before any report: just read
    picker.load_changed(snap.backends[2])
    assert repr(picker) == "<LeastConnPicker backends=3 mode=indexed>"
    assert picker.pick() == snap.backends[0]
    assert picker.drift() == []


def test_unreported_change_is_drift_and_heals_on_the_next_report():
    snap = snapshot([1, 1], loads=[0, 1])
    picker = build(snap, "indexed")
    snap.stats[snap.backends[0]].in_flight = 4          # not reported
    assert picker.drift() == [snap.backends[0]]
    assert picker.pick() == snap.backends[0]            # stale, as documented
    picker.load_changed(snap.backends[0])
    assert picker.drift() == []
    assert picker.pick() == snap.backends[1]


def test_unknown_backends_are_ignored():
    snap = snapshot([1, 1])
    picker = build(snap, "indexed")
    picker.load_changed(Backend("192.0.2.1", 1))
    assert picker.drift() == []
    assert picker.pick() in snap.backends


def test_scan_mode_never_drifts():
    snap = snapshot([1, 1])
    picker = build(snap)
    snap.stats[snap.backends[0]].in_flight = 4
    assert picker.drift() == []
    assert picker.pick() == snap.backends[1]


# -- candidates ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_candidates_run_from_least_to_most_loaded(mode):
    rng = random.Random(9)
    for _ in range(100):
        n = rng.randint(1, 40)
        snap = snapshot([rng.choice([1, 2, 3]) for _ in range(n)],
                        [rng.randrange(6) for _ in range(n)])
        picker = build(snap, mode)
        got = list(picker.candidates())
        assert sorted(got, key=id) == sorted(snap.backends, key=id)
        key = keys(snap)
        assert [key[b] for b in got] == sorted(key[b] for b in got)


@pytest.mark.parametrize("mode", MODES)
def test_candidates_skipping_the_unready_find_the_least_loaded_ready(mode):
    # The idle backend is down: a caller skipping it must land on a least-loaded ready
    # one, not on a random one.
    snap = snapshot([1] * 8, loads=[0, 3, 3, 1, 3, 3, 1, 3])
    picker = build(snap, mode)
    for _ in range(200):
        ready = [b for b in picker.candidates() if b != snap.backends[0]]
        assert ready[0] in (snap.backends[3], snap.backends[6])


def test_indexed_candidates_survive_changes_while_iterating():
    rng = random.Random(4)
    snap = snapshot([1, 2] * 20, [rng.randrange(4) for _ in range(40)])
    picker = build(snap, "indexed")
    for _ in range(200):
        got = []
        for b in picker.candidates():
            got.append(b)
            if rng.random() < 0.3:
                set_load(snap, picker, rng.choice(snap.backends), rng.randrange(6))
        assert len(got) == 40 and set(got) == set(snap.backends)


@pytest.mark.parametrize("mode", MODES)
def test_large_cluster(mode):
    rng = random.Random(8)
    snap = snapshot([rng.randint(1, 5) for _ in range(1000)],
                    [rng.randrange(20) for _ in range(1000)])
    picker = build(snap, mode)
    key = keys(snap)
    low = min(key.values())
    assert all(key[picker.pick()] == low for _ in range(200))
    first_ten = [b for _, b in zip(range(10), picker.candidates(), strict=False)]
    assert [key[b] for b in first_ten] == sorted(key[b] for b in first_ten)
    assert len(set(picker.candidates())) == 1000
