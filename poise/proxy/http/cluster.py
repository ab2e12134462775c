"""A cluster at run time, in one worker: its backends' pools, the picker over the
backends that may take traffic, and the resilience state around them (health, outlier
ejection, circuit-breaker limits and the queue of requests waiting for a connection,
retry settings and budget).

Health decisions are made by :class:`~poise.core.availability.ClusterHealth`; when
they change the ready set, the picker is rebuilt over the ready backends and swapped
in whole, so the request path is the same single ``pick`` call whether or not
anything is down.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import deque
from typing import TYPE_CHECKING, Any

from poise.checks import CheckSettings, HealthChecker
from poise.config.load import policy_spec
from poise.config.model import Cluster
from poise.config.units import parse_address
from poise.core.availability import ClusterHealth
from poise.core.backend import Backend
from poise.core.clock import MonotonicClock
from poise.core.cluster import ClusterSnapshot
from poise.core.health import HealthFlag
from poise.core.limits import ClusterLimits
from poise.core.outlier import Outcome, OutlierDetector
from poise.core.policies import Picker, build_picker, create_policy
from poise.core.retry import RetryBudget
from poise.errors import NoBackendAvailable
from poise.proxy.http.upstream import UpstreamPool

if TYPE_CHECKING:
    from poise.config.model import Retries

log = logging.getLogger("poise")


class RetryPolicy:
    """A cluster's ``retries`` settings, resolved for the request path."""

    __slots__ = ("attempts", "on_connect_failure", "on_reset", "on_timeout", "statuses",
                 "backoff_base", "backoff_max", "non_idempotent", "max_buffered_body",
                 "budget")

    def __init__(self, spec: Retries, clock: MonotonicClock) -> None:
        self.attempts = spec.attempts
        self.on_connect_failure = "connect_failure" in spec.retry_on
        self.on_reset = "reset" in spec.retry_on
        self.on_timeout = "timeout" in spec.retry_on
        self.statuses = frozenset(s for s in spec.retry_on if isinstance(s, int))
        self.backoff_base = spec.backoff.base
        self.backoff_max = spec.backoff.max
        self.non_idempotent = spec.retry_non_idempotent
        self.max_buffered_body = spec.max_buffered_body
        self.budget = RetryBudget(clock=clock, budget=spec.budget,
                                  min_per_second=spec.min_per_second)


class ClusterRuntime:
    """A cluster's snapshot, picker, pools and resilience state (one worker)."""

    __slots__ = ("name", "loop", "policy", "snapshot", "picker", "pools", "_pool_of",
                 "needs_context", "observe", "set_cookie", "load_changed", "health",
                 "checker", "limits", "pending", "queue_timeout", "retry", "request_timeout",
                 "failure_statuses", "rng", "_release_timer", "_release_at", "guarded")

    def __init__(self, spec: Cluster, loop: asyncio.AbstractEventLoop) -> None:
        self.name = spec.name
        self.loop = loop
        clock = MonotonicClock()
        backends = [Backend(*parse_address(b.address), weight=b.weight, backup=b.backup)
                    for b in spec.backends]
        name, options = policy_spec(spec.policy)
        self.policy = create_policy(name, options)
        self.needs_context = self.policy.needs_context
        outlier = spec.outlier_detection
        self.health = ClusterHealth(
            spec.name, backends, clock=clock, panic_threshold=spec.panic_threshold,
            outlier=None if outlier is None else OutlierDetector(
                clock=clock, consecutive_failures=outlier.consecutive_failures,
                consecutive_gateway_errors=outlier.consecutive_gateway_errors,
                base_ejection_time=outlier.base_ejection_time,
                max_ejection_time=outlier.max_ejection_time,
                max_ejection_percent=outlier.max_ejection_percent * 100),
            on_change=self._use)
        # Statuses that count as failures for outlier detection (None: not detecting).
        self.failure_statuses = None if outlier is None else frozenset(
            code for lo, hi in outlier.failure_statuses for code in range(lo, hi + 1))
        self._release_timer: asyncio.TimerHandle | None = None
        self._release_at = 0.0
        self.limits = ClusterLimits(
            max_connections=spec.max_connections, max_pending=spec.max_pending,
            max_requests=spec.max_requests, max_retries=spec.max_retries,
        ) if _has_limits(spec) else None
        # Requests waiting for a connection while a connection limit is reached.
        self.pending: deque[Any] = deque()     # of Exchange
        self.queue_timeout = spec.queue_timeout
        self.retry = None if spec.retries is None else RetryPolicy(spec.retries, clock)
        self.request_timeout = spec.request_timeout
        # Whether a request needs resilience.admit at all (the common case skips it).
        self.guarded = (self.limits is not None or self.retry is not None
                        or self.request_timeout is not None)
        self.rng = random.Random()
        per_try = spec.retries.per_try_timeout if spec.retries is not None else None
        limit_of = {(b.host, b.port): c.max_connections
                    for b, c in zip(backends, spec.backends, strict=True)}
        snapshot = self.health.snapshot
        self.pools = {
            b: UpstreamPool(b, snapshot.stats[b], self, max_idle=spec.keepalive_max_idle,
                            idle_timeout=spec.keepalive_idle_timeout,
                            connect_timeout=spec.connect_timeout,
                            response_timeout=per_try or spec.response_header_timeout,
                            max_connections=limit_of[(b.host, b.port)], loop=loop)
            for b in snapshot.backends
        }
        # Keyed by identity: the picker returns this cluster's own Backend objects,
        # and id() skips hashing a dataclass on every request.
        self._pool_of = {id(b): pool for b, pool in self.pools.items()}
        self.checker = None if spec.health_check is None else HealthChecker(
            _check_settings(spec.health_check), backends, self._check_result, loop=loop)
        self._use(snapshot)

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Start active health checks (if configured)."""
        if self.checker is not None:
            self.checker.start()

    def stop(self) -> None:
        if self.checker is not None:
            self.checker.stop()
        if self._release_timer is not None:
            self._release_timer.cancel()
            self._release_timer = None

    # -- the request path ----------------------------------------------------------------

    # (Exchanges and connections are typed loosely here: ClusterRuntime only calls
    # what it documents on them, and tests drive it with stand-ins.)

    def choose(self, ex: Any) -> UpstreamPool:
        """The pool of the backend the policy prefers for ``ex`` (the picker only
        knows backends that may take traffic)."""
        picker = self.picker
        if picker is None:
            raise NoBackendAvailable(f"cluster {self.name}: no healthy backend")
        return self._pool_of[id(picker.pick(ex.context() if self.needs_context else None))]

    def fallback(self, ex: Any, tried: list[UpstreamPool]) -> UpstreamPool | None:
        """The next backend's pool for ``ex`` that is not in ``tried``, or None."""
        if self.picker is None:
            return None
        for backend in self.picker.candidates(ex.context() if self.needs_context else None):
            pool = self._pool_of[id(backend)]
            if pool not in tried:
                return pool
        return None

    def report(self, pool: UpstreamPool, outcome: Outcome) -> None:
        """One attempt's outcome, for outlier detection.  The request path calls this
        for failures, and for a success only while the backend has a failure streak."""
        pool.failing = outcome is not Outcome.SUCCESS
        self.health.report(pool.backend, outcome)
        if outcome is not Outcome.SUCCESS:
            self._schedule_release()

    def outcome_of(self, status: int) -> Outcome:
        """How outlier detection counts a response with ``status``."""
        statuses = self.failure_statuses
        if statuses is None or status not in statuses:
            return Outcome.SUCCESS
        return Outcome.GATEWAY_ERROR if 502 <= status <= 504 else Outcome.ERROR

    # -- the queue of requests waiting for a connection ----------------------------------

    def hand_over(self, pool: UpstreamPool, conn: Any) -> bool:
        """``conn`` of ``pool`` was released while requests wait: give it to the first
        one waiting for that backend.  When only requests for other backends wait and
        the cluster-wide connection limit holds them, close it to make room.  True when
        ``conn`` was taken (the caller must not pool it)."""
        for ex in self.pending:
            if ex.pool is pool:
                ex.dequeued(conn)
                return True
        limits = self.limits
        if limits is not None and limits.can_connect(0, None) is not None:
            conn.close()
            return True
        return False

    def connection_freed(self) -> None:
        """A connection closed: let the first waiting request that may now connect."""
        limits = self.limits
        assert limits is not None       # (requests queue only under limits)
        for ex in self.pending:
            if limits.can_connect(ex.pool.active, ex.pool.max_connections) is None:
                ex.dequeued(None)
                return

    def free_idle_connection(self) -> None:
        """Close the longest-idle connection of any backend: a request waits for the
        cluster's connection limit while connections sit idle elsewhere."""
        oldest: Any = None
        idle: Any
        for pool in self.pools.values():
            # (A connection the backend closed stays listed until taken: skip those,
            # closing them again frees nothing.)
            idle = pool.idle
            conn = next((c for c in idle if c.usable), None)
            if conn is not None and (oldest is None or conn.idle_since < oldest.idle_since):
                oldest = conn
        if oldest is not None:
            oldest.pool.idle.remove(oldest)
            oldest.close()

    # -- health ----------------------------------------------------------------------------

    def _use(self, snapshot: ClusterSnapshot) -> None:
        """Swap in a snapshot: the picker is rebuilt over its ready backends."""
        self.snapshot = snapshot
        ready = [b for b in snapshot.backends if snapshot.ready(b)]
        picker: Picker | None = build_picker(self.policy, snapshot.subset(ready)) \
            if ready else None
        self.picker = picker
        # Optional policy hooks (see poise.core.policies): None when the policy has none.
        policy_type = type(self.policy)
        hooks: Any = picker     # (optional hooks, not part of the Picker protocol)
        self.observe = hooks.observe if picker and hasattr(policy_type, "observe") else None
        self.set_cookie = (hooks.set_cookie if picker and hasattr(policy_type, "set_cookie")
                           else None)
        inner = getattr(picker, "_primary", picker)
        self.load_changed = (hooks.load_changed if picker and hasattr(inner, "load_changed")
                             else None)

    def _check_result(self, backend: Backend, healthy: bool) -> None:
        if healthy:
            self.health.recovered(backend)
        else:
            self.health.set_flag(backend, HealthFlag.ACTIVE_CHECK_FAILED, True)

    def _schedule_release(self) -> None:
        """Arm the timer for the earliest ejection end (re-armed if it moved earlier)."""
        when = self.health.next_release()
        timer = self._release_timer
        if timer is not None:
            if when is not None and when >= self._release_at:
                return
            timer.cancel()
            self._release_timer = None
        if when is None:
            return
        self._release_at = when
        delay = max(0.0, when - MonotonicClock().now())
        self._release_timer = self.loop.call_later(delay, self._release)

    def _release(self) -> None:
        self._release_timer = None
        self.health.tick()
        self._schedule_release()

    def status(self) -> dict:
        """JSON-able state for operators (health flags, panic, limits)."""
        state = self.health.status()
        if self.checker is not None:
            for entry, backend in zip(state["backends"], self.health.snapshot.backends,
                                      strict=False):
                entry["check"] = self.checker.last_result(backend)
        if self.limits is not None:
            state["overflows"] = {k.value: v for k, v in self.limits.overflows.items()}
        return state

    def __repr__(self) -> str:
        return f"<ClusterRuntime {self.name} {self.snapshot!r}>"


def _has_limits(spec: Cluster) -> bool:
    return (spec.max_connections is not None or spec.max_pending is not None
            or spec.max_requests is not None or spec.max_retries is not None
            or any(b.max_connections is not None for b in spec.backends))


def _check_settings(spec) -> CheckSettings:
    return CheckSettings(type=spec.type, path=spec.path, method=spec.method, host=spec.host,
                         expect_status=tuple(spec.expect_status),
                         expect_body=spec.expect_body, interval=spec.interval,
                         timeout=spec.timeout, jitter=spec.jitter, rise=spec.rise,
                         fall=spec.fall)
