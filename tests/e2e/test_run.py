"""`poise run` as an operator uses it: several workers, signals, a port already taken."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import yaml

from tests.support.client import H11Client
from tests.support.procs import LOOPBACK, POISE_SRC, make_config
from tests.support.waiting import wait_for


def test_several_workers_serve_and_stop_gracefully(stack):
    backend = stack.backend()
    px = stack.poise([backend.address], workers=2)
    workers = _children(px.pid)
    assert len(workers) == 2, workers
    for _ in range(20):
        with H11Client(px.addr) as c:
            assert c.get("/echo").status == 200
    assert px.stop() == 0
    assert not any(_alive(pid) for pid in workers)


def test_a_crashed_worker_is_replaced(stack):
    # (With the admin API, the stack waits until both workers run, and the test until
    # the replacement runs: a worker that is a process but has not bound yet refused
    # the test's connection once on a loaded CI box.)
    backend = stack.backend()
    px = stack.poise([backend.address], workers=2, admin={})
    first = _children(px.pid)
    os.kill(first[0], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        now = _children(px.pid)
        if len(now) == 2 and first[0] not in now:
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"worker not replaced: {first} → {_children(px.pid)}")
    px.wait_workers()
    with H11Client(px.addr) as c:
        assert c.get("/echo").status == 200


def test_sighup_with_an_unchanged_file_changes_nothing(stack):
    backend = stack.backend()
    px = stack.poise([backend.address])
    px.signal(signal.SIGHUP)
    wait_for(lambda: "is unchanged (config version 1)" in px.log(), what="the reload")
    assert px.alive()
    with H11Client(px.addr) as c:
        assert c.get("/echo").status == 200


def test_a_second_poise_on_the_same_port_refuses_to_start(stack, tmp_path):
    backend = stack.backend()
    px = stack.poise([backend.address])
    path = tmp_path / "second.yaml"
    path.write_text(yaml.safe_dump(make_config([backend.address], px.port)))
    second = subprocess.run([sys.executable, "-m", "poise", "run", str(path)],
                            cwd=POISE_SRC, capture_output=True, text=True, timeout=30)
    assert second.returncode == 1
    assert f"cannot bind {LOOPBACK}:{px.port}" in second.stderr
    with H11Client(px.addr) as c:          # the first one is untouched
        assert c.get("/echo").status == 200


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False
