"""A cheap, lazily re-armed timer for per-connection deadlines.

Setting or clearing a deadline is an attribute write; the underlying loop timer is
only re-armed when it fires early (the deadline moved later) or when a new deadline is
sooner than the armed one.  On a keep-alive connection that sets and clears a deadline
for every request this costs no timer operations on the fast path.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

# libuv timers have millisecond granularity; count a deadline that is this close as due.
SLACK = 0.001


class Deadline:
    """Calls ``on_expire`` once when the set deadline passes (unless cleared first)."""

    __slots__ = ("_loop", "_on_expire", "when", "_handle", "_armed_for")

    def __init__(self, loop: asyncio.AbstractEventLoop, on_expire: Callable[[], None]) -> None:
        self._loop = loop
        self._on_expire = on_expire
        self.when: float | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._armed_for = 0.0

    def set(self, timeout: float) -> None:
        """Expire ``timeout`` seconds from now (replacing any earlier deadline)."""
        when = self.when = self._loop.time() + timeout
        if self._handle is None or when < self._armed_for:
            self._arm(when)

    def push(self, timeout: float) -> None:
        """Like ``set``, for callers whose new deadline is never earlier than one already
        armed (the same timeout again and again): no timer work unless none is armed."""
        when = self.when = self._loop.time() + timeout
        if self._handle is None:
            self._arm(when)

    def clear(self) -> None:
        """No deadline; an armed timer will fire and find nothing to do."""
        self.when = None

    def cancel(self) -> None:
        """Clear and release the loop timer (call when the owner closes)."""
        self.when = None
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _arm(self, when: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._armed_for = when
        self._handle = self._loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._handle = None
        when = self.when
        if when is None:
            return
        if self._loop.time() + SLACK >= when:
            self.when = None
            self._on_expire()
        else:
            self._arm(when)

    def __repr__(self) -> str:
        return f"<Deadline when={self.when}>"
