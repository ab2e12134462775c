"""Which backends may take traffic: flags, outlier ejection, panic mode
(poise.core.availability) with a fake clock."""

import json
import logging

import pytest

from poise.core.availability import ClusterHealth
from poise.core.backend import Backend
from poise.core.clock import FakeClock
from poise.core.health import HealthFlag
from poise.core.outlier import Outcome, OutlierDetector

CHECK = HealthFlag.ACTIVE_CHECK_FAILED
DRAINED = HealthFlag.DRAINED
EJECTED = HealthFlag.OUTLIER_EJECTED
GW, OK = Outcome.GATEWAY_ERROR, Outcome.SUCCESS

A, B, C, D = (Backend(f"10.0.0.{i}", 80) for i in range(1, 5))
BACKUP = Backend("10.0.1.1", 80, backup=True)


def cluster(backends=(A, B, C, D), outlier=None, **options):
    clock = FakeClock(100.0)
    changes = []
    detector = OutlierDetector(clock=clock, **outlier) if outlier is not None else None
    health = ClusterHealth("web", backends, clock=clock, outlier=detector,
                           on_change=changes.append, **options)
    return clock, health, changes


def ready(health):
    return [b for b in health.snapshot.backends if health.snapshot.ready(b)]


def fail(health, *backends):
    for b in backends:
        health.set_flag(b, CHECK, True)


# -- flags ----------------------------------------------------------------------------------


def test_all_backends_start_healthy_and_ready_with_no_ready_since():
    _, health, changes = cluster()
    assert ready(health) == [A, B, C, D] and not health.panic
    assert health.snapshot.ready_since == {} and changes == []
    assert repr(health) == "<ClusterHealth web healthy=4/4>"


def test_flags_compose_clearing_one_leaves_the_other():
    _, health, _ = cluster()
    health.set_flag(A, DRAINED, True)
    health.set_flag(A, CHECK, True)
    assert health.flags(A) == DRAINED | CHECK
    health.set_flag(A, CHECK, False)                 # the check passes: still drained
    assert health.flags(A) == DRAINED and A not in ready(health)
    health.set_flag(A, DRAINED, False)
    assert health.flags(A) == HealthFlag(0) and A in ready(health)


def test_snapshot_is_not_rebuilt_when_readiness_does_not_change():
    _, health, changes = cluster()
    first = health.snapshot
    health.set_flag(A, CHECK, False)                 # already clear
    assert health.snapshot is first and changes == []
    health.set_flag(A, DRAINED, True)
    down = health.snapshot
    assert down is not first and changes == [down]
    health.set_flag(A, CHECK, True)                  # a second reason: still unready
    health.set_flag(A, DRAINED, True)
    assert health.snapshot is down and changes == [down]


def test_on_change_is_called_once_per_change_with_the_new_snapshot():
    _, health, changes = cluster()
    fail(health, A)
    health.set_flag(A, CHECK, False)
    assert len(changes) == 2 and changes[-1] is health.snapshot


def test_stats_carry_over_rebuilds():
    _, health, _ = cluster()
    health.snapshot.stats[B].in_flight = 7
    stats = health.snapshot.stats[B]
    fail(health, A)
    assert health.snapshot.stats[B] is stats and stats.in_flight == 7


def test_unknown_backends_are_ignored():
    _, health, changes = cluster(outlier={"consecutive_gateway_errors": 1})
    stranger = Backend("10.9.9.9", 80)
    health.set_flag(stranger, CHECK, True)
    health.report(stranger, GW)
    assert health.flags(stranger) == HealthFlag(0) and changes == []


# -- ready_since ------------------------------------------------------------------------------


def test_ready_since_marks_recovery_and_is_dropped_when_unhealthy_again():
    clock, health, _ = cluster()
    fail(health, A)
    assert A not in health.snapshot.ready_since
    clock.advance(5)
    health.set_flag(A, CHECK, False)
    assert health.snapshot.ready_since == {A: 105.0}
    clock.advance(5)
    fail(health, A)
    assert health.snapshot.ready_since == {}


def test_ready_since_feeds_slow_start():
    from poise.core.policies.slow_start import Ramp
    clock, health, _ = cluster()
    fail(health, A)
    health.set_flag(A, CHECK, False)
    ramp = Ramp.plan(health.snapshot, 10.0, clock)
    assert ramp is not None and ramp.starts == {0: 100.0}
    weights, _ = ramp.weights(clock.now())
    assert weights[0] == pytest.approx(0.1) and weights[1:] == [1, 1, 1]


# -- outlier ejection --------------------------------------------------------------------------


def test_gateway_errors_eject_and_tick_releases_after_the_base_ejection_time():
    clock, health, changes = cluster(outlier={"consecutive_gateway_errors": 3,
                                              "base_ejection_time": 30})
    for _ in range(2):
        health.report(A, GW)
    assert A in ready(health) and health.next_release() is None
    health.report(A, GW)
    assert health.flags(A) == EJECTED and A not in ready(health) and len(changes) == 1
    assert health.next_release() == 130.0
    clock.advance(29.9)
    health.tick()
    assert A not in ready(health)
    clock.advance(0.1)
    health.tick()
    assert health.flags(A) == HealthFlag(0) and A in ready(health)
    assert health.next_release() is None
    assert health.snapshot.ready_since == {A: 130.0}


def test_a_success_resets_the_count():
    _, health, _ = cluster(outlier={"consecutive_gateway_errors": 2})
    for outcome in (GW, OK, GW):
        health.report(A, outcome)
    assert A in ready(health)


def test_repeated_ejections_last_longer():
    clock, health, _ = cluster(outlier={"consecutive_gateway_errors": 1,
                                        "base_ejection_time": 10, "max_ejection_time": 25})
    for expected in (10, 20, 25):
        health.report(A, GW)
        assert health.next_release() == clock.now() + expected
        clock.advance(expected)
        health.tick()
        assert A in ready(health)


def test_next_release_is_the_earliest_ejection_end():
    clock, health, _ = cluster(outlier={"consecutive_gateway_errors": 1,
                                        "base_ejection_time": 30})
    health.report(A, GW)
    clock.advance(10)
    health.report(B, GW)
    assert health.next_release() == 130.0
    clock.advance(20)
    health.tick()
    assert health.next_release() == 140.0 and A in ready(health) and B not in ready(health)


def test_max_ejection_percent_is_respected_over_the_whole_cluster():
    _, health, _ = cluster(outlier={"consecutive_gateway_errors": 1,
                                    "max_ejection_percent": 50})
    for b in (A, B, C):
        health.report(b, GW)
    assert [health.flags(b) for b in (A, B, C)] == [EJECTED, EJECTED, HealthFlag(0)]


def test_a_released_backend_stays_out_while_its_active_check_fails():
    clock, health, _ = cluster(outlier={"consecutive_gateway_errors": 1,
                                        "base_ejection_time": 30})
    health.report(A, GW)
    fail(health, A)
    clock.advance(30)
    health.tick()
    assert health.flags(A) == CHECK and A not in ready(health)


def test_without_a_detector_reports_and_ticks_do_nothing():
    _, health, changes = cluster()
    health.report(A, GW)
    health.tick()
    assert health.next_release() is None and changes == []


# -- panic mode --------------------------------------------------------------------------------


def test_panic_engages_below_the_threshold_and_fails_open_to_every_primary(caplog):
    _, health, _ = cluster(panic_threshold=0.5)
    with caplog.at_level(logging.INFO, logger="poise"):
        fail(health, A, B)                          # 2/4 == threshold: not panic
        assert not health.panic and ready(health) == [C, D]
        fail(health, C)                             # 1/4 < 0.5
        assert health.panic and ready(health) == [A, B, C, D]
        assert health.flags(C) == CHECK             # still flagged, just used
        health.set_flag(C, CHECK, False)            # back to 2/4
        assert not health.panic and ready(health) == [C, D]
    panic_logs = [r for r in caplog.records if "panic" in r.getMessage()]
    assert [r.levelname for r in panic_logs] == ["WARNING", "INFO"]


def test_panic_is_logged_once_not_per_change(caplog):
    _, health, _ = cluster(backends=[Backend(f"10.0.0.{i}", 80) for i in range(10)])
    with caplog.at_level(logging.WARNING, logger="poise"):
        fail(health, *health.snapshot.backends[:9])
    assert health.panic
    assert sum("panic" in r.getMessage() for r in caplog.records) == 1


def test_the_boundary_is_exact_for_fractions_that_are_not_binary():
    backends = [Backend(f"10.0.0.{i}", 80) for i in range(10)]
    _, health, _ = cluster(backends=backends, panic_threshold=0.3)
    fail(health, *backends[:7])                     # 3/10 == 0.3: not panic
    assert not health.panic and len(ready(health)) == 3
    fail(health, backends[7])
    assert health.panic and len(ready(health)) == 10


def test_threshold_zero_disables_panic():
    _, health, _ = cluster(panic_threshold=0)
    fail(health, A, B, C)
    assert not health.panic and ready(health) == [D]


def test_all_down_makes_every_backend_unready_without_panic(caplog):
    _, health, _ = cluster(backends=(A, B, BACKUP))
    with caplog.at_level(logging.WARNING, logger="poise"):
        fail(health, A, B, BACKUP)
    assert not health.panic and ready(health) == [] and health.snapshot.ready_count == 0
    assert any("no healthy backend" in r.getMessage() for r in caplog.records)
    health.set_flag(BACKUP, CHECK, False)
    assert ready(health) == [BACKUP] and not health.panic


def test_backups_are_not_counted_in_the_share_and_stay_as_they_are():
    backups = [Backend(f"10.0.1.{i}", 80, backup=True) for i in range(1, 5)]
    _, health, _ = cluster(backends=(A, B, C, D, *backups))
    fail(health, A, B, C, backups[0])               # primaries 1/4, all backups but one fine
    assert health.panic
    assert ready(health) == [A, B, C, D, *backups[1:]]


def test_healthy_backups_take_over_without_panic_when_every_primary_is_down():
    _, health, _ = cluster(backends=(A, B, BACKUP))
    fail(health, A, B)
    assert not health.panic and ready(health) == [BACKUP]


def test_drained_primaries_neither_count_nor_fail_open():
    _, health, _ = cluster()
    health.set_flag(A, DRAINED, True)
    health.set_flag(B, DRAINED, True)               # an operator drains half the cluster
    assert not health.panic and ready(health) == [C, D]
    fail(health, C)                                 # 1 of 2 in service: not below 0.5
    assert not health.panic
    health.set_flag(D, CHECK, True)
    health.set_flag(C, CHECK, False)
    health.set_flag(B, DRAINED, False)              # in service: B, C, D; healthy B, C
    fail(health, B)                                 # 1/3 < 0.5
    assert health.panic and ready(health) == [B, C, D]


# -- membership -------------------------------------------------------------------------------


def test_set_backends_keeps_flags_by_address_and_forgets_removed_ones():
    clock, health, changes = cluster(outlier={"consecutive_gateway_errors": 1,
                                              "max_ejection_percent": 100})
    health.set_flag(A, DRAINED, True)
    health.report(B, GW)
    health.snapshot.stats[A].active_connections = 3
    heavier_a = Backend("10.0.0.1", 80, weight=5)
    e = Backend("10.0.0.5", 80)
    clock.advance(1)
    health.set_backends([heavier_a, C, D, e])
    snap = health.snapshot
    assert snap.backends == (heavier_a, C, D, e) and changes[-1] is snap
    assert health.flags(heavier_a) == DRAINED and not snap.ready(heavier_a)
    assert snap.stats[heavier_a].active_connections == 3
    assert snap.ready_since == {e: 101.0}           # new backends are cold
    assert health.next_release() is None            # B's ejection is forgotten
    health.set_backends([heavier_a, B, C, D, e])    # B again: a fresh start
    assert health.flags(B) == HealthFlag(0) and health.snapshot.ready(B)


def test_set_backends_with_the_same_members_does_not_rebuild():
    _, health, changes = cluster()
    first = health.snapshot
    health.set_backends([A, B, C, D])
    assert health.snapshot is first and changes == []


def test_duplicate_addresses_and_bad_thresholds_are_refused():
    with pytest.raises(ValueError, match="address"):
        cluster(backends=(A, Backend("10.0.0.1", 80, weight=2)))
    with pytest.raises(ValueError):
        cluster(panic_threshold=1.5)


# -- status ------------------------------------------------------------------------------------


def test_status_is_json_able_and_says_why():
    _, health, _ = cluster(backends=(A, B, BACKUP))
    health.set_flag(A, DRAINED, True)
    health.set_flag(A, CHECK, True)
    status = json.loads(json.dumps(health.status()))
    assert status == {
        "cluster": "web", "panic": False, "healthy": 2, "total": 3,
        "backends": [
            {"address": "10.0.0.1:80", "backup": False,
             "flags": ["active_check_failed", "drained"], "ready": False},
            {"address": "10.0.0.2:80", "backup": False, "flags": [], "ready": True},
            {"address": "10.0.1.1:80", "backup": True, "flags": [], "ready": True},
        ]}
