"""Prometheus exposition, rendered in the control plane only (DESIGN.md §3.4).

A custom collector over the :class:`~poise.observability.book.MetricsBook` and the
control plane's own state (:class:`PlaneState`): no client-library objects are kept
per series and nothing is counted through the library, so a scrape costs what it
renders and the request path never sees Prometheus.  The names and labels are the
contract of docs/observability.md and docs/grafana/poise.json.
"""

from __future__ import annotations

import platform
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

import poise
from poise.observability.book import MetricsBook
from poise.observability.buckets import BOUNDS

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
STATES = ("up", "down", "ejected", "drained")
# Series names of the book (poise.observability.shipper) → exposition.
_SIMPLE_COUNTERS = (
    ("connections", "poise_connections", "Client connections accepted.", ("listener",)),
    ("bytes_in", "poise_received_bytes", "Bytes received from clients.", ("listener",)),
    ("bytes_out", "poise_sent_bytes", "Bytes sent to clients.", ("listener",)),
    ("connect_errors", "poise_upstream_connect_errors",
     "Upstream connections that could not be opened (refused, unreachable, timed out).",
     ("cluster", "backend")),
    ("timeouts", "poise_upstream_timeouts",
     "Upstream tries that timed out waiting for the response.", ("cluster", "backend")),
    ("ejections", "poise_ejections", "Outlier-detection ejections (summed over workers).",
     ("cluster", "backend")),
    ("retries", "poise_retries", "Requests sent again per the cluster's retries policy.",
     ("cluster",)),
    ("overflow", "poise_overflow",
     "Requests refused or dropped because a circuit-breaker limit was reached.",
     ("cluster", "limit")),
    ("health_transitions", "poise_health_transitions",
     "Active health check verdict changes.", ("cluster", "backend", "to")),
    ("reloads", "poise_config_reloads", "Config reloads by result.", ("result",)),
    ("access_log_dropped", "poise_access_log_dropped",
     "Access log lines dropped because the writer fell 16 MiB behind or a write failed.",
     ()),
    ("rate_limited", "poise_rate_limited",
     "Requests a rate limit denied with 429 (mode enforce) or would have (mode shadow).",
     ("listener", "route", "mode")),
    ("connections_rejected", "poise_connections_rejected",
     "Client connections closed before being served: a connection limit was reached, "
     "or (tcp and PROXY protocol listeners) the reason says why.",
     ("listener", "reason")),
    ("rate_limit_evictions", "poise_rate_limit_evictions",
     "Keys still limited that the full rate-limit table forgot (then admitted afresh).",
     ()),
    ("redis_errors", "poise_rate_limit_redis_errors",
     "Round trips to a global rate limit's Redis that failed or timed out.", ("redis",)),
    ("redis_fallbacks", "poise_rate_limit_redis_fallbacks",
     "Requests a global rate limit answered per on_redis_error (Redis unreachable).",
     ("limit",)),
)
_GAUGES = (
    ("open", "poise_connections_active", "Client connections open.", ("listener",)),
    ("in_flight", "poise_backend_in_flight", "Requests in flight to the backend.",
     ("cluster", "backend")),
    ("idle", "poise_upstream_connections_idle",
     "Idle pooled upstream connections (parked ones included).", ("cluster", "backend")),
    ("parked", "poise_upstream_connections_parked",
     "Idle pooled upstream connections parked: kept as bare sockets, revived on demand.",
     ("cluster", "backend")),
    ("active", "poise_upstream_connections_active",
     "Open (or opening) upstream connections.", ("cluster", "backend")),
)


@dataclass(slots=True)
class BackendState:
    cluster: str
    backend: str
    state: str          # one of STATES
    weight: int


@dataclass(slots=True)
class PlaneState:
    """What the control plane itself knows, at the time of a scrape."""

    backends: list[BackendState] = field(default_factory=list)
    listeners: list[str] = field(default_factory=list)
    panic: dict[str, bool] = field(default_factory=dict)
    # Per cluster with a discovery source: (up, updates so far).
    discovery: dict[str, tuple[bool, int]] = field(default_factory=dict)
    config_version: int = 0
    workers: int = 0
    worker_restarts: int = 0
    hot_path: str = "interpreted"


def render(book: MetricsBook, state: PlaneState) -> bytes:
    """The exposition text (``CONTENT_TYPE``)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(book, state))
    return generate_latest(registry)


class _Collector(Collector):
    def __init__(self, book: MetricsBook, state: PlaneState) -> None:
        self.book = book
        self.state = state

    def collect(self) -> Iterator[object]:
        book = self.book
        yield from self._requests()
        yield from self._histogram("request_bucket", "request_seconds",
                                   "poise_request_duration_seconds",
                                   "Client request duration, first byte to last response byte.",
                                   ("listener", "cluster"))
        yield from self._upstream()
        yield from self._histogram("upstream_bucket", "upstream_seconds",
                                   "poise_upstream_duration_seconds",
                                   "Upstream try duration, sent to response end or failure.",
                                   ("cluster", "backend"))
        for series, name, doc, labels in _SIMPLE_COUNTERS:
            family = CounterMetricFamily(name, doc, labels=labels)
            for rest, value in book.series(series):
                family.add_metric([str(v) for v in rest], value)
            yield family
        gauges = book.gauges()
        # Every listener and backend the control plane knows has each gauge, 0 when no
        # worker reports one (workers leave zeros out).
        known = [(lst,) for lst in self.state.listeners]
        known_backends = [(b.cluster, b.backend) for b in self.state.backends]
        for series, name, doc, labels in _GAUGES:
            values = dict.fromkeys(known if labels == ("listener",) else known_backends, 0.0)
            for key, value in gauges.items():
                if key[0] == series:
                    values[tuple(str(v) for v in key[1:])] = value
            family = GaugeMetricFamily(name, doc, labels=labels)
            for label_values, value in values.items():
                family.add_metric(list(label_values), value)
            yield family
        yield from self._backends(gauges)
        yield from self._redis(gauges)
        yield from self._process()

    def _requests(self) -> Iterable[object]:
        family = CounterMetricFamily(
            "poise_requests", "Responses sent to clients, by exact status (499: the client "
            "went away before any response).", labels=("listener", "cluster", "code"))
        for (listener, cluster, code), value in self.book.series("requests"):
            family.add_metric([listener, cluster, str(code)], value)
        yield family

    def _upstream(self) -> Iterable[object]:
        family = CounterMetricFamily(
            "poise_upstream_requests", "Upstream tries by response status (\"error\": no "
            "response: reset, timeout, connect failure, malformed).",
            labels=("cluster", "backend", "code"))
        for (cluster, backend, code), value in self.book.series("upstream"):
            family.add_metric([cluster, backend, str(code) if code else "error"], value)
        yield family

    def _histogram(self, bucket_series: str, sum_series: str, name: str, doc: str,
                   labels: tuple[str, ...]) -> Iterable[object]:
        per: dict[tuple[str, ...], list[float]] = {}
        for rest, value in self.book.series(bucket_series):
            counts = per.setdefault(tuple(rest[:-1]), [0.0] * (len(BOUNDS) + 1))
            counts[int(rest[-1])] += value
        sums = dict((tuple(rest), value) for rest, value in self.book.series(sum_series))
        family = HistogramMetricFamily(name, doc, labels=labels)
        for label_values, counts in sorted(per.items()):
            cumulative, buckets = 0.0, []
            for bound, count in zip((*map(_le, BOUNDS), "+Inf"), counts, strict=True):
                cumulative += count
                buckets.append((bound, cumulative))
            family.add_metric(list(label_values), buckets, sums.get(label_values, 0.0))
        yield family

    def _backends(self, gauges: dict) -> Iterable[object]:
        state = self.state
        up = GaugeMetricFamily("poise_backend_up", "1 when the backend may take traffic "
                               "(not down, drained or ejected).", labels=("cluster", "backend"))
        states = GaugeMetricFamily("poise_backend_state", "1 for the backend's current state.",
                                   labels=("cluster", "backend", "state"))
        weights = GaugeMetricFamily("poise_backend_weight", "The backend's effective weight.",
                                    labels=("cluster", "backend"))
        for b in state.backends:
            labels = [b.cluster, b.backend]
            up.add_metric(labels, 1 if b.state == "up" else 0)
            for s in STATES:
                states.add_metric([*labels, s], 1 if b.state == s else 0)
            weights.add_metric(labels, b.weight)
        panic = GaugeMetricFamily("poise_panic_mode", "1 when the cluster is in panic mode "
                                  "in at least one worker.", labels=("cluster",))
        for cluster, on in state.panic.items():
            panic.add_metric([cluster], 1 if on else 0)
        yield from (up, states, weights, panic)
        source_up = GaugeMetricFamily("poise_discovery_up", "1 while the cluster's discovery "
                                      "source answers (0: failing, the last set is kept).",
                                      labels=("cluster",))
        updates = CounterMetricFamily("poise_discovery_updates", "New backend sets a "
                                      "discovery source yielded.", labels=("cluster",))
        for cluster, (on, count) in state.discovery.items():
            source_up.add_metric([cluster], 1 if on else 0)
            updates.add_metric([cluster], count)
        yield from (source_up, updates)

    def _redis(self, gauges: dict) -> Iterable[object]:
        up: dict[str, float] = {}     # by Redis URL
        for key in gauges:
            if key[0] == "redis_down":
                up[str(key[1])] = 0.0
            elif key[0] == "redis_up":
                up.setdefault(str(key[1]), 1.0)
        family = GaugeMetricFamily("poise_rate_limit_redis_up", "1 while every worker "
                                   "reaches this Redis of global rate limits (0: "
                                   "on_redis_error applies in at least one).",
                                   labels=("redis",))
        for redis, value in sorted(up.items()):
            family.add_metric([redis], value)
        yield family

    def _process(self) -> Iterable[object]:
        state = self.state
        yield GaugeMetricFamily("poise_config_version", "The running config's version.",
                                value=state.config_version)
        yield GaugeMetricFamily("poise_workers", "Worker processes running.",
                                value=state.workers)
        yield CounterMetricFamily("poise_worker_restarts", "Worker processes restarted "
                                  "after they died.", value=state.worker_restarts)
        info = GaugeMetricFamily("poise_build_info", "poise's version, Python and hot path.",
                                 labels=("version", "python", "hot_path"))
        info.add_metric([poise.__version__, platform.python_version(), state.hot_path], 1)
        yield info


def _le(bound: float) -> str:
    return floatToGoString(bound)
