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
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from poise.config.load import policy_spec
from poise.config.model import Cluster
from poise.control.state import Member, members_of
from poise.core.availability import ClusterHealth
from poise.core.backend import Backend
from poise.core.clock import MonotonicClock
from poise.core.cluster import ClusterSnapshot
from poise.core.health import HealthFlag
from poise.core.limits import ClusterLimits
from poise.core.outlier import Outcome, OutlierDetector
from poise.core.policies import Picker, build_picker, create_policy
from poise.core.policies.rotation import RotationPicker
from poise.core.retry import RetryBudget
from poise.errors import NoBackendAvailable
from poise.proxy.http.pool import UpstreamPool

if TYPE_CHECKING:
    from poise.config.model import OutlierDetection, Retries

log = logging.getLogger("poise")
# The health flags a control plane snapshot sets (outlier ejection stays per worker).
CONTROL_FLAGS = HealthFlag.ACTIVE_CHECK_FAILED | HealthFlag.DRAINED


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
    """A cluster's snapshot, picker, pools and resilience state (one worker).

    Built from the cluster's settings (``spec``) and its backends as the control plane
    sees them (``members``; default: the backends listed in ``spec``, all up).  Later
    snapshots arrive through :meth:`apply_members` and new settings through
    :meth:`reconfigure`; both swap the picker whole between requests, and keep the
    stats, pools and outlier state of every backend whose address stays."""

    __slots__ = ("name", "loop", "spec", "policy", "snapshot", "picker", "pools", "_pool_of",
                 "needs_context", "observe", "set_cookie", "load_changed", "health",
                 "limits", "pending", "queue_timeout", "retry", "request_timeout",
                 "failure_statuses", "rng", "_release_timer", "_release_at", "guarded",
                 "_clock", "_retired", "members", "retries", "tls_context", "_stream_tls",
                 "send_proxy_protocol", "h2", "_rotor", "_rotation")

    def __init__(self, spec: Cluster, loop: asyncio.AbstractEventLoop,
                 members: Sequence[Member] | None = None) -> None:
        self.name = spec.name
        self.loop = loop
        self.spec = spec
        clock = self._clock = MonotonicClock()
        members = self.members = tuple(members_of(spec) if members is None else members)
        backends = [_backend(m) for m in members]
        name, options = policy_spec(spec.policy)
        self.policy = create_policy(name, options)
        self.needs_context = self.policy.needs_context
        self.health = ClusterHealth(spec.name, backends, clock=clock,
                                    panic_threshold=spec.panic_threshold,
                                    outlier=_detector(spec.outlier_detection, clock),
                                    on_change=self._use)
        self.failure_statuses = _failure_statuses(spec.outlier_detection)
        self._release_timer: asyncio.TimerHandle | None = None
        self._release_at = 0.0
        self.limits: ClusterLimits | None = None
        # Requests waiting for a connection while a connection limit is reached.
        self.pending: deque[Any] = deque()     # of Exchange
        self.rng = random.Random()
        # Retries sent (per the retries policy), for metrics.
        self.retries = 0
        self.pools: dict[Backend, UpstreamPool] = {}
        # Keyed by identity: the picker returns this cluster's own Backend objects,
        # and id() skips hashing a dataclass on every request.
        self._pool_of: dict[int, UpstreamPool] = {}
        self.picker: Picker | None = None      # (set by _use)
        # The picker when it is a RotationPicker (else None), and the pool of each
        # position of its schedule: a round-robin pick is then an index (_index_rotation).
        self._rotor: RotationPicker | None = None
        self._rotation: list[UpstreamPool] = []
        # Pools of removed backends whose connections are still open (limits count them).
        self._retired: list[UpstreamPool] = []
        # Resolved by _settle:
        self.queue_timeout = 0.0
        self.retry: RetryPolicy | None = None
        self.request_timeout: float | None = None
        self.guarded = False
        # TLS towards the backends (an ssl.SSLContext, None: plain) and the PROXY
        # header version to start each backend connection with (None: none).
        self.tls_context: Any = None
        self._stream_tls: Any = None
        self.send_proxy_protocol: str | None = None
        self.h2 = False
        self._settle(spec)
        self._use_tls(spec)
        self.health.update(backends, _flags(members), CONTROL_FLAGS)
        self._sync_pools(members)
        self._use(self.health.snapshot)

    # -- lifecycle -----------------------------------------------------------------------

    def stop(self) -> None:
        """Release timers and close idle connections (the cluster is going away:
        requests in flight finish, their connections are then closed)."""
        if self._release_timer is not None:
            self._release_timer.cancel()
            self._release_timer = None
        for pool in self.pools.values():
            pool.max_idle = 0
            pool.close_idle()

    # -- snapshots and settings from the control plane -----------------------------------

    def apply_members(self, members: Sequence[Member]) -> None:
        """A new snapshot of the backends: membership, weights and the flags the control
        plane owns (active checks, drains).  Requests in flight on a removed backend
        finish, then its connections close; its idle ones close now."""
        members = self.members = tuple(members)
        # (A changed snapshot reaches _use through the health's on_change.)
        self.health.update([_backend(m) for m in members], _flags(members), CONTROL_FLAGS)
        self._sync_pools(members)
        self._settle(self.spec, renew_retry=False)

    def reconfigure(self, spec: Cluster) -> None:
        """New settings from a reload (same name).  Caps change in place, so requests
        in flight release what they hold; a changed policy or retry policy starts
        fresh; changed outlier settings end the ejections in progress."""
        old = self.spec
        self.spec = spec
        if spec.policy != old.policy:
            name, options = policy_spec(spec.policy)
            self.policy = create_policy(name, options)
            self.needs_context = self.policy.needs_context
        outlier = (self.health.outlier if spec.outlier_detection == old.outlier_detection
                   else _detector(spec.outlier_detection, self._clock))
        self.failure_statuses = _failure_statuses(spec.outlier_detection)
        snapshot = self.health.snapshot
        self.health.configure(spec.panic_threshold, outlier)
        if self.health.snapshot is snapshot:    # (else on_change has rebuilt the picker)
            self._use(snapshot)
        self._settle(spec, renew_retry=spec.retries != old.retries)
        self._use_tls(spec)
        # Open connections with a PROXY header name one client; those without one were
        # made for a backend that wanted none: neither may serve the new setting.
        reopen = spec.send_proxy_protocol != old.send_proxy_protocol
        for pool in self.pools.values():
            self._pool_settings(pool)
            if reopen:
                pool.disown()
        self._release_pending()

    def _settle(self, spec: Cluster, renew_retry: bool = True) -> None:
        """Resolve the limits, queue, retry and deadline settings for the request path."""
        caps = _has_limits(spec) or any(m.max_connections is not None for m in self.members)
        limits = self.limits
        if limits is not None:
            # Kept (caps lifted to None if gone): requests in flight still release slots.
            limits.configure(max_connections=spec.max_connections,
                             max_pending=spec.max_pending, max_requests=spec.max_requests,
                             max_retries=spec.max_retries)
        elif caps:
            limits = self.limits = ClusterLimits(
                max_connections=spec.max_connections, max_pending=spec.max_pending,
                max_requests=spec.max_requests, max_retries=spec.max_retries)
            # Connections opened before there were limits close through them too.
            limits.connections = sum(p.active for p in [*self.pools.values(), *self._retired])
        self.queue_timeout = spec.queue_timeout
        if renew_retry or (spec.retries is None) != (self.retry is None):
            self.retry = None if spec.retries is None else RetryPolicy(spec.retries,
                                                                       self._clock)
        self.request_timeout = spec.request_timeout
        # Whether a request needs resilience.admit at all (the common case skips it).
        self.guarded = (self.limits is not None or self.retry is not None
                        or self.request_timeout is not None)

    def _use_tls(self, spec: Cluster) -> None:
        """Origination settings; a reload reads the CA and client certificate files
        again (new connections use them; pooled ones keep their session)."""
        self.send_proxy_protocol = spec.send_proxy_protocol
        # HTTP/2 to the backends (poise.proxy.http2.upstream): requests go through
        # Exchange._send's h2 branch.
        self.h2 = spec.protocol == "h2"
        self._stream_tls = None
        if spec.tls is None:
            self.tls_context = None
        else:
            from poise.proxy.tls import client_context
            self.tls_context = client_context(spec.tls,
                                              alpn=("h2",) if self.h2 else ("http/1.1",))

    def stream_tls_context(self) -> Any:
        """The TLS context of tcp listeners' connections: as ``tls_context`` but
        offering no ALPN protocol (the bytes relayed need not be HTTP); None: plain."""
        if self.tls_context is None:
            return None
        if self._stream_tls is None:
            from poise.proxy.tls import client_context
            self._stream_tls = client_context(self.spec.tls, alpn=())  # type: ignore[arg-type]
        return self._stream_tls

    def server_name(self, backend: Backend) -> str | None:
        """The TLS server name to send (and verify) to ``backend`` (TLS clusters)."""
        tls = self.spec.tls
        return backend.host if tls is None else (tls.sni or backend.host)

    def _sync_pools(self, members: Sequence[Member]) -> None:
        """One pool per backend of the snapshot, kept by address (with its idle
        connections and stats) and pointed at the backend's current object."""
        snapshot = self.health.snapshot
        old = {(p.backend.host, p.backend.port): p for p in self.pools.values()}
        caps = {(m.host, m.port): m.max_connections for m in members}
        pools: dict[Backend, UpstreamPool] = {}
        for b in snapshot.backends:
            key = (b.host, b.port)
            pool = old.pop(key, None)
            if pool is None:
                pool = UpstreamPool(b, snapshot.stats[b], self, max_idle=0, idle_timeout=0.0,
                                    connect_timeout=0.0, response_timeout=0.0, loop=self.loop)
            pool.backend = b
            pool.max_connections = caps.get(key)
            self._pool_settings(pool)
            pools[b] = pool
        for pool in old.values():
            pool.max_idle = 0       # connections released from now on are closed
            pool.close_idle()
            if pool.active:
                self._retired.append(pool)
        self._retired = [p for p in self._retired if p.active]
        self.pools = pools
        self._pool_of = {id(b): pool for b, pool in pools.items()}
        self._index_rotation()

    def _index_rotation(self) -> None:
        """Index a RotationPicker's schedule by position (``_rotation``); until every
        backend of it has a pool (a snapshot's picker can come just before its pools),
        picks look the pool up by backend."""
        picker = self.picker
        self._rotor = None
        if isinstance(picker, RotationPicker):
            rotation: list[UpstreamPool] = []
            for backend in picker.schedule:
                pool = self._pool_of.get(id(backend))
                if pool is None:
                    return
                rotation.append(pool)
            self._rotation = rotation
            self._rotor = picker

    def _pool_settings(self, pool: UpstreamPool) -> None:
        spec = self.spec
        per_try = spec.retries.per_try_timeout if spec.retries is not None else None
        pool.max_idle = spec.keepalive_max_idle
        pool.idle_timeout = spec.keepalive_idle_timeout
        # Only plain HTTP/1.1 connections are parked (see pool.py); those parked before
        # a reload to TLS, PROXY headers or HTTP/2 must not be revived as they are.
        plain = self.tls_context is None and self.send_proxy_protocol is None and not self.h2
        pool.park_after = spec.keepalive_park_after if plain else 0.0
        if not plain:
            pool.close_parked()
        pool.connect_timeout = spec.connect_timeout
        pool.response_timeout = per_try or spec.response_header_timeout

    def _release_pending(self) -> None:
        """Let queued requests go that the (maybe lifted) caps now allow."""
        while self.pending and self.limits is not None and self.connection_freed():
            pass

    # -- the request path ----------------------------------------------------------------

    # (Exchanges and connections are typed loosely here: ClusterRuntime only calls
    # what it documents on them, and tests drive it with stand-ins.)

    def choose(self, ex: Any) -> UpstreamPool:
        """The pool of the backend the policy prefers for ``ex`` (the picker only
        knows backends that may take traffic)."""
        picker = self.picker
        if picker is None:
            raise NoBackendAvailable(f"cluster {self.name}: no healthy backend")
        rotor = self._rotor
        if rotor is not None:   # (round robin: a native call and a list index, compiled)
            return self._rotation[rotor.pick_index()]
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
        ``conn`` was taken (the caller must not pool it).  A private connection (one
        that began with a PROXY header) only goes to a request of its own client."""
        owner = conn.owner
        for ex in self.pending:
            if ex.pool is pool and (owner is None or ex.client is owner):
                ex.dequeued(conn)
                return True
        limits = self.limits
        if limits is not None and limits.can_connect(0, None) is not None:
            conn.close()
            return True
        return False

    def connection_freed(self) -> bool:
        """A connection closed: let the first waiting request that may now connect
        (True when one did)."""
        limits = self.limits
        assert limits is not None       # (requests queue only under limits)
        for ex in self.pending:
            if limits.can_connect(ex.pool.active, ex.pool.max_connections) is None:
                ex.dequeued(None)
                return True
        return False

    def free_idle_connection(self) -> None:
        """Close the longest-idle connection of any backend: a request waits for the
        cluster's connection limit while connections sit idle elsewhere.  Parked ones
        go first (the longest parked): a warm one would serve sooner."""
        parked = [p for p in self.pools.values() if p.parked]
        if parked:
            min(parked, key=lambda p: p.parked_since[0]).close_oldest_parked()
            return
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
        self._index_rotation()

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
        if self.limits is not None:
            state["overflows"] = {k.value: v for k, v in self.limits.overflows.items()}
        return state

    def counters(self) -> dict[str, list[int]]:
        """Per backend address: ``[in_flight, requests, errors, ejected]`` in this
        worker (``ejected`` 1 when outlier detection has it out), for the control plane."""
        health = self.health
        out: dict[str, list[int]] = {}
        for backend, pool in self.pools.items():
            ejected = HealthFlag.OUTLIER_EJECTED in health.flags(backend)
            out[backend.address] = [pool.stats.in_flight, pool.requests, pool.errors,
                                    1 if ejected else 0]
        return out

    def __repr__(self) -> str:
        return f"<ClusterRuntime {self.name} {self.snapshot!r}>"


def _has_limits(spec: Cluster) -> bool:
    return (spec.max_connections is not None or spec.max_pending is not None
            or spec.max_requests is not None or spec.max_retries is not None
            or any(b.max_connections is not None for b in spec.backends))


def _backend(m: Member) -> Backend:
    return Backend(m.host, m.port, weight=m.weight, backup=m.backup)


def _flags(members: Sequence[Member]) -> dict[tuple[str, int], HealthFlag]:
    flags: dict[tuple[str, int], HealthFlag] = {}
    for m in members:
        if m.down or m.drained:
            flag = HealthFlag(0)
            if m.down:
                flag |= HealthFlag.ACTIVE_CHECK_FAILED
            if m.drained:
                flag |= HealthFlag.DRAINED
            flags[(m.host, m.port)] = flag
    return flags


def _detector(spec: OutlierDetection | None, clock: MonotonicClock) -> OutlierDetector | None:
    if spec is None:
        return None
    return OutlierDetector(
        clock=clock, consecutive_failures=spec.consecutive_failures,
        consecutive_gateway_errors=spec.consecutive_gateway_errors,
        base_ejection_time=spec.base_ejection_time, max_ejection_time=spec.max_ejection_time,
        max_ejection_percent=spec.max_ejection_percent * 100)


def _failure_statuses(spec: OutlierDetection | None) -> frozenset[int] | None:
    """Statuses that count as failures for outlier detection (None: not detecting)."""
    if spec is None:
        return None
    return frozenset(code for lo, hi in spec.failure_statuses for code in range(lo, hi + 1))
