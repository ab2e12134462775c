"""Retry decisions: which attempts may be retried, how long to wait, and a budget that
keeps retries from multiplying load during an outage.

Pure: the proxy asks, then acts.  The budget follows Linkerd's: every request deposits
``budget`` (e.g. 0.2) of a retry, deposits expire after ``ttl`` seconds, and
``min_per_second`` retries per second are always allowed so that low-traffic clusters
can still retry.  Counting is done in one-second buckets, so the cost is O(ttl) memory
and O(1) per call.
"""

from __future__ import annotations

import random

from poise.core.clock import Clock

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})


class RetryBudget:
    """Allows a retry while retries in the last ``ttl`` seconds stay within
    ``budget × requests + min_per_second × ttl``."""

    def __init__(self, *, clock: Clock, budget: float = 0.2, min_per_second: float = 10.0,
                 ttl: int = 10) -> None:
        if not 0 <= budget <= 10 or min_per_second < 0 or ttl < 1:
            raise ValueError("need 0 <= budget <= 10, min_per_second >= 0, ttl >= 1")
        self._clock = clock
        self.budget = budget
        self.min_per_second = min_per_second
        self.ttl = int(ttl)
        self._requests = [0] * self.ttl
        self._retries = [0] * self.ttl
        self._second = int(clock.now())

    def _advance(self) -> int:
        now = int(self._clock.now())
        if now != self._second:
            for s in range(max(self._second + 1, now - self.ttl + 1), now + 1):
                self._requests[s % self.ttl] = self._retries[s % self.ttl] = 0
            self._second = now
        return now % self.ttl

    def record_request(self) -> None:
        """One original request (not a retry) started."""
        self._requests[self._advance()] += 1

    def try_withdraw(self) -> bool:
        """True, and the retry is counted, when the budget allows one more retry."""
        slot = self._advance()
        allowed = self.budget * sum(self._requests) + self.min_per_second * self.ttl
        if sum(self._retries) + 1 > allowed:
            return False
        self._retries[slot] += 1
        return True

    def __repr__(self) -> str:
        return (f"<RetryBudget {self.budget:.0%} +{self.min_per_second:g}/s "
                f"requests={sum(self._requests)} retries={sum(self._retries)}>")


def backoff(attempt: int, rng: random.Random, base: float = 0.025, cap: float = 0.25) -> float:
    """Seconds to wait before retry number ``attempt`` (1 for the first retry):
    exponential from ``base`` up to ``cap``, with jitter over the upper half so that
    clients that failed together do not retry together."""
    ceiling = min(cap, base * 2 ** (attempt - 1))
    return ceiling / 2 + rng.random() * ceiling / 2


def may_retry(method: str, *, retry_non_idempotent: bool = False, body_replayable: bool,
              response_started: bool) -> bool:
    """Whether an attempt of this request may be sent again at all: idempotent methods
    only (unless configured), a body we still hold in full (or none), and never after
    response bytes reached the client."""
    if response_started or not body_replayable:
        return False
    return retry_non_idempotent or method.upper() in IDEMPOTENT
