"""ZooKeeper discovery through a real poise (two workers) and a real ZooKeeper:
`poise register zookeeper` processes drive the membership under load; a graceful
deregistration fails nothing; a hard kill leaves within the session timeout; the two
workers make one watching session at the server, not two."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
import uuid

import pytest

from tests.support import zookeeper as zk_support
from tests.support.control import TOKEN
from tests.support.loadgen import LoadGen
from tests.support.procs import POISE_SRC
from tests.support.waiting import wait_for

pytestmark = pytest.mark.skipif(shutil.which("java") is None, reason="no ZooKeeper (java)")
zookeeper_server = zk_support.zookeeper_server


def register(zk, path: str, backend, ttl: str = "2s") -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "poise", "register", "zookeeper", "--hosts", zk.hosts,
         "--path", path, "--address", backend.address, "--ttl", ttl],
        cwd=POISE_SRC, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_zookeeper_registrations_drive_membership_under_load(stack, zookeeper_server):
    zk = zookeeper_server
    path = f"/services/{uuid.uuid4().hex[:8]}"
    b1, b2 = stack.backend("b1"), stack.backend("b2")
    procs = [register(zk, path, b1)]
    try:
        px = stack.poise([], workers=2, admin={"token": TOKEN}, cluster={
            "discovery": {"type": "zookeeper", "hosts": zk.hosts, "path": path},
            "retries": {"attempts": 2, "retry_on": ["connect_failure", "reset"]}})

        def members() -> set[str]:
            return {b["address"] for b in px.admin.get("/clusters/app").json()["backends"]}
        wait_for(lambda: members() == {b1.address}, 15, "b1 registered")
        assert len(zk_support.watching_sessions(zk, path)) == 1     # one for two workers
        with LoadGen(px.addr, connections=8) as load:
            load.wait_more(200)
            procs.append(register(zk, path, b2))
            added = time.monotonic()
            wait_for(lambda: load.backends(added)["b2"] > 0, 10, "b2 traffic")
            procs[0].send_signal(signal.SIGTERM)            # graceful: deregisters
            assert procs[0].wait(10) == 0
            gone = time.monotonic()
            wait_for(lambda: load.backends(gone + 1.0)["b2"] > 50, 10, "b2 alone")
            assert load.backends(gone + 1.0)["b1"] == 0
            assert load.failures == [], load.summary()
            procs.append(register(zk, path, b1))
            wait_for(lambda: members() == {b1.address, b2.address}, 10, "b1 back")
            procs[1].kill()                                  # hard: the session expires
            b2.kill()
            killed = time.monotonic()
            wait_for(lambda: members() == {b1.address}, 10, "b2 gone with its session")
            assert time.monotonic() - killed < 2.0 + 2.0     # session timeout + events
            load.wait_more(200)
            load.stop()
        print(f"failed requests after the hard kill: {len(load.failures)}")
        assert len(load.failures) <= 5, load.summary()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
