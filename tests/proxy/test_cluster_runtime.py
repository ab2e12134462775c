"""ClusterRuntime without sockets: built from a parsed config, fed health flags and
outcomes directly, and checked through what the request path asks of it (``choose``,
``fallback``, ``report``, ``outcome_of``, the connection queue) and ``status()``.

The event loop is never connected to anything: it only holds the timers the runtime
schedules (outlier releases), which some tests run.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from types import SimpleNamespace

import pytest
import yaml

from poise.config import parse_config
from poise.control.state import Member
from poise.core.health import HealthFlag
from poise.core.limits import Overflow
from poise.core.outlier import Outcome
from poise.errors import NoBackendAvailable
from poise.proxy.http.cluster import ClusterRuntime

ADDRESSES = [f"127.0.0.1:{9001 + i}" for i in range(6)]
EX = SimpleNamespace()          # round robin never looks at the exchange


@pytest.fixture
def loop():
    lp = asyncio.new_event_loop()
    yield lp
    lp.close()


@pytest.fixture
def make(loop):
    made: list[ClusterRuntime] = []

    def make(n: int = 3, backends: list[dict] | None = None, **cluster) -> ClusterRuntime:
        members = backends or [{"address": a} for a in ADDRESSES[:n]]
        data = {"listeners": [{"name": "web", "bind": "127.0.0.1:8080",
                               "routes": [{"cluster": "app"}]}],
                "clusters": [{"name": "app", "backends": members, **cluster}]}
        rt = ClusterRuntime(parse_config(yaml.safe_dump(data)).clusters[0], loop)
        made.append(rt)
        return rt

    yield make
    for rt in made:
        rt.stop()


def members(rt: ClusterRuntime) -> tuple:
    return rt.health.snapshot.backends


def _member(b, **flags) -> Member:
    return Member(b.host, b.port, weight=b.weight, backup=b.backup, **flags)


def picks(rt: ClusterRuntime, n: int = 12) -> Counter:
    return Counter(rt.choose(EX).backend.port for _ in range(n))


def ports(*backends) -> set[int]:
    return {b.port for b in backends}


# -- the picker follows the ready set ------------------------------------------------------


def test_every_backend_is_picked_when_all_are_ready(make):
    rt = make(3)
    assert picks(rt, 12) == {9001: 4, 9002: 4, 9003: 4}


@pytest.mark.parametrize("policy", ["round_robin", "least_conn"])
def test_backends_added_and_removed_by_a_snapshot_are_picked_and_dropped(make, policy):
    """(A new snapshot's picker comes before the new backend's pool: the round-robin
    index over pools must follow both.)"""
    rt = make(2, policy=policy)
    a, b = members(rt)
    c = Member("127.0.0.1", 9003)
    rt.apply_members([_member(a), _member(b), c])
    # (least_conn breaks ties at random: enough picks to see every backend)
    assert set(picks(rt, 300)) == {a.port, b.port, 9003}
    for _ in range(6):
        pool = rt.choose(EX)
        assert rt.pools[pool.backend] is pool
    rt.apply_members([_member(b), Member("127.0.0.1", 9003, weight=2)])
    if policy == "round_robin":
        assert picks(rt) == {b.port: 4, 9003: 8}
    assert set(picks(rt, 300)) == {b.port, 9003}


def test_a_flagged_backend_is_never_picked_and_returns_when_cleared(make):
    rt = make(3)
    a, b, c = members(rt)
    before = rt.picker
    rt.health.set_flag(b, HealthFlag.ACTIVE_CHECK_FAILED, True)
    assert rt.picker is not before, "the picker is rebuilt when the ready set changes"
    assert picks(rt, 10) == {a.port: 5, c.port: 5}
    rt.health.set_flag(b, HealthFlag.ACTIVE_CHECK_FAILED, False)
    assert set(picks(rt, 9)) == ports(a, b, c)


@pytest.mark.parametrize("flag", list(HealthFlag))
def test_each_flag_takes_a_backend_out(make, flag):
    rt = make(3)
    a, b, c = members(rt)
    rt.health.set_flag(a, flag, True)
    assert set(picks(rt)) == ports(b, c)


def test_a_snapshot_sets_the_active_check_and_drain_flags(make):
    rt = make(2, health_check={"interval": "1s"})
    a, b = members(rt)
    rt.apply_members([_member(a, down=True), _member(b)])
    assert rt.health.flags(a) == HealthFlag.ACTIVE_CHECK_FAILED
    assert set(picks(rt)) == ports(b)
    rt.apply_members([_member(a), _member(b, drained=True)])
    assert rt.health.flags(a) == HealthFlag(0)
    assert rt.health.flags(b) == HealthFlag.DRAINED
    assert set(picks(rt)) == ports(a)


def test_flags_composed_independently(make):
    rt = make(3)
    a, _, _ = members(rt)
    rt.health.set_flag(a, HealthFlag.DRAINED, True)
    rt.health.set_flag(a, HealthFlag.ACTIVE_CHECK_FAILED, True)
    rt.health.set_flag(a, HealthFlag.ACTIVE_CHECK_FAILED, False)
    assert a.port not in picks(rt), "clearing one flag must not undo another"


def test_a_change_that_keeps_the_ready_set_keeps_the_picker(make):
    rt = make(3)
    a, _, _ = members(rt)
    rt.health.set_flag(a, HealthFlag.ACTIVE_CHECK_FAILED, True)
    picker = rt.picker
    rt.health.set_flag(a, HealthFlag.ACTIVE_CHECK_FAILED, True)     # no change
    rt.health.set_flag(a, HealthFlag.DRAINED, True)                 # still unready
    assert rt.picker is picker


def test_no_ready_backend_means_no_picker_and_no_backend_available(make):
    rt = make(2)
    for b in members(rt):
        rt.health.set_flag(b, HealthFlag.ACTIVE_CHECK_FAILED, True)
    assert rt.picker is None
    with pytest.raises(NoBackendAvailable) as info:
        rt.choose(EX)
    assert info.value.status == 503
    assert rt.fallback(EX, []) is None
    assert rt.status()["panic"] is False, "all down is not panic: nothing healthy to favour"


def test_fallback_proposes_untried_backends_only(make):
    rt = make(3)
    pools = [rt.pools[b] for b in members(rt)]
    first = rt.choose(EX)
    tried = [first]
    while (nxt := rt.fallback(EX, tried)) is not None:
        assert nxt not in tried
        tried.append(nxt)
    assert sorted(p.backend.port for p in tried) == sorted(p.backend.port for p in pools)


def test_fallback_skips_unready_backends(make):
    rt = make(3)
    a, b, c = members(rt)
    rt.health.set_flag(c, HealthFlag.ACTIVE_CHECK_FAILED, True)
    assert rt.fallback(EX, [rt.pools[a]]) is rt.pools[b]
    assert rt.fallback(EX, [rt.pools[a], rt.pools[b]]) is None


# -- panic -----------------------------------------------------------------------------------


def test_panic_below_the_threshold_makes_every_primary_ready(make):
    rt = make(4, panic_threshold="50%")
    a, b, c, d = members(rt)
    for x in (b, c):
        rt.health.set_flag(x, HealthFlag.ACTIVE_CHECK_FAILED, True)
    assert set(picks(rt)) == ports(a, d), "2 of 4 healthy is not below 50%"
    assert rt.status()["panic"] is False
    rt.health.set_flag(d, HealthFlag.ACTIVE_CHECK_FAILED, True)
    assert picks(rt, 8) == {p: 2 for p in ports(a, b, c, d)}
    status = rt.status()
    assert status["panic"] is True and status["healthy"] == 1
    assert all(entry["ready"] for entry in status["backends"])
    rt.health.set_flag(d, HealthFlag.ACTIVE_CHECK_FAILED, False)
    assert set(picks(rt)) == ports(a, d) and rt.status()["panic"] is False


def test_panic_threshold_zero_never_panics(make):
    rt = make(4, panic_threshold=0)
    a, b, c, d = members(rt)
    for x in (b, c, d):
        rt.health.set_flag(x, HealthFlag.ACTIVE_CHECK_FAILED, True)
    assert set(picks(rt)) == ports(a)
    assert rt.status()["panic"] is False


def test_drained_backends_stay_out_even_in_panic(make):
    rt = make(4, panic_threshold="50%")
    a, b, c, d = members(rt)
    rt.health.set_flag(b, HealthFlag.DRAINED, True)
    rt.health.set_flag(c, HealthFlag.ACTIVE_CHECK_FAILED, True)
    rt.health.set_flag(d, HealthFlag.ACTIVE_CHECK_FAILED, True)
    assert rt.status()["panic"] is True     # 1 of 3 in service is healthy
    assert set(picks(rt)) == ports(a, c, d)


def test_backup_is_picked_only_when_no_primary_is_ready(make):
    rt = make(backends=[{"address": ADDRESSES[0]}, {"address": ADDRESSES[1]},
                        {"address": ADDRESSES[2], "backup": True}])
    a, b, backup = members(rt)
    assert set(picks(rt)) == ports(a, b)
    assert rt.fallback(EX, [rt.pools[a], rt.pools[b]]) is rt.pools[backup]
    rt.health.set_flag(a, HealthFlag.ACTIVE_CHECK_FAILED, True)
    rt.health.set_flag(b, HealthFlag.ACTIVE_CHECK_FAILED, True)
    assert set(picks(rt)) == ports(backup)


# -- outcomes and outlier ejection ---------------------------------------------------------


@pytest.mark.parametrize("status, outcome", [
    (200, Outcome.SUCCESS), (302, Outcome.SUCCESS), (404, Outcome.SUCCESS),
    (499, Outcome.SUCCESS), (500, Outcome.ERROR), (501, Outcome.ERROR),
    (502, Outcome.GATEWAY_ERROR), (503, Outcome.GATEWAY_ERROR), (504, Outcome.GATEWAY_ERROR),
    (505, Outcome.ERROR), (599, Outcome.ERROR)])
def test_outcome_of_default_failure_statuses(make, status, outcome):
    rt = make(2, outlier_detection={})
    assert rt.outcome_of(status) is outcome


def test_outcome_of_configured_failure_statuses(make):
    rt = make(2, outlier_detection={"failure_statuses": [429, "502-503"]})
    assert rt.outcome_of(429) is Outcome.ERROR
    assert rt.outcome_of(500) is Outcome.SUCCESS
    assert rt.outcome_of(502) is Outcome.GATEWAY_ERROR
    assert rt.outcome_of(504) is Outcome.SUCCESS


def test_without_outlier_detection_nothing_counts_as_failure(make):
    rt = make(2)
    assert rt.failure_statuses is None
    a, _ = members(rt)
    for _ in range(10):
        rt.report(rt.pools[a], Outcome.GATEWAY_ERROR)
    assert rt.health.flags(a) == HealthFlag(0)
    assert rt._release_timer is None


def test_report_ejects_after_consecutive_gateway_errors(make):
    rt = make(3, outlier_detection={"consecutive_gateway_errors": 2,
                                    "consecutive_failures": 10})
    a, b, c = members(rt)
    pool = rt.pools[a]
    rt.report(pool, Outcome.GATEWAY_ERROR)
    assert pool.failing and rt.health.flags(a) == HealthFlag(0)
    rt.report(pool, Outcome.SUCCESS)                     # a success breaks the streak
    assert not pool.failing
    rt.report(pool, Outcome.ERROR)                       # not a gateway error
    assert rt.health.flags(a) == HealthFlag(0)
    rt.report(pool, Outcome.SUCCESS)
    rt.report(pool, Outcome.GATEWAY_ERROR)
    assert rt.health.flags(a) == HealthFlag(0)
    rt.report(pool, Outcome.GATEWAY_ERROR)
    assert rt.health.flags(a) == HealthFlag.OUTLIER_EJECTED
    assert set(picks(rt)) == ports(b, c)
    assert rt.status()["backends"][0]["flags"] == ["outlier_ejected"]


def test_ejection_ends_on_the_release_timer(make, loop):
    rt = make(2, outlier_detection={"consecutive_gateway_errors": 1,
                                    "base_ejection_time": "50ms"})
    a, b = members(rt)
    rt.report(rt.pools[a], Outcome.GATEWAY_ERROR)
    assert set(picks(rt)) == ports(b)
    assert rt._release_timer is not None
    loop.run_until_complete(asyncio.sleep(0.12))
    assert rt.health.flags(a) == HealthFlag(0)
    assert set(picks(rt)) == ports(a, b)
    assert rt._release_timer is None, "nothing is ejected: no timer left"


def test_release_timer_follows_the_earliest_ejection_end(make, loop):
    # a's second ejection lasts 2 x base; b, ejected just after it for 1 x base, must be
    # released at its own end, not when a is.  (A base of 300 ms: the loop would have to
    # stall for most of 300 ms past b's end for a's end to pass before the check; with
    # 100 ms, 70 ms of a loaded CI box would do.)
    rt = make(3, panic_threshold=0, outlier_detection={
        "consecutive_gateway_errors": 1, "base_ejection_time": "300ms",
        "max_ejection_percent": "100%"})
    a, b, _ = members(rt)
    rt.report(rt.pools[a], Outcome.GATEWAY_ERROR)
    loop.run_until_complete(asyncio.sleep(0.35))
    assert rt.health.flags(a) == HealthFlag(0)
    rt.report(rt.pools[a], Outcome.GATEWAY_ERROR)       # 600ms
    rt.report(rt.pools[b], Outcome.GATEWAY_ERROR)       # 300ms
    b_ends = rt.health.next_release()
    assert rt._release_timer.when() == pytest.approx(b_ends, abs=0.01), \
        "the release timer is armed for a later ejection end than b's"
    loop.run_until_complete(asyncio.sleep(max(0.0, b_ends - loop.time()) + 0.03))
    assert rt.health.flags(b) == HealthFlag(0), "b stayed ejected past its ejection time"
    assert rt.health.flags(a) == HealthFlag.OUTLIER_EJECTED


def test_an_active_check_coming_back_up_ends_an_outlier_ejection(make):
    rt = make(3, health_check={"interval": "1s"}, outlier_detection={
        "consecutive_gateway_errors": 1, "base_ejection_time": "1m"})
    a, b, c = members(rt)
    rt.apply_members([_member(a, down=True), _member(b), _member(c)])
    rt.report(rt.pools[a], Outcome.GATEWAY_ERROR)
    assert rt.health.flags(a) == HealthFlag.ACTIVE_CHECK_FAILED | HealthFlag.OUTLIER_EJECTED
    rt.apply_members([_member(a), _member(b), _member(c)])
    assert rt.health.flags(a) == HealthFlag(0)
    assert set(picks(rt)) == ports(a, b, c)


def test_max_ejection_percent_keeps_backends_in_service(make):
    rt = make(4, outlier_detection={"consecutive_gateway_errors": 1,
                                    "max_ejection_percent": "50%"})
    for b in members(rt):
        rt.report(rt.pools[b], Outcome.GATEWAY_ERROR)
    ejected = [b for b in members(rt) if rt.health.flags(b)]
    assert len(ejected) == 2
    assert len(set(picks(rt))) == 2


# -- the connection queue --------------------------------------------------------------------


class FakeConn:
    def __init__(self, pool, idle_since: float = 0.0) -> None:
        self.pool = pool
        self.idle_since = idle_since
        self.closed = False
        self.usable = True      # as UpstreamConnection: open at both ends
        self.owner = None       # shared (no PROXY header naming a client)

    def close(self) -> None:
        self.closed = True
        self.usable = False


class FakeExchange:
    def __init__(self, pool) -> None:
        self.pool = pool
        self.given: list = []

    def dequeued(self, conn) -> None:
        self.given.append(conn)


def test_hand_over_gives_the_connection_to_the_first_request_for_that_backend(make):
    rt = make(2, max_connections=2)
    pa, pb = (rt.pools[b] for b in members(rt))
    for_b, for_a1, for_a2 = FakeExchange(pb), FakeExchange(pa), FakeExchange(pa)
    rt.pending.extend([for_b, for_a1, for_a2])
    conn = FakeConn(pa)
    assert rt.hand_over(pa, conn) is True
    assert for_a1.given == [conn] and for_a2.given == [] and for_b.given == []
    assert not conn.closed


def test_hand_over_closes_a_connection_only_the_cluster_limit_waits_for(make):
    rt = make(2, max_connections=2)
    pa, pb = (rt.pools[b] for b in members(rt))
    waiting = FakeExchange(pb)
    rt.pending.append(waiting)
    rt.limits.connections = 2                   # the cluster's cap is reached
    conn = FakeConn(pa)
    assert rt.hand_over(pa, conn) is True and conn.closed
    assert waiting.given == [], "it connects once the close has freed the slot"


def test_hand_over_keeps_the_connection_when_the_cluster_has_room(make):
    rt = make(backends=[{"address": ADDRESSES[0]},
                        {"address": ADDRESSES[1], "max_connections": 1}])
    pa, pb = (rt.pools[b] for b in members(rt))
    rt.pending.append(FakeExchange(pb))         # waits for b's own limit
    conn = FakeConn(pa)
    assert rt.hand_over(pa, conn) is False and not conn.closed


def test_connection_freed_lets_the_first_request_that_may_connect(make):
    rt = make(backends=[{"address": ADDRESSES[0], "max_connections": 1},
                        {"address": ADDRESSES[1]}], max_connections=3)
    pa, pb = (rt.pools[b] for b in members(rt))
    pa.active = 1
    rt.limits.connections = 2
    blocked, free = FakeExchange(pa), FakeExchange(pb)
    rt.pending.extend([blocked, free])
    rt.connection_freed()
    assert blocked.given == [] and free.given == [None]


def test_connection_freed_does_nothing_while_the_cap_holds(make):
    rt = make(2, max_connections=1)
    pa, _ = (rt.pools[b] for b in members(rt))
    rt.limits.connections = 1
    waiting = FakeExchange(pa)
    rt.pending.append(waiting)
    rt.connection_freed()
    assert waiting.given == []


def test_free_idle_connection_closes_the_longest_idle_one(make):
    rt = make(2, max_connections=4)
    pa, pb = (rt.pools[b] for b in members(rt))
    a_old, a_new, b_mid = FakeConn(pa, 1.0), FakeConn(pa, 5.0), FakeConn(pb, 3.0)
    pa.idle.extend([a_old, a_new])
    pb.idle.append(b_mid)
    rt.free_idle_connection()
    assert a_old.closed and list(pa.idle) == [a_new]
    assert not a_new.closed and not b_mid.closed and list(pb.idle) == [b_mid]
    rt.free_idle_connection()
    assert b_mid.closed and not pb.idle
    pa.idle.clear()     # (stand-ins: the compiled pools' close_idle takes real connections)


# -- settings resolved for the request path and status() -------------------------------------


def test_a_plain_cluster_is_not_guarded(make):
    rt = make(2)
    assert rt.guarded is False
    assert rt.limits is None and rt.retry is None and rt.request_timeout is None
    assert rt.failure_statuses is None


@pytest.mark.parametrize("fields", [{"max_requests": 5}, {"request_timeout": "1s"},
                                    {"retries": {}}, {"max_connections": 0}])
def test_any_limit_retry_or_deadline_guards_the_cluster(make, fields):
    assert make(2, **fields).guarded is True


def test_a_backend_connection_limit_alone_creates_the_limits(make):
    rt = make(backends=[{"address": ADDRESSES[0], "max_connections": 3},
                        {"address": ADDRESSES[1]}])
    assert rt.limits is not None and rt.guarded
    assert [rt.pools[b].max_connections for b in members(rt)] == [3, None]


def test_retry_settings_are_resolved(make):
    rt = make(2, retries={"attempts": 3, "retry_on": ["reset", 503, "500"],
                          "per_try_timeout": "250ms", "backoff": "10ms..40ms",
                          "retry_non_idempotent": True, "max_buffered_body": "1KiB"},
              response_header_timeout="5s")
    retry = rt.retry
    assert retry.attempts == 3
    assert (retry.on_reset, retry.on_timeout, retry.on_connect_failure) == (True, False, False)
    assert retry.statuses == {500, 503}
    assert (retry.backoff_base, retry.backoff_max) == (0.01, 0.04)
    assert retry.non_idempotent is True and retry.max_buffered_body == 1024
    assert all(p.response_timeout == 0.25 for p in rt.pools.values()), \
        "per_try_timeout is each try's response deadline"


def test_without_per_try_timeout_the_response_header_timeout_applies(make):
    rt = make(2, retries={}, response_header_timeout="5s")
    assert all(p.response_timeout == 5.0 for p in rt.pools.values())


def test_status_reports_backends_flags_and_readiness(make):
    rt = make(3)
    a, b, c = members(rt)
    rt.health.set_flag(b, HealthFlag.DRAINED, True)
    status = rt.status()
    assert status == {
        "cluster": "app", "panic": False, "healthy": 2, "total": 3,
        "backends": [
            {"address": a.address, "backup": False, "flags": [], "ready": True},
            {"address": b.address, "backup": False, "flags": ["drained"], "ready": False},
            {"address": c.address, "backup": False, "flags": [], "ready": True},
        ]}


def test_status_includes_overflow_counts_when_configured(make):
    rt = make(2, max_requests=1)
    status = rt.status()
    assert status["overflows"] == {o.value: 0 for o in Overflow}
    rt.limits.trip(Overflow.MAX_REQUESTS)
    assert rt.status()["overflows"]["max_requests"] == 1
    assert "overflows" not in make(2).status()
