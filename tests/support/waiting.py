"""Waiting for a condition in tests: poll with a deadline instead of a fixed sleep."""

from __future__ import annotations

import time


def wait_for(predicate, timeout: float = 5.0, what="condition", step: float = 0.01):
    """Poll ``predicate`` until it returns something truthy (returned); fail after
    ``timeout`` seconds saying ``what`` did not happen (``what`` may be a callable
    returning the message, so that it describes the state at the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            message = what() if callable(what) else what
            raise AssertionError(f"{message}: not within {timeout}s")
        time.sleep(step)
