"""Envoy-style circuit-breaker accounting (poise.core.limits)."""

import pytest

from poise.core.limits import ClusterLimits, Overflow


def trips(limits: ClusterLimits) -> dict[str, int]:
    return {o.value: n for o, n in limits.overflows.items() if n}


def test_unlimited_by_default_and_every_overflow_starts_at_zero():
    limits = ClusterLimits()
    assert all(limits.try_request() and limits.try_retry() and limits.try_pend()
               for _ in range(1000))
    assert limits.can_connect(10_000, None) is None
    assert (limits.requests, limits.retries, limits.pending) == (1000, 1000, 1000)
    assert limits.overflows == dict.fromkeys(Overflow, 0)


def test_max_requests_refuses_and_counts_then_a_release_admits_again():
    limits = ClusterLimits(max_requests=2)
    assert [limits.try_request() for _ in range(4)] == [True, True, False, False]
    assert limits.requests == 2 and trips(limits) == {"max_requests": 2}
    limits.end_request()
    assert limits.try_request() and limits.requests == 2


def test_max_retries_refuses_and_counts():
    limits = ClusterLimits(max_retries=1)
    assert limits.try_retry() and not limits.try_retry()
    assert trips(limits) == {"max_retries": 1}
    limits.end_retry()
    assert limits.try_retry()


def test_max_retries_zero_allows_no_retry():
    limits = ClusterLimits(max_retries=0)
    assert not limits.try_retry()
    assert limits.retries == 0 and trips(limits) == {"max_retries": 1}


def test_max_pending_refuses_and_counts_and_queue_timeouts_are_tripped_by_the_caller():
    limits = ClusterLimits(max_pending=1)
    assert limits.try_pend() and not limits.try_pend()
    limits.trip(Overflow.QUEUE_TIMEOUT)
    limits.end_pend()
    assert limits.pending == 0
    assert trips(limits) == {"max_pending": 1, "queue_timeout": 1}


def test_cluster_max_connections_is_checked_before_the_backend_cap_and_counts_nothing():
    limits = ClusterLimits(max_connections=2)
    assert limits.can_connect(0, 1) is None
    limits.opened()
    assert limits.can_connect(1, 1) is Overflow.BACKEND_MAX_CONNECTIONS
    assert limits.can_connect(1, None) is None
    limits.opened()
    assert limits.can_connect(0, None) is Overflow.MAX_CONNECTIONS
    assert limits.can_connect(5, 1) is Overflow.MAX_CONNECTIONS
    assert trips(limits) == {}                     # asking is not a trip
    limits.trip(Overflow.MAX_CONNECTIONS)
    assert trips(limits) == {"max_connections": 1}
    limits.closed()
    assert limits.connections == 1 and limits.can_connect(0, None) is None


def test_backend_cap_applies_without_a_cluster_cap():
    limits = ClusterLimits()
    assert limits.can_connect(3, 4) is None
    assert limits.can_connect(4, 4) is Overflow.BACKEND_MAX_CONNECTIONS
    assert limits.can_connect(0, 0) is Overflow.BACKEND_MAX_CONNECTIONS


@pytest.mark.parametrize("end, message", [
    ("end_request", "try_request"), ("end_retry", "try_retry"),
    ("end_pend", "try_pend"), ("closed", "opened")])
def test_ending_more_than_was_started_is_refused_and_no_count_goes_negative(end, message):
    limits = ClusterLimits()
    with pytest.raises(RuntimeError, match=message):
        getattr(limits, end)()
    assert (limits.requests, limits.retries, limits.pending, limits.connections) == (0, 0, 0, 0)


def test_a_refused_try_needs_no_end():
    limits = ClusterLimits(max_requests=0)
    assert not limits.try_request()
    with pytest.raises(RuntimeError):
        limits.end_request()


@pytest.mark.parametrize("options", [
    {"max_connections": -1}, {"max_pending": 1.5}, {"max_requests": True},
    {"max_retries": "3"}])
def test_bad_caps_are_refused(options):
    with pytest.raises(ValueError):
        ClusterLimits(**options)


def test_repr_shows_counts_against_caps():
    limits = ClusterLimits(max_requests=10, max_retries=3)
    limits.try_request()
    limits.opened()
    assert repr(limits) == ("<ClusterLimits requests=1/10 connections=1/inf "
                            "pending=0/inf retries=0/3>")
