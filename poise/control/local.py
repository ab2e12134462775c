"""``workers: 1``: the control plane and the data plane in one process.

The same messages as between processes go through an in-process channel: published
messages are queued to this process's :class:`WorkerAgent`, applied on the next loop
iteration (between requests), and counts are read straight from the data plane.
"""

from __future__ import annotations

import os
from typing import Any

from poise.control.agent import Message, WorkerAgent
from poise.control.stats import StatsBook
from poise.observability.book import MetricsBook


class LocalFleet:
    """A :class:`poise.control.plane.Fleet` of one: this process's data plane."""

    def __init__(self, agent: WorkerAgent) -> None:
        self.agent = agent
        self._book = StatsBook()

    def publish(self, message: Message) -> None:
        self.agent.receive(message)

    def stats(self) -> StatsBook:
        self._book.update(0, self.agent.counters())
        return self._book

    def refresh_metrics(self, book: MetricsBook) -> None:
        report = self.agent.metrics_report()
        book.add(0, report["deltas"], report["gauges"])

    def workers(self) -> list[dict[str, Any]]:
        return [{"slot": 0, "pid": os.getpid(), "state": "running", "restarts": 0,
                 **self.agent.status(), "requests": self.stats().requests_of(0)}]

    def resize(self, count: int) -> None:
        """Never asked: the control plane refuses to leave ``workers: 1`` by reload."""
