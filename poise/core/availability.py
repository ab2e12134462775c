"""Which backends of a cluster may take traffic: health flags, outlier ejection and
panic mode, decided in one place and published as a :class:`ClusterSnapshot`.

Sources set and clear only their own :class:`HealthFlag` (the prober
``ACTIVE_CHECK_FAILED``, an operator ``DRAINED``, passive outlier detection
``OUTLIER_EJECTED``); a backend is *healthy* when no flag is set.  From the flags,
:class:`ClusterHealth` derives the snapshot's unready set:

* **Normal:** every backend with a flag is unready.
* **Panic** (Envoy's panic threshold): when some but fewer than ``panic_threshold`` of
  the primary backends in service are healthy, every primary in service is ready
  ("fail open"): the healthy few would otherwise take the whole load and fall over too,
  turning a partial outage into a total one, while a flagged backend often still
  answers most requests.  Backups keep their own state.  Drained primaries are not in
  service: they count neither way in the share and stay unready, because a drain is an
  operator's order (say, a rolling restart of half the cluster), not a failure.
* **All down:** when no backend at all (primaries and backups) is healthy, every
  backend is unready and ``panic`` is False, so the proxy answers 503 at once instead
  of waiting on backends known to fail (HAProxy's behaviour when all servers are down);
  fail-open is for partial failure only.

Pure and single-threaded: call it from one thread (the event loop or the control
plane's), with the clock it was given.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping

from poise.core.backend import Backend
from poise.core.clock import Clock
from poise.core.cluster import ClusterSnapshot
from poise.core.health import HealthFlag, set_flag
from poise.core.outlier import Outcome, OutlierDetector

log = logging.getLogger("poise")

_Key = tuple[str, int]
_NONE = HealthFlag(0)


def _key(backend: Backend) -> _Key:
    # By address, as ClusterSnapshot.build keeps stats: a reweighted backend is the same
    # server with the same health.
    return (backend.host, backend.port)


def flag_names(flags: HealthFlag) -> list[str]:
    """``flags`` as lower-case names in declaration order, e.g. ``["drained"]``."""
    return [f.name.lower() for f in HealthFlag if f in flags and f.name]


class ClusterHealth:
    """Health state of one cluster and its current :attr:`snapshot`.

    ``panic_threshold`` (default 0.5) is a fraction of the primary backends in service;
    0 disables panic mode.  ``outlier`` (default None: no passive ejection) receives
    the outcomes given to :meth:`report`, keyed by ``(host, port)``.  ``on_change`` is
    called with the new snapshot after each rebuild (not for the initial one).

    :attr:`snapshot` is rebuilt, with stats carried over, only when the ready set,
    membership or ``ready_since`` changes; otherwise it stays the same object.
    ``ready_since`` maps each backend that (re)became healthy after it joined to the
    clock time it did (backends healthy from the start are absent, i.e. long ago, so
    slow start ramps only backends that came back or were added later); unhealthy
    backends have no entry.
    """

    def __init__(self, name: str, backends: Iterable[Backend], *, clock: Clock,
                 panic_threshold: float = 0.5, outlier: OutlierDetector | None = None,
                 on_change: Callable[[ClusterSnapshot], None] | None = None) -> None:
        if not 0 <= panic_threshold <= 1:
            raise ValueError("panic_threshold must be a fraction between 0 and 1")
        self.name = name
        self.panic_threshold = panic_threshold
        self._clock = clock
        self._outlier = outlier
        self._on_change = on_change
        members = _unique(backends)
        self._flags: dict[_Key, HealthFlag] = {_key(b): _NONE for b in members}
        self._since: dict[_Key, float] = {}
        self._all_down = False
        # Outlier ejections so far, by backend address (for metrics).
        self.ejections: dict[str, int] = {}
        unready, self.panic = self._decide(members)
        self._unready = unready
        self.snapshot = ClusterSnapshot.build(name, members, unready=unready,
                                              ready_since=self._ready_since(members))

    # -- inputs -------------------------------------------------------------------------

    def set_flag(self, backend: Backend, flag: HealthFlag, on: bool) -> None:
        """Set or clear one ``flag`` of ``backend`` (others are untouched).  A backend
        that is not a member (say, removed while its probe ran) is ignored."""
        if self._change(_key(backend), flag, on):
            self._refresh()

    def report(self, backend: Backend, outcome: Outcome) -> None:
        """One attempt's outcome, for outlier detection; an ejection sets
        ``OUTLIER_EJECTED`` until :meth:`tick` releases it.  No-op without a detector
        or for a backend that is not a member."""
        key = _key(backend)
        if self._outlier is None or key not in self._flags:
            return
        if self._outlier.report(key, outcome, len(self.snapshot.backends)):
            log.info("cluster %s: backend %s ejected as an outlier", self.name, backend.address)
            self.ejections[backend.address] = self.ejections.get(backend.address, 0) + 1
            if self._change(key, HealthFlag.OUTLIER_EJECTED, True):
                self._refresh()

    def recovered(self, backend: Backend) -> None:
        """The backend's active check came back up (it was down and passed ``rise``
        probes): clear ``ACTIVE_CHECK_FAILED`` and end an outlier ejection early,
        since the ejection most likely came from the same outage."""
        key = _key(backend)
        changed = self._change(key, HealthFlag.ACTIVE_CHECK_FAILED, False)
        if self._end_ejection(key) or changed:
            self._refresh()

    def tick(self) -> None:
        """Release the ejections that have ended (a released backend takes traffic
        again unless another flag is set).  Call at :meth:`next_release`."""
        if self._outlier is None:
            return
        changed = False
        for key in self._outlier.release_expired():
            changed |= self._change(key, HealthFlag.OUTLIER_EJECTED, False)  # type: ignore[arg-type]
        if changed:
            self._refresh()

    def next_release(self) -> float | None:
        """Clock time at which the earliest ejection ends; None when nothing is ejected."""
        if self._outlier is None:
            return None
        ends = [self._outlier.ejected_until(key) for key in self._flags]
        return min((end for end in ends if end is not None), default=None)

    def set_backends(self, backends: Iterable[Backend]) -> None:
        """New membership.  Backends that stay (same host and port) keep their flags and
        ejection records; removed ones are forgotten; added ones start healthy, with
        ``ready_since`` now (they are cold, so slow start ramps them)."""
        self._refresh(self._set_members(backends))

    def update(self, backends: Iterable[Backend], flags: Mapping[_Key, HealthFlag],
               owned: HealthFlag) -> None:
        """New membership (as :meth:`set_backends`) and, for every member, the flags in
        ``owned`` set as in ``flags`` (keyed by ``(host, port)``; absent = none), in one
        rebuild: how a worker applies a control plane snapshot, whose source owns the
        active-check and drain flags while outlier ejection stays the worker's own.
        Clearing ``ACTIVE_CHECK_FAILED`` ends an outlier ejection, as :meth:`recovered`."""
        members = self._set_members(backends)
        for b in members:
            key = _key(b)
            want = flags.get(key, _NONE) & owned
            have = self._flags[key] & owned
            for flag in HealthFlag:
                if flag & owned and (flag in want) != (flag in have):
                    self._change(key, flag, flag in want)
            if HealthFlag.ACTIVE_CHECK_FAILED in have & ~want:
                self._end_ejection(key)         # (as recovered)
        self._refresh(members)

    def _end_ejection(self, key: _Key) -> bool:
        """End an outlier ejection of ``key`` early; True when one ended."""
        if self._outlier is None or not self._outlier.end_ejection(key):
            return False
        return self._change(key, HealthFlag.OUTLIER_EJECTED, False)

    def configure(self, panic_threshold: float, outlier: OutlierDetector | None) -> None:
        """New settings (a config reload).  Pass the current detector to keep its
        records; a different one (or None) ends every ejection in progress."""
        if not 0 <= panic_threshold <= 1:
            raise ValueError("panic_threshold must be a fraction between 0 and 1")
        self.panic_threshold = panic_threshold
        if outlier is not self._outlier:
            self._outlier = outlier
            for key in list(self._flags):
                self._change(key, HealthFlag.OUTLIER_EJECTED, False)
        self._refresh()

    @property
    def outlier(self) -> OutlierDetector | None:
        return self._outlier

    def _set_members(self, backends: Iterable[Backend]) -> tuple[Backend, ...]:
        members = _unique(backends)
        keys = {_key(b) for b in members}
        for key in [k for k in self._flags if k not in keys]:
            del self._flags[key]
            self._since.pop(key, None)
            if self._outlier is not None:
                self._outlier.forget(key)
        now = self._clock.now()
        for key in keys - self._flags.keys():
            self._flags[key] = _NONE
            self._since[key] = now
        return members

    # -- outputs ------------------------------------------------------------------------

    def flags(self, backend: Backend) -> HealthFlag:
        """The flags set on ``backend`` (empty for a healthy or unknown backend)."""
        return self._flags.get(_key(backend), _NONE)

    def status(self) -> dict:
        """JSON-able state for the admin API: cluster name, panic, healthy and total
        counts, and per backend its address, backup role, flag names and readiness."""
        snap = self.snapshot
        return {
            "cluster": self.name,
            "panic": self.panic,
            "healthy": sum(1 for b in snap.backends if not self._flags[_key(b)]),
            "total": len(snap.backends),
            "backends": [{"address": b.address, "backup": b.backup,
                          "flags": flag_names(self._flags[_key(b)]), "ready": snap.ready(b)}
                         for b in snap.backends],
        }

    def __repr__(self) -> str:
        status = self.status()
        panic = " PANIC" if self.panic else ""
        return f"<ClusterHealth {self.name} healthy={status['healthy']}/{status['total']}{panic}>"

    # -- decisions ----------------------------------------------------------------------

    def _change(self, key: _Key, flag: HealthFlag, on: bool) -> bool:
        """Update one flag; True when the backend's flags changed."""
        old = self._flags.get(key)
        if old is None:
            return False
        new = set_flag(old, flag, on)
        if new == old:
            return False
        self._flags[key] = new
        if bool(old) != bool(new):
            if new:
                self._since.pop(key, None)
            else:
                self._since[key] = self._clock.now()
            log.info("cluster %s: backend %s is %s (flags: %s)", self.name,
                     Backend(*key).address, "down" if new else "up",
                     ", ".join(flag_names(new)) or "none")
        return True

    def _decide(self, members: tuple[Backend, ...]) -> tuple[frozenset[Backend], bool]:
        """The unready set and whether the cluster is in panic mode."""
        flags = self._flags
        unready = {b for b in members if flags[_key(b)]}
        if len(unready) == len(members):
            return frozenset(members), False
        in_service = [b for b in members
                      if not b.backup and HealthFlag.DRAINED not in flags[_key(b)]]
        if self.panic_threshold > 0 and in_service:
            # Divide rather than multiply the threshold: 3 / 10 == 0.3 but 0.3 * 10 > 3.
            share = sum(1 for b in in_service if not flags[_key(b)]) / len(in_service)
            if 0 < share < self.panic_threshold:
                return frozenset(unready.difference(in_service)), True
        return frozenset(unready), False

    def _ready_since(self, members: tuple[Backend, ...]) -> dict[Backend, float]:
        since = self._since
        return {b: since[_key(b)] for b in members if _key(b) in since}

    def _refresh(self, members: tuple[Backend, ...] | None = None) -> None:
        """Recompute readiness; rebuild and publish the snapshot if it changed."""
        snap = self.snapshot
        if members is None:
            members = snap.backends
        unready, panic = self._decide(members)
        self._log_mode(members, unready, panic)
        ready_since = self._ready_since(members)
        if (members == snap.backends and unready == self._unready
                and ready_since == snap.ready_since):
            return
        self._unready = unready
        self.snapshot = ClusterSnapshot.build(self.name, members, snap, unready, ready_since)
        if self._on_change is not None:
            self._on_change(self.snapshot)

    def _log_mode(self, members: tuple[Backend, ...], unready: frozenset[Backend],
                  panic: bool) -> None:
        if panic != self.panic:
            self.panic = panic
            primaries = [b for b in members if not b.backup]
            healthy = sum(1 for b in primaries if not self._flags[_key(b)])
            if panic:
                log.warning("cluster %s: panic mode: %d of %d primary backends healthy "
                            "(threshold %g%%), sending traffic to all of them",
                            self.name, healthy, len(primaries), self.panic_threshold * 100)
            else:
                log.info("cluster %s: panic mode over: %d of %d primary backends healthy",
                         self.name, healthy, len(primaries))
        all_down = bool(members) and len(unready) == len(members)
        if all_down != self._all_down:
            self._all_down = all_down
            if all_down:
                log.warning("cluster %s: no healthy backend", self.name)
            else:
                log.info("cluster %s: a backend is healthy again", self.name)


def _unique(backends: Iterable[Backend]) -> tuple[Backend, ...]:
    members = tuple(backends)
    if len({_key(b) for b in members}) != len(members):
        raise ValueError("two backends of a cluster share an address")
    return members
