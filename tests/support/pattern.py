"""A deterministic byte stream for large-body tests, generated and verified without
holding the stream in memory.

The stream is a fixed pseudo-random block repeated.  Its length is 1 MiB + 13 bytes so
block boundaries never line up with socket buffer sizes; a doubled copy lets any
piece up to one block long be sliced without copying.
"""

from __future__ import annotations

import random

BLOCK = random.Random(20240601).randbytes((1 << 20) + 13)
_L = len(BLOCK)
_DOUBLE = memoryview(BLOCK + BLOCK)


def piece(offset: int, size: int) -> memoryview:
    """The stream's bytes ``[offset, offset + size)``; ``size`` must not exceed one block."""
    assert size <= _L
    start = offset % _L
    return _DOUBLE[start:start + size]


def chunks(total: int, size: int = 1 << 20):
    """Yield the first ``total`` bytes of the stream as memoryviews of at most ``size``."""
    size = min(size, _L)
    pos = 0
    while pos < total:
        n = min(size, total - pos)
        yield piece(pos, n)
        pos += n


def matches(offset: int, data) -> bool:
    """True when ``data`` equals the stream at ``offset``."""
    view = memoryview(data)
    pos = 0
    while pos < len(view):
        n = min(_L, len(view) - pos)
        if view[pos:pos + n] != piece(offset + pos, n):
            return False
        pos += n
    return True


def prefix(size: int) -> bytes:
    """The first ``size`` bytes of the stream (for small bodies)."""
    return b"".join(bytes(c) for c in chunks(size))
