"""Passive outlier ejection (poise.core.outlier) with a fake clock."""

import pytest

from poise.core.clock import FakeClock
from poise.core.outlier import Outcome, OutlierDetector

OK, ERR, GW = Outcome.SUCCESS, Outcome.ERROR, Outcome.GATEWAY_ERROR


def detector(**options):
    clock = FakeClock(0.0)
    return clock, OutlierDetector(clock=clock, **options)


def test_consecutive_failures_eject_and_a_success_resets_the_count():
    _, d = detector(consecutive_failures=3)
    assert [d.report("a", o, 4) for o in (ERR, ERR, OK, ERR, ERR)] == [False] * 5
    assert d.report("a", ERR, 4) is True
    assert d.is_ejected("a")


def test_gateway_errors_have_their_own_threshold():
    _, d = detector(consecutive_failures=10, consecutive_gateway_errors=2)
    assert d.report("a", GW, 4) is False
    assert d.report("a", GW, 4) is True


def test_another_failure_breaks_a_run_of_gateway_errors():
    """Regression: a 500 between gateway errors did not reset their count."""
    _, d = detector(consecutive_failures=10, consecutive_gateway_errors=2)
    assert [d.report("a", o, 4) for o in (GW, ERR, GW)] == [False] * 3
    assert d.report("a", GW, 4) is True


def test_an_ejected_backend_returns_after_its_time_and_repeat_ejections_last_longer():
    clock, d = detector(consecutive_failures=1, base_ejection_time=30, max_ejection_time=70)
    assert d.report("a", ERR, 4)
    clock.advance(29.9)
    assert d.release_expired() == []
    clock.advance(0.1)
    assert d.release_expired() == ["a"] and not d.is_ejected("a")
    assert d.report("a", ERR, 4)                 # second ejection: 60 s
    clock.advance(59)
    assert d.release_expired() == []
    clock.advance(1)
    assert d.release_expired() == ["a"]
    assert d.report("a", ERR, 4)                 # third: 90 s, capped at 70 s
    clock.advance(70)
    assert d.release_expired() == ["a"]


def test_max_ejection_percent_keeps_part_of_the_cluster_in_service():
    _, d = detector(consecutive_failures=1, max_ejection_percent=50)
    assert d.report("a", ERR, 4) and d.report("b", ERR, 4)
    assert d.report("c", ERR, 4) is False        # 3 of 4 would exceed 50%
    assert d.ejected_count() == 2


@pytest.mark.parametrize("options", [
    {"consecutive_failures": 0}, {"max_ejection_percent": 101},
    {"base_ejection_time": 0}, {"base_ejection_time": 10, "max_ejection_time": 5}])
def test_bad_options_are_refused(options):
    with pytest.raises(ValueError):
        detector(**options)
