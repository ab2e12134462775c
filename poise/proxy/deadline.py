"""Cheap, lazily re-armed per-connection deadlines that share one loop timer.

Setting or clearing a deadline is an attribute write; a deadline is only re-armed
when it fires early (it moved later) or when a new one is sooner than the armed one.
On a keep-alive connection that sets and clears a deadline for every request this
costs no timer work on the fast path.

Armed deadlines wait in the buckets of a :class:`Timeouts` (one per listener site or
upstream pool), one bucket per GRANULARITY of time, with a single loop timer for the
earliest bucket: a loop timer per connection would cost about 700 bytes each (handle,
libuv timer, bound callback), the most an idle connection held.  A deadline fires at
most GRANULARITY late, never early.
"""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import Callable
from typing import Any, Final

import uvloop

from poise.proxy.http import fasthead

# Deadlines are armed to the end of their GRANULARITY-long bucket (seconds).
GRANULARITY: Final = 0.005
# libuv timers have millisecond granularity; count a deadline that is this close as due.
SLACK: Final = 0.001


# Loops whose time() is CLOCK_MONOTONIC in seconds (uvloop's, asyncio's own).
_STOCK_TIMES: Final[tuple[Any, ...]] = (uvloop.Loop.time, asyncio.BaseEventLoop.time)


def clock_of(loop: asyncio.AbstractEventLoop) -> Callable[[], float]:
    """What to read for ``loop``'s time: fasthead.clock (the same clock, read for
    less than a method call into the loop) when the loop keeps a stock ``time()``;
    else ``loop.time`` (a test's virtual loop)."""
    if getattr(type(loop), "time", None) in _STOCK_TIMES:
        clock: Callable[[], float] = fasthead.clock
        return clock
    return loop.time


class Timeouts:
    """Armed deadlines by bucket, and the loop timer for the earliest bucket."""

    __slots__ = ("loop", "clock", "shared_clock", "_buckets", "_ticks", "_handle",
                 "_armed_tick")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        # The loop's clock (clock_of), bound once: read per deadline set
        self.clock: Callable[[], float] = clock_of(loop)
        # Whether it is fasthead.clock, the clock the request path reads: then a reading
        # the caller took just now can stand for a new one (``now`` arguments).
        self.shared_clock = self.clock is fasthead.clock
        # bucket number → its deadlines (a dict: O(1) removal, insertion order)
        self._buckets: dict[int, dict[Deadline, None]] = {}
        self._ticks: list[int] = []         # heap of the bucket numbers in _buckets
        self._handle: asyncio.TimerHandle | None = None
        self._armed_tick = 0

    def now(self, reading: float = 0.0) -> float:
        """The loop's time: ``reading`` (a fasthead.clock reading the caller took just
        now, in this same call) where that is the loop's clock, else a new reading
        (also when ``reading`` is 0.0)."""
        if reading > 0.0 and self.shared_clock:
            return reading
        return self.clock()

    def add(self, deadline: Deadline, when: float) -> int:
        """Arm ``deadline`` for ``when``; returns its bucket (for :meth:`remove`)."""
        tick = int(when / GRANULARITY) + 1      # the bucket ends after ``when``
        bucket = self._buckets.get(tick)
        if bucket is None:
            bucket = self._buckets[tick] = {}
            heapq.heappush(self._ticks, tick)
            if self._handle is None or tick < self._armed_tick:
                self._arm(tick)
        bucket[deadline] = None
        return tick

    def remove(self, deadline: Deadline, tick: int) -> None:
        """Disarm ``deadline`` (armed in bucket ``tick``); an empty bucket stays until
        its time (cheaper than re-arming the loop timer)."""
        bucket = self._buckets.get(tick)
        if bucket is not None:
            bucket.pop(deadline, None)

    def pending(self) -> int:
        """Deadlines armed (for tests and benchmarks)."""
        return sum(len(bucket) for bucket in self._buckets.values())

    def _arm(self, tick: int) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._armed_tick = tick
        self._handle = self.loop.call_at(tick * GRANULARITY, self._fire)

    def _fire(self) -> None:
        self._handle = None
        due = self.clock() + SLACK
        ticks = self._ticks
        fired: list[tuple[Deadline, int]] = []
        while ticks and ticks[0] * GRANULARITY <= due:
            tick = heapq.heappop(ticks)
            for deadline in self._buckets.pop(tick):
                fired.append((deadline, tick))
        if ticks:
            self._arm(ticks[0])
        for deadline, tick in fired:    # (last: their callbacks may arm deadlines again)
            deadline.fire(tick)


class Deadline:
    """Calls ``on_expire`` once when the set deadline passes (unless cleared first)."""

    __slots__ = ("_timeouts", "_on_expire", "when", "_armed_for", "_tick")

    def __init__(self, timeouts: Timeouts, on_expire: Callable[[], None]) -> None:
        self._timeouts = timeouts
        self._on_expire = on_expire
        self.when: float | None = None
        self._armed_for = 0.0
        self._tick = 0              # its bucket while armed, else 0

    def set(self, timeout: float) -> None:
        """Expire ``timeout`` seconds from now (replacing any earlier deadline)."""
        when = self.when = self._timeouts.clock() + timeout
        if not self._tick or when < self._armed_for:
            self._arm(when)

    def push(self, timeout: float, now: float = 0.0) -> None:
        """Like ``set``, for callers whose new deadline is never earlier than one already
        armed (the same timeout again and again): no timer work unless none is armed.
        ``now``: a clock reading taken just now, as for :meth:`Timeouts.now`."""
        when = self.when = self._timeouts.now(now) + timeout
        if not self._tick:
            self._arm(when)

    def clear(self) -> None:
        """No deadline; an armed one will fire and find nothing to do."""
        self.when = None

    def cancel(self) -> None:
        """Clear and disarm (call when the owner closes: the buckets let go of it)."""
        self.when = None
        if self._tick:
            self._timeouts.remove(self, self._tick)
            self._tick = 0

    def detach(self) -> None:
        """Cancel, and forget the callback for good (its owner is closed).  The
        callback is usually a method of the owner, which holds this deadline: a cycle
        that only a full garbage collection would free, with all the owner holds."""
        self.cancel()
        self._on_expire = _nothing

    def _arm(self, when: float) -> None:
        timeouts = self._timeouts
        if self._tick:
            timeouts.remove(self, self._tick)
        self._armed_for = when
        self._tick = timeouts.add(self, when)

    def fire(self, tick: int) -> None:
        """Bucket ``tick``'s time came (called by Timeouts)."""
        if self._tick != tick:
            return      # (re-armed or cancelled since, by another deadline's callback)
        self._tick = 0
        when = self.when
        if when is None:
            return
        if self._timeouts.clock() + SLACK >= when:
            self.when = None
            self._on_expire()
        else:
            self._arm(when)

    def __repr__(self) -> str:
        return f"<Deadline when={self.when}>"


def _nothing() -> None:
    """A detached deadline's callback."""
