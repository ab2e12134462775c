"""Metrics without sockets: the request path's counts, a worker's deltas, the control
plane's sums and the exposition rendered from them."""

from __future__ import annotations

import random
from bisect import bisect_left

import pytest
from prometheus_client.parser import text_string_to_metric_families

from poise.observability.book import MetricsBook, Sample
from poise.observability.buckets import BOUNDS, SIZE, bucket_of, quantile
from poise.observability.exposition import BackendState, PlaneState, render
from poise.observability.shipper import Shipper
from poise.proxy.http.accounting import Counts


def test_counts_bucket_like_bisect_and_keep_every_code():
    rng = random.Random(7)
    counts = Counts()
    expected_buckets = [0] * SIZE
    expected_codes: dict[int, int] = {}
    values = [*BOUNDS, 0.0, 1e9, *(rng.uniform(0, 70) for _ in range(500)),
              *(b * (1 + 1e-12) for b in BOUNDS)]
    for i, seconds in enumerate(values):
        code = (200, 200, 200, 404, 503)[i % 5] if i % 7 else 200
        counts.observe(code, seconds)
        expected_buckets[bisect_left(BOUNDS, seconds)] += 1
        expected_codes[code] = expected_codes.get(code, 0) + 1
    assert counts.buckets == expected_buckets
    assert counts.by_code() == expected_codes
    assert counts.total == pytest.approx(sum(values))
    assert bucket_of(0.0005) == 0 and bucket_of(0.00051) == 1 and bucket_of(61) == SIZE - 1


def test_repeated_buckets_are_counted_and_folded_in_when_another_comes():
    """(The latest bucket is counted natively until an observation falls elsewhere.)"""
    counts = Counts()
    expected = [0] * SIZE
    runs = [(0.0001, 1000), (0.003, 1), (0.0001, 5), (1e9, 3), (0.0005, 2), (0.00051, 7)]
    for seconds, times in runs:
        for _ in range(times):
            counts.observe(200, seconds)
        expected[bisect_left(BOUNDS, seconds)] += times
        assert counts.buckets == expected
    snapshot = counts.buckets
    snapshot[0] += 100                      # a copy: the counts are not changed
    assert counts.buckets == expected


def test_quantile_interpolates_within_its_bucket():
    counts = [0] * SIZE
    counts[2] = 100                         # all in (1 ms, 2.5 ms]
    assert quantile(counts, 0.5) == pytest.approx(0.00175)
    assert quantile(counts, 1.0) == pytest.approx(0.0025)
    assert quantile([0] * SIZE, 0.5) is None
    counts[-1] = 1_000_000                  # beyond the last bound: its lower bound
    assert quantile(counts, 0.99) == BOUNDS[-1]


def test_the_book_sums_deltas_keeps_a_dead_workers_counts_and_drops_its_gauges():
    book = MetricsBook()
    book.add(1, [[["requests", "web", "app", 200], 3]], [[["open", "web"], 2]])
    book.add(2, [[["requests", "web", "app", 200], 4], [["requests", "web", "", 404], 1]],
             [[["open", "web"], 5]])
    book.add(1, [[["requests", "web", "app", 200], 1]], [[["open", "web"], 1]])
    assert dict(book.series("requests")) == {("web", "app", 200): 8, ("web", "", 404): 1}
    assert book.gauges()[("open", "web")] == 6
    book.retire(2)
    assert dict(book.series("requests"))[("web", "app", 200)] == 8
    assert book.gauges()[("open", "web")] == 1


def test_the_book_forgets_removed_backends_and_builds_samples():
    book = MetricsBook()
    book.add(1, [[["upstream", "app", "h:1", 200], 8], [["upstream", "app", "h:1", 0], 1],
                 [["upstream", "app", "h:1", 502], 1], [["upstream_bucket", "app", "h:1", 3], 10],
                 [["upstream", "app", "h:2", 200], 5], [["retries", "app"], 2]])
    samples = book.backend_samples()
    assert samples[("app", "h:1")] == Sample(10, 2, tuple(10 if i == 3 else 0
                                                          for i in range(SIZE)))
    book.forget(lambda key: key[:3] != ("upstream", "app", "h:2"))
    assert ("app", "h:2") not in book.backend_samples()
    assert dict(book.series("retries")) == {("app",): 2}


def test_a_worker_ships_what_changed_and_a_rebuilt_object_starts_over():
    from tests.observability.fakes import fake_server
    server, site, pool = fake_server()
    shipper = Shipper(server)
    site.served["app"] = Counts()
    site.served["app"].observe(200, 0.002)
    site.accepted = 2
    pool.tries.observe(200, 0.001)
    first = {tuple(k): v for k, v in shipper.deltas()}
    assert first[("requests", "web", "app", 200)] == 1
    assert first[("request_bucket", "web", "app", 2)] == 1
    assert first[("connections", "web")] == 2
    assert first[("upstream", "app", "h:1", 200)] == 1
    assert shipper.deltas() == []           # nothing changed
    site.served["app"].observe(200, 0.002)
    site.served["app"].observe(503, 0.002)
    second = {tuple(k): v for k, v in shipper.deltas()}
    assert second == {("requests", "web", "app", 200): 1, ("requests", "web", "app", 503): 1,
                      ("request_bucket", "web", "app", 2): 2,
                      ("request_seconds", "web", "app"): pytest.approx(0.004)}
    site.served["app"] = Counts()           # rebuilt: counts start again from 0
    site.served["app"].observe(200, 0.002)
    third = {tuple(k): v for k, v in shipper.deltas()}
    assert third[("requests", "web", "app", 200)] == 1


def test_the_exposition_is_valid_prometheus_text_with_cumulative_buckets():
    book = MetricsBook()
    book.add(1, [[["requests", "web", "app", 200], 7], [["request_bucket", "web", "app", 0], 5],
                 [["request_bucket", "web", "app", 4], 2], [["request_seconds", "web", "app"], 0.1],
                 [["upstream", "app", "h:1", 0], 2], [["overflow", "app", "max_pending"], 3]],
             [[["open", "web"], 4], [["idle", "app", "h:1"], 2]])
    book.count(("reloads", "applied"))
    state = PlaneState(backends=[BackendState("app", "h:1", "drained", 3)],
                       listeners=["web", "quiet"], panic={"app": False}, config_version=4, workers=2, worker_restarts=1)
    text = render(book, state).decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    web_app = {"cluster": "app", "listener": "web"}

    def sample(name, **labels):
        return samples[(name, tuple(sorted(labels.items())))]
    assert sample("poise_requests_total", **web_app, code="200") == 7
    assert sample("poise_request_duration_seconds_bucket", **web_app, le="0.0005") == 5
    assert sample("poise_request_duration_seconds_bucket", **web_app, le="0.005") == 5
    assert sample("poise_request_duration_seconds_bucket", **web_app, le="0.01") == 7
    assert sample("poise_request_duration_seconds_bucket", **web_app, le="+Inf") == 7
    assert sample("poise_request_duration_seconds_count", **web_app) == 7
    assert sample("poise_request_duration_seconds_sum", **web_app) == pytest.approx(0.1)
    assert samples[("poise_upstream_requests_total",
                    (("backend", "h:1"), ("cluster", "app"), ("code", "error")))] == 2
    assert samples[("poise_overflow_total", (("cluster", "app"), ("limit", "max_pending")))] == 3
    assert samples[("poise_connections_active", (("listener", "web"),))] == 4
    # (known to the control plane, reported by no worker: 0, not absent)
    assert samples[("poise_connections_active", (("listener", "quiet"),))] == 0
    assert samples[("poise_backend_in_flight", (("backend", "h:1"), ("cluster", "app")))] == 0
    assert samples[("poise_backend_state",
                    (("backend", "h:1"), ("cluster", "app"), ("state", "drained")))] == 1
    assert samples[("poise_backend_up", (("backend", "h:1"), ("cluster", "app")))] == 0
    assert samples[("poise_config_reloads_total", (("result", "applied"),))] == 1
    assert samples[("poise_worker_restarts_total", ())] == 1
    assert samples[("poise_workers", ())] == 2
