"""A local OTLP/HTTP trace receiver for tests (what an OpenTelemetry Collector does on
port 4318, minus everything but keeping the spans).

A real HTTP server on a free 127.0.0.1 port, in a thread::

    with OtlpReceiver() as rx:
        tracer = Tracer(Tracing(otlp_endpoint=rx.endpoint, sample_ratio=1.0))
        ...
        spans = rx.wait_for(2)          # at least 2 spans, or AssertionError

It accepts ``POST /v1/traces`` with a protobuf ``ExportTraceServiceRequest`` body
(``Content-Encoding: gzip`` or ``deflate`` too), answers 200 with an empty
``ExportTraceServiceResponse`` and keeps every span as a :class:`ReceivedSpan`.
Anything else gets 404 (wrong path), 415 (not protobuf) or 400 (undecodable) and is
counted in ``rejected``.
"""

from __future__ import annotations

import gzip
import threading
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status


@dataclass(frozen=True)
class ReceivedSpan:
    """One decoded span; ids are lowercase hex, ``parent_span_id`` is "" for a root."""

    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    kind: str                    # "SERVER", "CLIENT", "INTERNAL", ...
    attributes: dict[str, Any]
    status: str                  # "UNSET", "OK" or "ERROR"
    status_message: str
    trace_state: str
    start_ns: int
    end_ns: int
    resource: dict[str, Any] = field(default_factory=dict)
    scope: str = ""


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, kind) if kind else None


def _attrs(kvs: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in kvs}


def decode(body: bytes) -> list[ReceivedSpan]:
    """The spans of a serialized ``ExportTraceServiceRequest``."""
    req = ExportTraceServiceRequest()
    req.ParseFromString(body)
    out = []
    for rs in req.resource_spans:
        resource = _attrs(rs.resource.attributes)
        for ss in rs.scope_spans:
            for s in ss.spans:
                out.append(ReceivedSpan(
                    trace_id=s.trace_id.hex(), span_id=s.span_id.hex(),
                    parent_span_id=s.parent_span_id.hex(), name=s.name,
                    kind=Span.SpanKind.Name(s.kind).removeprefix("SPAN_KIND_"),
                    attributes=_attrs(s.attributes),
                    status=Status.StatusCode.Name(s.status.code).removeprefix("STATUS_CODE_"),
                    status_message=s.status.message, trace_state=s.trace_state,
                    start_ns=s.start_time_unix_nano, end_ns=s.end_time_unix_nano,
                    resource=resource, scope=ss.scope.name))
    return out


class OtlpReceiver:
    """Collects spans posted to ``{endpoint}/v1/traces``; thread-safe.

    ``endpoint`` is the base URL to put in ``tracing.otlp_endpoint``; ``requests`` counts
    accepted export requests, ``rejected`` refused ones, ``encodings`` the
    Content-Encoding of each accepted request ("" for none)."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self.requests = 0
        self.rejected = 0
        self.encodings: list[str] = []
        self._cond = threading.Condition()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        # a short poll so that close() returns at once
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,),
                                        name="otlp-receiver", daemon=True)

    def __repr__(self) -> str:
        return f"<OtlpReceiver {self.endpoint} spans={len(self.spans)} requests={self.requests}>"

    def __enter__(self) -> OtlpReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        rx = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path != "/v1/traces":
                    return self._answer(404, b"")
                if self.headers.get("Content-Type") != "application/x-protobuf":
                    return self._answer(415, b"")
                encoding = (self.headers.get("Content-Encoding") or "").lower()
                try:
                    if encoding == "gzip":
                        body = gzip.decompress(body)
                    elif encoding == "deflate":
                        body = zlib.decompress(body)
                    spans = decode(body)
                except Exception:  # any undecodable body is the sender's bug: answer 400
                    return self._answer(400, b"")
                with rx._cond:
                    rx.spans.extend(spans)
                    rx.requests += 1
                    rx.encodings.append(encoding)
                    rx._cond.notify_all()
                self._answer(200, ExportTraceServiceResponse().SerializeToString())

            def _answer(self, status: int, body: bytes) -> None:
                if status != 200:
                    with rx._cond:
                        rx.rejected += 1
                self.send_response(status)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler

    def wait_for(self, n: int, timeout: float = 10.0) -> list[ReceivedSpan]:
        """All spans received once there are at least ``n``; AssertionError after
        ``timeout`` seconds."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.spans) >= n, timeout):
                raise AssertionError(f"{n} spans expected, {len(self.spans)} received "
                                     f"within {timeout}s: {self.spans!r}")
            return list(self.spans)

    def by_trace(self, trace_id: str) -> list[ReceivedSpan]:
        with self._cond:
            return [s for s in self.spans if s.trace_id == trace_id]
