"""ClusterSnapshot: an immutable view of a cluster's backends and their health.

Snapshots are rebuilt and swapped whole when membership, weights or health change;
requests in flight keep the snapshot they started with.  Live stats are carried over
for backends that stay (see :meth:`ClusterSnapshot.build`).
"""

from __future__ import annotations

from collections.abc import Iterable

from poise.core.backend import Backend, BackendStats


class ClusterSnapshot:
    """Backends (in config order), which of them may take traffic, and their stats."""

    __slots__ = ("name", "backends", "stats", "_unready", "all_ready")

    def __init__(self, name: str, backends: tuple[Backend, ...],
                 stats: dict[Backend, BackendStats], unready: frozenset[Backend]) -> None:
        self.name = name
        self.backends = backends
        self.stats = stats
        self._unready = unready
        self.all_ready = not unready

    @classmethod
    def build(cls, name: str, backends: Iterable[Backend],
              previous: ClusterSnapshot | None = None,
              unready: Iterable[Backend] = ()) -> ClusterSnapshot:
        """A new snapshot; stats of backends already in ``previous`` are kept."""
        members = tuple(backends)
        old = previous.stats if previous is not None else {}
        stats = {b: old.get(b) or BackendStats() for b in members}
        return cls(name, members, stats, frozenset(unready))

    def ready(self, backend: Backend) -> bool:
        """True when ``backend`` may be sent new requests."""
        return backend not in self._unready

    @property
    def ready_count(self) -> int:
        return sum(1 for b in self.backends if b not in self._unready)

    def __repr__(self) -> str:
        return f"<ClusterSnapshot {self.name} backends={len(self.backends)} ready={self.ready_count}>"
