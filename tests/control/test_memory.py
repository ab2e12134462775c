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


@pytest.mark.skipif(not _glibc(), reason="mallopt tuning applies to glibc only")
def test_large_buffers_are_reused_after_tuning():
    tune_malloc()
    # With trimming deferred, freeing and reallocating a read-sized buffer reuses the
    # same heap block instead of returning it to the kernel each time.
    addresses = set()
    for _ in range(50):
        block = ctypes.create_string_buffer(256 * 1024)
        addresses.add(ctypes.addressof(block))
        del block
    assert len(addresses) <= 2
