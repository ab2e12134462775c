"""What the admin API asks of the control plane (:class:`Operations`), and the shapes
it answers with.  The control plane implements it; tests may use a stand-in.

Every method runs on the control plane's event loop and returns at once (nothing in
here waits on a worker or a backend).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class ReloadResult:
    """The outcome of a reload: ``applied`` with the config ``version`` now running
    (unchanged when the file changed nothing), or not applied with ``errors`` as
    ``(field path, message)`` pairs and the old config still running."""

    applied: bool
    version: int
    errors: list[tuple[str, str]] = field(default_factory=list)


class Operations(Protocol):
    """The control plane as the admin API sees it.

    Lookups raise :class:`poise.errors.UnknownCluster` / :class:`UnknownBackend`
    (404) and bad values :class:`poise.errors.ControlError` (400).  Backend addresses
    are written as in the config (``host:port``, IPv6 hosts in brackets).
    """

    def clusters(self) -> list[dict[str, Any]]:
        """Every cluster, in config order::

            {"name": str, "policy": str, "version": int, "panic": bool,
             "backends": [{"address": str, "weight": int, "backup": bool,
                           "state": "up" | "down" | "ejected" | "drained",
                           "reason": str | None, "in_flight": int,
                           "requests": int, "errors": int}]}

        Counts are summed over workers and at most about a second old."""
        ...

    def cluster(self, name: str) -> dict[str, Any]:
        """One entry of :meth:`clusters`; UnknownCluster."""
        ...

    def set_drained(self, cluster: str, address: str, drained: bool) -> dict[str, Any]:
        """Drain (no new requests; those in flight finish) or enable a backend in every
        worker; returns its backend entry as in :meth:`clusters`."""
        ...

    def set_weight(self, cluster: str, address: str, weight: int) -> dict[str, Any]:
        """Change a backend's weight (1..10000, else ControlError) in every worker;
        returns its backend entry."""
        ...

    def effective_config(self) -> dict[str, Any]:
        """The effective config as JSON-able data, secrets (the admin token) redacted."""
        ...

    def reload(self) -> ReloadResult:
        """Re-read the config file and apply it (see :class:`ReloadResult`).  Applied
        means the control plane runs it and has sent it to every worker, which apply it
        within moments (``config_version`` in :meth:`workers` says when each has)."""
        ...

    def workers(self) -> list[dict[str, Any]]:
        """Each worker slot: ``{"slot": int, "pid": int | None, "state": "starting" |
        "running" | "restarting" | "stopping", "restarts": int, "config_version":
        int, "snapshot_versions": {cluster: int}, "requests": int}`` (the versions it
        has applied; requests it sent to backends, per its latest report)."""
        ...

    def metrics_text(self) -> bytes:
        """The Prometheus text exposition (format 0.0.4) of every metric
        (docs/observability.md), counts summed over workers."""
        ...

    def dashboard(self) -> dict[str, Any]:
        """What the dashboard shows (built by :mod:`poise.control.dashboard`)::

            {"now": float (unix time), "span": float, "interval": float,
             "quantile_window": float, "version": int (config version),
             "listeners": [{"name": str, "bind": str, "protocol": str,
                            "connections": int | None, "series": Series}],
             "clusters": [<a cluster of clusters(), each backend with a "series">]}

        A ``Series`` is columnar, oldest first: ``{"t": [seconds before now, <= 0],
        "rps": [float], "error_rate": [float | None], "p50_ms": [float | None],
        "p99_ms": [float | None]}`` (see :mod:`poise.observability.history`)."""
        ...
