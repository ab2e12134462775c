"""Backend identity, ClusterSnapshot rebuilds and FakeClock (poise.core)."""

import pytest

from poise.core.backend import Backend, BackendStats
from poise.core.clock import FakeClock, MonotonicClock
from poise.core.cluster import ClusterSnapshot

A = Backend("10.0.0.1", 80)
B = Backend("10.0.0.2", 80)
C = Backend("10.0.0.3", 80)


# -- Backend -----------------------------------------------------------------------------------


def test_backend_equality_is_by_value():
    assert Backend("10.0.0.1", 80) == A
    assert hash(Backend("10.0.0.1", 80)) == hash(A)
    assert Backend("10.0.0.1", 80, weight=2) != A
    assert Backend("10.0.0.1", 81) != A
    assert Backend("10.0.0.1", 80, zone="a") != A
    assert len({A, Backend("10.0.0.1", 80), B}) == 2


def test_backend_is_frozen():
    with pytest.raises(AttributeError):
        A.port = 81  # type: ignore[misc]


def test_backend_address_and_repr():
    assert A.address == "10.0.0.1:80"
    assert Backend("::1", 8080).address == "[::1]:8080"
    assert repr(Backend("b.internal", 9001, weight=3)) == "<Backend b.internal:9001 w=3>"


def test_backend_stats_start_at_zero():
    stats = BackendStats()
    assert (stats.in_flight, stats.active_connections, stats.ewma_rtt) == (0, 0, 0.0)
    assert repr(stats) == "<BackendStats in_flight=0 conns=0>"


# -- ClusterSnapshot ---------------------------------------------------------------------------


def test_build_keeps_config_order_and_gives_each_backend_stats():
    snap = ClusterSnapshot.build("app", [B, A, C])
    assert snap.name == "app"
    assert snap.backends == (B, A, C)
    assert set(snap.stats) == {A, B, C}
    assert len({id(s) for s in snap.stats.values()}) == 3


def test_build_keeps_stats_of_surviving_backends():
    first = ClusterSnapshot.build("app", [A, B])
    first.stats[A].in_flight = 3
    first.stats[B].active_connections = 10
    second = ClusterSnapshot.build("app", [B, Backend("10.0.0.1", 80), C], previous=first)
    assert second.stats[A] is first.stats[A]        # an equal backend is the same backend
    assert second.stats[A].in_flight == 3
    assert second.stats[B] is first.stats[B]
    assert second.stats[B].active_connections == 10
    assert second.stats[C] is not first.stats[A]
    assert second.stats[C].active_connections == 0


def test_build_drops_stats_of_removed_backends():
    first = ClusterSnapshot.build("app", [A, B])
    second = ClusterSnapshot.build("app", [B], previous=first)
    assert set(second.stats) == {B}
    assert second.backends == (B,)


def test_a_reweighted_backend_keeps_its_live_stats():
    # Changing a weight at runtime does not make the server forget the requests it has
    # in flight (least_conn and peak_ewma read them): stats are carried by address.
    first = ClusterSnapshot.build("app", [A])
    first.stats[A].active_connections = 5
    heavier = Backend("10.0.0.1", 80, weight=2)
    second = ClusterSnapshot.build("app", [heavier], previous=first)
    assert second.stats[heavier] is first.stats[A]
    other = Backend("10.0.0.1", 81)
    third = ClusterSnapshot.build("app", [other], previous=second)
    assert third.stats[other] is not first.stats[A]


def test_previous_snapshot_is_not_mutated():
    first = ClusterSnapshot.build("app", [A, B])
    stats_before = dict(first.stats)
    ClusterSnapshot.build("app", [C], previous=first, unready=[C])
    assert first.backends == (A, B)
    assert first.stats == stats_before
    assert first.all_ready


def test_readiness():
    snap = ClusterSnapshot.build("app", [A, B, C], unready=[B])
    assert snap.ready(A)
    assert not snap.ready(B)
    assert snap.ready(C)
    assert snap.ready_count == 2
    assert not snap.all_ready
    assert repr(snap) == "<ClusterSnapshot app backends=3 ready=2>"


def test_all_ready_by_default():
    snap = ClusterSnapshot.build("app", [A, B])
    assert snap.all_ready
    assert snap.ready_count == 2
    assert repr(snap) == "<ClusterSnapshot app backends=2 ready=2>"


def test_readiness_is_per_snapshot():
    first = ClusterSnapshot.build("app", [A, B], unready=[A])
    second = ClusterSnapshot.build("app", [A, B], previous=first)
    assert not first.ready(A)
    assert second.ready(A)


def test_build_accepts_any_iterable():
    snap = ClusterSnapshot.build("app", (b for b in [A, B]))
    assert snap.backends == (A, B)


# -- clocks ------------------------------------------------------------------------------------


def test_fake_clock_moves_only_when_told():
    clock = FakeClock()
    assert clock.now() == 0.0
    assert clock.now() == 0.0
    clock.advance(1.5)
    assert clock.now() == 1.5
    clock.advance(0)
    assert clock.now() == 1.5


def test_fake_clock_start():
    clock = FakeClock(100.0)
    clock.advance(0.25)
    assert clock.now() == 100.25
    assert repr(clock) == "<FakeClock now=100.250>"


def test_fake_clock_never_goes_back():
    clock = FakeClock(5.0)
    with pytest.raises(ValueError):
        clock.advance(-0.001)
    assert clock.now() == 5.0


def test_monotonic_clock_does_not_go_back():
    clock = MonotonicClock()
    first = clock.now()
    assert clock.now() >= first


def test_request_context_query_keeps_raw_bytes_of_any_percent_encoding():
    # Regression: non-UTF-8 percent-encodings raised UnicodeEncodeError.
    from poise.core.context import RequestContext

    ctx = RequestContext(target=b"/x?q=%E2%82%AC&r=%FF&s=1&s=2")
    assert ctx.query(b"q") == "€".encode()
    assert ctx.query(b"r") == b"\xff"
    assert ctx.query(b"s") == b"1"
    assert ctx.query(b"missing") is None
