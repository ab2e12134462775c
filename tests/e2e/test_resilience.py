"""Resilience end to end, with real processes over loopback: a backend killed and
restarted under load, a backend that never answers, one that fails half its requests,
a cluster with every backend down and one in panic mode, retries of idempotent and
non-idempotent requests, the circuit-breaker limits and their queue, and a client
that goes away while its request waits.

Every wait is for a condition, with a timeout; timings are asserted only where the
feature is a timing (a deadline, "503 at once").  Figures worth watching across runs
(detection, recovery, 503 latency) are printed (``pytest -s``) and recorded as test
properties (``--junitxml``).
"""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import statistics
import struct
import threading
import time
from dataclasses import dataclass

import pytest

from tests.support.client import H11Client, RawReader, connect
from tests.support.waiting import wait_for

# -- helpers ---------------------------------------------------------------------------

# poise's timers (libuv) have millisecond granularity: one may fire a hair early.
TIMER_SLACK = 0.005


def wait_log(px, pattern: str, timeout: float, count: int = 1) -> float:
    """Wait until poise has logged ``count`` lines matching the regex ``pattern``;
    the monotonic time at which that was seen (at most ~10 ms late)."""
    regex = re.compile(pattern)
    wait_for(lambda: len(regex.findall(px.log())) >= count, timeout,
             f"{count} log line(s) matching {pattern!r}\n--- poise log:\n{px.log()[-3000:]}")
    return time.monotonic()


def checked(address: str, state: str) -> str:
    """A log pattern: the health checker found ``address`` ``state`` ("up"/"down")."""
    return rf"INFO backend {re.escape(address)} is {state} \("


def down_or_ejected(address: str) -> str:
    """A log pattern: ``address`` marked down by a health check or ejected."""
    a = re.escape(address)
    return rf"backend {a} (is down|ejected as an outlier)"


@dataclass
class Outcome:
    start: float
    end: float
    status: int | None          # None: no response (the error is in ``error``)
    backend: str | None         # X-Backend of the answer
    error: str | None = None
    limit: str | None = None    # x-poise-limit of a 503

    @property
    def elapsed(self) -> float:
        return self.end - self.start


def timed(c: H11Client, method: str, target: str, body: bytes | None = None) -> Outcome:
    t0 = time.monotonic()
    r = c.request(method, target, body=body)
    return Outcome(t0, time.monotonic(), r.status, r.header("x-backend"),
                   limit=r.header("x-poise-limit"))


class Load:
    """``threads`` clients sending GETs over keep-alive connections until
    :meth:`stop`, each request's outcome kept: an exception or a closed connection is
    an error outcome (the client then reconnects)."""

    def __init__(self, addr, threads: int = 4, target: str = "/echo?load",
                 pause: float = 0.003) -> None:
        self.addr = addr
        self.target = target
        self.pause = pause
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True)
                         for _ in range(threads)]

    def start(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __enter__(self) -> Load:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> list[Outcome]:
        self._stop.set()
        for t in self._threads:
            t.join(15)
        assert not any(t.is_alive() for t in self._threads), "a load thread hangs"
        return self.outcomes

    def _record(self, outcome: Outcome) -> None:
        with self._lock:
            self.outcomes.append(outcome)

    def _run(self) -> None:
        c = None
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                if c is None:
                    c = H11Client(self.addr, timeout=10)
                self._record(timed(c, "GET", self.target))
                if not c.reusable:
                    c.close()
                    c = None
            except Exception as e:  # noqa: BLE001 - any failure is a client-visible error
                self._record(Outcome(t0, time.monotonic(), None, None, repr(e)))
                if c is not None:
                    c.close()
                c = None
            time.sleep(self.pause)
        if c is not None:
            c.close()

    def snapshot(self) -> list[Outcome]:
        with self._lock:
            return list(self.outcomes)

    def first_from(self, backend: str, after: float) -> Outcome | None:
        return next((o for o in sorted(self.snapshot(), key=lambda o: o.start)
                     if o.start >= after and o.backend == backend), None)


def errors(outcomes: list[Outcome]) -> list[Outcome]:
    return [o for o in outcomes if o.status != 200]


def report(record_property, **figures) -> None:
    for name, value in figures.items():
        record_property(name, value)
    print(" ".join(f"{k}={v}" for k, v in figures.items()))


def in_parallel(n: int, job) -> list:
    """Run ``job(i, barrier)`` in ``n`` threads (a job may wait on the shared
    ``barrier`` to start together); the results in order, an exception as its result."""
    results: list = [None] * n
    barrier = threading.Barrier(n)

    def run(i: int) -> None:
        try:
            results[i] = job(i, barrier)
        except Exception as e:  # noqa: BLE001
            results[i] = e
    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "a client thread hangs"
    return results


# -- 1. a backend killed under load, then restarted ---------------------------------------

# (A probe may take its whole interval: one that times out after 100 ms, as a live
# backend's sometimes does on a loaded CI box, counts towards taking it out; a dead
# backend's connect is refused at once either way.)
KILL_CHECK = {"type": "http", "path": "/health", "interval": "200ms", "timeout": "200ms",
              "rise": 2, "fall": 2}
KILL_OUTLIER = {"consecutive_gateway_errors": 3, "base_ejection_time": "30s"}


def kill_and_restart(stack, cluster: dict):
    """Three backends under steady load; b2 is SIGKILLed, then (once poise has taken
    it out) restarted on its port.  Returns (proxy, load, new b2, kill time, time it
    was seen taken out, restart time)."""
    b1, b2, b3 = (stack.backend(f"b{i}") for i in (1, 2, 3))
    px = stack.poise([b1, b2, b3], cluster=cluster)
    load = Load(px.addr).start()
    try:
        wait_for(lambda: {o.backend for o in load.snapshot()} >= {"b1", "b2", "b3"}, 5,
                 "all three backends serving")
        killed = time.monotonic()
        b2.kill()
        out = wait_log(px, down_or_ejected(b2.address), 5)
        wait_log(px, checked(b2.address, "down"), 5)
        restarted = time.monotonic()
        b2 = stack.restart(b2)
    except BaseException:
        load.stop()
        raise
    return px, load, b2, killed, out, restarted


def probes_before_rise(backend, rise: int) -> tuple[list[dict], float | None]:
    """Client requests a restarted backend got before its ``rise``-th health probe
    arrived (it cannot be up before that probe was answered), and that probe's time."""
    requests = backend.stats()["requests"]
    probes = [q["at"] for q in requests if q["target"] == "/health"]
    if len(probes) < rise:
        return [q for q in requests if q["target"] != "/health"], None
    return [q for q in requests if q["target"] != "/health" and q["at"] < probes[rise - 1]], \
        probes[rise - 1]


@pytest.mark.parametrize("outlier", [True, False], ids=["checks+outlier", "checks-only"])
def test_sigkilled_backend_costs_no_client_error_and_rejoins_after_rise(
        stack, record_property, outlier):
    """Health checks (200 ms, fall 2, rise 2), retries and (first case) outlier
    detection (3 gateway errors): SIGKILL one of three backends under the load of 4
    keep-alive clients.  No client sees an error (requests in flight on the dead
    connections are re-sent, connects refused go to the other backends); poise takes
    the backend out within 1 s (ejected at once when outlier detection is on: connects
    refused are gateway errors; else after 2 failed probes).  Restarted on its port,
    it gets no client request before its ``rise``-th passing probe, then takes traffic
    again about rise × interval after the restart (asserted within 5 s): passing
    checks also end an ejection that came from the same outage."""
    cluster = {"health_check": KILL_CHECK, "retries": {"attempts": 2}}
    if outlier:
        cluster["outlier_detection"] = KILL_OUTLIER
    px, load, b2, killed, out, restarted = kill_and_restart(stack, cluster)
    try:
        back = wait_for(lambda: load.first_from("b2", restarted), 5,
                        "the restarted backend serving clients again")
        time.sleep(0.2)
    finally:
        outcomes = load.stop()
    early, rise_probe = probes_before_rise(b2, 2)
    report(record_property, requests=len(outcomes), taken_out_s=round(out - killed, 3),
           recovery_s=round(back.start - restarted, 3))
    assert not errors(outcomes), f"client-visible errors: {errors(outcomes)[:5]}"
    ejected = re.search(rf"backend {re.escape(b2.address)} ejected as an outlier", px.log())
    assert bool(ejected) is outlier
    assert out - killed < 1.0, f"taken out {out - killed:.2f}s after the kill"
    assert not [o for o in outcomes if o.backend == "b2" and killed < o.start < restarted]
    assert not early, f"traffic before the health checks passed: {early[:3]}"
    assert rise_probe is not None and back.end > rise_probe
    assert back.start - restarted < 5.0
    assert len(outcomes) > 200


# -- 2. a backend that accepts and never answers -----------------------------------------

def readable(sock: socket.socket) -> bool:
    return bool(select.select([sock], [], [], 0)[0])


def test_backend_that_never_answers_gets_504s_at_the_deadline_then_is_ejected(
        stack, record_property):
    """response_header_timeout 700 ms, 2 gateway errors eject, no retries: a request
    routed to the silent backend is answered 504 after the deadline, not before, and
    while it waits other requests are served by the others; after two such 504s the
    silent backend is ejected and every request is served by the others."""
    hang = stack.backend("hang", hang=True)
    ok1, ok2 = stack.backend("ok1"), stack.backend("ok2")
    px = stack.poise([hang, ok1, ok2], cluster={
        "response_header_timeout": "700ms",
        "outlier_detection": {"consecutive_gateway_errors": 2}})
    ejection = re.compile(rf"backend {re.escape(hang.address)} ejected")
    waits: list[tuple[Outcome, list[Outcome]]] = []     # a 504, what was served meanwhile
    served: list[Outcome] = []
    with H11Client(px.addr) as a, H11Client(px.addr) as b:
        for k in range(12):
            if ejection.search(px.log()):
                break
            target = f"/echo?a{k}"
            t0 = time.monotonic()
            a.send("GET", target)
            wait_for(lambda target=target: readable(a.sock) or target in hang.targets(), 3,
                     "the request answered or reaching the silent backend")
            meanwhile = [timed(b, "GET", f"/echo?b{k}-{i}") for i in range(2)] \
                if not readable(a.sock) else []
            r = a.read_response()
            outcome = Outcome(t0, time.monotonic(), r.status, r.header("x-backend"))
            if r.status == 504:
                waits.append((outcome, meanwhile))
            else:
                served.append(outcome)
            served += meanwhile
        else:
            raise AssertionError(f"not ejected after 12 rounds:\n{px.log()}")
        after = [timed(b, "GET", "/echo?after") for _ in range(30)]
    timeouts = [o for o, _ in waits]
    report(record_property, timeouts=len(timeouts),
           timeout_latency_s=[round(o.elapsed, 3) for o in timeouts])
    assert len(timeouts) == 2
    for o in timeouts:
        assert 0.7 - TIMER_SLACK <= o.elapsed < 2.2, \
            f"504 after {o.elapsed:.3f}s for a 700ms deadline"
    for o, meanwhile in waits:      # the others served while the silent one kept a request
        assert len(meanwhile) == 2 and all(m.status == 200 for m in meanwhile), meanwhile
        assert {m.backend for m in meanwhile} == {"ok1", "ok2"}
        assert max(m.end for m in meanwhile) < o.end
    assert all(o.status == 200 and o.backend in ("ok1", "ok2") for o in served + after)
    # each request the silent backend got was answered 504 (no retries), then poise
    # closed that connection; once ejected it got nothing more
    assert len(hang.stats()["requests"]) == 2
    wait_for(lambda: hang.stats()["peer_closed"] == 2, 3,
             "poise closing its connections to the silent backend")


# -- 3. a backend failing half its requests ------------------------------------------------

def test_half_failing_backend_is_ejected_and_retries_hide_its_500s(stack, record_property):
    """One of three backends answers 500 to half its requests (a seeded sequence);
    outlier detection ejects it after 3 failures in a row and retries on 5xx send its
    failed requests elsewhere: over 300 requests from 4 clients no 500 reaches a
    client, and once ejected it gets no more requests."""
    bad = stack.backend("bad", fail_ratio=0.5, fail_seed=7)
    good = [stack.backend("good1"), stack.backend("good2")]
    px = stack.poise([bad, *good], cluster={
        "outlier_detection": {"consecutive_failures": 3},
        "retries": {"retry_on": [500, 502, 503, 504, "reset", "connect_failure", "timeout"]}})

    def clients(n: int) -> list[Outcome]:
        def job(i: int, barrier) -> list[Outcome]:
            with H11Client(px.addr) as c:
                barrier.wait(10)
                return [timed(c, "GET", f"/echo?c{i}") for _ in range(n)]
        results = in_parallel(4, job)
        for r in results:
            if isinstance(r, Exception):
                raise r
        return [o for r in results for o in r]

    outcomes = clients(75)
    wait_log(px, rf"backend {re.escape(bad.address)} ejected as an outlier", 2)
    seen_by_bad = len(bad.stats()["requests"])
    answered_by_bad = [o for o in outcomes if o.backend == "bad"]
    later = clients(25)
    report(record_property, bad_requests=seen_by_bad, bad_answers=len(answered_by_bad))
    assert len(outcomes) == 300
    assert not errors(outcomes + later), errors(outcomes + later)[:5]
    assert seen_by_bad > len(answered_by_bad) >= 1, "its 500s were retried elsewhere"
    assert len(bad.stats()["requests"]) == seen_by_bad, "an ejected backend got requests"
    assert not [o for o in later if o.backend == "bad"]


# -- 4. all backends down; panic mode ------------------------------------------------------

def test_all_backends_down_answers_503_at_once(stack, record_property):
    """Every backend killed, active checks every 100 ms with fall 1: once poise has
    marked them all down, requests are answered 503 at once (median of 20 < 50 ms;
    about 0.1 ms here, but 8 ms was seen under heavy CPU contention), without trying
    the dead backends and without hanging (a request that waited for a backend, as
    far as queue_timeout, set to 3 s, would take seconds)."""
    backends = [stack.backend(f"b{i}") for i in (1, 2, 3)]
    px = stack.poise(backends, cluster={"queue_timeout": "3s", "health_check": {
        "path": "/health", "interval": "100ms", "timeout": "100ms", "rise": 1, "fall": 1}})
    with H11Client(px.addr) as c:
        assert c.get("/echo").status == 200
        for b in backends:
            b.kill()
        wait_log(px, r"cluster app: no healthy backend", 3)
        outcomes = [timed(c, "GET", "/echo?down") for _ in range(20)]
    latencies = sorted(o.elapsed for o in outcomes)
    median = statistics.median(latencies)
    report(record_property, median_503_ms=round(median * 1000, 2),
           max_503_ms=round(latencies[-1] * 1000, 2))
    assert [o.status for o in outcomes] == [503] * 20
    assert median < 0.050, f"median {median * 1000:.1f} ms"
    assert latencies[-1] < 1.0


def spread(px, n: int = 200) -> dict[str | None, int]:
    counts: dict[str | None, int] = {}
    with H11Client(px.addr) as c:
        for i in range(n):
            r = c.get(f"/echo?spread{i}")
            assert r.status == 200
            counts[r.header("x-backend")] = counts.get(r.header("x-backend"), 0) + 1
    return counts


# fall 3: a healthy backend whose probe times out (100 ms, which a loaded CI box
# sometimes takes) must not leave, or the share of healthy backends changes.
PANIC_CHECK = {"path": "/health", "interval": "100ms", "timeout": "100ms", "rise": 1,
               "fall": 3}


def test_panic_mode_spreads_traffic_over_all_backends_below_the_threshold(stack):
    """panic_threshold 50%: with 3 of 4 backends failing their health check (25%
    healthy, below the threshold) poise fails open and every backend gets traffic;
    with 2 of 4 failing (50%, not below) only the 2 healthy ones do."""
    healthy = stack.backend("h1")
    sick = [stack.backend(f"s{i}", health_status=503) for i in (1, 2, 3)]
    px = stack.poise([healthy, *sick], cluster={"health_check": PANIC_CHECK,
                                               "panic_threshold": "50%"})
    wait_log(px, r"cluster app: backend \S+ is down", 3, count=3)
    wait_log(px, r"panic mode: 1 of 4 primary backends healthy", 1)
    counts = spread(px)
    assert set(counts) == {"h1", "s1", "s2", "s3"}, counts
    assert min(counts.values()) >= 20, counts

    healthy2 = stack.backend("h2")
    px2 = stack.poise([healthy, healthy2, *sick[:2]], cluster={"health_check": PANIC_CHECK,
                                                               "panic_threshold": "50%"})
    wait_log(px2, r"cluster app: backend \S+ is down", 3, count=2)
    counts = spread(px2)
    assert set(counts) == {"h1", "h2"}, counts
    assert "panic mode" not in px2.log()


# -- 5. retries and idempotency ------------------------------------------------------------

def seen(backends, method: str, target: str) -> list[str]:
    """Names of the backends that received ``method target`` (one entry per receipt)."""
    return [b.name for b in backends for q in b.stats()["requests"]
            if q["method"] == method and q["target"] == target]


RETRY_ALL = {"attempts": 3, "retry_on": [500, 502, 503, 504, "reset", "connect_failure",
                                          "timeout"], "backoff": "5ms..20ms"}


def test_post_is_not_retried_by_default_but_get_is(stack):
    """retries {attempts 3, on 500 and reset}: a POST answered 500 or reset reached a
    backend exactly once; the same as GET was tried 3 times, on different backends."""
    backends = [stack.backend(f"b{i}") for i in (1, 2, 3)]
    # no pooled connections: a reset is then never taken for a stale keep-alive one
    px = stack.poise(backends, cluster={"retries": RETRY_ALL, "keepalive_max_idle": 0})
    with H11Client(px.addr) as c:
        assert c.request("POST", "/status/500?post", body=b"once").status == 500
        assert c.request("GET", "/status/500?get").status == 500
    with H11Client(px.addr) as c:
        assert c.request("POST", "/reset?post", body=b"once").status == 502
    with H11Client(px.addr) as c:
        assert c.request("GET", "/reset?get").status == 502
    assert len(seen(backends, "POST", "/status/500?post")) == 1
    assert len(seen(backends, "POST", "/reset?post")) == 1
    get500 = seen(backends, "GET", "/status/500?get")
    assert len(get500) == 3 and len(set(get500)) == 3, get500
    get_reset = seen(backends, "GET", "/reset?get")
    assert len(get_reset) == 3 and len(set(get_reset)) == 3, get_reset


def test_retry_non_idempotent_retries_post_with_its_body(stack):
    backends = [stack.backend(f"b{i}") for i in (1, 2, 3)]
    px = stack.poise(backends, cluster={"retries": {**RETRY_ALL, "retry_non_idempotent": True},
                                        "keepalive_max_idle": 0})
    with H11Client(px.addr) as c:
        assert c.request("POST", "/status/500?post", body=b"again").status == 500
    with H11Client(px.addr) as c:
        assert c.request("POST", "/reset?post", body=b"again").status == 502
    post500 = seen(backends, "POST", "/status/500?post")
    assert len(post500) == 3 and len(set(post500)) == 3, post500
    post_reset = seen(backends, "POST", "/reset?post")
    assert len(post_reset) == 3 and len(set(post_reset)) == 3, post_reset
    # a retried POST that succeeds carries its body to the next backend
    flaky = stack.backend("flaky", fail_ratio=1.0)
    ok = stack.backend("ok")
    px2 = stack.poise([flaky, ok], cluster={"retries": {**RETRY_ALL,
                                                         "retry_non_idempotent": True}})
    with H11Client(px2.addr) as c:
        for i in range(4):
            r = c.request("POST", f"/echo?p{i}", body=b"payload-%d" % i)
            assert r.status == 200 and r.json()["body"] == f"payload-{i}"
            assert r.json()["name"] == "ok"
    assert flaky.stats()["requests"], "no POST was tried on the failing backend first"


def test_get_reset_on_a_reused_connection_still_gets_its_configured_retries(stack):
    """A reset on a pooled (keep-alive) connection is first re-sent once on a fresh
    connection to the same backend (it may have been a stale connection); that must
    not use up the configured retries: attempts 3 still reach the other backends."""
    backends = [stack.backend(f"b{i}") for i in (1, 2, 3)]
    px = stack.poise(backends, cluster={"retries": RETRY_ALL})
    with H11Client(px.addr) as c:
        for i in range(6):      # warm a pooled connection to every backend
            assert c.get(f"/echo?warm{i}").status == 200
        assert c.get("/reset?pooled").status == 502
    got = seen(backends, "GET", "/reset?pooled")
    assert len(set(got)) == 3, f"tried on {got}: the retries to other backends were lost"


# -- 6. circuit breaker: max_requests, max_connections, the queue ----------------------------

def raw_get(target: str) -> bytes:
    return b"GET %b HTTP/1.1\r\nHost: x\r\n\r\n" % target.encode()


def accept_backlog(port: int) -> int:
    """Connections waiting in the accept queue of the loopback listener on ``port``."""
    local = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[1] == local and fields[3] == "0A":     # LISTEN
                return int(fields[4].split(":")[1], 16)
    raise AssertionError(f"no listener on port {port}")


def arrive_together(px, socks: list[socket.socket], targets: list[str]) -> float:
    """Send one request on each (connected) socket while poise is stopped (SIGSTOP):
    they all arrive in one turn of its event loop, as they do when poise is busy
    (CPU contention, a long callback).  The monotonic time they were sent."""
    wait_for(lambda: accept_backlog(px.port) == 0, 5, "poise accepting the connections")
    os.kill(px.pid, signal.SIGSTOP)
    try:
        for s, target in zip(socks, targets, strict=True):
            s.sendall(raw_get(target))
        return time.monotonic()
    finally:
        os.kill(px.pid, signal.SIGCONT)


def read_responses(socks: list[socket.socket], t0: float) -> list[Outcome]:
    """One response from each socket (read in parallel); elapsed counts from ``t0``."""
    def read(s: socket.socket) -> Outcome:
        r = RawReader(s).read_response()
        return Outcome(t0, time.monotonic(), r.status, r.header("x-backend"),
                       limit=r.header("x-poise-limit"))
    results = in_parallel(len(socks), lambda i, barrier: read(socks[i]))
    for r in results:
        if isinstance(r, Exception):
            raise r
    return results


def test_max_requests_admits_exactly_10_of_50_concurrent(stack):
    """max_requests 10, 50 slow requests arriving together on connections of their
    own: 10 are served, 40 get 503 with x-poise-limit: max_requests at once."""
    b = stack.backend()
    px = stack.poise([b], cluster={"max_requests": 10})
    socks = [connect(px.addr, timeout=20) for _ in range(50)]
    try:
        t0 = arrive_together(px, socks, [f"/slow?delay=0.5&i={i}" for i in range(50)])
        results = read_responses(socks, t0)
    finally:
        for s in socks:
            s.close()
    served = [o for o in results if o.status == 200]
    rejected = [o for o in results if o.status == 503]
    assert len(served) == 10 and len(rejected) == 40, [o.status for o in results]
    assert {o.limit for o in rejected} == {"max_requests"}
    assert max(o.elapsed for o in rejected) < min(o.elapsed for o in served)
    assert len(b.stats()["requests"]) == 10
    with H11Client(px.addr) as c:       # the slots are free again
        assert c.get("/echo").status == 200


def queue_scenario(stack):
    b = stack.backend()
    px = stack.poise([b], cluster={"max_connections": 2, "max_pending": 3,
                                   "queue_timeout": "2s"})
    return b, px, [connect(px.addr, timeout=20) for _ in range(8)]


def check_queue_outcomes(b, results: list[Outcome], delay: float) -> None:
    served = sorted((o for o in results if o.status == 200), key=lambda o: o.end)
    rejected = [o for o in results if o.status == 503]
    assert len(served) == 5 and len(rejected) == 3, [o.status for o in results]
    assert {o.limit for o in rejected} == {"max_pending"}
    assert max(o.elapsed for o in rejected) < min(o.elapsed for o in served)
    assert served[-1].elapsed >= 3 * delay, "the last one waited for two rounds"
    stats = b.stats()
    assert len(stats["requests"]) == 5
    assert stats["connections"] == 2, f"{stats['connections']} connections for max_connections 2"


def test_max_connections_queue_serves_max_pending_and_rejects_the_rest(stack):
    """max_connections 2, max_pending 3, queue_timeout 2 s, 8 slow requests: the
    first 2 take the 2 connections; of the next 6, sent together, 3 wait and are
    served on the same 2 connections as they free up, 3 are rejected at once with
    x-poise-limit: max_pending."""
    b, px, socks = queue_scenario(stack)
    try:
        t0 = time.monotonic()
        for n, s in enumerate(socks[:2], 1):
            s.sendall(raw_get(f"/slow?delay=0.4&i={n}"))
            wait_for(lambda n=n: len(b.stats()["requests"]) == n, 3, f"request {n} sent")
        for i, s in enumerate(socks[2:], 3):
            s.sendall(raw_get(f"/slow?delay=0.4&i={i}"))
        results = read_responses(socks, t0)
    finally:
        for s in socks:
            s.close()
    assert results[0].status == results[1].status == 200
    check_queue_outcomes(b, results, 0.4)


def test_max_connections_holds_for_requests_arriving_together(stack):
    """The same 8 requests arriving in one turn of poise's event loop: still at most
    2 connections, 5 served and 3 rejected."""
    b, px, socks = queue_scenario(stack)
    try:
        t0 = arrive_together(px, socks, [f"/slow?delay=0.4&i={i}" for i in range(8)])
        results = read_responses(socks, t0)
    finally:
        for s in socks:
            s.close()
    check_queue_outcomes(b, results, 0.4)


def test_queue_timeout_answers_waiting_requests_503(stack):
    """max_connections 1, queue_timeout 200 ms: requests waiting behind a slow one
    get 503 with x-poise-limit: queue_timeout after about 200 ms (well before the slow
    one is done), and the slow one is served."""
    b = stack.backend()
    px = stack.poise([b], cluster={"max_connections": 1, "max_pending": 10,
                                   "queue_timeout": "200ms"})
    socks = [connect(px.addr, timeout=20) for _ in range(4)]
    try:
        socks[0].sendall(raw_get("/slow?delay=1.5"))
        wait_for(lambda: b.targets() == ["/slow?delay=1.5"], 3, "the slow request sent")
        t0 = time.monotonic()
        for i, s in enumerate(socks[1:], 1):
            s.sendall(raw_get(f"/echo?q{i}"))
        results = read_responses(socks, t0)
    finally:
        for s in socks:
            s.close()
    assert results[0].status == 200
    for o in results[1:]:
        assert o.status == 503 and o.limit == "queue_timeout", o
        assert 0.2 - TIMER_SLACK <= o.elapsed < 1.2, f"queue timeout after {o.elapsed:.3f}s"
    assert b.targets() == ["/slow?delay=1.5"]


# -- 7. a client that goes away while its request waits ----------------------------------

def abort(sock: socket.socket) -> None:
    """Close with a reset (SO_LINGER 0): the peer learns at once the client is gone."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_client_reset_cancels_the_upstream_request_and_frees_the_connection(stack):
    """max_connections 1: a client resets its connection while its request waits on
    a backend that never answers: poise closes the upstream connection (the backend
    sees its peer go away) and holds no connection for it, so the next request is
    served at once instead of waiting for the queue."""
    b = stack.backend()
    px = stack.poise([b], cluster={"max_connections": 1, "max_pending": 4,
                                   "queue_timeout": "5s"})
    s = connect(px.addr)
    s.sendall(b"GET /never HTTP/1.1\r\nHost: x\r\n\r\n")
    wait_for(lambda: b.targets() == ["/never"], 3, "the request reaching the backend")
    abort(s)
    wait_for(lambda: b.stats()["peer_closed"] == 1, 2, "the backend seeing its peer leave")
    with H11Client(px.addr) as c:
        o = timed(c, "GET", "/echo?next")
    assert o.status == 200 and o.elapsed < 1.0, o


def test_client_close_while_waiting_frees_the_connection_after_the_answer(stack):
    """A client that closes (FIN) its connection while its request waits on a slow
    backend: whether poise cancels the upstream request at once or (as it does now,
    see the next test) lets it run to its end, its connection is free afterwards:
    with max_connections 1 the next request is served, not queued until it times
    out."""
    b = stack.backend()
    px = stack.poise([b], cluster={"max_connections": 1, "max_pending": 4,
                                   "queue_timeout": "5s"})
    s = connect(px.addr)
    s.sendall(b"GET /slow?delay=0.5 HTTP/1.1\r\nHost: x\r\n\r\n")
    wait_for(lambda: b.targets() == ["/slow?delay=0.5"], 3, "the request reaching the backend")
    s.close()
    with H11Client(px.addr) as c:
        o = timed(c, "GET", "/echo?next")
        assert o.status == 200, o
        assert c.get("/echo?again").status == 200
    # and poise kept serving on a connection of its own afterwards
    with connect(px.addr) as s2:
        s2.sendall(b"GET /echo?raw HTTP/1.1\r\nHost: x\r\n\r\n")
        assert RawReader(s2).read_response().status == 200


def test_client_close_cancels_the_upstream_request(stack):
    """A client that closes (FIN) its connection while its request waits on a
    backend that never answers: the upstream connection is closed at once
    (abort_on_client_close, the default; regression: a FIN used to be taken for a
    half-close, holding the upstream connection and limit slots until the backend
    answered or response_header_timeout passed)."""
    b = stack.backend()
    px = stack.poise([b], drain_timeout="1s")
    s = connect(px.addr)
    s.sendall(b"GET /never HTTP/1.1\r\nHost: x\r\n\r\n")
    wait_for(lambda: b.targets() == ["/never"], 3, "the request reaching the backend")
    s.close()
    wait_for(lambda: b.stats()["peer_closed"] == 1, 2, "the backend seeing its peer leave")
