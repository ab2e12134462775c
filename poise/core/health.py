"""Health as pure state machines: a rise/fall threshold per active check, and flags
from independent sources that compose instead of overwriting each other.

The prober (``poise.checks``, issue 4) feeds results in; what it gets back says
whether the backend just flipped.  One blip never flips a backend: it takes ``rise``
successes in a row to come up and ``fall`` failures in a row to go down (HAProxy's
``rise``/``fall``).
"""

from __future__ import annotations

from enum import Enum, IntFlag


class Transition(Enum):
    """What one observation did to a backend's state."""

    NONE = "none"
    FLIPPED_UP = "flipped_up"
    FLIPPED_DOWN = "flipped_down"


class HealthFlag(IntFlag):
    """Reasons a backend may not take traffic; it is ready only when none is set.

    Each source sets and clears only its own flag, so (say) an operator's drain is not
    undone by a passing health check."""

    ACTIVE_CHECK_FAILED = 1
    OUTLIER_EJECTED = 2
    DRAINED = 4


class RiseFall:
    """Consecutive-result thresholds for one backend's active checks.

    ``rise`` (default 2) successes in a row make a down backend up; ``fall`` (default 3)
    failures in a row make an up backend down.  ``healthy`` is the starting state
    (default True: a new backend is not kept out of traffic before its first check)."""

    __slots__ = ("rise", "fall", "healthy", "_streak")

    def __init__(self, rise: int = 2, fall: int = 3, healthy: bool = True) -> None:
        if rise < 1 or fall < 1:
            raise ValueError("rise and fall must be at least 1")
        self.rise = rise
        self.fall = fall
        self.healthy = healthy
        self._streak = 0    # consecutive results against the current state

    def observe(self, ok: bool) -> Transition:
        """Record one check result; the transition it caused, if any."""
        if ok == self.healthy:
            self._streak = 0
            return Transition.NONE
        self._streak += 1
        if self._streak < (self.rise if ok else self.fall):
            return Transition.NONE
        self.healthy = ok
        self._streak = 0
        return Transition.FLIPPED_UP if ok else Transition.FLIPPED_DOWN

    def __repr__(self) -> str:
        state = "up" if self.healthy else "down"
        return f"<RiseFall {state} streak={self._streak} rise={self.rise} fall={self.fall}>"


def set_flag(flags: HealthFlag, flag: HealthFlag, on: bool) -> HealthFlag:
    """``flags`` with ``flag`` set or cleared, others untouched."""
    return flags | flag if on else flags & ~flag
