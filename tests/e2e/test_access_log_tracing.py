"""Access logs and tracing through real poise processes.

Access log: one JSON line per response (poise's own 4xx/5xx included), written by
every worker, nothing lost on a graceful stop, the file reopened on SIGUSR1
(logrotate).  Tracing: a client's ``traceparent`` is continued, the backend receives
poise's try span as its parent, the spans reach a real OTLP/HTTP receiver; with
tracing off the header passes through untouched.
"""

from __future__ import annotations

import json
import os
import signal
import socket

import pytest

from tests.support.client import H11Client, echo_headers
from tests.support.control import TOKEN
from tests.support.otlp import OtlpReceiver
from tests.support.waiting import wait_for

CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"
TRACEPARENT = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
ROUTES = [{"match": {"path_prefix": "/"}, "cluster": "app"}]


def get(addr, target: str, headers=None):
    with H11Client(addr) as c:
        return c.request("GET", target, headers=headers or [])


def lines(path) -> list[dict]:
    try:
        text = open(path).read()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines()]


@pytest.mark.parametrize("workers", [1, 2])
def test_one_json_line_per_response_nothing_lost_and_reopened_on_sigusr1(stack, tmp_path,
                                                                          workers):
    b1 = stack.backend("b1")
    log_path = tmp_path / "access.log"
    px = stack.poise([b1], workers=workers, admin={"token": TOKEN},
                     access_log={"format": "json", "path": str(log_path)},
                     listener={"routes": [{"match": {"path_prefix": "/status"},
                                           "cluster": "app"}]})
    for _ in range(5):
        assert get(px.addr, "/status/200", [("User-Agent", "probe/1")]).status == 200
    assert get(px.addr, "/nope").status == 404
    with socket.create_connection(px.addr, timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 400")
    wait_for(lambda: len(lines(log_path)) == 7, 5, lambda: f"7 lines in {lines(log_path)}")

    entries = lines(log_path)
    ok = [e for e in entries if e["status"] == 200]
    assert len(ok) == 5
    first = ok[0]
    assert first["method"] == "GET" and first["path"] == "/status/200"
    assert first["protocol"] == "HTTP/1.1" and first["cluster"] == "app"
    assert first["upstream"] == b1.address and first["attempts"] == 1
    assert first["client"] == "127.0.0.1" and first["user_agent"] == "probe/1"
    assert first["bytes_sent"] > 0 and first["duration_ms"] >= 0
    assert first["ts"].endswith("Z") and first["trace_id"] is None
    no_route = [e for e in entries if e["status"] == 404]
    assert no_route[0]["cluster"] == "" and no_route[0]["upstream"] is None
    assert [e["status"] for e in entries].count(400) == 1

    # logrotate: move the file away, SIGUSR1, and new lines go to a new file
    rotated = tmp_path / "access.log.1"
    os.rename(log_path, rotated)
    px.signal(signal.SIGUSR1)
    px.wait_log("SIGUSR1: reopening", timeout=5)

    probes = 0

    def reopened() -> bool:
        nonlocal probes
        assert get(px.addr, "/status/200").status == 200
        probes += 1
        return log_path.exists()
    wait_for(reopened, 5, "a new access log file")
    for _ in range(20):
        assert get(px.addr, "/status/201").status == 201
    assert px.stop() == 0
    new = lines(log_path)
    assert [e["status"] for e in new].count(201) == 20     # all flushed at the stop
    assert len(lines(rotated)) + len(new) == 7 + probes + 20   # one line per response


def test_traces_continue_the_clients_context_and_reach_the_collector(stack):
    b1 = stack.backend("b1")
    with OtlpReceiver() as receiver:
        px = stack.poise([b1], workers=1, listener={"routes": ROUTES},
                         tracing={"otlp_endpoint": receiver.endpoint, "sample_ratio": 1.0,
                                  "service_name": "edge"})
        r = get(px.addr, "/echo", [("traceparent", TRACEPARENT), ("tracestate", "k=v")])
        assert r.status == 200
        sent = echo_headers(r.json(), "traceparent")
        assert len(sent) == 1
        version, trace, parent, flags = sent[0].split("-")
        assert (version, trace, flags) == ("00", CLIENT_TRACE, "01")
        assert parent != CLIENT_SPAN
        assert echo_headers(r.json(), "tracestate") == ["k=v"]

        spans = receiver.wait_for(2)
        server = next(s for s in spans if s.kind == "SERVER")
        attempt = next(s for s in spans if s.kind == "CLIENT")
        assert server.trace_id == attempt.trace_id == CLIENT_TRACE
        assert server.parent_span_id == CLIENT_SPAN
        assert attempt.parent_span_id == server.span_id
        assert attempt.span_id == parent            # the backend's parent is the try span
        assert server.attributes["http.response.status_code"] == 200
        assert server.resource.get("service.name") == "edge"
        assert px.stop() == 0


def test_with_tracing_off_traceparent_passes_through_untouched(stack):
    b1 = stack.backend("b1")
    px = stack.poise([b1], workers=1, listener={"routes": ROUTES})
    r = get(px.addr, "/echo", [("traceparent", TRACEPARENT), ("tracestate", "k=v")])
    assert echo_headers(r.json(), "traceparent") == [TRACEPARENT]
    assert echo_headers(r.json(), "tracestate") == ["k=v"]
