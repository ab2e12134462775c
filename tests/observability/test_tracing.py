"""poise.observability.tracing against a real OTLP/HTTP receiver (tests/support/otlp.py).

Spans leave through the SDK's batch processor; ``Tracer.shutdown`` flushes it, so each
test ends its tracer before reading what the receiver decoded."""

from __future__ import annotations

import random
import re
import socket
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from poise.config.observability import Tracing
from poise.errors import ConfigError
from poise.observability.tracing import Tracer, parse_traceparent, valid_tracestate
from tests.support.otlp import OtlpReceiver

CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"
SAMPLED = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01".encode()
UNSAMPLED = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-00".encode()
HEADER = re.compile(rb"traceparent: (00-[0-9a-f]{32}-[0-9a-f]{16}-0[01])\r\n"
                    rb"(?:tracestate: ([\x20-\x7e]+)\r\n)?")


@pytest.fixture
def rx():
    with OtlpReceiver() as r:
        yield r


@pytest.fixture
def tracer(rx):
    made: list[Tracer] = []

    def make(ratio: float = 1.0, rng: random.Random | None = None, name: str = "edge") -> Tracer:
        t = Tracer(Tracing(otlp_endpoint=rx.endpoint, sample_ratio=ratio, service_name=name),
                   rng=rng or random.Random(7))
        made.append(t)
        return t

    yield make
    for t in made:
        t.shutdown()


def start(t: Tracer, traceparent: bytes | None = None, tracestate: bytes | None = None,
          method: bytes = b"GET", target: bytes = b"/a/b?x=1", host: bytes | None = b"ex.com:8080"):
    return t.start(traceparent, tracestate, method, target, host, b"10.0.0.9", "web")


def header(lines: bytes) -> tuple[bytes, bytes | None]:
    m = HEADER.fullmatch(lines)
    assert m, lines
    return m.group(1), m.group(2)


def test_sampled_request_exports_a_server_span_and_one_client_span_per_try(rx, tracer):
    t = tracer(1.0, name="edge-1")
    r = start(t)
    assert r.sampled and re.fullmatch(r"[0-9a-f]{32}", r.trace_id)
    first, _ = header(r.try_headers("127.0.0.1:9001", 1))
    r.end_try(None, "connect")
    second, _ = header(r.try_headers("127.0.0.1:9002", 2))
    r.end_try(200, None)
    r.finish(200, "api", "127.0.0.1:9002")
    t.shutdown()

    spans = rx.wait_for(3)
    assert len(spans) == 3 and {s.trace_id for s in spans} == {r.trace_id}
    server = next(s for s in spans if s.kind == "SERVER")
    tries = sorted((s for s in spans if s.kind == "CLIENT"),
                   key=lambda s: s.attributes["poise.attempt"])
    assert server.parent_span_id == "" and server.name == "GET" and server.status == "UNSET"
    assert server.attributes == {
        "http.request.method": "GET", "url.path": "/a/b", "url.query": "x=1",
        "url.scheme": "http", "client.address": "10.0.0.9", "network.protocol.version": "1.1",
        "poise.listener": "web", "server.address": "ex.com", "server.port": 8080,
        "http.response.status_code": 200, "poise.cluster": "api",
        "poise.backend": "127.0.0.1:9002"}
    assert server.resource["service.name"] == "edge-1" and server.scope == "poise"
    assert [s.parent_span_id for s in tries] == [server.span_id] * 2
    # the backend's spans become children of poise's try span
    assert [parse_traceparent(h)[1].decode() for h in (first, second)] == [
        s.span_id for s in tries]
    assert all(h.endswith(b"-01") for h in (first, second))
    failed, ok = tries
    assert failed.name == "GET" and failed.status == "ERROR"
    assert failed.attributes == {
        "http.request.method": "GET", "server.address": "127.0.0.1", "server.port": 9001,
        "url.full": "http://127.0.0.1:9001/a/b?x=1", "network.protocol.version": "1.1",
        "poise.attempt": 1, "error.type": "connect"}
    assert ok.status == "UNSET" and ok.attributes["http.response.status_code"] == 200
    assert ok.attributes["http.request.resend_count"] == 1 and "error.type" not in ok.attributes
    assert server.start_ns <= failed.start_ns <= failed.end_ns <= ok.start_ns <= server.end_ns


def test_sampled_client_context_is_continued(rx, tracer):
    t = tracer(0.0)   # parent-based: the client's sampled flag wins over the ratio
    r = start(t, SAMPLED, b"congo=t61rcWkgMzE, rojo=00f067aa0ba902b7")
    assert r.sampled and r.trace_id == CLIENT_TRACE
    tp, ts = header(r.try_headers("10.1.1.1:80", 1))
    assert tp.startswith(f"00-{CLIENT_TRACE}-".encode()) and tp.endswith(b"-01")
    assert ts == b"congo=t61rcWkgMzE, rojo=00f067aa0ba902b7"
    r.end_try(503, None)
    r.finish(503, "api", "10.1.1.1:80")
    t.shutdown()

    server, client = sorted(rx.wait_for(2), key=lambda s: s.kind != "SERVER")
    assert server.trace_id == client.trace_id == CLIENT_TRACE
    assert server.parent_span_id == CLIENT_SPAN and client.parent_span_id == server.span_id
    assert tp.decode().split("-")[2] == client.span_id
    assert server.trace_state.startswith("congo=t61rcWkgMzE")
    assert server.status == "ERROR" and server.attributes["error.type"] == "503"
    assert client.status == "ERROR" and client.attributes["http.response.status_code"] == 503


def test_unsampled_client_context_is_propagated_without_spans_or_sdk_calls(rx, tracer):
    t = tracer(1.0)
    # any use of OpenTelemetry would now raise
    t._tracer = t._api = t._ids = t._empty = None
    r = start(t, UNSAMPLED, b"congo=t61rcWkgMzE")
    assert not r.sampled and r.trace_id == CLIENT_TRACE
    expected = UNSAMPLED.join([b"traceparent: ", b"\r\ntracestate: congo=t61rcWkgMzE\r\n"])
    assert r.try_headers("10.1.1.1:80", 1) == expected
    r.end_try(None, "timeout")
    assert r.try_headers("10.1.1.2:80", 2) == expected
    r.end_try(200, None)
    r.finish(200, "api", "10.1.1.2:80")
    t.shutdown()
    assert rx.spans == [] and rx.requests == 0


def test_ratio_zero_starts_traces_but_exports_nothing(rx, tracer):
    t = tracer(0.0)
    seen = set()
    for _ in range(200):
        r = start(t)
        assert not r.sampled and re.fullmatch(r"[0-9a-f]{32}", r.trace_id)
        tp, ts = header(r.try_headers("10.1.1.1:80", 1))
        trace, parent, sampled = parse_traceparent(tp)
        assert (trace.decode(), sampled, ts) == (r.trace_id, False, None)
        seen.add(r.trace_id)
        r.finish(200, "api", "10.1.1.1:80")
    t.shutdown()
    assert len(seen) == 200
    assert rx.spans == [] and rx.requests == 0


def test_ratio_half_samples_about_half_decided_by_the_trace_id(rx, tracer):
    t = tracer(0.5, rng=random.Random(20240501))
    traces = [start(t) for _ in range(2000)]
    for r in traces:
        r.finish(200, "api", None)
    t.shutdown()
    sampled = {r.trace_id for r in traces if r.sampled}
    # binomial(2000, 0.5): sd = 22.4; ±100 is 4.5 sd (the seed makes it one fixed draw)
    assert 900 <= len(sampled) <= 1100
    # the TraceIdRatioBased rule: low 64 bits of the trace id below ratio * 2**64
    assert all(r.sampled == (int(r.trace_id[16:], 16) < 1 << 63) for r in traces)
    spans = rx.wait_for(len(sampled))
    assert {s.trace_id for s in spans} == sampled and len(spans) == len(sampled)


MALFORMED = [
    b"", b"00", SAMPLED[:-1], SAMPLED + b"0", SAMPLED + b"-extra",
    SAMPLED.upper(), SAMPLED.replace(b"0af7", b"0ag7"), b"ff" + SAMPLED[2:],
    f"00-{'0' * 32}-{CLIENT_SPAN}-01".encode(), f"00-{CLIENT_TRACE}-{'0' * 16}-01".encode(),
    SAMPLED.replace(b"-", b"_"), SAMPLED.replace(b"0af7", "0äf".encode()),
    f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-0x".encode(), b"\xff" * 55, b"00-+" + SAMPLED[4:],
]


@pytest.mark.parametrize("traceparent", MALFORMED)
def test_malformed_traceparent_starts_a_new_trace_and_drops_tracestate(rx, tracer, traceparent):
    t = tracer(1.0)
    r = start(t, traceparent, b"congo=t61rcWkgMzE")
    assert r.sampled and r.trace_id != CLIENT_TRACE
    tp, ts = header(r.try_headers("10.1.1.1:80", 1))
    assert ts is None and parse_traceparent(tp)[0].decode() == r.trace_id
    r.end_try(200, None)
    r.finish(200, "api", "10.1.1.1:80")
    t.shutdown()
    assert {s.parent_span_id for s in rx.wait_for(2) if s.kind == "SERVER"} == {""}


def test_future_version_with_extra_fields_is_continued():
    assert parse_traceparent(b"cc" + SAMPLED[2:] + b"-what-ever") == (
        CLIENT_TRACE.encode(), CLIENT_SPAN.encode(), True)
    assert parse_traceparent(b" \t" + UNSAMPLED[:-1] + b"2 ") == (
        CLIENT_TRACE.encode(), CLIENT_SPAN.encode(), False)


@pytest.mark.parametrize("tracestate", [
    b",".join(b"k%d=" % i + b"x" * 60 for i in range(10)),   # 650 bytes of valid members
    b"a=" + b"x" * 257, b"congo=t61rcWkgMzE\r\nX-Evil: 1", "congo=ä".encode(), b"Congo=1",
    b"congo", b"=1", b"congo=1 ,rojo", b",".join(b"k%d=1" % i for i in range(33)),
    b"congo=with=equals",
])
def test_invalid_tracestate_is_dropped_and_the_trace_continued(tracer, tracestate):
    assert not valid_tracestate(tracestate)
    r = start(tracer(0.0), UNSAMPLED, tracestate)
    assert r.trace_id == CLIENT_TRACE
    assert r.try_headers("10.1.1.1:80", 1) == b"traceparent: " + UNSAMPLED + b"\r\n"


@pytest.mark.parametrize("tracestate", [
    b"congo=t61rcWkgMzE", b"rojo=00f067aa0ba902b7,congo=t61rcWkgMzE", b"a@b=1, , c/d*e_f-g=x y",
    b",".join(b"k%d=1" % i for i in range(32)), b"k=" + b"v" * 256,
])
def test_valid_tracestate_is_kept(tracestate):
    assert valid_tracestate(tracestate)


@pytest.fixture(scope="module")
def quiet_tracer():
    with OtlpReceiver() as r:
        t = Tracer(Tracing(otlp_endpoint=r.endpoint, sample_ratio=0.0), rng=random.Random(3))
        yield t
        t.shutdown()


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.none(), st.binary(max_size=80),
                 st.builds(lambda a, b: a + b, st.sampled_from([SAMPLED, UNSAMPLED]),
                           st.binary(max_size=4))),
       st.one_of(st.none(), st.binary(max_size=600)))
@example(SAMPLED, b"\x00" * 600)
def test_hostile_headers_never_raise(quiet_tracer, traceparent, tracestate):
    r = start(quiet_tracer, traceparent, tracestate, method=b"\xff\x00", target=b"\xfe?\x80",
              host=b"[::1\xb2]:\xb2")
    parsed = parse_traceparent(traceparent) if traceparent else None
    assert r.trace_id == (parsed[0].decode() if parsed else r.trace_id)
    tp, ts = header(r.try_headers("10.1.1.1:80", 1))
    assert parse_traceparent(tp)[0].decode() == r.trace_id
    assert ts is None or (parsed and valid_tracestate(ts))
    r.end_try(None, "reset")
    r.finish(502, "api", None)


@given(version=st.text("0123456789abcdef", min_size=2, max_size=2),
       trace=st.integers(0, (1 << 128) - 1), span=st.integers(0, (1 << 64) - 1),
       flags=st.integers(0, 255))
def test_parse_traceparent_accepts_exactly_the_valid_ones(version, trace, span, flags):
    value = f"{version}-{trace:032x}-{span:016x}-{flags:02x}".encode()
    expected = None
    if version != "ff" and trace and span:
        expected = (f"{trace:032x}".encode(), f"{span:016x}".encode(), bool(flags & 1))
    assert parse_traceparent(value) == expected


def test_server_span_details_unknown_method_499_and_trys_left_open(rx, tracer):
    t = tracer(1.0)
    purge = start(t, method=b"PURGE", target=b"http://ex.com/x?y", host=b"[::1]")
    purge.try_headers("10.1.1.1:80", 1)
    purge.try_headers("10.1.1.2:80", 2)      # the first try was never ended
    purge.finish(499, "api", None)           # the client left during the second
    ok = start(t, target=b"/z", host=None)
    ok.try_headers("10.1.1.4:80", 1)
    ok.end_try(None, None)                   # no response, no reason given
    ok.try_headers("10.1.1.3:80", 2)
    ok.finish(200, "api", "10.1.1.3:80")     # the answering try is ended by finish
    ok.finish(200, "api", "10.1.1.3:80")     # a second finish is ignored
    t.shutdown()
    spans = rx.wait_for(6)
    assert len(spans) == 6
    by = {(s.trace_id, s.kind, s.attributes.get("poise.attempt")): s for s in spans}
    server = by[purge.trace_id, "SERVER", None]
    assert server.name == "HTTP" and server.status == "ERROR"
    assert server.attributes["http.request.method"] == "_OTHER"
    assert server.attributes["http.request.method_original"] == "PURGE"
    assert (server.attributes["url.path"], server.attributes["url.query"]) == ("/x", "y")
    assert (server.attributes["server.address"], server.attributes["server.port"]) == ("::1", 80)
    assert server.attributes["error.type"] == "client_closed"
    assert "http.response.status_code" not in server.attributes
    assert by[purge.trace_id, "CLIENT", 1].attributes["error.type"] == "abandoned"
    assert by[purge.trace_id, "CLIENT", 2].attributes["error.type"] == "aborted"
    assert by[purge.trace_id, "CLIENT", 2].attributes["url.full"] == "http://10.1.1.2:80/x?y"
    plain = by[ok.trace_id, "SERVER", None]
    assert "server.address" not in plain.attributes and plain.status == "UNSET"
    failed = by[ok.trace_id, "CLIENT", 1]
    assert failed.status == "ERROR" and failed.attributes["error.type"] == "_OTHER"
    assert "http.response.status_code" not in failed.attributes
    answered = by[ok.trace_id, "CLIENT", 2]
    assert answered.status == "UNSET" and answered.attributes["http.response.status_code"] == 200


def test_shutdown_flushes_queued_spans(rx, tracer):
    t = tracer(1.0)
    for _ in range(10):
        start(t).finish(204, "api", None)
    assert rx.spans == []   # still queued: the batch processor exports every 5 s by default
    t.shutdown()
    assert len(rx.spans) == 10 and rx.requests >= 1   # no waiting: shutdown exported them
    t.shutdown()   # idempotent


def test_shutdown_is_bounded_when_the_collector_hangs():
    hung = socket.create_server(("127.0.0.1", 0))   # accepts connections, never answers
    try:
        port = hung.getsockname()[1]
        t = Tracer(Tracing(otlp_endpoint=f"http://127.0.0.1:{port}", sample_ratio=1.0))
        start(t).finish(200, "api", None)
        began = time.monotonic()
        t.shutdown(timeout=0.3)
        # the contract bound, not a performance figure: one export alone would take the
        # exporter's 10 s timeout
        assert time.monotonic() - began < 5
    finally:
        hung.close()


def test_gzip_exports_are_received(rx, tracer, monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "gzip")
    t = tracer(1.0)
    start(t).finish(200, "api", None)
    t.shutdown()
    assert len(rx.wait_for(1)) == 1 and rx.encodings == ["gzip"]


def test_missing_extra_is_a_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)
    with pytest.raises(ConfigError, match=r"pip install 'poise\[otel\]'"):
        Tracer(Tracing())


def test_poise_imports_tracing_without_opentelemetry():
    code = ("import sys; import poise.observability.tracing, poise.config; "
            "assert not [m for m in sys.modules if m.startswith('opentelemetry')], 'imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
