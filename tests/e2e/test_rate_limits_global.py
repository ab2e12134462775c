"""Global rate limits end to end: real poise processes sharing one real redis-server
(the session's, :mod:`tests.support.redis`), an h11 backend, real clients.

What is proved:

- A request that waits for Redis (no leased token) is then forwarded, also over a
  pooled keep-alive upstream connection, body included.
- Two poise instances (separate processes, separate ports) with one ``100/s, burst
  10`` limit of the same ``name``, loaded together for 10 s well above the rate, admit
  ``burst + 100 × elapsed`` between them (±10%: the leases each instance holds move a
  few tokens in time, see :mod:`poise.core.leases`), not that much each (which would
  be twice as many); every other answer is a well-formed 429.
- Redis stopped under load: with ``on_redis_error: allow`` every request is admitted
  once the failure is noticed, with ``deny`` every one is a 429; no request fails
  otherwise or takes a second.  Redis started again: enforcement resumes within a few
  seconds.  /metrics shows ``poise_rate_limit_redis_up`` 0 then 1, the failed round
  trips and the requests answered per ``on_redis_error``.

Each test uses limit names of its own (Redis keeps keys of earlier tests a while).
"""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from tests.e2e.test_rate_limits import (
    Outcome,
    Run,
    check_denial,
    drive,
    metric,
    outcome,
    wait_metric,
)
from tests.support import redis as redis_support
from tests.support.client import H11Client
from tests.support.waiting import wait_for

redis_server = redis_support.redis_server       # (the session's redis-server)


def fresh_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def global_limit(redis_server, name: str, rate: str, burst: int, **more) -> dict:
    return {"rate": rate, "burst": burst, "scope": "global", "redis": redis_server.url,
            "name": name, **more}


# -- a request that waits for Redis --------------------------------------------------------


def test_a_request_parked_for_redis_is_forwarded_over_a_pooled_connection(stack,
                                                                          redis_server):
    """A request whose key has no leased token waits (parked) for Redis' answer, then
    goes on: here to the idle keep-alive connection the previous request left in the
    pool.  Its head, and a body that came with it, must then be written although no
    more client bytes arrive.  (A regression test: they stayed buffered and the
    request hung until the client gave up.)"""
    limit = global_limit(redis_server, fresh_name("parked"), "1000/s", 1000)
    b = stack.backend()
    px = stack.poise([b], listener={"rate_limit": limit})
    with H11Client(px.addr, timeout=2) as c:
        for i in range(6):
            body = f"request {i}".encode()
            try:
                r = c.request("POST", f"/echo?{i}", body=body) if i % 2 else c.get(f"/{i}")
            except TimeoutError:
                r = None
            if r is None:
                pytest.fail(f"request {i} (a {'POST' if i % 2 else 'GET'}) was not answered "
                            f"within 2s; the backend saw {b.targets()}", pytrace=False)
            assert r.status == 200, r
            if i % 2:
                assert r.json()["body"] == body.decode()
    assert len(b.stats()["requests"]) == 6


# -- two instances, one limit ------------------------------------------------------------

RATE, BURST, SECONDS = 100, 10, 10.0


def test_two_instances_share_one_global_limit(stack, redis_server):
    name = fresh_name("shared")
    limit = global_limit(redis_server, name, f"{RATE}/s", BURST)
    b = stack.backend()
    proxies = [stack.poise([b], admin={}, listener={"rate_limit": limit}) for _ in range(2)]
    assert proxies[0].addr != proxies[1].addr

    # Per instance 2 keep-alive clients pausing 10 ms: ~350 requests/s offered in all.
    until = time.monotonic() + SECONDS
    runs: dict[int, Run] = {}
    errors: list[BaseException] = []

    def load(i: int) -> None:
        try:
            runs[i] = drive(proxies[i].addr, connections=2, per_connection=0, gap=0.01,
                            until=until)
        except BaseException as e:     # (reported in the test's thread)
            errors.append(e)
    threads = [threading.Thread(target=load, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(SECONDS + 30)
    assert not errors, f"the load failed: {errors[0]}"

    outcomes: list[Outcome] = runs[0].outcomes + runs[1].outcomes
    elapsed = max(o.done for o in outcomes) - min(o.sent for o in outcomes)
    admitted = [runs[i].count(200) for i in range(2)]
    denied = [runs[i].count(429) for i in range(2)]
    assert sum(admitted) + sum(denied) == len(outcomes), \
        f"other statuses: {sorted({o.status for o in outcomes})}"
    expected = BURST + RATE * elapsed
    print(f"global: {admitted} admitted (total {sum(admitted)}) of {len(outcomes)} in "
          f"{elapsed:.2f}s, expected {expected:.0f} ± 10%")
    assert len(outcomes) >= 2 * expected, "the load did not exceed the limit enough"
    assert abs(sum(admitted) - expected) <= 0.10 * expected, (admitted, expected)
    assert all(a > 0 for a in admitted), admitted       # (both spent the shared limit)
    for o in outcomes:
        if o.status == 429:
            check_denial(o, name, RATE, 1)
    for px, d in zip(proxies, denied, strict=True):
        wait_metric(px, "poise_rate_limited_total", d, listener="web", mode="enforce")
        assert metric(px, "poise_rate_limit_redis_up", redis=redis_server.url) == 1


# -- Redis stopped and started under load ------------------------------------------------


class Paced:
    """One keep-alive client sending GETs ``gap`` apart in a thread of its own until
    :meth:`stop`; every outcome recorded, and every failure (a timeout after
    ``timeout``, a reset, a closed connection)."""

    def __init__(self, addr: tuple[str, int], gap: float = 0.01, timeout: float = 2.0):
        self.addr = addr
        self.gap = gap
        self.timeout = timeout
        self.outcomes: list[Outcome] = []
        self.failures: list[str] = []
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        client = H11Client(self.addr, timeout=self.timeout)
        while not self._stopping.is_set():
            try:
                self.outcomes.append(outcome(client, "/"))
                if not client.reusable:
                    raise ConnectionError("the connection was not kept alive")
            except Exception as e:
                self.failures.append(repr(e))
                client.close()
                client = H11Client(self.addr, timeout=self.timeout)
            time.sleep(self.gap)
        client.close()

    def since(self, t: float) -> list[Outcome]:
        return [o for o in list(self.outcomes) if o.sent >= t]

    def between(self, start: float, end: float) -> list[Outcome]:
        return [o for o in list(self.outcomes) if start <= o.sent < end]

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(10)


def switch(outcomes: list[Outcome], status: int) -> float | None:
    """When the run of ``status`` answers that ends ``outcomes`` began (the sent time
    of its first request; None when the last answer is another status)."""
    start = None
    for o in outcomes:
        if o.status != status:
            start = None
        elif start is None:
            start = o.sent
    return start


@pytest.mark.parametrize("on_error", ["allow", "deny"])
def test_redis_stopped_and_started_under_load(stack, redis_server, on_error):
    name = fresh_name(f"down-{on_error}")
    # 20/s against ~90 requests/s: a mix of 200s and 429s while Redis answers.
    limit = global_limit(redis_server, name, "20/s", 5, on_redis_error=on_error)
    fallback = 200 if on_error == "allow" else 429
    b = stack.backend()
    px = stack.poise([b], admin={}, listener={"rate_limit": limit})
    url = redis_server.url
    load = Paced(px.addr)
    try:
        time.sleep(1.5)
        up = load.since(0)
        assert not load.failures, load.failures[:5]
        # (~90 requests/s offered: far fewer answers means requests hang)
        assert len(up) >= 50, f"only {len(up)} requests answered in 1.5s"
        assert {o.status for o in up} == {200, 429}, "no enforcement while Redis answers"
        wait_for(lambda: metric(px, "poise_rate_limit_redis_up", redis=url) == 1, 5,
                 "poise_rate_limit_redis_up 1 before the stop")

        stopped = time.monotonic()
        redis_server.stop()
        wait_for(lambda: metric(px, "poise_rate_limit_redis_up", redis=url) == 0, 5,
                 "poise_rate_limit_redis_up 0")
        time.sleep(1.5)
        down = load.since(stopped)
        assert not load.failures, load.failures[:5]
        began = switch(down, fallback)
        assert began is not None, f"still {down[-1].status} with Redis down"
        # (a lease's tokens, or a known wait, may still be spent for up to a second)
        assert began - stopped < 1.5, f"{on_error} only {began - stopped:.2f}s after the stop"
        steady = [o for o in down if o.sent >= began]
        assert steady[-1].done - began >= 1.0 and len(steady) >= 50, len(steady)
        if fallback == 429:
            for o in steady:
                check_denial(o, name, 20, 1)
        assert metric(px, "poise_rate_limit_redis_errors_total", redis=url) >= 1
        # (answered per on_redis_error, all but the tokens still leased: at most a burst)
        def fallbacks() -> float:
            return metric(px, "poise_rate_limit_redis_fallbacks_total", limit=name) or 0
        wait_for(lambda: fallbacks() >= len(steady) - 5, 5,
                 lambda: f"{len(steady) - 5} fallbacks counted (now {fallbacks()})")

        started = time.monotonic()
        redis_server.start()
        enforced = 429 if on_error == "allow" else 200
        wait_for(lambda: any(o.status == enforced for o in load.since(started)), 5,
                 f"a {enforced} again after Redis started")
        resumed = min(o.sent for o in load.since(started) if o.status == enforced)
        wait_for(lambda: metric(px, "poise_rate_limit_redis_up", redis=url) == 1, 5,
                 "poise_rate_limit_redis_up 1")
        time.sleep(1.0)
        back = load.between(resumed, time.monotonic())
        assert {o.status for o in back} == {200, 429}, "enforcement did not resume"
        print(f"on_redis_error={on_error}: {fallback}s from {began - stopped:.2f}s after "
              f"the stop; enforced {resumed - started:.2f}s after the start")
    finally:
        load.stop()
        if not redis_server.running():
            redis_server.start()
    assert not load.failures, load.failures[:5]
    everything = load.outcomes
    assert {o.status for o in everything} <= {200, 429}
    slowest = max(o.done - o.sent for o in everything)
    assert slowest < 1.0, f"a request took {slowest:.2f}s"
