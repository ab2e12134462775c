"""The dashboard's sampler and data, over a stand-in control plane with a real
MetricsBook: series per backend and listener, connections, the document's schema, a
plane without metrics, and the once-a-second timer on a real event loop."""

from __future__ import annotations

import asyncio
import copy
import logging
from types import SimpleNamespace

import jsonschema
import uvloop

from poise.admin.openapi import DOCUMENT
from poise.control.dashboard import Dashboard, columns
from poise.observability.book import MetricsBook
from poise.observability.buckets import bucket_of
from poise.observability.history import Point
from tests.admin.fakes import CLUSTERS

B1 = ("app", "127.0.0.1:9001")


class Fleet:
    def __init__(self) -> None:
        self.refreshed = 0

    def refresh_metrics(self, book: MetricsBook) -> None:
        self.refreshed += 1


class Plane:
    """What the dashboard reads of the control plane."""

    def __init__(self, metrics: MetricsBook | None = None) -> None:
        if metrics is not None:
            self.metrics = metrics
        self.fleet = Fleet()
        self.version = 4
        self.config = SimpleNamespace(listeners=[
            SimpleNamespace(name="web", bind="127.0.0.1:8080", protocol="http"),
            SimpleNamespace(name="api", bind="[::1]:8081", protocol="http")])

    def clusters(self) -> list[dict]:
        return copy.deepcopy(CLUSTERS)


class Clock:
    def __init__(self) -> None:
        self.now = 500.0

    def time(self) -> float:
        return self.now


def traffic(book: MetricsBook, requests: int, failed: int, seconds: float) -> None:
    """One worker report: ``requests`` tries of B1 (``failed`` of them 502) and as
    many listener responses, all taking ``seconds``."""
    i = bucket_of(seconds)
    book.add(1, [[["upstream", *B1, 200], requests - failed], [["upstream", *B1, 502], failed],
                 [["upstream_bucket", *B1, i], requests],
                 [["requests", "web", "app", 200], requests],
                 [["request_bucket", "web", "app", i], requests]],
             [[["open", "web"], 7], [["in_flight", *B1], 1]])


def validate(data: dict) -> None:
    schema = DOCUMENT["components"]["schemas"]["Dashboard"]
    jsonschema.Draft202012Validator(
        {**schema, "components": DOCUMENT["components"]}).validate(data)


def test_data_holds_every_listener_and_backend_with_its_series():
    book = MetricsBook()
    plane = Plane(book)
    clock = Clock()
    dash = Dashboard(plane, clock, wall=lambda: 1_700_000_000.0)
    traffic(book, 10, 0, 0.002)
    dash.sample()
    for _ in range(3):
        clock.now += 1.0
        traffic(book, 100, 10, 0.002)
        dash.sample()
    assert plane.fleet.refreshed == 4           # (asked before each sample)
    clock.now += 0.5                            # the page asks between two samples
    data = dash.data()
    validate(data)
    assert (data["now"], data["version"], data["span"], data["interval"]) \
        == (1_700_000_000.0, 4, 300.0, 1.0)
    web, api = data["listeners"]
    assert (web["name"], web["bind"], web["connections"]) == ("web", "127.0.0.1:8080", 7)
    assert web["series"]["t"] == [-2.5, -1.5, -0.5]
    assert web["series"]["rps"] == [100.0] * 3
    assert web["series"]["error_rate"] == [0.0] * 3     # 502s from a backend, 200s sent
    assert all(1 < v <= 2.5 for v in web["series"]["p50_ms"])
    assert (api["connections"], api["series"]["t"]) == (None, [])
    backends = {(c["name"], b["address"]): b for c in data["clusters"] for b in c["backends"]}
    assert set(backends) == {(c["name"], b["address"]) for c in CLUSTERS for b in c["backends"]}
    b1 = backends[B1]["series"]
    assert b1["rps"] == [100.0] * 3 and b1["error_rate"] == [0.1] * 3
    assert all(1 < v <= 2.5 for v in b1["p99_ms"])
    assert backends[("app", "[::1]:9002")]["series"]["t"] == []
    assert backends[B1]["state"] == "up"        # (the entries of clusters(), kept)


def test_without_a_metrics_book_there_are_no_series():
    plane = Plane()
    dash = Dashboard(plane, Clock())
    dash.sample()
    data = dash.data()
    validate(data)
    assert plane.fleet.refreshed == 0
    assert all(listener["series"]["t"] == [] and listener["connections"] is None
               for listener in data["listeners"])
    assert all(b["series"]["rps"] == [] for c in data["clusters"] for b in c["backends"])


def test_columns_round_and_keep_gaps():
    points = [Point(9.0, 1 / 3, None, None, None), Point(10.0, 2.0, 0.123456, 1.23456, 9.87654)]
    assert columns(points, 10.25) == {
        "t": [-1.2, -0.2], "rps": [0.33, 2.0], "error_rate": [None, 0.1235],
        "p50_ms": [None, 1.235], "p99_ms": [None, 9.877]}


def _run_until(loop: asyncio.AbstractEventLoop, predicate, timeout: float = 5.0) -> None:
    async def wait() -> None:
        while not predicate():
            await asyncio.sleep(0.005)
    loop.run_until_complete(asyncio.wait_for(wait(), timeout))


def test_sampling_runs_on_the_loop_from_start_to_stop():
    loop = uvloop.new_event_loop()
    try:
        book = MetricsBook()
        plane = Plane(book)
        dash = Dashboard(plane, loop, interval=0.01)
        dash.start()
        assert "running" in repr(dash)
        for n in range(1, 4):
            traffic(book, 5, 0, 0.001)
            _run_until(loop, lambda n=n: plane.fleet.refreshed > n)
        assert len(dash.history.backend_series(B1)) >= 2
        dash.stop()
        assert "stopped" in repr(dash)
        seen = plane.fleet.refreshed
        loop.run_until_complete(asyncio.sleep(0.05))
        assert plane.fleet.refreshed == seen
    finally:
        loop.close()


def test_a_fault_in_sampling_is_logged_once_and_sampling_goes_on(caplog):
    class Broken(MetricsBook):
        def backend_samples(self):
            raise RuntimeError("a bug")

    loop = uvloop.new_event_loop()
    try:
        plane = Plane(Broken())
        dash = Dashboard(plane, loop, interval=0.005)
        with caplog.at_level(logging.ERROR, "poise"):
            dash.start()
            _run_until(loop, lambda: plane.fleet.refreshed >= 5)
            dash.stop()
        assert [r.message for r in caplog.records] == ["dashboard: sampling failed"]
    finally:
        loop.close()

