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

    __slots__ = ("name", "backends", "stats", "_unready", "all_ready", "ready_since")

    def __init__(self, name: str, backends: tuple[Backend, ...],
                 stats: dict[Backend, BackendStats], unready: frozenset[Backend],
                 ready_since: dict[Backend, float] | None = None) -> None:
        self.name = name
        self.backends = backends
        self.stats = stats
        self._unready = unready
        self.all_ready = not unready
        # When each backend (last) became ready, for slow start; absent: long ago.
        self.ready_since = ready_since or {}

    @classmethod
    def build(cls, name: str, backends: Iterable[Backend],
              previous: ClusterSnapshot | None = None,
              unready: Iterable[Backend] = (),
              ready_since: dict[Backend, float] | None = None) -> ClusterSnapshot:
        """A new snapshot; stats of backends already in ``previous`` are kept."""
        members = tuple(backends)
        # By address: a backend whose weight (or other metadata) changed is still the
        # same server, with the same requests in flight.
        old = {(b.host, b.port): s for b, s in previous.stats.items()} if previous else {}
        stats = {b: old.get((b.host, b.port)) or BackendStats() for b in members}
        return cls(name, members, stats, frozenset(unready), ready_since)

    def subset(self, backends: Iterable[Backend]) -> ClusterSnapshot:
        """A snapshot of some of these backends sharing this one's stats and flags."""
        members = tuple(backends)
        return ClusterSnapshot(self.name, members, {b: self.stats[b] for b in members},
                               self._unready & frozenset(members),
                               {b: t for b, t in self.ready_since.items() if b in members})

    def ready(self, backend: Backend) -> bool:
        """True when ``backend`` may be sent new requests."""
        return backend not in self._unready

    @property
    def ready_count(self) -> int:
        return sum(1 for b in self.backends if b not in self._unready)

    def __repr__(self) -> str:
        return f"<ClusterSnapshot {self.name} backends={len(self.backends)} ready={self.ready_count}>"
