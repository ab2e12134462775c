"""round_robin: weighted, smooth, deterministic (poise.core.policies.round_robin)."""

import itertools
import math
import random
from collections import Counter
from functools import reduce

import pytest

from poise.core.backend import Backend
from poise.core.cluster import ClusterSnapshot
from poise.core.policies import POLICIES, create_policy
from poise.core.policies.round_robin import DeadlinePicker, RotationPicker, RoundRobin


def backends(*weights: int) -> tuple[Backend, ...]:
    return tuple(Backend(f"10.0.{i // 256}.{i % 256}", 8000 + i, weight=w)
                 for i, w in enumerate(weights))


def build(*weights: int):
    return RoundRobin().build(ClusterSnapshot.build("c", backends(*weights)))


def period(weights) -> int:
    return sum(weights) // reduce(math.gcd, weights)


def longest_run(seq) -> int:
    return max(len(list(group)) for _, group in itertools.groupby(seq))


# -- registry ----------------------------------------------------------------------------------


def test_registered():
    assert POLICIES["round_robin"] is RoundRobin
    assert isinstance(create_policy("round_robin"), RoundRobin)
    assert isinstance(create_policy("round_robin", {}), RoundRobin)


def test_takes_no_options():
    with pytest.raises(TypeError):
        create_policy("round_robin", {"spread": 2})


def test_unknown_policy_is_a_key_error():
    with pytest.raises(KeyError):
        create_policy("fastest")


# -- equal weights -------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_equal_weights_rotate_in_order(n):
    bs = backends(*[1] * n)
    picker = RoundRobin().build(ClusterSnapshot.build("c", bs))
    assert [picker.pick() for _ in range(3 * n)] == list(bs) * 3


def test_equal_weights_above_one_are_plain_rotation():
    bs = backends(5, 5, 5)
    picker = RoundRobin().build(ClusterSnapshot.build("c", bs))
    assert [picker.pick() for _ in range(6)] == list(bs) * 2


# -- proportions ---------------------------------------------------------------------------------


def test_weights_1_2_exact_thirds_every_cycle():
    a, b = bs = backends(1, 2)
    picker = RoundRobin().build(ClusterSnapshot.build("c", bs))
    for _ in range(1000):
        cycle = Counter(picker.pick() for _ in range(3))
        assert cycle == {a: 1, b: 2}


@pytest.mark.parametrize("weights", [
    (1, 2), (1, 3), (2, 3), (5, 1, 1), (1, 2, 3, 4), (7, 5, 3, 1), (4, 6), (10, 10, 1),
    tuple(range(1, 51)), (3000, 7),
])
def test_each_full_cycle_is_exactly_proportional(weights):
    bs = backends(*weights)
    picker = RoundRobin().build(ClusterSnapshot.build("c", bs))
    n = period(weights)
    g = reduce(math.gcd, weights)
    for _ in range(5):
        cycle = Counter(picker.pick() for _ in range(n))
        assert cycle == {b: b.weight // g for b in bs}


def test_weights_1_3_over_100k_picks():
    a, b = bs = backends(1, 3)
    picker = RoundRobin().build(ClusterSnapshot.build("c", bs))
    counts = Counter(picker.pick() for _ in range(100_000))
    assert counts[a] / 100_000 == pytest.approx(0.25, abs=0.02)
    assert counts[b] / 100_000 == pytest.approx(0.75, abs=0.02)


def test_weights_1_3_deadline_path_over_100k_picks():
    a, b = bs = backends(1, 3)
    picker = DeadlinePicker(bs)
    counts = Counter(picker.pick() for _ in range(100_000))
    assert counts[a] / 100_000 == pytest.approx(0.25, abs=0.02)
    assert counts[b] / 100_000 == pytest.approx(0.75, abs=0.02)


# -- smoothness ----------------------------------------------------------------------------------

SMOOTH_CASES = [
    (1, 2), (1, 3), (2, 3), (5, 1, 1), (1, 1, 5), (1, 2, 3, 4), (7, 5, 3, 1), (3, 3, 1),
    (1, 100), (100, 99, 1), (9, 1, 1, 1, 1), tuple(range(1, 51)), (3000, 7),
]


def assert_smooth(picker, weights, cycles: int = 4) -> None:
    bound = math.ceil(max(weights) / min(weights))
    seq = [picker.pick() for _ in range(cycles * period(weights))]
    assert longest_run(seq) <= bound


@pytest.mark.parametrize("weights", SMOOTH_CASES)
def test_never_more_than_ceil_ratio_in_a_row(weights):
    assert_smooth(build(*weights), weights)


@pytest.mark.parametrize("weights", SMOOTH_CASES)
def test_deadline_picker_is_smooth(weights):
    assert_smooth(DeadlinePicker(backends(*weights)), weights)


@pytest.mark.parametrize("weights", SMOOTH_CASES)
def test_deadline_picker_cycles_are_exactly_proportional(weights):
    bs = backends(*weights)
    picker = DeadlinePicker(bs)
    n = period(weights)
    g = reduce(math.gcd, weights)
    for _ in range(3):
        assert Counter(picker.pick() for _ in range(n)) == {b: b.weight // g for b in bs}


@pytest.mark.parametrize("weights", [
    tuple(range(1, 101)),                 # period 5050
    (3000, 7, 1500),                      # period 4507
    (10_000, 1),
    (1, 10_000),
    (9_999, 10_000, 1),
])
def test_large_weight_sums_use_the_deadline_picker(weights):
    bs = backends(*weights)
    picker = RoundRobin().build(ClusterSnapshot.build("c", bs))
    assert isinstance(picker, DeadlinePicker)
    n = period(weights)
    g = reduce(math.gcd, weights)
    assert Counter(picker.pick() for _ in range(n)) == {b: b.weight // g for b in bs}
    assert_smooth(picker, weights, cycles=10)


def test_small_weight_sums_use_a_precomputed_rotation():
    assert isinstance(build(1, 2), RotationPicker)
    assert isinstance(build(1, 1), RotationPicker)
    assert isinstance(build(*range(1, 51)), RotationPicker)


def test_schedule_is_deterministic():
    weights = (3, 1, 4, 1, 5, 9, 2, 6)
    p1, p2 = build(*weights), build(*weights)
    assert [p1.pick().address for _ in range(200)] == [p2.pick().address for _ in range(200)]


def test_pickers_do_not_share_state():
    snap = ClusterSnapshot.build("c", backends(1, 2))
    p1, p2, fresh = (RoundRobin().build(snap) for _ in range(3))
    p1.pick()
    p1.pick()
    assert [p2.pick() for _ in range(3)] == [fresh.pick() for _ in range(3)]


# -- candidates() --------------------------------------------------------------------------------

CANDIDATE_CASES = [(1,), (1, 1, 1), (1, 2), (5, 1, 1), (1, 2, 3, 4), (3000, 7),
                   tuple(range(1, 101))]


def make_pickers(weights):
    """Two independent pickers for each implementation, in lockstep."""
    bs = backends(*weights)
    snap = ClusterSnapshot.build("c", bs)
    return bs, [
        (RoundRobin().build(snap), RoundRobin().build(snap)),
        (DeadlinePicker(bs), DeadlinePicker(bs)),
    ]


@pytest.mark.parametrize("weights", CANDIDATE_CASES)
def test_candidates_yield_every_backend_once_pick_first(weights):
    bs, pairs = make_pickers(weights)
    rng = random.Random(7)
    for reference, picker in pairs:
        for _ in range(2 * period(weights) + 3):
            if rng.random() < 0.5:
                assert picker.pick() == reference.pick()
                continue
            expected_first = reference.pick()
            got = list(picker.candidates())
            assert got[0] == expected_first
            assert sorted(got, key=bs.index) == list(bs)
            assert len(got) == len(set(got))


@pytest.mark.parametrize("weights", CANDIDATE_CASES)
def test_candidates_are_lazy(weights):
    # The caller usually stops at the first ready backend: taking one candidate must
    # advance the schedule exactly like one pick().
    _, pairs = make_pickers(weights)
    for reference, picker in pairs:
        for _ in range(period(weights) + 2):
            assert next(iter(picker.candidates())) == reference.pick()


def test_candidates_skip_to_the_next_backends_in_order():
    a, b, c = bs = backends(1, 1, 1)
    picker = RoundRobin().build(ClusterSnapshot.build("c", bs))
    assert list(picker.candidates()) == [a, b, c]
    assert list(picker.candidates()) == [b, c, a]
    assert list(picker.candidates()) == [c, a, b]


def test_empty_cluster_has_no_candidates():
    picker = RoundRobin().build(ClusterSnapshot.build("c", ()))
    assert list(picker.candidates()) == []


def test_reprs():
    assert repr(build(1, 1)) == "<RotationPicker schedule=2 backends=2>"
    assert repr(build(1, 2)) == "<RotationPicker schedule=3 backends=2>"
    assert repr(DeadlinePicker(backends(1, 2, 3))) == "<DeadlinePicker backends=3>"
