"""Waiting for a condition in tests: poll with a deadline instead of a fixed sleep."""

from __future__ import annotations

import time


def wait_for(predicate, timeout: float = 5.0, what: str = "condition", step: float = 0.01):
    """Poll ``predicate`` until it returns something truthy (returned); fail after
    ``timeout`` seconds saying ``what`` did not happen."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s")
        time.sleep(step)
