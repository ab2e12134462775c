"""Active health checks and what they do to traffic, through the proxy: a failing
backend leaves the rotation after ``fall`` probes and returns after ``rise``; slow start
ramps a returning backend; with every backend down the answer is an immediate 503;
panic mode sends traffic to all backends when too few are healthy.  Plus passive
outlier ejection and backups.

Backends answer ``/health`` with 200 until ``set_health(b, False)``; probes every 100ms.
Transitions are awaited (by traffic, or by poise's log where traffic cannot tell), never
slept through.  A backend that must stay up has ``fall`` 2 or more: a probe times out
after 100 ms, which a loaded CI box sometimes takes (about one probe in a thousand
under heavy CPU contention), and with ``fall`` 1 that alone took a healthy backend out.
"""

from __future__ import annotations

import re
import time

import pytest

from tests.support.client import H11Client
from tests.support.procs import served, set_health, set_mode
from tests.support.waiting import wait_for


def checked(**options) -> dict:
    """Cluster fields for fast HTTP checks (``options`` override)."""
    return {"health_check": {"interval": "100ms", "timeout": "100ms", "jitter": 0,
                             "rise": 2, "fall": 2, **options}}


def wait_log(px, pattern: str, timeout: float = 5.0) -> None:
    """Until poise's log matches ``pattern`` (a regular expression)."""
    wait_for(lambda: re.search(pattern, px.log()), timeout, f"{pattern!r} in poise's log")


def names(px, n: int, target: str = "/echo") -> list[str | None]:
    """The backend (x-backend) that answered each of ``n`` requests; None for poise."""
    with H11Client(px.addr) as c:
        return [c.get(target).header("x-backend") for _ in range(n)]


def probes(b) -> int:
    return sum(1 for q in b.stats()["requests"] if q["target"] == "/health")


def test_failing_backend_leaves_after_fall_probes_and_returns_after_rise(stack):
    b1, b2 = stack.backend("b1"), stack.backend("b2")
    px = stack.poise([b1, b2], cluster=checked(fall=3, rise=2))
    assert sorted(names(px, 4)) == ["b1", "b1", "b2", "b2"]

    b2.reset()
    set_health(b2, False)
    # Out of rotation: round robin over both would send two of four requests to b2.
    wait_for(lambda: names(px, 4) == ["b1"] * 4, what="b2 out of rotation")
    assert probes(b2) >= 3, "taken out before `fall` failed probes"
    b2.reset()
    assert names(px, 20) == ["b1"] * 20
    assert served(b2) == [], "a request reached a backend that failed its checks"

    b2.reset()
    set_health(b2, True)
    wait_for(lambda: "b2" in names(px, 2), what="b2 back in rotation")
    assert probes(b2) >= 2, "brought back before `rise` passed probes"
    assert sorted(names(px, 10)) == ["b1"] * 5 + ["b2"] * 5


def test_expect_status_decides_what_passes(stack):
    # /status/404 answers 404: a failure by default (2xx/3xx), a pass when listed.
    b1, b2 = stack.backend("b1"), stack.backend("b2")
    strict = stack.poise([b1, b2], cluster=checked(path="/status/404?strict", fall=1))
    lenient = stack.poise([b1, b2], cluster=checked(path="/status/404?lenient", fall=3,
                                                    expect_status=[200, 404]))
    wait_for(lambda: names(strict, 1) == [None], what="every backend down (strict)")
    for b in (b1, b2):
        wait_for(lambda b=b: probes_of(b, "/status/404?lenient") >= 3, what="lenient probes")
    assert sorted(names(lenient, 4)) == ["b1", "b1", "b2", "b2"]


def test_expect_body_must_be_in_the_check_response(stack):
    b1, b2 = stack.backend("b1"), stack.backend("b2")
    # /echo answers JSON with the backend's name: only b1's contains "b1".
    px = stack.poise([b1, b2], cluster=checked(path="/echo?check", expect_body='"name": "b1"',
                                               fall=1))
    wait_for(lambda: names(px, 4) == ["b1"] * 4, what="b2 out of rotation")
    assert probes_of(b2, "/echo?check") >= 1


def probes_of(b, path: str) -> int:
    return sum(1 for q in b.stats()["requests"] if q["target"] == path)


def test_tcp_check_removes_a_killed_backend(stack):
    b1, b2 = stack.backend("b1"), stack.backend("b2")
    px = stack.poise([b1, b2], cluster=checked(type="tcp", fall=3))
    assert sorted(names(px, 4)) == ["b1", "b1", "b2", "b2"]
    b2.proc.kill()
    b2.proc.wait()
    # A refused connect falls back to b1 anyway, so traffic cannot tell: the log can.
    wait_log(px, rf"backend {re.escape(b2.address)} is down")
    assert names(px, 6) == ["b1"] * 6
    assert re.search(rf"backend {re.escape(b1.address)} is down", px.log()) is None


def test_returning_backend_ramps_up_with_slow_start(stack):
    b1, b2 = stack.backend("b1"), stack.backend("b2")
    window = 2.0
    px = stack.poise([b1, b2], cluster={"policy": {"type": "round_robin",
                                                   "slow_start": f"{window}s"},
                                        **checked(fall=3, rise=1)})
    set_health(b2, False)
    wait_for(lambda: names(px, 4) == ["b1"] * 4, what="b2 out of rotation")
    set_health(b2, True)
    wait_log(px, rf"cluster app: backend {re.escape(b2.address)} is up")
    back = time.monotonic()
    early = names(px, 30)
    took = time.monotonic() - back
    # While ramping (10% of its weight at first, rising) b2 gets far less than half.
    assert took < 0.8, f"the early requests took {took:.2f}s"
    assert 1 <= early.count("b2") <= 9, early       # about 5 (at most 7.3 in 0.8s)
    time.sleep(max(0.0, back + window + 0.1 - time.monotonic()))   # the ramp is timed
    # A turn scheduled while b2 ramped stands (up to 1/10% = 10 picks ahead), so its
    # full share shows after the first 10 picks.
    late = names(px, 40)[10:]
    assert 14 <= late.count("b2") <= 16, late


def test_all_backends_failing_checks_is_503_at_once(stack):
    # (queue_timeout 3 s: a request that waited for a backend to come back would take
    # that long, so "at once" can leave a loaded CI box most of a second; 0.1 s did not.)
    b1, b2 = stack.backend("b1"), stack.backend("b2")
    px = stack.poise([b1, b2], cluster={**checked(fall=1), "queue_timeout": "3s"})
    set_health(b1, False)
    set_health(b2, False)
    wait_for(lambda: names(px, 1) == [None], what="every backend down")
    b1.reset()
    b2.reset()
    with H11Client(px.addr) as c:
        for _ in range(5):
            t0 = time.monotonic()
            r = c.get("/echo")
            assert r.status == 503 and r.header("x-backend") is None
            took = time.monotonic() - t0
            assert took < 1.0, f"503 after {took:.3f}s"
            assert c.reusable
    assert served(b1) == [] and served(b2) == []
    set_health(b1, True)
    wait_for(lambda: names(px, 1) == ["b1"], what="b1 back")


@pytest.mark.parametrize("threshold", ["50%", 0])
def test_panic_mode_sends_traffic_to_every_backend(stack, threshold):
    backends = [stack.backend(f"b{i}") for i in range(1, 5)]
    px = stack.poise(backends, cluster={"panic_threshold": threshold, **checked(fall=3)})
    for b in backends[1:]:
        set_health(b, False)
    if threshold:
        # 1 of 4 healthy is below 50%: all four take traffic, failing checks or not.
        wait_log(px, r"cluster app: panic mode")
        got = names(px, 40)
        assert sorted(set(got)) == ["b1", "b2", "b3", "b4"]
        assert all(got.count(n) == 10 for n in set(got)), got
    else:
        wait_for(lambda: names(px, 6) == ["b1"] * 6, what="three backends out")
        assert names(px, 20) == ["b1"] * 20
        assert "panic mode" not in px.log()


def test_backup_takes_traffic_only_while_no_primary_is_ready(stack):
    b1, b2 = stack.backend("b1"), stack.backend("b2")
    px = stack.poise([b1, b2], cluster={"backends": [
        {"address": b1.address}, {"address": b2.address, "backup": True}],
        **checked(fall=3, rise=1)})
    assert names(px, 6) == ["b1"] * 6
    set_health(b1, False)
    wait_for(lambda: names(px, 1) == ["b2"], what="the backup in use")
    assert names(px, 6) == ["b2"] * 6
    set_health(b1, True)
    wait_for(lambda: names(px, 1) == ["b1"], what="the primary back")
    assert names(px, 6) == ["b1"] * 6


def test_outlier_detection_ejects_a_failing_backend_for_a_while(stack):
    # The ejection (1 s) begins after ``ejecting``, with the third request, so it ends
    # no sooner than 1 s after it: timed from there, neither check depends on how fast
    # the requests go (timed from the fourth answer, with 500 ms, a loaded CI box had
    # 50 ms to spare).
    b1, b2 = stack.backend("b1"), stack.backend("b2")
    set_mode(b1, status=503)
    px = stack.poise([b1, b2], cluster={"outlier_detection": {
        "consecutive_gateway_errors": 2, "base_ejection_time": "1s"}})
    statuses = []
    with H11Client(px.addr) as c:
        for _ in range(2):                  # b1, b2
            statuses.append(c.get("/mode").status)
        ejecting = time.monotonic()
        for _ in range(2):                  # b1 (ejected now), b2
            statuses.append(c.get("/mode").status)
        assert statuses == [503, 200, 503, 200]
        for _ in range(10):
            r = c.get("/mode")
            assert r.status == 200 and r.header("x-backend") == "b2"
    assert time.monotonic() - ejecting < 0.99, "too slow to check the ejection"
    assert len(served(b1)) == 2
    wait_for(lambda: names(px, 2, "/mode").count("b1") == 1, what="b1 released")
    assert time.monotonic() - ejecting >= 0.99
