"""Local rate limits and connection limits, end to end: real poise processes (one worker,
and a supervisor with two), an h11 backend, real clients over loopback.

What is proved:

- GCRA: 1,000 requests from 20 keep-alive connections against ``50/s, burst 10`` admit
  ``burst + rate × elapsed`` (5% with one worker, 10% with two sharing the table), the
  first wave of 20 simultaneous requests admits the burst, every other answer is a 429
  whose ``Retry-After``/``RateLimit-Policy``/``RateLimit`` fields are right (and that
  keeps the connection alive), and /metrics counts exactly the 429s the clients saw.
- Connection limits, with one worker and with two: ``max_connections`` and
  ``max_connections_per_ip`` (client addresses 127.0.0.2 and .3) let the allowed
  connections serve, close the next one right after accept (no byte sent), accept again
  once one of them closes, and /metrics counts each refusal.
- ``trusted_proxies``: behind a trusted peer the key is the right-most untrusted
  ``X-Forwarded-For`` address (a forged left part changes nothing); from an untrusted
  peer, or without ``trusted_proxies``, the header is ignored.
- Keys: a listener's limit is one bucket per key for all the routes without their
  own; ``header:NAME`` (a bucket per value, one for requests without it), ``route``
  vs ``cluster`` on two routes to one cluster, ``mode: shadow`` (all admitted, counted
  as ``mode="shadow"``), a route with ``rate_limit: []`` under a listener limit.
- Reload: a reload that keeps a limit keeps its state (an exhausted key stays limited);
  one that changes its rate starts afresh.

Rates like ``1/m`` make a bucket refill slower than a test runs, so those tests count
exact admissions.  The GCRA proof spreads its 1,000 requests over about two seconds (a
load of about 10× the rate): then the rate term (about 100) dominates the burst and a
5% tolerance is wider than the one request GCRA's quantisation may take.
"""

from __future__ import annotations

import copy
import math
import re
import socket
import threading
import time
from dataclasses import dataclass

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.admin import socket_owner
from tests.support.client import H11Client, RawReader, is_closed
from tests.support.procs import LOOPBACK, Poise
from tests.support.waiting import wait_for

# -- helpers (also used by test_rate_limits_global.py) -------------------------------------


@dataclass(frozen=True)
class Outcome:
    sent: float         # time.monotonic() when the request was sent
    done: float         # ... when its response was read
    status: int
    headers: dict[str, str]     # names in lower case


@dataclass
class Run:
    outcomes: list[Outcome]
    owners: list[int | None]    # per connection: the pid of the worker that held it
    reconnects: int             # connections the server ended, so the client opened anew

    @property
    def elapsed(self) -> float:
        """From the first request sent to the last response read."""
        return max(o.done for o in self.outcomes) - min(o.sent for o in self.outcomes)

    def count(self, status: int) -> int:
        return sum(1 for o in self.outcomes if o.status == status)


def outcome(client: H11Client, target: str, headers=None) -> Outcome:
    sent = time.monotonic()
    r = client.get(target, headers)
    return Outcome(sent, time.monotonic(), r.status,
                   {n.decode("latin-1").lower(): v.decode("latin-1") for n, v in r.headers})


def drive(addr: tuple[str, int], connections: int, per_connection: int, gap: float = 0.0,
          target: str = "/", headers=None, pids: list[int] | None = None,
          until: float | None = None) -> Run:
    """``connections`` keep-alive clients, each in a thread, connected first, then
    released together: each sends ``per_connection`` GETs (or, with ``until``, GETs
    until that monotonic time), ``gap`` seconds apart.  A client whose connection the
    server ends reconnects.  ``pids``: find which worker held each connection."""
    clients = [H11Client(addr, timeout=5) for _ in range(connections)]
    results: list[list[Outcome]] = [[] for _ in clients]
    reconnects = [0] * connections
    errors: list[BaseException] = []
    start = threading.Barrier(connections)

    def run(i: int) -> None:
        try:
            start.wait()
            n = 0
            while (n < per_connection) if until is None else (time.monotonic() < until):
                results[i].append(outcome(clients[i], target, headers))
                n += 1
                if not clients[i].reusable:
                    clients[i].close()
                    clients[i] = H11Client(addr, timeout=5)
                    reconnects[i] += 1
                if gap:
                    time.sleep(gap)
        except BaseException as e:   # (reported below, in the test's thread)
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    owners = [socket_owner(c.sock, pids) if pids else None for c in clients]
    for c in clients:
        c.close()
    assert not errors, f"a client failed: {errors[0]!r}"
    return Run([o for r in results for o in r], owners, sum(reconnects))


POLICY = re.compile(r'^"(?P<name>[^"]+)";q=(?P<q>\d+);w=(?P<w>\d+)$')
RATELIMIT = re.compile(r'^"(?P<name>[^"]+)";r=(?P<r>\d+);t=(?P<t>\d+)$')


def check_denial(o: Outcome, name: str, quota: int, window: int,
                 retry_after: int | None = None) -> int:
    """``o`` is a well-formed 429 of policy ``name`` (``q=quota;w=window``), saying
    ``retry_after`` if given; its Retry-After (whole seconds, at least 1, at most one
    interval rounded up, and the ``t`` of the ``RateLimit`` field)."""
    assert o.status == 429, o
    field = o.headers.get("retry-after", "")
    assert field.isdigit() and 1 <= int(field) <= math.ceil(window / quota), o.headers
    if retry_after is not None:
        assert int(field) == retry_after, o.headers
    policy = POLICY.match(o.headers.get("ratelimit-policy", ""))
    assert policy and policy["name"] == name and int(policy["q"]) == quota \
        and int(policy["w"]) == window, o.headers
    state = RATELIMIT.match(o.headers.get("ratelimit", ""))
    assert state and state["name"] == name and state["r"] == "0" and state["t"] == field, \
        o.headers
    return int(field)


def request(addr: tuple[str, int], target: str = "/", headers=None,
            source: str | None = None) -> Outcome:
    """One GET on its own connection, from the loopback address ``source`` if given."""
    with socket.create_connection(addr, timeout=5,
                                  source_address=(source, 0) if source else None) as s:
        head = [f"GET {target} HTTP/1.1", "Host: rl.test"]
        head += [f"{n}: {v}" for n, v in (headers or [])]
        sent = time.monotonic()
        s.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
        r = RawReader(s).read_response()
        return Outcome(sent, time.monotonic(), r.status,
                       {n.decode("latin-1").lower(): v.decode("latin-1")
                        for n, v in r.headers})


def statuses(client: H11Client, target: str, n: int, headers=None) -> list[int]:
    return [client.get(target, headers).status for _ in range(n)]


def scrape(px: Poise) -> dict[tuple[str, tuple], float]:
    """``{(sample name, sorted labels): value}`` of ``GET /metrics``."""
    r = px.admin.get("/metrics")
    assert r.status == 200, r
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.body.decode())
            for s in family.samples}


def metric(px: Poise, name: str, **labels: str) -> float | None:
    """The sum of the samples ``name`` whose labels include ``labels`` (None: none)."""
    values = [v for (n, ls), v in scrape(px).items()
              if n == name and all(dict(ls).get(k) == x for k, x in labels.items())]
    return sum(values) if values else None


def wait_metric(px: Poise, name: str, value: float, timeout: float = 5.0,
                **labels: str) -> None:
    """Until ``name`` (summed as :func:`metric` does) equals ``value`` (workers ship
    their counters every second)."""
    wait_for(lambda: metric(px, name, **labels) == value, timeout,
             lambda: f"{name}{labels} == {value} (now {metric(px, name, **labels)})")


# -- GCRA: a burst against 50/s ------------------------------------------------------------

RATE, BURST = 50, 10


@pytest.mark.parametrize("workers, tolerance", [(1, 0.05), (2, 0.10)])
def test_a_burst_admits_burst_plus_rate_times_elapsed(stack, workers, tolerance):
    b = stack.backend()
    px = stack.poise([b], workers=workers, admin={},
                     listener={"rate_limit": {"rate": f"{RATE}/s", "burst": BURST}})
    pids = [w["pid"] for w in px.workers()]
    # 20 connections × 50 requests, each client pausing 40 ms: ~490 requests/s offered
    run = drive(px.addr, connections=20, per_connection=50, gap=0.04, pids=pids)

    assert len(run.outcomes) == 1000
    assert run.reconnects == 0, "poise closed keep-alive connections"
    admitted, denied = run.count(200), run.count(429)
    assert admitted + denied == 1000, f"other statuses: {[o.status for o in run.outcomes]}"
    expected = BURST + RATE * run.elapsed
    print(f"workers={workers}: {admitted} admitted of 1000 in {run.elapsed:.3f}s, "
          f"expected {expected:.1f} ± {tolerance:.0%}")
    assert abs(admitted - expected) <= tolerance * expected, (admitted, expected)

    # The first wave (one request per connection, all released at once) finds the key
    # idle: the burst is admitted at once, plus what the rate added while it lasted.
    first = sorted(run.outcomes, key=lambda o: o.sent)[:20]
    wave = max(o.done for o in first) - min(o.sent for o in first)
    wave_admitted = sum(1 for o in first if o.status == 200)
    assert BURST <= wave_admitted <= BURST + math.ceil(RATE * wave) + (workers - 1), \
        (wave_admitted, wave)

    for o in run.outcomes:
        if o.status == 429:
            # (one more request fits within one interval, 20 ms: rounded up, 1 s)
            assert check_denial(o, "web.0", RATE, 1) == 1

    if workers == 2:
        assert set(run.owners) == set(pids), f"connections held by {run.owners}, not {pids}"
        wait_for(lambda: all(w["requests"] > 0 for w in px.workers()), 5,
                 lambda: f"both workers served admitted requests ({px.workers()})")
    wait_metric(px, "poise_rate_limited_total", denied, listener="web", route="app",
                mode="enforce")


# -- connection limits ---------------------------------------------------------------------


def served(sock: socket.socket) -> bool:
    """Send one GET on ``sock``: True when it is answered 200, False when the server
    closed (or reset) the connection without a byte."""
    try:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: rl.test\r\n\r\n")
        r = RawReader(sock).read_response()
    except EOFError as e:
        assert e.args == ("connection closed",)
        return False
    except (ConnectionResetError, BrokenPipeError):
        return False
    assert r.status == 200, r
    return True


def connect(px: Poise, source: str = LOOPBACK) -> socket.socket:
    return socket.create_connection(px.addr, timeout=5, source_address=(source, 0))


def refused_after_accept(px: Poise, source: str = LOOPBACK) -> None:
    """A connection from ``source`` is accepted by the kernel, then closed by poise
    within a second without a byte, and a request on it gets no answer."""
    with connect(px, source) as s:
        start = time.monotonic()
        assert is_closed(s, 2.0), "poise kept a connection over its limit open"
        assert time.monotonic() - start < 1.0
        assert not served(s)


class Held:
    """Connections held open, each proven accepted by one request served."""

    def __init__(self, px: Poise) -> None:
        self.px = px
        self.socks: list[socket.socket] = []

    def open(self, source: str = LOOPBACK) -> socket.socket:
        s = connect(self.px, source)
        assert served(s), f"a connection from {source} within the limit was closed"
        self.socks.append(s)
        return s

    def close(self, s: socket.socket) -> None:
        self.socks.remove(s)
        s.close()

    def reopen_until_accepted(self, source: str = LOOPBACK) -> int:
        """After a close: connect until poise accepts again (it learns of the close
        asynchronously); how many connections it refused meanwhile."""
        refused = 0
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            s = connect(self.px, source)
            if served(s):
                self.socks.append(s)
                return refused
            s.close()
            refused += 1
            time.sleep(0.01)
        raise AssertionError(f"no connection from {source} accepted within 5s of a close")

    def close_all(self) -> None:
        for s in self.socks:
            s.close()
        self.socks.clear()


@pytest.mark.parametrize("workers", [1, 2])
def test_max_connections_closes_the_connection_over_the_limit(stack, workers):
    b = stack.backend()
    px = stack.poise([b], workers=workers, admin={}, listener={"max_connections": 5})
    pids = [w["pid"] for w in px.workers()]
    held = Held(px)
    refused = 0
    try:
        for _ in range(5):
            held.open()
        if workers == 2:
            # The limit is on both workers together: hold connections in each.  (A
            # connection to the busier worker is swapped until one lands on the other.)
            def spread():
                nonlocal refused
                owners = [socket_owner(s, pids) for s in held.socks]
                if len(set(owners)) == 2:
                    return owners
                held.close(held.socks[-1])
                refused += held.reopen_until_accepted()
                return None
            wait_for(spread, 10, "5 connections held across both workers")

        for _ in range(4):      # (with two workers, both get some of these)
            refused_after_accept(px)
            refused += 1
        for s in held.socks:
            assert served(s), "a connection within the limit stopped serving"

        held.close(held.socks[0])
        refused += held.reopen_until_accepted()
        refused_after_accept(px)
        refused += 1
        wait_metric(px, "poise_connections_rejected_total", refused, listener="web",
                    reason="max_connections")
        assert metric(px, "poise_connections_rejected_total", listener="web",
                      reason="max_connections_per_ip") in (0, None)
    finally:
        held.close_all()


@pytest.mark.parametrize("workers", [1, 2])
def test_max_connections_per_ip_counts_each_client_address(stack, workers):
    b = stack.backend()
    px = stack.poise([b], workers=workers, admin={}, listener={"max_connections_per_ip": 2})
    held = Held(px)
    refused = 0
    try:
        two = [held.open("127.0.0.2"), held.open("127.0.0.2")]
        refused_after_accept(px, "127.0.0.2")
        refused += 1
        held.open("127.0.0.3")
        held.open("127.0.0.3")
        refused_after_accept(px, "127.0.0.3")
        refused += 1
        held.open(LOOPBACK)     # a third address: its own count
        for s in held.socks:
            assert served(s)

        held.close(two[0])
        refused += held.reopen_until_accepted("127.0.0.2")
        refused_after_accept(px, "127.0.0.2")
        refused += 1
        wait_metric(px, "poise_connections_rejected_total", refused, listener="web",
                    reason="max_connections_per_ip")
        assert metric(px, "poise_connections_rejected_total", listener="web",
                      reason="max_connections") in (0, None)
    finally:
        held.close_all()


# -- trusted_proxies: which address is the client --------------------------------------

# 2 at once, then one a minute: no refill while a test runs.
SLOW = {"key": "client_ip", "rate": "1/m", "burst": 2}


def xff(value: str) -> list[tuple[str, str]]:
    return [("X-Forwarded-For", value)]


def test_behind_a_trusted_proxy_the_client_is_the_rightmost_untrusted_address(stack):
    b = stack.backend()
    px = stack.poise([b], listener={"trusted_proxies": ["127.0.0.1/32"],
                                    "rate_limit": SLOW})
    with H11Client(px.addr) as c:
        assert statuses(c, "/", 3, xff("10.0.0.1")) == [200, 200, 429]
        assert statuses(c, "/", 3, xff("10.0.0.2")) == [200, 200, 429]   # its own bucket
        # The client may write anything to the left; the trusted peer appended 10.0.0.7.
        assert statuses(c, "/", 2, xff("forged, 10.0.0.7")) == [200, 200]
        assert statuses(c, "/", 1, xff("10.0.0.7")) == [429]
        assert statuses(c, "/", 1, xff("10.0.0.99, 10.0.0.7")) == [429]
        # A trusted hop to the right of it is skipped.
        assert statuses(c, "/", 1, xff("10.0.0.7, 127.0.0.1")) == [429]
        # Without the header, the peer itself.
        assert statuses(c, "/", 3) == [200, 200, 429]
    # From an untrusted peer the header is ignored: the key is 127.0.0.2.
    assert request(px.addr, headers=xff("10.0.0.50"), source="127.0.0.2").status == 200
    assert request(px.addr, headers=xff("10.0.0.51"), source="127.0.0.2").status == 200
    denied = request(px.addr, headers=xff("10.0.0.52"), source="127.0.0.2")
    # (the key's next token comes a minute after its first request, moments ago)
    check_denial(denied, "web.0", 1, 60, retry_after=60)


def test_without_trusted_proxies_x_forwarded_for_is_ignored(stack):
    b = stack.backend()
    px = stack.poise([b], listener={"rate_limit": SLOW})
    with H11Client(px.addr) as c:
        assert statuses(c, "/", 1, xff("10.0.0.1")) == [200]
        assert statuses(c, "/", 1, xff("10.0.0.2")) == [200]
        assert statuses(c, "/", 1, xff("10.0.0.3")) == [429]
        assert statuses(c, "/", 1, xff("forged, 10.0.0.7")) == [429]
        assert statuses(c, "/", 1) == [429]


# -- keys, shadow mode, a route without limits ---------------------------------------------


def test_a_listener_limit_is_one_bucket_per_key_for_all_routes_without_their_own(stack):
    b = stack.backend()
    px = stack.poise([b], listener={
        "rate_limit": SLOW,
        "routes": [{"match": {"path_prefix": "/a"}, "name": "a", "cluster": "app"},
                   {"match": {"path_prefix": "/b"}, "name": "b", "cluster": "app"}]})
    with H11Client(px.addr) as c:
        assert [c.get(path).status for path in ("/a", "/b", "/a", "/b")] == \
            [200, 200, 429, 429]


ONE_A_MINUTE = {"rate": "1/m"}
KEYS_LISTENER = {
    # Shared by the routes without their own: one bucket per route, one per cluster.
    "rate_limit": [{"key": "route", "burst": 2, "name": "per-route", **ONE_A_MINUTE},
                   {"key": "cluster", "burst": 3, "name": "per-cluster", **ONE_A_MINUTE}],
    "routes": [
        {"match": {"path_prefix": "/api"}, "name": "api", "cluster": "app",
         "rate_limit": {"key": "header:X-Api-Key", "burst": 2, "name": "api-key",
                        **ONE_A_MINUTE}},
        {"match": {"path_prefix": "/one"}, "name": "one", "cluster": "app"},
        {"match": {"path_prefix": "/two"}, "name": "two", "cluster": "app"},
        {"match": {"path_prefix": "/shadow"}, "name": "shadow", "cluster": "app",
         "rate_limit": {"burst": 2, "mode": "shadow", **ONE_A_MINUTE}},
        {"match": {"path_prefix": "/free"}, "name": "free", "cluster": "app",
         "rate_limit": []},
    ],
}


@pytest.fixture(scope="module")
def keyed(module_stack):
    b = module_stack.backend()
    return module_stack.poise([b], workers=2, admin={}, listener=KEYS_LISTENER)


def test_a_header_key_has_a_bucket_per_value_and_one_for_requests_without_it(keyed):
    with H11Client(keyed.addr) as c:
        assert statuses(c, "/api", 2, [("X-Api-Key", "alpha")]) == [200, 200]
        # (header names are case-insensitive: the same key)
        denied = outcome(c, "/api", [("x-api-KEY", "alpha")])
        check_denial(denied, "api-key", 1, 60, retry_after=60)
        assert statuses(c, "/api", 3, [("X-Api-Key", "beta")]) == [200, 200, 429]
        assert statuses(c, "/api", 3) == [200, 200, 429]
        assert statuses(c, "/api", 1, [("X-Api-Key", "gamma")]) == [200]


def test_route_keys_are_per_route_and_cluster_keys_shared_by_its_routes(keyed):
    with H11Client(keyed.addr) as c:
        assert statuses(c, "/one", 2) == [200, 200]
        # /one's own bucket is empty; the cluster's has one left
        check_denial(outcome(c, "/one"), "per-route", 1, 60)
        assert statuses(c, "/two", 1) == [200]      # /two's own bucket is full
        # ... but the cluster's is now empty: both routes spent it
        check_denial(outcome(c, "/two"), "per-cluster", 1, 60)
    wait_metric(keyed, "poise_rate_limited_total", 1, listener="web", route="one",
                mode="enforce")
    wait_metric(keyed, "poise_rate_limited_total", 1, listener="web", route="two",
                mode="enforce")


def test_shadow_mode_admits_everything_and_counts_what_it_would_deny(keyed):
    with H11Client(keyed.addr) as c:
        assert statuses(c, "/shadow", 10) == [200] * 10
    wait_metric(keyed, "poise_rate_limited_total", 8, listener="web", route="shadow",
                mode="shadow")
    assert metric(keyed, "poise_rate_limited_total", listener="web", route="shadow",
                  mode="enforce") in (0, None)


def test_a_route_with_an_empty_rate_limit_is_not_limited_by_its_listener(keyed):
    with H11Client(keyed.addr) as c:
        assert statuses(c, "/free", 30) == [200] * 30
    time.sleep(1.2)     # (a worker's counts are shipped every second)
    assert metric(keyed, "poise_rate_limited_total", listener="web", route="free") \
        in (0, None)


# -- reload ------------------------------------------------------------------------------


def with_limit(config: dict, **fields) -> dict:
    """A copy of ``config`` whose listener's rate limit has ``fields`` replaced."""
    out = copy.deepcopy(config)
    out["listeners"][0]["rate_limit"] = {**out["listeners"][0]["rate_limit"], **fields}
    return out


def reload(px: Poise, config: dict) -> None:
    r = px.reload(config)
    assert r.status == 200 and r.json()["applied"], r
    px.wait_workers(config_version=r.json()["version"])


@pytest.mark.parametrize("workers", [1, 2])
def test_a_reload_keeps_a_limits_state_unless_the_limit_changes(stack, workers):
    b = stack.backend()
    px = stack.poise([b], workers=workers, admin={},
                     listener={"rate_limit": {"rate": "1/m", "burst": 3}})
    # Fresh connections (with two workers they land on either one).
    assert [request(px.addr).status for _ in range(4)] == [200, 200, 200, 429]

    # Something else changes (the cluster's policy): the exhausted key stays limited.
    kept = copy.deepcopy(px.config)
    kept["clusters"][0]["policy"] = "least_conn"
    reload(px, kept)
    check_denial(request(px.addr), "web.0", 1, 60)
    assert [request(px.addr).status for _ in range(4)] == [429] * 4

    # The rate changes: a new limit, its keys start afresh.
    reload(px, with_limit(kept, rate="2/m"))
    assert [request(px.addr).status for _ in range(4)] == [200, 200, 200, 429]
    check_denial(request(px.addr), "web.0", 2, 60)
