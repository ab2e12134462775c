"""The scheduler: jittered waits, settings validation, set_backends, stop, and
exception safety."""

from __future__ import annotations

import asyncio
import logging
import random
import statistics

import pytest

from poise.checks import CheckSettings, HealthChecker
from poise.checks.settings import align, first_wait, grid, next_wait
from poise.core.backend import Backend
from tests.checks.servers import Changes, HealthServer, wait_for

FAST = dict(interval=0.03, timeout=2.0, rise=2, fall=3)


# -- scheduling arithmetic (no sockets) ------------------------------------------------

def test_waits_stay_within_interval_times_one_plus_or_minus_jitter():
    s = CheckSettings(interval=2.0, jitter=0.1)
    rng = random.Random(42)
    waits = [next_wait(s, rng) for _ in range(20_000)]
    assert all(1.8 <= w <= 2.2 for w in waits)
    # Uniform over the whole band: reaches near both ends, centred on the interval.
    assert min(waits) < 1.801 and max(waits) > 2.199
    assert statistics.fmean(waits) == pytest.approx(2.0, abs=0.005)
    below = sum(w < 2.0 for w in waits) / len(waits)
    assert below == pytest.approx(0.5, abs=0.02)


def test_zero_jitter_is_exactly_the_interval():
    s = CheckSettings(interval=1.5, jitter=0.0)
    rng = random.Random(1)
    assert {next_wait(s, rng) for _ in range(100)} == {1.5}


def test_first_probes_spread_over_one_interval():
    s = CheckSettings(interval=2.0)
    rng = random.Random(3)
    offsets = [first_wait(s, rng) for _ in range(10_000)]
    assert all(0 <= o < 2.0 for o in offsets)
    # Each tenth of the interval gets its share (10% ± 1.5%).
    counts = [0] * 10
    for o in offsets:
        counts[int(o / 0.2)] += 1
    assert all(850 <= c <= 1150 for c in counts), counts


def test_start_times_are_aligned_to_ticks_within_the_jitter_band():
    s = CheckSettings(interval=1.0, jitter=0.1)
    tick = grid(s)
    assert tick == 0.005
    rng = random.Random(5)
    now = 12345.6789
    for _ in range(20_000):
        wait = next_wait(s, rng)
        when = align(now, wait, tick, longest=1.1)
        assert 0.9 <= when - now <= 1.1 + 1e-9
        assert abs(when - wait - now) < tick, "moved by less than one tick"
        assert abs(when / tick - round(when / tick)) < 1e-6, "on the grid"


def test_fine_intervals_get_a_fine_grid_and_no_jitter_no_grid():
    assert grid(CheckSettings(interval=0.05, jitter=0.1)) == pytest.approx(0.0005)
    assert grid(CheckSettings(interval=2.0, jitter=0.0)) == 0
    assert align(10.0, 0.123, 0, longest=1.0) == 10.123


def test_same_seed_same_schedule():
    s = CheckSettings()
    a, b = random.Random(9), random.Random(9)
    assert [next_wait(s, a) for _ in range(5)] == [next_wait(s, b) for _ in range(5)]


# -- settings ------------------------------------------------------------------------

def test_defaults():
    s = CheckSettings()
    assert (s.type, s.path, s.method, s.host) == ("http", "/health", "GET", None)
    assert s.expect_status == ((200, 399),) and s.expect_body is None
    assert (s.interval, s.timeout, s.jitter, s.rise, s.fall) == (2.0, 1.0, 0.10, 2, 3)
    assert s.status_ok(200) and s.status_ok(399) and not s.status_ok(400)


def test_expect_status_lists_are_normalised_to_tuples():
    s = CheckSettings(expect_status=[[200, 204], [301, 301]])
    assert s.expect_status == ((200, 204), (301, 301))
    assert s.status_ok(301) and not s.status_ok(205)


@pytest.mark.parametrize("kwargs", [
    {"type": "udp"},
    {"method": "GE T"},
    {"path": "health"},
    {"path": "/a b"},
    {"path": "/x\r\nX-Evil: 1"},
    {"host": "a\r\nb"},
    {"expect_status": ()},
    {"expect_status": ((300, 200),)},
    {"expect_status": ((99, 200),)},
    {"expect_body": ""},
    {"interval": 0},
    {"timeout": -1},
    {"jitter": 1.0},
    {"jitter": -0.1},
    {"rise": 0},
    {"fall": 0},
])
def test_invalid_settings_are_rejected(kwargs):
    with pytest.raises(ValueError):
        CheckSettings(**kwargs)


# -- the checker ---------------------------------------------------------------------

async def test_unknown_backends_and_pending_results(server, make_checker):
    checker = make_checker(CheckSettings(**FAST), [server.backend], start=False)
    assert checker.healthy(server.backend), "backends start healthy"
    assert checker.last_result(server.backend) == "pending"
    with pytest.raises(KeyError):
        checker.healthy(Backend("127.0.0.1", 1))
    assert repr(checker) == "<HealthChecker http stopped backends=1 up=1 down=0>"
    assert server.requests == 0, "nothing is probed before start()"


async def test_set_backends_adds_removes_and_keeps_state(server, server2, make_checker):
    a, b = server.backend, server2.backend
    server.status = 503
    changes = Changes()
    checker = make_checker(CheckSettings(**FAST), [a], changes)
    await wait_for(lambda: changes.states == [False], what="a down")
    assert server2.requests == 0

    # `a` stays (a new Backend object, same address): its state and connection stay.
    a2 = Backend(a.host, a.port, weight=5)
    checker.set_backends([a2, b])
    await wait_for(lambda: server2.requests >= 2, what="b probed")
    assert not checker.healthy(a) and checker.healthy(b)
    assert changes.states == [False] and server.accepted == 1

    server.status = 200
    await wait_for(lambda: changes.states == [False, True], what="a up")
    assert changes.calls[-1][0].weight == 5, "on_change gets the current Backend object"

    checker.set_backends([b])
    with pytest.raises(KeyError):
        checker.healthy(a)
    await wait_for(lambda: server.open == 0, what="a's connection closed")
    seen = server.requests
    await wait_for(lambda: server2.requests >= seen + 3)
    assert server.requests == seen, "a removed backend is no longer probed"
    assert checker.backends == [b]


async def test_stop_cancels_timers_and_closes_connections(server, server2, make_checker):
    server2.respond = lambda srv, conn, head: None     # a probe is in flight at stop()
    changes = Changes()
    checker = make_checker(CheckSettings(**FAST), [server.backend, server2.backend], changes)
    await wait_for(lambda: server.requests >= 2 and server2.requests >= 1)
    checker.stop()
    assert checker.pending() == 0
    await wait_for(lambda: server.open == 0 and server2.open == 0, what="all closed")
    seen = server.requests, server2.requests
    await asyncio.sleep(5 * FAST["interval"])
    assert (server.requests, server2.requests) == seen, "nothing probes after stop()"
    assert changes.calls == []
    checker.stop()                  # idempotent
    assert checker.healthy(server.backend) and checker.last_result(server.backend) == "ok 200"
    assert "stopped" in repr(checker)


async def test_stop_while_connecting_leaves_nothing_behind(blackhole, make_checker):
    b = Backend("127.0.0.1", blackhole)
    changes = Changes()
    checker = make_checker(CheckSettings(**{**FAST, "interval": 0.001}), [b], changes)
    await asyncio.sleep(0.05)       # the first connect is now hanging
    checker.stop()
    assert checker.pending() == 0
    await asyncio.sleep(0.01)       # let the cancelled connect unwind
    assert changes.calls == [] and checker.last_result(b) == "pending"


async def test_restart_after_stop(server, make_checker):
    checker = make_checker(CheckSettings(**FAST), [server.backend])
    await wait_for(lambda: server.requests >= 1)
    checker.stop()
    seen = server.requests
    checker.start()
    await wait_for(lambda: server.requests >= seen + 2)


async def test_on_change_errors_are_logged_not_raised(server, make_checker, caplog):
    server.status = 500
    flips = []

    def on_change(backend, healthy):
        flips.append(healthy)
        raise RuntimeError("listener bug")

    checker = make_checker(CheckSettings(**{**FAST, "fall": 1, "rise": 1}),
                           [server.backend], on_change)
    with caplog.at_level(logging.ERROR, logger="poise"):
        await wait_for(lambda: flips == [False])
        server.status = 200
        await wait_for(lambda: flips == [False, True], what="probing went on")
    assert "on_change callback failed" in caplog.text
    assert checker.healthy(server.backend)


async def test_on_change_may_stop_the_checker(server, make_checker):
    server.status = 500
    checker = None

    def on_change(backend, healthy):
        checker.stop()

    checker = make_checker(CheckSettings(**{**FAST, "fall": 1}), [server.backend], on_change)
    await wait_for(lambda: not checker.healthy(server.backend))
    assert checker.pending() == 0


async def test_many_backends_are_probed_on_a_spread_schedule(make_checker):
    servers = [await HealthServer().start() for _ in range(50)]
    loop = asyncio.get_running_loop()
    first: dict[int, float] = {}

    def respond(srv, conn, head):
        first.setdefault(srv.port, loop.time())
        return b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"

    for srv in servers:
        srv.respond = respond
    try:
        checker = make_checker(CheckSettings(**{**FAST, "interval": 0.5}),
                               [srv.backend for srv in servers], start=False)
        t0 = loop.time()
        checker.start()
        await wait_for(lambda: len(first) == 50, what="every backend probed once")
        # make_checker seeds Random(7): the offsets drawn are known in advance.
        rng = random.Random(7)
        offsets = [0.5 * rng.random() for _ in servers]
        assert max(offsets) - min(offsets) > 0.3, "spread out, not all at once"
        for srv, offset in zip(servers, offsets, strict=True):
            late = first[srv.port] - t0 - offset
            assert -0.002 <= late < 0.3, (srv.port, offset, late)
        assert all(checker.healthy(srv.backend) for srv in servers)
    finally:
        for srv in servers:
            await srv.close()


def test_constructing_needs_no_running_loop():
    loop = asyncio.new_event_loop()
    try:
        checker = HealthChecker(CheckSettings(type="tcp"), [Backend("127.0.0.1", 1)],
                                lambda b, h: None, loop=loop)
        checker.stop()
        assert checker.pending() == 0
    finally:
        loop.close()
