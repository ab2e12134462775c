"""Deadlines sharing one loop timer (poise.proxy.deadline), on a fake loop."""

from __future__ import annotations

import heapq
import random

from poise.proxy.deadline import GRANULARITY, SLACK, Deadline, Timeouts


class FakeLoop:
    """time() and call_at() with a manual clock; counts the timers it was asked for."""

    def __init__(self) -> None:
        self.now = 0.0
        self.timers: list[tuple[float, int, FakeHandle]] = []
        self.armed = 0
        self._seq = 0

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback) -> FakeHandle:
        self.armed += 1
        self._seq += 1
        handle = FakeHandle(callback)
        heapq.heappush(self.timers, (when, self._seq, handle))
        return handle

    def advance(self, seconds: float) -> None:
        """Move the clock, firing due timers in order (as an event loop would)."""
        until = self.now + seconds
        while self.timers and self.timers[0][0] <= until:
            when, _, handle = heapq.heappop(self.timers)
            self.now = max(self.now, when)
            if not handle.cancelled:
                handle.callback()
        self.now = until

    def live_timers(self) -> int:
        return sum(1 for _, _, h in self.timers if not h.cancelled)


class FakeHandle:
    def __init__(self, callback) -> None:
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


def on_time(at: float, when: float) -> bool:
    """Fired at ``at`` for a deadline at ``when``: not early (but for SLACK), at most
    GRANULARITY late (and float rounding)."""
    return when - SLACK - 1e-9 <= at <= when + GRANULARITY + 1e-9


def make(loop: FakeLoop, timeouts: Timeouts, log: list, name: str) -> Deadline:
    return Deadline(timeouts, lambda: log.append((name, loop.now)))


def test_each_deadline_expires_once_at_its_time_not_before() -> None:
    loop = FakeLoop()
    timeouts = Timeouts(loop)
    log: list = []
    a, b = make(loop, timeouts, log, "a"), make(loop, timeouts, log, "b")
    a.set(1.0)
    loop.advance(0.5)
    b.set(1.0)
    loop.advance(0.499)
    assert log == []
    loop.advance(0.002 + GRANULARITY)
    assert [name for name, _ in log] == ["a"] and a.when is None
    loop.advance(0.5)
    assert [name for name, _ in log] == ["a", "b"]
    assert on_time(log[0][1], 1.0) and on_time(log[1][1], 1.5)
    loop.advance(10)
    assert len(log) == 2 and timeouts.pending() == 0 and loop.live_timers() == 0


def test_cleared_and_moved_deadlines_do_not_fire_early() -> None:
    loop = FakeLoop()
    timeouts = Timeouts(loop)
    log: list = []
    a = make(loop, timeouts, log, "a")
    a.set(1.0)
    a.clear()
    loop.advance(2)
    assert log == []
    a.set(1.0)
    loop.advance(0.9)
    a.set(1.0)              # moved later: expires 1 s from now, not at the old time
    loop.advance(0.9)
    assert log == []
    loop.advance(0.2)
    assert len(log) == 1 and on_time(log[0][1], 3.9)
    a.set(5.0)
    a.set(0.5)              # moved earlier: re-armed sooner
    loop.advance(0.6)
    assert len(log) == 2 and on_time(log[1][1], 4.5)
    loop.advance(10)
    assert len(log) == 2


def test_a_callback_may_set_its_deadline_again() -> None:
    loop = FakeLoop()
    timeouts = Timeouts(loop)
    fired: list[float] = []

    def again() -> None:
        fired.append(loop.now)
        if len(fired) < 3:
            d.set(1.0)

    d = Deadline(timeouts, again)
    d.set(1.0)
    loop.advance(10)
    assert len(fired) == 3
    for i in range(1, 3):       # each 1 s after the previous one fired
        assert on_time(fired[i], fired[i - 1] + 1.0)


def test_set_and_clear_per_request_arm_no_timer() -> None:
    """A keep-alive connection clears and re-sets its deadline per request: no timer
    work (one loop timer for all the deadlines)."""
    loop = FakeLoop()
    timeouts = Timeouts(loop)
    conns = [Deadline(timeouts, lambda: None) for _ in range(100)]
    for d in conns:
        d.set(60.0)
    armed = loop.armed
    for _ in range(50):
        for d in conns:
            d.clear()
            d.set(60.0)
        loop.advance(0.01)
    assert loop.armed == armed == 1


def test_many_deadlines_with_mixed_timeouts_fire_in_time_order() -> None:
    rng = random.Random(7)
    loop = FakeLoop()
    timeouts = Timeouts(loop)
    log: list = []
    expected: dict[str, float] = {}
    deadlines = {}
    for i in range(300):
        name = f"d{i}"
        deadlines[name] = make(loop, timeouts, log, name)
    for _ in range(200):
        name = rng.choice(list(deadlines))
        action = rng.random()
        if action < 0.6:
            timeout = rng.choice([0.5, 1.0, 2.5, rng.uniform(0.1, 3)])
            deadlines[name].set(timeout)
            expected[name] = loop.now + timeout
        elif action < 0.8:
            deadlines[name].clear()
            expected.pop(name, None)
        loop.advance(rng.uniform(0, 0.05))
        for fired, _at in log:
            expected.pop(fired, None)
        log.clear()
    loop.advance(100)
    fired_at = dict(log)
    assert set(fired_at) == set(expected)
    for name, when in expected.items():
        assert on_time(fired_at[name], when), name
    assert timeouts.pending() == 0 and loop.live_timers() == 0


def test_a_detached_deadline_forgets_its_callback_and_never_fires() -> None:
    """Owners detach their deadline when they close: its callback (a method of the
    owner) would otherwise keep a cycle alive until a full garbage collection."""
    import gc
    import weakref

    class Owner:
        def __init__(self, timeouts: Timeouts) -> None:
            self.fired = 0
            self.deadline = Deadline(timeouts, self.expired)

        def expired(self) -> None:
            self.fired += 1

    loop = FakeLoop()
    timeouts = Timeouts(loop)
    owner = Owner(timeouts)
    owner.deadline.set(1.0)
    deadline = owner.deadline
    owner.deadline.detach()
    deadline.set(0.5)               # (a late set after the close: fires nothing)
    fired = owner.fired
    ref = weakref.ref(owner)
    gc.disable()
    try:
        del owner
        assert ref() is None, "a detached deadline must not keep its owner alive"
    finally:
        gc.enable()
    loop.advance(2.0)
    assert fired == 0 and timeouts.pending() == 0


def test_stock_loops_read_the_shared_clock_and_others_their_own() -> None:
    import asyncio

    import uvloop

    from poise.proxy.deadline import clock_of
    from poise.proxy.http import fasthead

    class Virtual(asyncio.SelectorEventLoop):
        def time(self) -> float:
            return 5.0

    for make, shared in ((uvloop.new_event_loop, True), (asyncio.new_event_loop, True),
                         (Virtual, False)):
        loop = make()
        try:
            clock = clock_of(loop)
            assert (clock is fasthead.clock) is shared
            assert Timeouts(loop).shared_clock is shared
            # (the same clock as the loop's own time(), whichever is read)
            assert abs(clock() - loop.time()) < 0.05 or not shared
        finally:
            loop.close()
    fake = FakeLoop()
    assert clock_of(fake) == fake.time and not Timeouts(fake).shared_clock


def test_push_from_a_reading_taken_just_now_only_on_the_shared_clock() -> None:
    """``push(timeout, now)`` starts from ``now`` only where the deadlines' clock is
    the clock ``now`` was read from; a virtual loop's deadlines keep its own time."""
    loop = FakeLoop()
    timeouts = Timeouts(loop)
    log: list = []
    d = make(loop, timeouts, log, "d")
    loop.advance(100.0)
    d.push(1.0, now=3.0)        # (not the loop's clock: ignored)
    assert d.when == 101.0
    timeouts.shared_clock = True    # (as on a stock loop)
    d.push(1.0, now=100.5)
    assert d.when == 101.5
    d.push(1.0, now=0.0)        # 0.0: read the clock
    assert d.when == 101.0
