"""random and p2c: weights, load preference, candidates, options
(poise.core.policies.weighted_random, .p2c; least_conn is in test_least_conn.py and slow
start in test_slow_start.py).

Statistical tests use fixed seeds; tolerances are stated next to each figure.
"""

import math
import random
from collections import Counter

import pytest

from poise.core.backend import Backend
from poise.core.clock import FakeClock
from poise.core.cluster import ClusterSnapshot
from poise.core.policies.least_conn import LeastConn
from poise.core.policies.p2c import P2CPicker, PowerOfTwo
from poise.core.policies.weighted_random import RandomPicker, WeightedRandom

# Until these policies are registered, by name (then: create_policy(name, options, ...)).
CLASSES = {"random": WeightedRandom, "least_conn": LeastConn, "p2c": PowerOfTwo}
LOAD_AWARE = sorted(CLASSES)


def make(name, options=None, *, seed=1, clock=None):
    return CLASSES[name](**(options or {}), rng=random.Random(seed),
                         clock=clock or FakeClock(1000.0))


def snapshot(weights, loads=None):
    backends = [Backend(f"10.0.{i // 250}.{i % 250}", 8000 + i, weight=w)
                for i, w in enumerate(weights)]
    snap = ClusterSnapshot.build("c", backends)
    for b, load in zip(backends, loads or [0] * len(backends), strict=True):
        snap.stats[b].in_flight = load
    return snap


def shares(picker, snap, picks=100_000):
    counts = Counter(picker.pick() for _ in range(picks))
    return [counts[b] / picks for b in snap.backends]


# -- options -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", LOAD_AWARE)
def test_defaults_and_no_context(name):
    policy = make(name)
    assert policy.slow_start == 0.0
    assert policy.needs_context is False
    assert make(name, {"slow_start": 30}).slow_start == 30.0
    assert make(name, {"slow_start": 2.5}).slow_start == 2.5
    assert make(name, {"slow_start": "30s"}).slow_start == 30.0
    assert make(name, {"slow_start": "1m"}).slow_start == 60.0
    assert make(name, {"slow_start": "0"}).slow_start == 0.0


@pytest.mark.parametrize("name", LOAD_AWARE)
@pytest.mark.parametrize("value", [-1, -0.5, math.inf, math.nan, "-5s", "soon", "30 days",
                                   None, True, [30]])
def test_bad_slow_start_is_a_value_error(name, value):
    with pytest.raises(ValueError, match="slow_start"):
        make(name, {"slow_start": value})


@pytest.mark.parametrize("name", LOAD_AWARE)
def test_unknown_option_is_a_type_error(name):
    with pytest.raises(TypeError):
        make(name, {"spread": 2})


@pytest.mark.parametrize("value", [1, 0, -2, 2.0, "2", True, None])
def test_bad_choices_is_a_value_error(value):
    with pytest.raises(ValueError, match="choices"):
        make("p2c", {"choices": value})


def test_p2c_choices_default_and_cap():
    assert make("p2c").choices == 2
    assert make("p2c", {"choices": 5}).choices == 5
    assert repr(make("p2c", {"choices": 5}).build(snapshot([1] * 3))) == \
        "<P2CPicker backends=3 choices=3>"


def test_reprs():
    assert repr(make("random").build(snapshot([1] * 10))) == "<RandomPicker backends=10>"
    assert repr(make("p2c").build(snapshot([1] * 10))) == "<P2CPicker backends=10 choices=2>"
    assert repr(make("random", {"slow_start": 2.5})) == "<WeightedRandom slow_start=2.5s>"
    assert repr(make("p2c")) == "<PowerOfTwo choices=2 slow_start=0s>"
    assert isinstance(make("random").build(snapshot([1])), RandomPicker)
    assert isinstance(make("p2c").build(snapshot([1])), P2CPicker)


# -- weights (equal loads) ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["random", "p2c"])
def test_weights_1_3_over_100k_picks(name):
    snap = snapshot([1, 3])
    a, b = shares(make(name).build(snap), snap)
    assert a == pytest.approx(0.25, abs=0.02)
    assert b == pytest.approx(0.75, abs=0.02)


@pytest.mark.parametrize("name", ["random", "p2c"])
def test_weights_1_2_3_4_over_100k_picks(name):
    snap = snapshot([1, 2, 3, 4])
    for share, expected in zip(shares(make(name).build(snap), snap), [.1, .2, .3, .4],
                               strict=True):
        assert share == pytest.approx(expected, abs=0.01)


@pytest.mark.parametrize("name", ["random", "p2c"])
def test_equal_weights_are_uniform(name):
    snap = snapshot([4] * 10)
    for share in shares(make(name).build(snap), snap):
        assert share == pytest.approx(0.1, abs=0.006)


def test_p2c_loads_proportional_to_weights_keep_the_weights():
    # 2/1 == 6/3: equal relative loads, so the first drawn wins and draws follow weights.
    snap = snapshot([1, 3], loads=[2, 6])
    a, b = shares(make("p2c").build(snap), snap)
    assert a == pytest.approx(0.25, abs=0.02)
    assert b == pytest.approx(0.75, abs=0.02)


def test_random_ignores_loads():
    snap = snapshot([1, 1], loads=[0, 50])
    a, b = shares(make("random").build(snap), snap, 20_000)
    assert a == pytest.approx(0.5, abs=0.02)


def test_same_seed_same_picks():
    snap = snapshot([1, 2, 3, 4, 5])
    for name in LOAD_AWARE:
        p1, p2 = make(name, seed=5).build(snap), make(name, seed=5).build(snap)
        assert [p1.pick() for _ in range(200)] == [p2.pick() for _ in range(200)]


# -- p2c prefers the less loaded -----------------------------------------------------------------


@pytest.mark.parametrize("weights", [[1, 1], [1, 100], [100, 1]])
def test_p2c_two_distinct_draws_pick_the_idle_one_of_two(weights):
    # With two backends both are always drawn, so the idle one always wins; a sampler
    # that could draw the same backend twice would sometimes return the busy one.
    snap = snapshot(weights, loads=[0, 5])
    assert set(shares(make("p2c").build(snap), snap, 5000)) == {1.0, 0.0}
    assert make("p2c").build(snap).pick() == snap.backends[0]


def test_p2c_compares_load_relative_to_weight():
    heavy_wins = snapshot([1, 3], loads=[1, 2])       # 1/1 > 2/3
    light_wins = snapshot([1, 3], loads=[1, 4])       # 1/1 < 4/3
    for snap, winner in ((heavy_wins, 1), (light_wins, 0)):
        picker = make("p2c").build(snap)
        assert {picker.pick() for _ in range(500)} == {snap.backends[winner]}


@pytest.mark.parametrize("choices, expected", [(2, 0.2), (3, 0.3), (5, 0.5)])
def test_p2c_idle_backend_share_is_its_chance_to_be_drawn(choices, expected):
    # One idle backend among 10 busy ones wins whenever it is among the `choices` drawn:
    # 1 - C(9, k) / C(10, k) = k / 10.  Plain random would give it 0.1.
    snap = snapshot([1] * 10, loads=[0] + [10] * 9)
    share = shares(make("p2c", {"choices": choices}).build(snap), snap)[0]
    assert share == pytest.approx(expected, abs=0.01)


def test_p2c_never_picks_the_strictly_most_loaded():
    for weights in ([1] * 8, [1, 2, 3, 4, 1, 2, 3, 4]):
        loads = [1 * w for w in weights]
        loads[5] = 100
        snap = snapshot(weights, loads)
        assert shares(make("p2c").build(snap), snap, 20_000)[5] == 0.0


def test_p2c_weighted_draws_keep_the_idle_backend_preference():
    # Weighted path: the idle backend (weight 3 of 20) wins every pair it is in, so its
    # share is its chance to be one of two distinct weighted draws:
    # 3/20 + sum_j w_j/20 * 3/(20 - w_j) = 0.3006 (its weight share alone is 0.15).
    weights = [1, 2, 3, 4, 1, 2, 3, 4]
    snap = snapshot(weights, loads=[5, 5, 5, 5, 5, 5, 0, 5])
    expected = 3 / 20 + sum(w / 20 * 3 / (20 - w) for j, w in enumerate(weights) if j != 6)
    assert shares(make("p2c").build(snap), snap)[6] == pytest.approx(expected, abs=0.01)


# -- candidates --------------------------------------------------------------------------------

CANDIDATE_CASES = [[1], [1, 1], [1, 3], [5, 1, 1], [1, 2, 3, 4], [3000, 7],
                   list(range(1, 101)), [1] * 200]


@pytest.mark.parametrize("name", LOAD_AWARE)
@pytest.mark.parametrize("weights", CANDIDATE_CASES)
def test_candidates_are_complete_and_unique(name, weights):
    rng = random.Random(3)
    snap = snapshot(weights, [rng.randrange(5) for _ in weights])
    picker = make(name).build(snap)
    for _ in range(20):
        got = list(picker.candidates())
        assert len(got) == len(weights)
        assert set(got) == set(snap.backends)


@pytest.mark.parametrize("name", LOAD_AWARE)
def test_empty_snapshot_has_no_candidates(name):
    assert list(make(name).build(snapshot([])).candidates()) == []


@pytest.mark.parametrize("name", LOAD_AWARE)
def test_single_backend(name):
    snap = snapshot([3], [7])
    picker = make(name).build(snap)
    assert picker.pick() == snap.backends[0]
    assert list(picker.candidates()) == [snap.backends[0]]


@pytest.mark.parametrize("name", ["random", "p2c"])
def test_first_candidate_follows_the_pick_distribution(name):
    snap = snapshot([1, 3])
    picker = make(name).build(snap)
    counts = Counter(next(picker.candidates()) for _ in range(20_000))
    assert counts[snap.backends[0]] / 20_000 == pytest.approx(0.25, abs=0.02)


@pytest.mark.parametrize("name", ["random", "p2c"])
def test_later_candidates_are_weighted_too(name):
    # Nine of weight 1 and one of weight 9 (all idle): the heavy one is missing from the
    # first two candidates with probability 9/18 * 8/17 = 0.235 when every draw is
    # weighted; a uniform order after the first would give 0.444.
    snap = snapshot([1] * 9 + [9])
    picker = make(name).build(snap)
    heavy = snap.backends[9]
    missing = 0
    for _ in range(20_000):
        it = picker.candidates()
        if heavy not in (next(it), next(it)):
            missing += 1
    assert missing / 20_000 == pytest.approx(9 / 18 * 8 / 17, abs=0.015)


def test_p2c_candidates_put_the_loaded_last():
    snap = snapshot([1] * 10, loads=list(range(10)))
    picker = make("p2c").build(snap)
    firsts, lasts = Counter(), Counter()
    for _ in range(5000):
        got = list(picker.candidates())
        firsts[got[0]] += 1
        lasts[got[-1]] += 1
    assert snap.backends[9] not in firsts            # never wins a comparison
    assert lasts[snap.backends[9]] / 5000 > 0.75     # usually left for the sorted tail
    assert firsts[snap.backends[0]] / 5000 == pytest.approx(0.2, abs=0.02)


def test_random_candidates_orders_vary():
    snap = snapshot([1] * 6)
    picker = make("random").build(snap)
    orders = {tuple(picker.candidates()) for _ in range(2000)}
    assert len(orders) > 500        # 720 permutations exist; a fixed rotation gives 6
