"""Allocator tuning for a proxy's allocation pattern.

Streaming a large body allocates and frees a ~256 KiB bytes object per read.  glibc's
defaults return the top of the heap to the kernel as soon as such a block is freed, so
every read pays for ``brk`` calls and fresh page faults (measured: three ``brk`` per
read).  Keeping a few MiB of freed heap around removes that churn; it does not raise
peak memory, only how eagerly the unused part is handed back.
"""

from __future__ import annotations

import ctypes
import ctypes.util

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

TRIM_THRESHOLD = 16 * 1024 * 1024   # keep up to this much free heap before trimming
TOP_PAD = 1024 * 1024               # grow the heap in steps of at least this
MMAP_THRESHOLD = 4 * 1024 * 1024    # read buffers come from the heap, not mmap


def tune_malloc() -> bool:
    """Apply the settings above when running on glibc; True when applied."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False        # not glibc (musl has no mallopt): nothing to tune
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    ok &= mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    ok &= mallopt(_M_TOP_PAD, TOP_PAD)
    return bool(ok)
