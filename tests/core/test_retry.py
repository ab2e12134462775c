"""Retry budget, backoff and retry eligibility (poise.core.retry)."""

import random

import pytest

from poise.core.clock import FakeClock
from poise.core.retry import RetryBudget, backoff, may_retry


def test_budget_allows_its_share_of_requests_plus_the_minimum():
    clock = FakeClock(100.0)
    budget = RetryBudget(clock=clock, budget=0.2, min_per_second=1, ttl=10)
    for _ in range(100):
        budget.record_request()
    allowed = sum(budget.try_withdraw() for _ in range(100))
    assert allowed == 20 + 10          # 20% of 100 requests + 1/s × 10 s


def test_budget_deposits_expire_after_the_ttl():
    clock = FakeClock(0.0)
    budget = RetryBudget(clock=clock, budget=0.5, min_per_second=0, ttl=5)
    for _ in range(10):
        budget.record_request()
    assert sum(budget.try_withdraw() for _ in range(10)) == 5
    clock.advance(5)                   # all deposits and withdrawals have expired
    assert budget.try_withdraw() is False
    budget.record_request()
    budget.record_request()
    assert budget.try_withdraw() is True


def test_budget_options_are_checked():
    with pytest.raises(ValueError):
        RetryBudget(clock=FakeClock(), budget=-0.1)


def test_backoff_grows_exponentially_to_its_cap_with_jitter():
    rng = random.Random(3)
    for attempt, ceiling in [(1, 0.025), (2, 0.05), (3, 0.1), (4, 0.2), (5, 0.25), (9, 0.25)]:
        waits = [backoff(attempt, rng) for _ in range(200)]
        assert all(ceiling / 2 <= w <= ceiling for w in waits)
        assert max(waits) - min(waits) > ceiling / 4      # jittered, not constant


@pytest.mark.parametrize("method, expected", [("GET", True), ("put", True), ("POST", False),
                                              ("PATCH", False)])
def test_only_idempotent_methods_are_retried_by_default(method, expected):
    assert may_retry(method, body_replayable=True, response_started=False) is expected
    assert may_retry(method, retry_non_idempotent=True, body_replayable=True,
                     response_started=False) is True


def test_never_after_response_bytes_or_without_the_whole_body():
    assert not may_retry("GET", body_replayable=True, response_started=True)
    assert not may_retry("PUT", body_replayable=False, response_started=False)
