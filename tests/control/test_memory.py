"""Allocator tuning (poise.control.memory)."""

import ctypes
import ctypes.util

import pytest

from poise.control.memory import tune_malloc


def _glibc() -> bool:
    name = ctypes.util.find_library("c")
    return bool(name) and hasattr(ctypes.CDLL(name), "gnu_get_libc_version")


@pytest.mark.skipif(not _glibc(), reason="mallopt tuning applies to glibc only")
def test_tuning_is_accepted_by_glibc():
    # mallopt returns 0 for a parameter or value it rejects: every setting must take.
    assert tune_malloc() is True


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
        "uordblks", "fordblks", "keepcost")]


@pytest.mark.skipif(not _glibc(), reason="mallopt tuning applies to glibc only")
def test_a_freed_read_buffer_stays_in_the_heap():
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.mallinfo2.restype = _MallInfo2
    tune_malloc()
    block = ctypes.create_string_buffer(1024 * 1024)
    in_heap = libc.mallinfo2().uordblks
    del block
    # Served from the heap (not mmap), and kept there after free rather than trimmed:
    # the next read-sized allocation costs no brk and no page faults.
    assert in_heap >= 1024 * 1024
    assert libc.mallinfo2().fordblks >= 1024 * 1024
