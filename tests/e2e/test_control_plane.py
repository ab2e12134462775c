"""The runtime control plane end to end, with real processes over loopback: a
supervisor with two workers (``python -m poise run``), h11 backends, the admin API.

What is proved: an operator's drain reaches both workers as one snapshot version
within a second, and neither sends the drained backend a request; a worker killed with
SIGKILL is replaced by one that starts from the current snapshots (drain and weight
included); active health checks run once, in the control plane, not once per worker;
a drain under load stops new requests to the backend without failing one;
``workers: auto`` starts one worker per CPU.

Which worker served a request is read from /proc (the process holding the accepted
socket), so "both workers" is checked, not assumed.
"""

from __future__ import annotations

import os
import re
import signal
import time

import pytest

from tests.support.control import (
    TOKEN,
    backend_counts,
    by_worker,
    fresh,
    snapshot,
    spread,
    wait_settled,
    wait_snapshot,
    worker_pids,
)
from tests.support.loadgen import LoadGen
from tests.support.procs import served, set_health
from tests.support.waiting import wait_for

ADMIN = {"token": TOKEN}


def drain(px, backend, cluster: str = "app") -> dict:
    r = px.admin.post(f"/clusters/{cluster}/backends/{backend.address}/drain")
    assert r.status == 200, r
    return r.json()


def enable(px, backend, cluster: str = "app") -> dict:
    r = px.admin.post(f"/clusters/{cluster}/backends/{backend.address}/enable")
    assert r.status == 200, r
    return r.json()


def test_a_drain_reaches_both_workers_within_a_second_and_enable_undoes_it(stack):
    b1, b2, b3 = stack.backend("b1"), stack.backend("b2"), stack.backend("b3")
    px = stack.poise([b1, b2, b3], workers=2, admin=ADMIN)
    pids = worker_pids(px)
    assert sorted(pids) == sorted(px.children())
    v = snapshot(px)

    start = time.monotonic()
    entry = drain(px, b2)
    assert entry["state"] == "drained" and entry["address"] == b2.address
    px.wait_workers(timeout=5, snapshot_versions={"app": v + 1})
    took = time.monotonic() - start
    assert took < 1.0, f"both workers applied the drain only after {took:.2f}s"

    b2.reset()
    answers = spread(px, 60, pids)
    per_worker = by_worker(answers)
    assert set(per_worker) == set(pids), f"not both workers took traffic: {per_worker}"
    assert all(a.backend in ("b1", "b3") for a in answers), per_worker
    for pid, counts in per_worker.items():
        assert counts["b1"] and counts["b3"], (pid, counts)
    assert served(b2) == [], "a drained backend got a request"

    enable(px, b2)
    px.wait_workers(timeout=5, snapshot_versions={"app": v + 2})
    back = by_worker([a for a in spread(px, 60, pids) if a.backend == "b2"])
    assert set(back) == set(pids), f"b2 back in only some workers: {back}"


def test_a_killed_worker_is_replaced_by_one_with_the_current_snapshots(stack):
    b1, b2, b3 = stack.backend("b1"), stack.backend("b2"), stack.backend("b3")
    px = stack.poise([b1, b2, b3], workers=2, admin=ADMIN)
    v = snapshot(px)
    drain(px, b3)
    r = px.admin.put(f"/clusters/app/backends/{b1.address}/weight", {"weight": 3})
    assert r.status == 200 and r.json()["weight"] == 3, r
    before = px.wait_workers(snapshot_versions={"app": v + 2})
    victim, survivor = before

    os.kill(victim["pid"], signal.SIGKILL)

    def replaced():
        ws = px.workers()
        new = ws[victim["slot"]]
        if new["pid"] != victim["pid"] and new["state"] == "running":
            return ws
        return None
    after = wait_for(replaced, 10, "the killed worker replaced")
    new, other = after[victim["slot"]], after[survivor["slot"]]
    assert new["restarts"] == 1
    assert other["pid"] == survivor["pid"] and other["restarts"] == 0
    assert new["snapshot_versions"] == other["snapshot_versions"] == {"app": v + 2}
    assert new["config_version"] == other["config_version"]
    assert px.alive()
    px.wait_log(rf"worker {victim['slot']} \(pid {victim['pid']}\) exited with signal "
                rf"SIGKILL after [\d.]+s; restarting")
    px.wait_log(rf"worker {victim['slot']} \(pid {new['pid']}\) ready")

    # Fresh connections until the new worker has served a dozen requests.
    b3.reset()
    pids = [new["pid"], other["pid"]]
    answers = []
    while sum(1 for a in answers if a.worker == new["pid"]) < 12:
        assert len(answers) < 400, by_worker(answers)
        answers.append(fresh(px, pids=pids))
    assert all(a.backend != "b3" for a in answers), by_worker(answers)
    assert served(b3) == [], "a drained backend got a request after the restart"
    # The weight override came with the snapshot: b1 (3) gets 3 of every 4 requests
    # in the new worker (smooth round robin), where equal weights would give 1 of 2.
    counts = by_worker(answers)[new["pid"]]
    assert counts["b1"] >= 2 * counts["b2"] > 0, counts

    # The replacement hears what comes next, as the others do.
    enable(px, b3)
    wait_snapshot(px, v + 3)
    back = by_worker([a for a in spread(px, 60, pids) if a.backend == "b3"])
    assert new["pid"] in back, back


def probe_times(backend) -> list[float]:
    return [r["at"] for r in backend.stats()["requests"] if r["target"] == "/health"]


def test_health_checks_run_once_whatever_the_number_of_workers(stack):
    b1, b2 = stack.backend("b1"), stack.backend("b2")
    # fall 3: a probe of a healthy backend that times out (100 ms, which a loaded CI box
    # sometimes takes) must not take it out, which would change the snapshot versions
    # awaited below.
    check = {"interval": "100ms", "timeout": "100ms", "jitter": 0, "rise": 1, "fall": 3}
    px = stack.poise([b1, b2], workers=2, admin=ADMIN, cluster={"health_check": check})
    wait_for(lambda: len(probe_times(b1)) >= 3 and len(probe_times(b2)) >= 3,
             what="the first probes")
    window = 2.0
    start = time.monotonic()
    for b in (b1, b2):
        wait_for(lambda b=b: any(t >= start + window for t in probe_times(b)),
                 window + 3, f"a probe of {b.name} after the window")
        n = sum(1 for t in probe_times(b) if start <= t < start + window)
        # One prober, a probe every 100ms (from the end of the last): about 20, at most
        # 21.  One per worker would be about 40.  (Fewer only when probes take longer,
        # as on a loaded CI box: 8 allows them 150 ms each on average.)
        assert 8 <= n <= 28, f"{n} probes of {b.name} in {window}s"

    # The verdict reaches both workers: a failing backend leaves both rotations.
    v = snapshot(px)
    set_health(b2, False)
    px.wait_workers(snapshot_versions={"app": v + 1})
    px.wait_log(rf"backend {re.escape(b2.address)} is down")
    pids = worker_pids(px)
    answers = spread(px, 40, pids)
    assert set(by_worker(answers)) == set(pids)
    assert {a.backend for a in answers} == {"b1"}, by_worker(answers)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_drain_under_load_stops_new_requests_without_failing_one(stack, workers):
    b1, b2, b3 = stack.backend("b1"), stack.backend("b2"), stack.backend("b3")
    px = stack.poise([b1, b2, b3], workers=workers, admin=ADMIN)
    v = snapshot(px)
    with LoadGen(px.addr, connections=64) as load:
        load.wait_more(500)
        drain(px, b2)
        px.wait_workers(snapshot_versions={"app": v + 1})
        applied = time.monotonic()
        # Requests picked before the drain was applied may still be in flight to b2;
        # once all sent before `applied` are answered, b2 must see no request at all.
        load.wait_sent_after(applied)
        b2.reset()
        load.wait_more(1000)
        assert served(b2) == [], "a request reached the drained backend"
        counts = load.backends(since=applied)
        assert counts["b1"] > 100 and counts["b3"] > 100, counts

        enabling = time.monotonic()
        enable(px, b2)
        px.wait_workers(snapshot_versions={"app": v + 2})
        enabled = time.monotonic()
        load.wait_more(1000)
        assert load.backends(since=enabled)["b2"] > 100, load.backends(since=enabled)
    assert load.failures == [], load.summary()
    # Both workers' counts add up to what the clients saw; nothing is left in flight.
    wait_for(lambda: sum(n for _, n, _ in backend_counts(px).values()) == load.ok, 5,
             lambda: f"{load.ok} requests counted (now {backend_counts(px)})")
    settled = wait_settled(px)
    assert all(errors == 0 for _, _, errors in settled.values()), settled
    # (answered before the enable was asked for: surely picked while b2 was drained)
    late = [r for r in load.records if r[0] >= applied and r[1] < enabling and r[2] == "b2"]
    assert late == [], f"{len(late)} requests sent after the drain reached b2"


def test_workers_auto_starts_one_worker_per_cpu(stack):
    b1 = stack.backend("b1")
    px = stack.poise([b1], workers="auto", admin=ADMIN)
    cpus = len(os.sched_getaffinity(0))
    workers = px.wait_workers()
    assert len(workers) == cpus
    # (one CPU: one worker, which is poise itself)
    processes = sorted(px.children()) if cpus > 1 else [px.pid]
    assert sorted(w["pid"] for w in workers) == processes
    assert fresh(px).backend == "b1"
