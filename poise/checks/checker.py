"""The scheduler: one timer and one probe per backend, results fed into
:class:`poise.core.health.RiseFall`; the caller hears only about flips.

No Task per probe: each backend's cycle is ``loop.call_at`` → ``probe.run()`` → the
probe's result callback → ``loop.call_at`` for the next one.  Probes of one backend
never overlap: the next wait starts when the previous probe has reported.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Iterable

from poise.checks.grpc_probe import GrpcProbe
from poise.checks.handshake_probe import HandshakeProbe
from poise.checks.http_probe import HttpProbe
from poise.checks.probe import Probe
from poise.checks.settings import CheckSettings, align, first_wait, grid, next_wait
from poise.checks.tcp_probe import TcpProbe
from poise.core.backend import Backend
from poise.core.health import RiseFall, Transition

log = logging.getLogger("poise")

# check type → probe class; each takes (backend, settings, on_result, loop=...).
PROBES: dict[str, Callable[..., Probe]] = {"http": HttpProbe, "tcp": TcpProbe,
                                           "grpc": GrpcProbe}

Key = tuple[str, int]


def probe_class(settings: CheckSettings) -> Callable[..., Probe]:
    """The probe for ``settings``: a ``tcp`` check of a cluster with TLS or PROXY
    headers must complete those too, which a bare connect cannot."""
    if settings.type == "tcp" and (settings.tls is not None or settings.preamble):
        return HandshakeProbe
    return PROBES[settings.type]


class _Target:
    """One checked backend: its thresholds, probe, pending timer and last result."""

    __slots__ = ("backend", "health", "probe", "timer", "last", "probes", "stale")

    def __init__(self, backend: Backend, health: RiseFall) -> None:
        self.backend = backend
        self.health = health
        self.probe: Probe | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.last = "pending"
        self.probes = 0             # probes reported (probe_count)
        self.stale = False          # the probe was made with older settings


class HealthChecker:
    """Actively probes ``backends`` and calls ``on_change(backend, healthy)`` when one
    flips (after ``fall`` failures or ``rise`` passes in a row; see ``CheckSettings``).

    Every backend starts healthy.  :meth:`start` probes each one first at a random
    offset within one interval, to spread the load.  Backends are identified by
    ``(host, port)``: :meth:`set_backends` keeps the state of those that stay (and
    passes the new ``Backend`` object to later ``on_change`` calls).  ``on_change`` runs
    on the loop; an exception from it is logged, never propagated.  ``rng`` (default: a
    fresh ``random.Random()``) draws the offsets and jitter.
    """

    def __init__(self, settings: CheckSettings, backends: Iterable[Backend],
                 on_change: Callable[[Backend, bool], None], *,
                 loop: asyncio.AbstractEventLoop, rng: random.Random | None = None) -> None:
        self.settings = settings
        self._on_change = on_change
        self._loop = loop
        self._rng = rng if rng is not None else random.Random()
        self._probe_class = probe_class(settings)
        self._tick = grid(settings)
        self._first_max = settings.interval
        self._next_max = settings.interval * (1 + settings.jitter)
        self._targets: dict[Key, _Target] = {}
        self._running = False
        self.set_backends(backends)

    # -- public API --------------------------------------------------------------------

    def start(self) -> None:
        """Schedule the first probe of every backend; a no-op if already running."""
        if self._running:
            return
        self._running = True
        for target in self._targets.values():
            self._schedule(target, first_wait(self.settings, self._rng), self._first_max)

    def stop(self) -> None:
        """Cancel every timer and probe and close every connection; idempotent.
        Health states are kept (``start`` resumes probing)."""
        self._running = False
        for target in self._targets.values():
            self._halt(target)

    def renew(self, settings: CheckSettings) -> None:
        """Probe with ``settings`` from each backend's next probe on, keeping every
        health state: for a new TLS context (certificate files re-read on reload) or
        other transport settings. What is checked (type, request, thresholds, timing)
        must not change: that is a new checker."""
        self.settings = settings
        self._probe_class = probe_class(settings)
        for target in self._targets.values():
            target.stale = True

    def set_backends(self, backends: Iterable[Backend]) -> None:
        """Check exactly ``backends`` from now on: new ones start healthy and are first
        probed within one interval; removed ones stop being probed at once."""
        old = self._targets
        new: dict[Key, _Target] = {}
        for b in backends:
            key = (b.host, b.port)
            if key in new:
                continue
            target = old.get(key)
            if target is None:
                s = self.settings
                target = _Target(b, RiseFall(s.rise, s.fall, healthy=True))
                if self._running:
                    self._schedule(target, first_wait(s, self._rng), self._first_max)
            else:
                target.backend = b
            new[key] = target
        for key, target in old.items():
            if key not in new:
                self._halt(target)
        self._targets = new

    def healthy(self, backend: Backend) -> bool:
        """The backend's current state; ``KeyError`` if it is not being checked."""
        return self._targets[(backend.host, backend.port)].health.healthy

    def last_result(self, backend: Backend) -> str:
        """Short text of the backend's last probe result (``"pending"`` before the
        first); ``KeyError`` if it is not being checked."""
        return self._targets[(backend.host, backend.port)].last

    @property
    def backends(self) -> list[Backend]:
        """The backends being checked, in the order given."""
        return [t.backend for t in self._targets.values()]

    @property
    def probe_count(self) -> int:
        """Probes reported so far, summed over the current backends."""
        return sum(t.probes for t in self._targets.values())

    # -- the cycle ---------------------------------------------------------------------

    def _schedule(self, target: _Target, delay: float, longest: float) -> None:
        loop = self._loop
        when = align(loop.time(), delay, self._tick, longest)
        target.timer = loop.call_at(when, self._fire, target)

    def _fire(self, target: _Target) -> None:
        target.timer = None
        probe = target.probe
        if target.stale:
            target.stale = False
            if probe is not None:   # (its connection was opened the old way)
                probe.close()
                probe = target.probe = None
        if probe is None:
            probe = target.probe = self._probe_class(
                target.backend, self.settings,
                lambda ok, reason: self._reported(target, ok, reason), loop=self._loop)
        try:
            probe.run()
        except Exception as e:      # a bug in a probe must not stop the other backends
            log.exception("health check of %s crashed", target.backend.address)
            probe.close()
            self._reported(target, False, f"error: {type(e).__name__}")

    def _reported(self, target: _Target, ok: bool, reason: str) -> None:
        if self._targets.get((target.backend.host, target.backend.port)) is not target:
            return                  # removed while its probe was in flight
        target.last = reason
        target.probes += 1
        transition = target.health.observe(ok)
        if transition is not Transition.NONE:
            self._flipped(target, transition is Transition.FLIPPED_UP, reason)
        # on_change may have stopped the checker or removed this backend.
        if self._running and target.timer is None and target.probe is not None:
            self._schedule(target, next_wait(self.settings, self._rng), self._next_max)

    def _flipped(self, target: _Target, up: bool, reason: str) -> None:
        backend = target.backend
        log.info("backend %s is %s (%s)", backend.address, "up" if up else "down", reason)
        try:
            self._on_change(backend, up)
        except Exception:
            log.exception("health check on_change callback failed for %s", backend.address)

    def _halt(self, target: _Target) -> None:
        if target.timer is not None:
            target.timer.cancel()
            target.timer = None
        if target.probe is not None:
            target.probe.close()
            target.probe = None

    # -- introspection -----------------------------------------------------------------

    def pending(self) -> int:
        """How many timers and probes are live (0 after :meth:`stop`)."""
        return sum((t.timer is not None) + (t.probe is not None) for t in self._targets.values())

    def __repr__(self) -> str:
        up = sum(t.health.healthy for t in self._targets.values())
        state = "running" if self._running else "stopped"
        return (f"<HealthChecker {self.settings.type} {state} backends={len(self._targets)} "
                f"up={up} down={len(self._targets) - up}>")
