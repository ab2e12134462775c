"""The dashboard's data: the control plane's counts sampled into a
:class:`~poise.observability.history.History` once a second, and the JSON of
``GET /dashboard/data`` (shape: :meth:`poise.admin.ops.Operations.dashboard`).

Sampling runs whether or not anyone watches, so that a page opened now shows the last
minutes at once; it costs one point per backend and listener per second.  The counts
come from ``plane.metrics`` (a :class:`~poise.observability.book.MetricsBook`:
``backend_samples()``, ``listener_samples()``, and the gauge ``("open", listener)`` for
connections), brought up to date first where the fleet must be asked (the data plane
of this very process, with ``workers: 1``); without a book there are no series, and
the rest of the page works.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from poise.observability.history import History, Point

if TYPE_CHECKING:
    from poise.control.plane import ControlPlane

log = logging.getLogger("poise")

INTERVAL = 1.0


class Dashboard:
    """Samples ``plane``'s counts every ``interval`` seconds on ``loop`` (from
    :meth:`start` to :meth:`stop`) and assembles :meth:`data`.  ``wall`` is the clock
    of the ``now`` the page shows; series are timed by the loop's monotonic clock."""

    def __init__(self, plane: ControlPlane, loop: asyncio.AbstractEventLoop,
                 history: History | None = None, interval: float = INTERVAL,
                 wall: Callable[[], float] = time.time) -> None:
        self.plane = plane
        self.loop = loop
        self.history = history or History()
        self.interval = interval
        self.wall = wall
        self._timer: asyncio.TimerHandle | None = None
        self._next = 0.0
        self._failed = False

    def __repr__(self) -> str:
        return f"<Dashboard {'running' if self._timer else 'stopped'} {self.history!r}>"

    def start(self) -> None:
        if self._timer is None:
            self._next = self.loop.time()
            self._tick()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _tick(self) -> None:
        try:
            self.sample()
        except Exception:
            # (once: a fault here would otherwise fill the log every second)
            if not self._failed:
                log.exception("dashboard: sampling failed")
                self._failed = True
        now = self.loop.time()
        # On a fixed cadence; a loop that fell behind skips the beats it missed.
        self._next += self.interval
        if self._next <= now:
            self._next = now + self.interval
        self._timer = self.loop.call_at(self._next, self._tick)

    def sample(self) -> None:
        """Record the plane's counts now (no-op without ``plane.metrics``)."""
        metrics = getattr(self.plane, "metrics", None)
        if metrics is None:
            return
        refresh = getattr(self.plane.fleet, "refresh_metrics", None)
        if refresh is not None:
            refresh(metrics)
        self.history.record(self.loop.time(), metrics.backend_samples(),
                            metrics.listener_samples())

    def data(self) -> dict[str, Any]:
        """``GET /dashboard/data`` (see :meth:`poise.admin.ops.Operations.dashboard`)."""
        plane = self.plane
        now = self.loop.time()
        history = self.history
        connections = _connections(plane)
        listeners = [{"name": spec.name, "bind": spec.bind, "protocol": spec.protocol,
                      "connections": connections.get(spec.name),
                      "series": columns(history.listener_series(spec.name), now)}
                     for spec in plane.config.listeners]
        clusters = plane.clusters()
        for cluster in clusters:
            for backend in cluster["backends"]:
                backend["series"] = columns(
                    history.backend_series((cluster["name"], backend["address"])), now)
        return {"now": round(self.wall(), 3), "span": history.span,
                "interval": self.interval, "quantile_window": history.quantile_window,
                "version": plane.version, "listeners": listeners, "clusters": clusters}


def columns(points: Iterable[Point], now: float) -> dict[str, list[Any]]:
    """``points`` as columns, ``t`` in seconds before ``now`` (<= 0), rounded: a
    page of a few backends polls this every second, and columns of short numbers
    are a fraction of the size of one object per point."""
    out: dict[str, list[Any]] = {"t": [], "rps": [], "error_rate": [], "p50_ms": [],
                                 "p99_ms": []}
    t, rps, errors, p50, p99 = out.values()
    for p in points:
        t.append(round(p.t - now, 1))
        rps.append(round(p.rps, 2))
        errors.append(None if p.error_rate is None else round(p.error_rate, 4))
        p50.append(None if p.p50_ms is None else round(p.p50_ms, 3))
        p99.append(None if p.p99_ms is None else round(p.p99_ms, 3))
    return out


def _connections(plane: ControlPlane) -> dict[str, int]:
    """Open client connections per listener, summed over the workers that reported."""
    metrics = getattr(plane, "metrics", None)
    if metrics is None:
        return {}
    return {key[1]: int(value) for key, value in metrics.gauges().items()
            if key[0] == "open" and len(key) == 2}
