"""Open-connection counts that several worker processes keep together, without locks.

Every worker owns one *region* of a shared buffer: an array of ``buckets`` unsigned
32-bit counts that only it writes.  A listener's total, or one client address's count,
lives in the bucket its hash selects, and the count all workers together hold is the
sum of that bucket over their regions: exact, since no two processes ever write the
same word.  Two keys that hash to one bucket share its count (the table is fixed-size
so that rotating addresses cannot grow it): a client can then be refused a little
early, never let in beyond its limit.

Pure: a buffer in, counts out.
"""

from __future__ import annotations

from typing import Final

# The bytes of one count.
COUNT_BYTES: Final = 4


def counts_bytes(regions: int, buckets: int) -> int:
    """The buffer size for ``regions`` workers of ``buckets`` counts."""
    return regions * buckets * COUNT_BYTES


class ConnectionCounts:
    """``regions`` arrays of ``buckets`` counts in ``buffer``; this process writes
    region ``own`` only (:meth:`add`), and reads the first ``readers`` regions."""

    __slots__ = ("_counts", "buckets", "regions", "own", "readers")

    def __init__(self, buffer: object, regions: int, buckets: int, own: int,
                 readers: int) -> None:
        if not 0 <= own < regions or not 1 <= readers <= regions:
            raise ValueError(f"region {own} / {readers} readers outside 0..{regions - 1}")
        view = memoryview(buffer)   # type: ignore[arg-type]
        self._counts = view[: counts_bytes(regions, buckets)].cast("I")
        self.buckets = buckets
        self.regions = regions
        self.own = own
        self.readers = readers

    def bucket(self, key: int) -> int:
        """The bucket of a 64-bit key hash."""
        return key % self.buckets

    def total(self, bucket: int) -> int:
        """The count of ``bucket`` summed over the reading regions (this one included,
        even when it lies beyond them)."""
        counts, step = self._counts, self.buckets
        total = sum(counts[w * step + bucket] for w in range(self.readers))
        if self.own >= self.readers:
            total += counts[self.own * step + bucket]
        return total

    def add(self, bucket: int, delta: int) -> None:
        """Change this region's count of ``bucket`` by ``delta`` (never below 0)."""
        i = self.own * self.buckets + bucket
        self._counts[i] = max(0, self._counts[i] + delta)

    def clear(self, region: int) -> None:
        """Zero a region (its worker died: its connections are gone)."""
        start = region * self.buckets
        self._counts[start: start + self.buckets] = memoryview(
            bytes(self.buckets * COUNT_BYTES)).cast("I")

    def __repr__(self) -> str:
        return (f"<ConnectionCounts region {self.own} of {self.readers}/{self.regions} "
                f"buckets={self.buckets}>")
