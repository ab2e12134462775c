"""Prometheus metrics end to end: real poise processes, h11 backends, real clients.

What is proved: after traffic stops, ``GET /metrics`` on the admin listener equals what
the clients saw, code by code, summed over workers (with 1 and with 2 workers),
including the answers poise writes itself (no route, unparsable request, no backend);
histograms count every request; upstream tries equal what the backends served; a
backend's state follows a drain; reloads are counted by result.
"""

from __future__ import annotations

import socket
from collections import Counter

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.client import H11Client
from tests.support.control import TOKEN
from tests.support.procs import served
from tests.support.waiting import wait_for

ROUTES = [{"match": {"path_prefix": "/status"}, "cluster": "app"},
          {"match": {"path_prefix": "/gone"}, "cluster": "empty"}]
EMPTY = {"name": "empty", "backends": [{"address": "127.0.0.1:9"}],
         "health_check": {"type": "tcp", "interval": "100ms", "timeout": "50ms",
                          "fall": 1}}


def scrape(px) -> dict[tuple[str, tuple], float]:
    """``{(sample name, sorted labels): value}`` of one /metrics answer."""
    r = px.admin.get("/metrics")
    assert r.status == 200, r
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    out = {}
    for family in text_string_to_metric_families(r.body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def by(samples: dict, name: str, **match) -> dict[tuple, float]:
    """The samples of ``name`` whose labels include ``match``."""
    return {labels: v for (n, labels), v in samples.items()
            if n == name and all(dict(labels).get(k) == x for k, x in match.items())}


def request(addr, method: str, target: str):
    """One request on its own connection."""
    with H11Client(addr) as c:
        return c.request(method, target)


def raw(px, data: bytes) -> bytes:
    with socket.create_connection(px.addr, timeout=10) as s:
        s.sendall(data)
        return s.recv(65536)


def drive(px) -> Counter:
    """Requests with every kind of answer; the statuses clients saw, by cluster."""
    seen: Counter = Counter()
    for i in range(30):
        status = (200, 404, 503)[i % 3]
        r = request(px.addr, "GET", f"/status/{status}")
        assert r.status == status
        seen[("app", str(status))] += 1
    for _ in range(4):
        assert request(px.addr, "GET", "/nope").status == 404       # no route
        seen[("", "404")] += 1
    for _ in range(3):
        assert raw(px, b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n").startswith(
            b"HTTP/1.1 400")
        seen[("", "400")] += 1
    return seen


@pytest.mark.parametrize("workers", [1, 2])
def test_metrics_equal_what_clients_saw_summed_over_workers(stack, workers):
    b1, b2 = stack.backend("b1"), stack.backend("b2")
    px = stack.poise([b1, b2], workers=workers, admin={"token": TOKEN},
                     listener={"routes": ROUTES}, extra_clusters=[EMPTY])
    wait_for(lambda: px.admin.get("/clusters/empty").json()["backends"][0]["state"] == "down",
             10, "the empty cluster's backend down")
    seen = drive(px)
    assert request(px.addr, "GET", "/gone").status == 503       # no healthy backend
    seen[("empty", "503")] += 1

    def requests_total():
        got = by(scrape(px), "poise_requests_total", listener="web")
        return {(dict(k)["cluster"], dict(k)["code"]): v for k, v in got.items()}
    wait_for(lambda: requests_total() == dict(seen), 5,
             lambda: f"/metrics {requests_total()} != clients {dict(seen)}")

    samples = scrape(px)
    counts = by(samples, "poise_request_duration_seconds_count", listener="web")
    assert sum(counts.values()) == sum(seen.values())
    for labels, count in counts.items():
        inf = tuple(sorted({**dict(labels), "le": "+Inf"}.items()))
        assert samples[("poise_request_duration_seconds_bucket", inf)] == count

    tries = by(samples, "poise_upstream_requests_total", cluster="app")
    per_backend = Counter()
    for labels, v in tries.items():
        per_backend[dict(labels)["backend"]] += v
    assert per_backend == {b1.address: len(served(b1)), b2.address: len(served(b2))}
    codes = Counter()
    for labels, v in tries.items():
        codes[dict(labels)["code"]] += v
    assert codes == {"200": 10, "404": 10, "503": 10}

    assert by(samples, "poise_connections_total", listener="web")[(("listener", "web"),)] >= 37
    assert by(samples, "poise_received_bytes_total")[(("listener", "web"),)] > 0
    assert by(samples, "poise_sent_bytes_total")[(("listener", "web"),)] > 0
    assert by(samples, "poise_backend_up", cluster="empty") == {
        (("backend", "127.0.0.1:9"), ("cluster", "empty")): 0}
    assert by(samples, "poise_workers")[()] == workers
    assert by(samples, "poise_build_info")


def test_backend_state_reloads_and_health_transitions_are_exposed(stack):
    b1, b2 = stack.backend("b1"), stack.backend("b2")
    px = stack.poise([b1, b2], workers=2, admin={"token": TOKEN})
    assert px.admin.post(f"/clusters/app/backends/{b2.address}/drain").status == 200
    samples = scrape(px)
    assert by(samples, "poise_backend_state", backend=b2.address, state="drained") == {
        (("backend", b2.address), ("cluster", "app"), ("state", "drained")): 1}
    assert by(samples, "poise_backend_up", backend=b2.address)[
        (("backend", b2.address), ("cluster", "app"))] == 0
    assert by(samples, "poise_backend_up", backend=b1.address)[
        (("backend", b1.address), ("cluster", "app"))] == 1

    before = by(samples, "poise_config_reloads_total")
    assert px.reload().status == 200        # unchanged file
    after = by(scrape(px), "poise_config_reloads_total")
    unchanged = (("result", "unchanged"),)
    assert after[unchanged] == before[unchanged] + 1


def test_a_failing_backend_counts_connect_errors_and_error_tries(stack):
    b1 = stack.backend("b1")
    px = stack.poise([b1.address, "127.0.0.1:9"], workers=1, admin={"token": TOKEN})
    for _ in range(6):
        assert request(px.addr, "GET", "/").status == 200      # failover to b1
    samples = scrape(px)
    dead = (("backend", "127.0.0.1:9"), ("cluster", "app"))
    failed = by(samples, "poise_upstream_connect_errors_total")[dead]
    # (Every pick of the dead backend failed over to b1; how often round robin picked
    # it depends on where its rotation started, so the count comes from the admin API.)
    errors = {b["address"]: b["errors"] for b in px.admin.get("/clusters/app").json()["backends"]}
    assert failed == errors["127.0.0.1:9"] >= 3
    assert by(samples, "poise_upstream_requests_total", backend="127.0.0.1:9") == {
        dead + (("code", "error"),): failed}
    assert by(samples, "poise_upstream_requests_total", backend=b1.address) == {
        (("backend", b1.address), ("cluster", "app"), ("code", "200")): 6}
