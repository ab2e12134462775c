"""Passive outlier detection: eject a backend whose requests keep failing.

The data plane reports each attempt's outcome; the detector answers whether that
ejected the backend.  Two counters, as Envoy has them: ``consecutive_failures`` counts
every failure (5xx, connect failures, resets, timeouts), ``consecutive_gateway_errors``
only gateway errors (502/503/504 and failures to reach the backend at all) in a row; any other failure breaks that run.  A
success resets both.  The n-th ejection of a backend lasts ``n × base_ejection_time``
(capped at ``max_ejection_time``), so a backend that keeps failing is tried less and
less often; ``max_ejection_percent`` keeps a share of the cluster in service whatever
happens (ejecting everything would turn a partial outage into a total one).
"""

from __future__ import annotations

from enum import Enum

from poise.core.clock import Clock


class Outcome(Enum):
    SUCCESS = "success"
    ERROR = "error"                  # e.g. 500: the backend answered, badly
    GATEWAY_ERROR = "gateway_error"  # 502/503/504, connect failure, reset, timeout


class _Record:
    __slots__ = ("failures", "gateway_errors", "ejections", "ejected_until")

    def __init__(self) -> None:
        self.failures = 0
        self.gateway_errors = 0
        self.ejections = 0
        self.ejected_until: float | None = None


class OutlierDetector:
    """Ejection decisions for one cluster. Backends are identified by any hashable key
    (the proxy uses the address, so records survive reweighting)."""

    def __init__(self, *, clock: Clock, consecutive_failures: int = 5,
                 consecutive_gateway_errors: int = 5, base_ejection_time: float = 30.0,
                 max_ejection_time: float = 300.0, max_ejection_percent: float = 50.0) -> None:
        if consecutive_failures < 1 or consecutive_gateway_errors < 1:
            raise ValueError("consecutive thresholds must be at least 1")
        if not 0 <= max_ejection_percent <= 100:
            raise ValueError("max_ejection_percent must be between 0 and 100")
        if base_ejection_time <= 0 or max_ejection_time < base_ejection_time:
            raise ValueError("need 0 < base_ejection_time <= max_ejection_time")
        self._clock = clock
        self.consecutive_failures = consecutive_failures
        self.consecutive_gateway_errors = consecutive_gateway_errors
        self.base_ejection_time = base_ejection_time
        self.max_ejection_time = max_ejection_time
        self.max_ejection_percent = max_ejection_percent
        self._records: dict[object, _Record] = {}

    def report(self, backend: object, outcome: Outcome, cluster_size: int) -> bool:
        """Record one attempt's outcome; True when it ejected ``backend`` just now."""
        record = self._records.get(backend)
        if record is None:
            record = self._records[backend] = _Record()
        if outcome is Outcome.SUCCESS:
            record.failures = record.gateway_errors = 0
            return False
        record.failures += 1
        if outcome is Outcome.GATEWAY_ERROR:
            record.gateway_errors += 1
        else:       # an answer, if a bad one: the gateway errors are no longer in a row
            record.gateway_errors = 0
        tripped = (record.failures >= self.consecutive_failures
                   or record.gateway_errors >= self.consecutive_gateway_errors)
        if not tripped or record.ejected_until is not None:
            return False
        if (self.ejected_count() + 1) * 100 > self.max_ejection_percent * cluster_size:
            return False        # keep enough of the cluster in service
        record.ejections += 1
        duration = min(self.base_ejection_time * record.ejections, self.max_ejection_time)
        record.ejected_until = self._clock.now() + duration
        record.failures = record.gateway_errors = 0
        return True

    def release_expired(self) -> list[object]:
        """Backends whose ejection has ended (they may take traffic again, subject to
        active checks); call periodically."""
        now = self._clock.now()
        released = []
        for backend, record in self._records.items():
            if record.ejected_until is not None and record.ejected_until <= now:
                record.ejected_until = None
                released.append(backend)
        return released

    def is_ejected(self, backend: object) -> bool:
        record = self._records.get(backend)
        return record is not None and record.ejected_until is not None

    def end_ejection(self, backend: object) -> bool:
        """End ``backend``'s ejection now (it proved healthy another way, e.g. its
        active check came back up); True when it was ejected.  The count of its
        ejections is kept, so a relapse is ejected for longer."""
        record = self._records.get(backend)
        if record is None or record.ejected_until is None:
            return False
        record.ejected_until = None
        record.failures = record.gateway_errors = 0
        return True

    def ejected_until(self, backend: object) -> float | None:
        """Clock time at which ``backend``'s ejection ends; None when not ejected."""
        record = self._records.get(backend)
        return None if record is None else record.ejected_until

    def ejected_count(self) -> int:
        return sum(1 for r in self._records.values() if r.ejected_until is not None)

    def forget(self, backend: object) -> None:
        """The backend left the cluster."""
        self._records.pop(backend, None)

    def __repr__(self) -> str:
        return f"<OutlierDetector tracked={len(self._records)} ejected={self.ejected_count()}>"
