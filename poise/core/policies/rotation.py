"""RotationPicker: a pick is the next entry of a fixed schedule of backends.

round_robin's picker for equal weights and for precomputed weighted schedules (the
common case), so it is on the request path of most clusters: compiled with the hot
path (setup.py), and kept free of base classes for that.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from poise.core.backend import Backend


class RotationPicker:
    """Cycles through a fixed schedule of backends."""

    __slots__ = ("_schedule", "_backends", "_next", "_size")

    def __init__(self, schedule: tuple[Backend, ...]) -> None:
        self._schedule = schedule
        self._backends = tuple(dict.fromkeys(schedule))
        self._size = len(schedule)
        self._next = 0

    @property
    def schedule(self) -> tuple[Backend, ...]:
        """The backends in the order picks go through them (repeats for weights)."""
        return self._schedule

    def pick(self, ctx: Any = None) -> Backend:
        return self._schedule[self.pick_index()]

    def pick_index(self) -> int:
        """A pick as its position in :attr:`schedule` (for callers that keep something
        per position: ClusterRuntime's pools)."""
        i = self._next
        self._next = i + 1 if i + 1 < self._size else 0
        return i

    def candidates(self, ctx: Any = None) -> Iterator[Backend]:
        if not self._size:
            return
        first = self.pick(ctx)
        yield first
        start = self._backends.index(first)
        n = len(self._backends)
        for k in range(1, n):
            yield self._backends[(start + k) % n]

    def __repr__(self) -> str:
        return f"<RotationPicker schedule={self._size} backends={len(self._backends)}>"
