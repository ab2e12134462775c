"""Discovery through a real etcd, end to end, under steady load: poise (two workers)
watches a prefix that backends fill with ``poise register etcd`` processes.

Proved: a newly registered backend gets traffic within a second; a graceful
deregistration fails no request; a backend killed hard (with its registration) leaves
within its 3 s TTL, with outlier detection keeping the failed requests to a handful;
with etcd stopped, traffic goes on over the last known set, and once etcd is back a new
registration is followed again; two workers make one watch at etcd, not two.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest

from tests.support.control import TOKEN
from tests.support.etcd import Etcd
from tests.support.loadgen import LoadGen
from tests.support.procs import POISE_SRC
from tests.support.waiting import wait_for

pytestmark = pytest.mark.skipif(shutil.which("etcd") is None, reason="etcd not installed")


@pytest.fixture(scope="module")
def etcd(tmp_path_factory):
    server = Etcd(tmp_path_factory.mktemp("etcd-e2e") / "data", "poise-e2e")
    yield server
    server.stop()


class Registration:
    """``poise register etcd`` for one backend, as a process."""

    def __init__(self, etcd: Etcd, prefix: str, backend, ttl: str = "3s") -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "poise", "register", "etcd", "--endpoints", etcd.url,
             "--prefix", prefix, "--address", backend.address, "--ttl", ttl],
            cwd=POISE_SRC, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wait_for(lambda: etcd.get(prefix + backend.address) is not None
                 or self.proc.poll() is not None, 10, "the registration")
        assert self.proc.poll() is None, self.proc.stderr.read()

    def stop(self) -> None:
        """SIGTERM: deregisters, then exits."""
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(10) == 0

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


def watch_streams(etcd: Etcd) -> float:
    """Watch streams open at etcd (its own Prometheus metrics)."""
    text = urllib.request.urlopen(f"{etcd.url}/metrics", timeout=5).read().decode()
    match = re.search(r"^etcd_debugging_mvcc_watch_stream_total (\S+)$", text, re.M)
    assert match, "etcd exposes no watch stream count"
    return float(match.group(1))


def first_seen(load: LoadGen, backend: str, since: float) -> float | None:
    times = [sent for sent, _, b in list(load.records) if b == backend and sent >= since]
    return min(times) if times else None


def test_etcd_discovery_under_load(stack, etcd):
    prefix = f"/services/{uuid.uuid4().hex[:8]}/"
    b1, b2, b3 = stack.backend("b1"), stack.backend("b2"), stack.backend("b3")
    registrations = [Registration(etcd, prefix, b1), Registration(etcd, prefix, b2)]
    streams_before = watch_streams(etcd)
    px = stack.poise([], workers=2, admin={"token": TOKEN}, cluster={
        "discovery": {"type": "etcd", "endpoints": [etcd.url], "prefix": prefix},
        "outlier_detection": {"consecutive_gateway_errors": 1, "consecutive_failures": 1,
                              "base_ejection_time": "30s", "max_ejection_percent": 1.0},
        "retries": {"attempts": 2, "retry_on": ["connect_failure", "reset"]}})
    wait_for(lambda: len(px.admin.get("/clusters/app").json()["backends"]) == 2, 10,
             "poise following the two registrations")
    assert watch_streams(etcd) == streams_before + 1     # one watch, not one per worker

    try:
        with LoadGen(px.addr, connections=16) as load:
            load.wait_more(300)
            # a new registration gets traffic within a second of being in etcd
            registrations.append(Registration(etcd, prefix, b3))
            added = time.monotonic()        # (the key is there: Registration waited)
            wait_for(lambda: first_seen(load, "b3", added) is not None, 5, "b3 traffic")
            assert first_seen(load, "b3", added) - added < 1.0

            # a graceful deregistration fails nothing
            registrations.pop(0).stop()
            gone = time.monotonic()
            wait_for(lambda: load.backends(gone + 1.0)["b2"] > 50, 10, "traffic without b1")
            assert load.backends(gone + 1.0)["b1"] == 0
            assert load.failures == [], load.summary()

            # etcd down: the last set serves on; back up: new registrations followed
            etcd.stop()
            down = time.monotonic()
            load.wait_more(300)
            assert set(load.backends(down)) == {"b2", "b3"}
            wait_for(lambda: px.admin.get("/clusters/app").json()["discovery"]["state"]
                     == "down", 10, "the source seen down")
            etcd.start()
            wait_for(lambda: px.admin.get("/clusters/app").json()["discovery"]["state"]
                     == "up", 40, "the source back up")
            back = time.monotonic()
            registrations.append(Registration(etcd, prefix, b1))
            wait_for(lambda: first_seen(load, "b1", back) is not None, 10, "b1 traffic again")
            assert load.failures == [], load.summary()

            # killed hard with its registration: gone within the TTL
            before = len(load.failures)
            registrations.pop(1).kill()          # b3's registration
            b3.kill()
            killed = time.monotonic()
            wait_for(lambda: b3.address not in {
                b["address"] for b in px.admin.get("/clusters/app").json()["backends"]},
                10, "b3 removed after its lease expired")
            assert time.monotonic() - killed < 3.0 + 1.5       # TTL + a watch event
            load.wait_more(300)
            load.stop()
        failed = len(load.failures) - before
        print(f"requests failed after a hard kill: {failed} of {load.ok + failed}")
        assert failed <= 5, load.summary()
    finally:
        for r in registrations:
            if r.proc.poll() is None:
                r.kill()
