"""Per-backend counts summed over workers, for the admin API (and metrics next).

Each worker reports, about every second, its own cumulative counters since it started:
per cluster ``{"panic": bool, "backends": {address: [in_flight, requests, errors,
ejected]}}``.  The sum over the latest report of each live worker is the total;
what a worker counted before it died is kept (``requests``, ``errors``), while its
gauges (``in_flight``, ``ejected``) leave with it.  Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

Report = Mapping[str, Mapping[str, Any]]


@dataclass(slots=True)
class BackendTotals:
    in_flight: int = 0
    requests: int = 0
    errors: int = 0
    # Workers in which outlier detection has the backend ejected.
    ejected_in: int = 0


class StatsBook:
    """The latest report of every live worker, and the counts of those gone."""

    def __init__(self) -> None:
        self._latest: dict[Hashable, Report] = {}
        self._gone: dict[tuple[str, str], list[int]] = {}

    def update(self, worker: Hashable, report: Report) -> None:
        self._latest[worker] = report

    def retire(self, worker: Hashable) -> None:
        """``worker`` is gone: keep what it counted, drop what it held."""
        report = self._latest.pop(worker, None)
        for cluster, address, row in _rows(report or {}):
            kept = self._gone.setdefault((cluster, address), [0, 0])
            kept[0] += row[1]
            kept[1] += row[2]

    def forget(self, keep: Iterable[tuple[str, str]]) -> None:
        """Drop the kept counts of backends not in ``keep`` (removed by a reload)."""
        wanted = set(keep)
        self._gone = {k: v for k, v in self._gone.items() if k in wanted}

    def requests_of(self, worker: Hashable) -> int:
        """Requests ``worker`` sent to backends, per its latest report (0: none yet)."""
        return sum(row[1] for _, _, row in _rows(self._latest.get(worker) or {}))

    @property
    def workers(self) -> int:
        """How many workers have reported."""
        return len(self._latest)

    def totals(self) -> dict[tuple[str, str], BackendTotals]:
        """Per ``(cluster, address)``, summed over workers."""
        out: dict[tuple[str, str], BackendTotals] = {}
        for (cluster, address), (requests, errors) in self._gone.items():
            out[(cluster, address)] = BackendTotals(0, requests, errors, 0)
        for report in self._latest.values():
            for cluster, address, row in _rows(report):
                t = out.get((cluster, address))
                if t is None:
                    t = out[(cluster, address)] = BackendTotals()
                t.in_flight += row[0]
                t.requests += row[1]
                t.errors += row[2]
                t.ejected_in += 1 if row[3] else 0
        return out

    def panic(self, cluster: str) -> bool:
        """True when ``cluster`` is in panic mode in at least one worker."""
        return any(bool(r.get(cluster, {}).get("panic")) for r in self._latest.values())


def _rows(report: Report) -> Iterable[tuple[str, str, list[int]]]:
    for cluster, entry in report.items():
        for address, row in entry.get("backends", {}).items():
            yield cluster, address, row
