"""The control plane: the one place that owns runtime state (DESIGN.md §1).

It holds the running config and, per cluster, a :class:`ClusterState` (membership,
active-check verdicts, operator changes).  It runs the active health checks once,
whatever the number of workers; reloads the config file; carries out operators'
requests; and pushes every change to the workers as versioned whole snapshots through
its :class:`Fleet` (worker processes, or the data plane of this very process).

Everything here runs on one event loop and returns at once: nothing waits on a
worker, a backend or a file but :meth:`ControlPlane.reload`'s read of the config.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from typing import Any, Protocol

import poise
from poise.admin.ops import ReloadResult
from poise.checks import CheckSettings, HealthChecker
from poise.config.load import load_config
from poise.config.model import MAX_WEIGHT, Cluster, Config
from poise.config.units import parse_address
from poise.control.agent import Message, apply_message
from poise.control.binding import bind_error
from poise.control.dashboard import Dashboard
from poise.control.discovery import Discoveries
from poise.control.report import backend_entry, cluster_entry, redacted
from poise.control.state import ClusterState, Member, members_of
from poise.control.stats import StatsBook
from poise.core.backend import Backend
from poise.errors import ConfigError, ControlError, UnknownBackend, UnknownCluster
from poise.observability.book import MetricsBook, backend_of
from poise.observability.exposition import BackendState, PlaneState, render
from poise.proxy.proxy_protocol import header_for
from poise.proxy.tls import TlsConfigError, client_context

log = logging.getLogger("poise")


class Fleet(Protocol):
    """Where the control plane's messages go, and where the workers' counts come from."""

    def publish(self, message: Message) -> None:
        """Send ``message`` to every worker (and to those that start later, through
        :meth:`ControlPlane.state_message`)."""
        ...

    def stats(self) -> StatsBook:
        """The workers' latest counts (at most about a second old)."""
        ...

    def refresh_metrics(self, book: MetricsBook) -> None:
        """Bring ``book`` up to date where that needs asking (the data plane of this
        process); worker processes send theirs every second by themselves."""
        ...

    def workers(self) -> list[dict[str, Any]]: ...

    def resize(self, count: int) -> None:
        """Run ``count`` workers from now on (only when both counts are above 1)."""
        ...


class ControlPlane:
    """Runtime state, health checks, reload and operator changes (see module doc).

    ``path`` is the config file to re-read on reload (None: reload is refused).
    ``on_config`` callbacks run after each applied reload with the new config."""

    def __init__(self, config: Config, path: str | None,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.config = config
        self.path = path
        self.loop = loop
        self.version = 1
        # Digests of the certificate, key and CA files the config names: a reload with
        # the same config but rotated files re-reads them (see reload).
        self._tls_files = _tls_files(config)
        self.states = {c.name: ClusterState(c.name, members_of(c)) for c in config.clusters}
        self.checkers: dict[str, HealthChecker] = {}
        self.fleet: Fleet | None = None
        self.on_config: list[Callable[[Config], None]] = []
        # Counters summed over workers (and the control plane's own), for /metrics.
        self.metrics = MetricsBook()
        for result in ("applied", "unchanged", "rejected"):
            self.metrics.count(("reloads", result), 0)
        self._dirty: set[str] = set()
        self._flush: asyncio.Handle | None = None
        self._running = False
        self.dashboard_sampler = Dashboard(self, loop)
        self.discoveries = Discoveries(loop, self._discovered)

    # -- lifecycle ---------------------------------------------------------------------

    def attach(self, fleet: Fleet) -> None:
        self.fleet = fleet

    def start(self) -> None:
        """Start the active health checks (and the dashboard's sampling)."""
        self._running = True
        for spec in self.config.clusters:
            self._sync_checker(spec, None, self.states[spec.name])
        self.discoveries.sync(self.config)
        self.dashboard_sampler.start()

    def stop(self) -> None:
        self._running = False
        self.dashboard_sampler.stop()
        self.discoveries.stop()
        for checker in self.checkers.values():
            checker.stop()
        self.checkers.clear()
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None

    def state_message(self) -> Message:
        """Everything a worker needs before it accepts: the config and every view."""
        return apply_message(self.version, self.config,
                             [state.view for state in self.states.values()])

    # -- reload ------------------------------------------------------------------------

    def reload(self) -> ReloadResult:
        """Re-read the config file.  Invalid, or asking for what only a restart can do:
        rejected whole (the running config stays; errors logged and returned).  Valid:
        applied without dropping a connection or a request.  Unchanged (the TLS
        certificate, key and CA files it names included): nothing happens, not even a
        new version.  Changed files alone apply as a new version, which makes every
        listener and cluster read them again."""
        if self.path is None:
            return self._rejected([("", "poise was not started from a config file")])
        try:
            config = load_config(self.path)
        except ConfigError as e:
            return self._rejected(e.errors)
        problems = self._restart_only(config) + self._unbindable(config)
        if problems:
            return self._rejected(problems)
        files = _tls_files(config)
        if config == self.config and files == self._tls_files:
            self.metrics.count(("reloads", "unchanged"))
            log.info("reload: %s is unchanged (config version %d)", self.path, self.version)
            return ReloadResult(True, self.version)
        self._tls_files = files
        self._apply(config)
        self.metrics.count(("reloads", "applied"))
        log.info("reload: applied %s (config version %d)", self.path, self.version)
        return ReloadResult(True, self.version)

    def _rejected(self, errors: list[tuple[str, str]]) -> ReloadResult:
        self.metrics.count(("reloads", "rejected"))
        log.error("reload rejected, config version %d stays: %s", self.version,
                  "; ".join(f"{p}: {m}" if p else m for p, m in errors))
        return ReloadResult(False, self.version, list(errors))

    def _restart_only(self, config: Config) -> list[tuple[str, str]]:
        """Changes a running poise cannot make."""
        old = self.config
        problems = []
        if (old.workers == 1) != (config.workers == 1):
            problems.append(("workers", "changing between 1 worker and several needs a "
                                        "restart"))
        old_bind = old.admin.bind if old.admin else None
        new_bind = config.admin.bind if config.admin else None
        if old_bind != new_bind:
            problems.append(("admin", "adding, removing or moving the admin API needs a "
                                      "restart"))
        return problems

    def _unbindable(self, config: Config) -> list[tuple[str, str]]:
        """New listener addresses that another process holds (ours are kept bound)."""
        held = {parse_address(lst.bind) for lst in self.config.listeners}
        problems = []
        for i, lst in enumerate(config.listeners):
            if parse_address(lst.bind) in held:
                continue
            reason = bind_error(lst.bind)
            if reason is not None:
                problems.append((f"listeners[{i}].bind", f"cannot bind {lst.bind}: {reason}"))
        return problems

    def _apply(self, config: Config) -> None:
        old = {c.name: c for c in self.config.clusters}
        self.config = config
        self.version += 1
        if self._running:
            self.discoveries.sync(config)
        states: dict[str, ClusterState] = {}
        for spec in config.clusters:
            state = self.states.get(spec.name)
            members = self.discoveries.members(spec)    # (an empty set stays empty)
            if members is None:
                members = members_of(spec)
            if state is None:
                state = ClusterState(spec.name, members)
            else:
                state.set_members(members)
            states[spec.name] = state
            if self._running:
                self._sync_checker(spec, old.get(spec.name), state)
        for name in self.states.keys() - states.keys():
            checker = self.checkers.pop(name, None)
            if checker is not None:
                checker.stop()
        self.states = states
        self._dirty.clear()
        self._forget_removed()
        if self.fleet is not None:
            if config.workers != 1:
                self.fleet.resize(config.workers)
        self._publish(self.state_message())
        for callback in self.on_config:
            callback(config)

    # -- health checks -----------------------------------------------------------------

    def _sync_checker(self, spec: Cluster, old: Cluster | None, state: ClusterState) -> None:
        """Probe the backends of ``spec`` (``state``'s members) as its ``health_check``
        says (a changed check starts over; a changed membership keeps the verdicts of
        those that stay)."""
        checker = self.checkers.get(spec.name)
        backends = [Backend(m.host, m.port) for m in state.view.members]
        if checker is not None and (old is None or old.health_check != spec.health_check
                                    or old.tls != spec.tls
                                    or old.send_proxy_protocol != spec.send_proxy_protocol):
            checker.stop()
            del self.checkers[spec.name]
            checker = None
            for m in state.view.members:
                if state.set_down(m.key, False):
                    self._changed(spec.name)
        if spec.health_check is None:
            return
        try:
            settings = _check_settings(spec)
        except TlsConfigError as e:     # (the file changed since the config was checked)
            log.error("health checks of cluster %s: %s", spec.name, e)
            return
        if checker is None:
            checker = HealthChecker(
                settings, backends,
                lambda b, up, name=spec.name: self._checked(name, b, up), loop=self.loop)
            self.checkers[spec.name] = checker
            checker.start()
        else:
            if spec.tls is not None:
                checker.renew(settings)     # (the CA or client certificate re-read)
            checker.set_backends(backends)

    def _discovered(self, cluster: str, members: list[Member]) -> None:
        """A discovery source yielded ``cluster``'s new membership."""
        state = self.states.get(cluster)
        if state is None or not state.set_members(members):
            return
        log.info("discovery: cluster %s now has %d backends", cluster, len(members))
        checker = self.checkers.get(cluster)
        if checker is not None:
            checker.set_backends([Backend(m.host, m.port) for m in members])
        self._forget_removed()
        self._changed(cluster)

    def _forget_removed(self) -> None:
        """Drop the counts of backends no cluster has any more (so that they leave the
        admin API's totals and the metrics)."""
        kept = {(c, m.address) for c, s in self.states.items() for m in s.view.members}
        self.metrics.forget(lambda key: (b := backend_of(key)) is None or b in kept)
        if self.fleet is not None:
            self.fleet.stats().forget(kept)

    def _checked(self, cluster: str, backend: Backend, healthy: bool) -> None:
        state = self.states.get(cluster)
        if state is not None and state.set_down((backend.host, backend.port), not healthy):
            self.metrics.count(("health_transitions", cluster, backend.address,
                                "up" if healthy else "down"))
            self._changed(cluster)

    # -- publishing --------------------------------------------------------------------

    def _changed(self, cluster: str) -> None:
        """``cluster``'s view changed: push it at the end of this loop iteration, with
        whatever else changes in the same iteration (one message for many flips)."""
        self._dirty.add(cluster)
        if self._flush is None:
            self._flush = self.loop.call_soon(self._push_dirty)

    def _push_dirty(self) -> None:
        self._flush = None
        views = [self.states[n].view for n in sorted(self._dirty) if n in self.states]
        self._dirty.clear()
        if views:
            self._publish(apply_message(self.version, None, views))

    def _publish(self, message: Message) -> None:
        if self.fleet is not None:
            self.fleet.publish(message)

    # -- operations (the admin API; see poise.admin.ops.Operations) ---------------------

    def clusters(self) -> list[dict[str, Any]]:
        totals = self._totals()
        return [self._cluster_entry(spec, totals) for spec in self.config.clusters]

    def cluster(self, name: str) -> dict[str, Any]:
        return self._cluster_entry(self._spec(name), self._totals())

    def set_drained(self, cluster: str, address: str, drained: bool) -> dict[str, Any]:
        state, key = self._backend(cluster, address)
        if state.set_drained(key, drained):
            log.info("cluster %s: backend %s %s by an operator", cluster, address,
                     "drained" if drained else "enabled")
            self._publish(apply_message(self.version, None, [state.view]))
        return self._backend_entry(cluster, key)

    def set_weight(self, cluster: str, address: str, weight: int) -> dict[str, Any]:
        if isinstance(weight, bool) or not isinstance(weight, int) \
                or not 1 <= weight <= MAX_WEIGHT:
            raise ControlError(f"weight must be an integer from 1 to {MAX_WEIGHT}")
        state, key = self._backend(cluster, address)
        if state.set_weight(key, weight):
            log.info("cluster %s: backend %s weight set to %d by an operator", cluster,
                     address, weight)
            self._publish(apply_message(self.version, None, [state.view]))
        return self._backend_entry(cluster, key)

    def effective_config(self) -> dict[str, Any]:
        return redacted(self.config)

    def workers(self) -> list[dict[str, Any]]:
        return self.fleet.workers() if self.fleet is not None else []

    def dashboard(self) -> dict[str, Any]:
        return self.dashboard_sampler.data()

    def metrics_text(self) -> bytes:
        """The Prometheus exposition of everything above (``exposition.CONTENT_TYPE``)."""
        if self.fleet is not None:
            self.fleet.refresh_metrics(self.metrics)
        clusters = self.clusters()
        workers = self.workers()
        state = PlaneState(
            backends=[BackendState(c["name"], b["address"], b["state"], b["weight"])
                      for c in clusters for b in c["backends"]],
            listeners=[lst.name for lst in self.config.listeners],
            panic={c["name"]: c["panic"] for c in clusters},
            discovery={name: (s.state == "up", s.updates)
                       for name, s in self.discoveries.statuses().items()},
            config_version=self.version,
            workers=sum(1 for w in workers if w["state"] == "running"),
            worker_restarts=sum(w["restarts"] for w in workers),
            hot_path=poise.hot_path())
        return render(self.metrics, state)

    # -- helpers of the operations -------------------------------------------------------

    def _spec(self, name: str) -> Cluster:
        for spec in self.config.clusters:
            if spec.name == name:
                return spec
        raise UnknownCluster(f"no cluster named {name!r}")

    def _backend(self, cluster: str, address: str) -> tuple[ClusterState, tuple[str, int]]:
        self._spec(cluster)
        state = self.states[cluster]
        try:
            key = parse_address(address)
            state.member(key)
        except (ValueError, KeyError):
            raise UnknownBackend(f"cluster {cluster!r} has no backend {address!r}") from None
        return state, key

    def _totals(self) -> StatsBook:
        return self.fleet.stats() if self.fleet is not None else StatsBook()

    def _cluster_entry(self, spec: Cluster, book: StatsBook) -> dict[str, Any]:
        return {**cluster_entry(spec, self.states[spec.name].view, book,
                                self._check_reason(spec.name)),
                "discovery": self.discoveries.status(spec.name)}

    def _backend_entry(self, cluster: str, key: tuple[str, int]) -> dict[str, Any]:
        return backend_entry(cluster, self.states[cluster].member(key), self._totals(),
                             self._check_reason(cluster))

    def _check_reason(self, cluster: str) -> Callable[[Member], str]:
        """Why the checks of ``cluster`` have a backend down: its last probe result."""
        checker = self.checkers.get(cluster)

        def reason(member: Member) -> str:
            try:
                last = checker.last_result(Backend(member.host, member.port)) \
                    if checker is not None else None
            except KeyError:
                last = None
            return f"health check: {last}" if last else "health check failed"
        return reason


def _tls_files(config: Config) -> dict[str, bytes]:
    """Path → SHA-256 of each TLS file ``config`` names (b"" if unreadable: loading
    the config has reported that)."""
    paths = [p for lst in config.listeners if lst.tls is not None
             for c in lst.tls.certificates for p in (c.cert, c.key)]
    paths += [p for c in config.clusters if c.tls is not None
              for p in (c.tls.ca, c.tls.client_cert, c.tls.client_key) if p is not None]
    digests = {}
    for path in paths:
        try:
            with open(path, "rb") as f:
                digests[path] = hashlib.sha256(f.read()).digest()
        except OSError:
            digests[path] = b""
    return digests


def _check_settings(cluster: Cluster) -> CheckSettings:
    """The cluster's ``health_check``, probing the way its traffic connects: with TLS
    (same verification and server name) and with a PROXY header when it sends one
    (``PROXY UNKNOWN`` / v2 ``LOCAL``: a check is no client's). TlsConfigError for an
    unusable CA or client certificate file."""
    spec = cluster.health_check
    assert spec is not None
    tls = cluster.tls
    version = cluster.send_proxy_protocol
    return CheckSettings(type=spec.type, path=spec.path, method=spec.method, host=spec.host,
                         expect_status=tuple(spec.expect_status),
                         expect_body=spec.expect_body, interval=spec.interval,
                         timeout=spec.timeout, jitter=spec.jitter, rise=spec.rise,
                         fall=spec.fall,
                         tls=None if tls is None else client_context(
                             tls, alpn=("h2",) if spec.type == "grpc" else ("http/1.1",)),
                         server_name=None if tls is None else tls.sni,
                         preamble=b"" if version is None else header_for(version, None, None),
                         service=spec.service)
