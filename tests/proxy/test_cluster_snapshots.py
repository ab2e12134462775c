"""ClusterRuntime applying control plane snapshots and reloaded settings (no sockets):
what survives a swap (stats, pools, outlier state, limits' counts) and what changes."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
import yaml

from poise.config import parse_config
from poise.control.state import Member
from poise.core.health import HealthFlag
from poise.core.outlier import Outcome
from poise.proxy.http.cluster import ClusterRuntime
from poise.proxy.http.upstream import UpstreamConnection

EX = SimpleNamespace()
A, B, C = (Member("127.0.0.1", 9001), Member("127.0.0.1", 9002), Member("127.0.0.1", 9003))


def spec(backends=(A, B), **cluster):
    data = {"listeners": [{"name": "web", "bind": "127.0.0.1:8080",
                           "routes": [{"cluster": "app"}]}],
            "clusters": [{"name": "app", "backends": [{"address": m.address} for m in backends],
                          **cluster}]}
    return parse_config(yaml.safe_dump(data)).clusters[0]


@pytest.fixture
def loop():
    lp = asyncio.new_event_loop()
    yield lp
    lp.close()


def by_port(rt):
    return {b.port: pool for b, pool in rt.pools.items()}


def picked_ports(rt, n=12):
    return {rt.choose(EX).backend.port for _ in range(n)}


def test_stats_and_pools_survive_a_snapshot_that_keeps_the_address(loop):
    rt = ClusterRuntime(spec(), loop)
    pool_a = by_port(rt)[9001]
    pool_a.stats.in_flight = 3
    pool_a.requests = 10
    rt.apply_members([Member(A.host, A.port, weight=5), B, C])
    assert by_port(rt)[9001] is pool_a, "the pool (and its idle connections) was replaced"
    assert pool_a.backend.weight == 5, "the pool still points at the old Backend object"
    assert pool_a.stats.in_flight == 3 and pool_a.requests == 10
    assert rt.health.snapshot.stats[pool_a.backend] is pool_a.stats
    assert picked_ports(rt, 70) == {9001, 9002, 9003}


def test_a_removed_backend_takes_no_new_requests_and_keeps_no_idle_connections(loop):
    rt = ClusterRuntime(spec(), loop)
    pool_a = by_port(rt)[9001]
    conn = UpstreamConnection(pool_a)       # (never connected: closing it is a no-op)
    conn.usable = True
    pool_a.idle.append(conn)
    rt.apply_members([B])
    assert picked_ports(rt) == {9002}
    assert not conn.usable and not pool_a.idle
    assert pool_a.max_idle == 0, "a connection released later would be pooled"


def test_a_snapshot_drain_and_down_flags_compose_with_the_workers_own_ejection(loop):
    rt = ClusterRuntime(spec((A, B, C), outlier_detection={"consecutive_gateway_errors": 1},
                             panic_threshold=0), loop)
    a, b, c = rt.health.snapshot.backends
    rt.report(rt.pools[c], Outcome.GATEWAY_ERROR)
    rt.apply_members([Member(A.host, A.port, drained=True), B, C])
    assert rt.health.flags(a) == HealthFlag.DRAINED
    assert rt.health.flags(c) == HealthFlag.OUTLIER_EJECTED, \
        "a snapshot must not clear the worker's own ejection"
    assert picked_ports(rt) == {9002}


def test_an_up_verdict_ends_an_ejection_as_a_recovered_check_does(loop):
    rt = ClusterRuntime(spec((A, B, C), outlier_detection={"consecutive_gateway_errors": 1,
                                                           "base_ejection_time": "1m"}), loop)
    a = rt.health.snapshot.backends[0]
    rt.apply_members([Member(A.host, A.port, down=True), B, C])
    rt.report(rt.pools[a], Outcome.GATEWAY_ERROR)
    rt.apply_members([A, B, C])
    assert rt.health.flags(a) == HealthFlag(0)


def test_a_backend_added_later_ramps_with_slow_start(loop):
    rt = ClusterRuntime(spec(policy={"type": "round_robin", "slow_start": "30s"}), loop)
    assert rt.health.snapshot.ready_since == {}
    rt.apply_members([A, B, C])
    assert {b.port for b in rt.health.snapshot.ready_since} == {9003}


def test_reconfigure_swaps_the_policy_and_keeps_the_pools(loop):
    rt = ClusterRuntime(spec(), loop)
    pools = dict(by_port(rt))
    rt.reconfigure(spec(policy="least_conn", connect_timeout="5s",
                        keepalive_max_idle=7))
    assert type(rt.policy).__name__ == "LeastConn"
    assert by_port(rt) == pools
    assert all(p.connect_timeout == 5.0 and p.max_idle == 7 for p in pools.values())


def test_limits_added_by_a_reload_count_the_connections_already_open(loop):
    rt = ClusterRuntime(spec(), loop)
    pool = by_port(rt)[9001]
    pool.active = 2
    rt.reconfigure(spec(max_connections=10))
    assert rt.limits is not None and rt.limits.connections == 2 and rt.guarded
    pool.closed()                       # one of those connections closes: no error
    assert rt.limits.connections == 1


def test_limits_removed_by_a_reload_lift_the_caps_and_let_queued_requests_go(loop):
    rt = ClusterRuntime(spec(max_connections=1, max_pending=5), loop)
    limits = rt.limits
    limits.opened()
    dequeued = []

    def dequeue(conn):          # (as resilience.resume_from_queue: leave the queue)
        rt.pending.remove(ex)
        dequeued.append(conn)

    ex = SimpleNamespace(pool=by_port(rt)[9001], dequeued=dequeue)
    rt.pending.append(ex)
    rt.reconfigure(spec())
    assert rt.limits is limits, "requests in flight still release into this object"
    assert limits.max_connections is None
    assert dequeued == [None], "the queued request was not released"


def test_a_reload_keeps_the_retry_budget_unless_retries_changed(loop):
    rt = ClusterRuntime(spec(retries={"attempts": 2}), loop)
    retry = rt.retry
    rt.reconfigure(spec(retries={"attempts": 2}, connect_timeout="3s"))
    assert rt.retry is retry
    rt.reconfigure(spec(retries={"attempts": 3}))
    assert rt.retry is not retry and rt.retry.attempts == 3
    rt.reconfigure(spec())
    assert rt.retry is None and rt.guarded is False


def test_counters_report_each_backend(loop):
    rt = ClusterRuntime(spec(outlier_detection={"consecutive_gateway_errors": 1}), loop)
    a, b = rt.health.snapshot.backends
    rt.pools[a].requests = 4
    rt.pools[a].errors = 1
    rt.report(rt.pools[b], Outcome.GATEWAY_ERROR)
    assert rt.counters() == {A.address: [0, 4, 1, 0], B.address: [0, 0, 0, 1]}
