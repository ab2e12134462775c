"""Rise/fall thresholds and composable health flags (poise.core.health)."""

import pytest

from poise.core.health import HealthFlag, RiseFall, Transition, set_flag


def run(machine: RiseFall, results: str) -> list[Transition]:
    return [machine.observe(r == "+") for r in results]


def test_one_failure_never_flips_a_healthy_backend():
    m = RiseFall(rise=2, fall=3)
    assert set(run(m, "+-+-+--+")) == {Transition.NONE}
    assert m.healthy


def test_fall_failures_in_a_row_flip_it_down_once():
    m = RiseFall(rise=2, fall=3)
    assert run(m, "---") == [Transition.NONE, Transition.NONE, Transition.FLIPPED_DOWN]
    assert not m.healthy
    assert run(m, "---") == [Transition.NONE] * 3       # already down: no new flip


def test_rise_successes_in_a_row_bring_it_back():
    m = RiseFall(rise=2, fall=1, healthy=False)
    assert run(m, "+-+") == [Transition.NONE] * 3        # the streak was broken
    assert m.observe(True) is Transition.FLIPPED_UP
    assert m.healthy


def test_thresholds_of_one_flip_on_every_change():
    m = RiseFall(rise=1, fall=1)
    assert run(m, "-+-") == [Transition.FLIPPED_DOWN, Transition.FLIPPED_UP,
                             Transition.FLIPPED_DOWN]


@pytest.mark.parametrize("rise, fall", [(0, 1), (1, 0), (-1, 3)])
def test_thresholds_must_be_positive(rise, fall):
    with pytest.raises(ValueError):
        RiseFall(rise=rise, fall=fall)


def test_flags_from_different_sources_compose():
    flags = HealthFlag(0)
    flags = set_flag(flags, HealthFlag.DRAINED, True)           # operator drains
    flags = set_flag(flags, HealthFlag.ACTIVE_CHECK_FAILED, True)
    flags = set_flag(flags, HealthFlag.ACTIVE_CHECK_FAILED, False)  # check passes again
    assert flags == HealthFlag.DRAINED                             # the drain stands
    assert not set_flag(flags, HealthFlag.DRAINED, False)          # ready only when none
