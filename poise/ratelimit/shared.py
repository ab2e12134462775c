"""The memory every process of one poise shares: the rate-limit table and the
connection counts (:mod:`poise.core.ratelimit`, :mod:`poise.core.connlimit`).

The supervisor creates it once at start as an anonymous ``memfd`` (nothing in the file
system to leak when a process is killed) and hands the descriptor to each worker it
starts, which maps it.  Pages are allocated by the kernel as they are first written, so
the reserve for 256 workers' connection counts costs only what is used.  With one
process (``workers: 1``) the same layout lives in an anonymous mapping.

Layout: ``[rate table: slots * 16 bytes][connection counts: MAX_WORKERS regions]``.
"""

from __future__ import annotations

import mmap
import os

from poise.core.connlimit import ConnectionCounts, counts_bytes
from poise.core.ratelimit import RateTable, table_bytes

# Worker slots a shared mapping has room for (Config.workers' maximum).
MAX_WORKERS = 256
# Connection-count buckets per worker (64 KiB each).
CONNECTION_BUCKETS = 16384


def _size(slots: int) -> int:
    return table_bytes(slots) + counts_bytes(MAX_WORKERS, CONNECTION_BUCKETS)


class SharedState:
    """One mapping of the shared layout; ``fd`` is the memfd (None: private to this
    process).  ``own`` is this process's worker slot, ``workers`` how many slots'
    connection counts to add up."""

    def __init__(self, memory: mmap.mmap, slots: int, fd: int | None = None,
                 own: int = 0, workers: int = 1) -> None:
        self.memory = memory
        self.slots = slots
        self.fd = fd
        self.rates = RateTable(memory, slots)
        offset = table_bytes(slots)
        self._counts_view = memoryview(memory)[offset:]
        self.connections = ConnectionCounts(self._counts_view, MAX_WORKERS,
                                            CONNECTION_BUCKETS, own, max(1, workers))

    @classmethod
    def create(cls, slots: int, shareable: bool = True) -> SharedState:
        """A new, zeroed state; ``shareable``: backed by a memfd workers can map."""
        size = _size(slots)
        if not shareable or not hasattr(os, "memfd_create"):
            return cls(mmap.mmap(-1, size), slots)
        fd = os.memfd_create("poise-shared", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        return cls(mmap.mmap(fd, size), slots, fd)

    @classmethod
    def attach(cls, fd: int, slots: int, own: int, workers: int) -> SharedState:
        """Map the state a supervisor created (a worker, given its ``fd``)."""
        return cls(mmap.mmap(fd, _size(slots)), slots, fd, own, workers)

    def set_workers(self, workers: int) -> None:
        """How many worker slots serve now (a reload may change it)."""
        self.connections.readers = max(1, min(workers, MAX_WORKERS))

    def worker_gone(self, slot: int) -> None:
        """A worker died or retired: its connections are closed, forget their counts."""
        self.connections.clear(slot)

    def describe(self) -> str:
        """The argument a worker is started with (see :meth:`from_argument`)."""
        return f"{self.fd}:{self.slots}"

    @classmethod
    def from_argument(cls, argument: str, own: int, workers: int) -> SharedState:
        fd, slots = (int(x) for x in argument.split(":"))
        return cls.attach(fd, slots, own, workers)

    def __repr__(self) -> str:
        return f"<SharedState slots={self.slots} fd={self.fd}>"
