"""Helpers of the control-plane end-to-end tests: requests on fresh connections that
say which backend answered and which worker process accepted them, and config dicts
edited for a reload."""

from __future__ import annotations

import copy
import socket
import time
from collections import Counter
from dataclasses import dataclass

from tests.support.admin import socket_owner
from tests.support.client import H11Client
from tests.support.procs import Poise
from tests.support.waiting import wait_for

TOKEN = "e2e-s3cret-token"


@dataclass(frozen=True)
class Answer:
    backend: str | None     # x-backend of the h11 backend that answered
    worker: int | None      # pid of the worker that accepted the connection


def fresh(px: Poise, target: str = "/echo?fresh", addr: tuple[str, int] | None = None,
          pids: list[int] | None = None) -> Answer:
    """One GET on a new connection (so that SO_REUSEPORT may hand it to any worker)."""
    with H11Client(addr or px.addr) as c:
        r = c.get(target)
        assert r.status == 200, (r.status, r.body[:300])
        worker = socket_owner(c.sock, pids) if pids else None
        return Answer(r.header("x-backend"), worker)


def spread(px: Poise, n: int, pids: list[int] | None = None, **kw) -> list[Answer]:
    """``n`` requests, each on a new connection."""
    return [fresh(px, pids=pids, **kw) for _ in range(n)]


def by_worker(answers: list[Answer]) -> dict[int | None, Counter]:
    """Per worker pid, how many requests each backend answered."""
    out: dict[int | None, Counter] = {}
    for a in answers:
        out.setdefault(a.worker, Counter())[a.backend] += 1
    return out


def worker_pids(px: Poise) -> list[int]:
    return [w["pid"] for w in px.workers()]


def snapshot(px: Poise, cluster: str = "app") -> int:
    """The snapshot version of ``cluster`` that every worker has applied (asserted
    equal across workers)."""
    versions = {w["snapshot_versions"].get(cluster) for w in px.workers()}
    assert len(versions) == 1, f"workers disagree: {px.workers()}"
    return versions.pop()


def wait_snapshot(px: Poise, version: int, cluster: str = "app",
                  timeout: float = 5.0) -> list[dict]:
    """Until every worker runs snapshot ``version`` of ``cluster``; the workers."""
    def applied():
        ws = px.workers()
        return ws if all(w["state"] == "running"
                         and w["snapshot_versions"].get(cluster) == version for w in ws) \
            else None
    return wait_for(applied, timeout, lambda: f"snapshot {version} of {cluster} in every "
                                              f"worker (now {px.workers()})")


def backend_counts(px: Poise, cluster: str = "app") -> dict[str, tuple[int, int, int]]:
    """Per backend address: (in_flight, requests, errors) summed over the workers, as
    the admin API reports them (about a second old)."""
    return {b["address"]: (b["in_flight"], b["requests"], b["errors"])
            for b in px.admin.get(f"/clusters/{cluster}").json()["backends"]}


def wait_settled(px: Poise, cluster: str = "app", timeout: float = 5.0) -> dict:
    """Until no request is in flight in any worker (nothing leaked: every request
    admitted was released); :func:`backend_counts` then."""
    def settled():
        now = backend_counts(px, cluster)
        return now if all(in_flight == 0 for in_flight, _, _ in now.values()) else None
    return wait_for(settled, timeout,
                    lambda: f"no request in flight (now {backend_counts(px, cluster)})")


def edited(config: dict, **top) -> dict:
    """A deep copy of ``config`` with top-level fields replaced."""
    out = copy.deepcopy(config)
    out.update(top)
    return out


def with_cluster(config: dict, **fields) -> dict:
    """A copy of ``config`` whose first cluster (``app``) has ``fields`` replaced;
    ``backends`` may be given as addresses or ``(address, weight)`` pairs."""
    out = copy.deepcopy(config)
    if "backends" in fields:
        fields["backends"] = [{"address": b[0], "weight": b[1]} if isinstance(b, tuple)
                              else {"address": b} for b in fields["backends"]]
    out["clusters"][0].update(fields)
    return out


def with_listener(config: dict, name: str, port: int) -> dict:
    """A copy of ``config`` with one more listener, routing to ``app``."""
    out = copy.deepcopy(config)
    out["listeners"].append({"name": name, "bind": f"127.0.0.1:{port}", "protocol": "http",
                             "routes": [{"cluster": "app"}]})
    return out


def without_listener(config: dict, name: str) -> dict:
    out = copy.deepcopy(config)
    out["listeners"] = [lst for lst in out["listeners"] if lst["name"] != name]
    return out


def refuses(addr: tuple[str, int]) -> bool:
    """True when a connect to ``addr`` is refused (nothing listens there)."""
    try:
        socket.create_connection(addr, timeout=2).close()
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:
        # Queued as the listening socket closed: not refused yet, the next try is.
        return False
    return False


def first_answer_from(px: Poise, backend: str, timeout: float, **kw) -> float:
    """Fresh requests until ``backend`` answers one; the seconds that took (an
    AssertionError when not within ``timeout``)."""
    start = time.monotonic()
    seen: Counter = Counter()
    while time.monotonic() - start < timeout:
        answer = fresh(px, **kw)
        if answer.backend == backend:
            return time.monotonic() - start
        seen[answer.backend] += 1
    raise AssertionError(f"{backend} answered none of {sum(seen.values())} requests in "
                         f"{timeout}s: {dict(seen)}")
