"""OpenTelemetry tracing of proxied requests (needs the ``[otel]`` extra).

One :class:`Tracer` per worker process turns each request into a :class:`RequestTrace`:

- a W3C ``traceparent`` from the client is continued (its trace id, its span as parent);
  a missing or malformed one starts a new trace, and a ``tracestate`` is kept only with a
  valid ``traceparent`` and only when itself valid;
- sampling is parent-based: a sampled ``traceparent`` is traced, an unsampled one is not,
  a new trace is sampled with probability ``sample_ratio`` (decided from the trace id's
  low 64 bits, as OpenTelemetry's ``TraceIdRatioBased`` does, so every hop that samples
  by ratio agrees);
- a sampled request gets a SERVER span named after the method and one CLIENT child span
  per upstream try; the backend receives the try span as its parent;
- an unsampled request makes no OpenTelemetry call at all: the backend still receives a
  ``traceparent`` with the same trace id and flags ``00``.

The decision is made here, before any SDK call, which is why the SDK's own sampler is
ALWAYS_ON.  Spans leave in batches (``BatchSpanProcessor``, tuned by the ``OTEL_BSP_*``
variables) over OTLP/HTTP protobuf to ``{otlp_endpoint}/v1/traces``; a full queue drops
spans rather than slow requests down.
"""

from __future__ import annotations

import random
import re
import threading
from types import SimpleNamespace
from typing import Any

from poise import __version__
from poise.config.observability import Tracing
from poise.errors import ConfigError

_HEX = b"0123456789abcdef"
_ODD = frozenset(b"13579bdf")
_LOW64 = (1 << 64) - 1
_ZERO_TRACE = b"0" * 32
_ZERO_SPAN = b"0" * 16
# RFC 9110 methods and PATCH; any other is "_OTHER" (the conventions keep span names and
# attribute values low-cardinality).
_KNOWN = {m.encode(): m for m in
          ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")}
_MEMBER = re.compile(
    rb"[ \t]*(?:[a-z][-a-z0-9_*/]{0,255}|[a-z0-9][-a-z0-9_*/]{0,240}@[a-z][-a-z0-9_*/]{0,13})"
    rb"=[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e][ \t]*")
SHUTDOWN_TIMEOUT = 2.0


def parse_traceparent(value: bytes) -> tuple[bytes, bytes, bool] | None:
    """``(trace id, parent span id, sampled)`` of a W3C ``traceparent``, as lowercase hex
    bytes; None when it is malformed (wrong length or separators, non-hex or uppercase,
    version ``ff``, all-zero ids).  A future version may carry more fields after ours."""
    v = value
    if len(v) != 55:
        v = v.strip(b" \t")
        if len(v) < 55 or (len(v) > 55 and (v[:2] == b"00" or v[55] != 45)):   # 45: "-"
            return None
        v = v[:55]
    if v[2] != 45 or v[35] != 45 or v[52] != 45 or v.translate(None, _HEX) != b"---":
        return None
    trace, parent = v[3:35], v[36:52]
    if v[:2] == b"ff" or trace == _ZERO_TRACE or parent == _ZERO_SPAN:
        return None
    return trace, parent, v[54] in _ODD


def valid_tracestate(value: bytes) -> bool:
    """True for a W3C ``tracestate``: at most 512 bytes and 32 ``key=value`` members of
    printable ASCII (so it can be copied into a request head as is)."""
    if len(value) > 512:
        return False
    members = value.split(b",")
    return len(members) <= 32 and all(
        _MEMBER.fullmatch(m) or not m.strip(b" \t") for m in members)


def _host_port(host: str, default: int | None) -> tuple[str, int | None]:
    """``("example.com", 8080)`` from ``example.com:8080`` (``[::1]:80`` too); the
    default port when there is none, None when it is not a number."""
    name, colon, port = host.rpartition(":")
    if not colon or "]" in port:
        name, port = host, ""
    if name[:1] == "[" and name[-1:] == "]":
        name = name[1:-1]
    if not port:
        return name, default
    return name, int(port) if port.isascii() and port.isdigit() and len(port) <= 5 else None


def _load() -> SimpleNamespace:
    """The OpenTelemetry names poise uses, imported on first use so that poise runs
    without the extra; ConfigError (at config load or worker start) when it is missing."""
    try:
        from opentelemetry import trace
        from opentelemetry.context import Context
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.id_generator import IdGenerator
        from opentelemetry.sdk.trace.sampling import ALWAYS_ON
    except ImportError as e:
        raise ConfigError([("tracing", f"needs the OpenTelemetry SDK ({e.name} is missing): "
                                       "pip install 'poise[otel]'")]) from e
    return SimpleNamespace(
        trace=trace, Context=Context, OTLPSpanExporter=OTLPSpanExporter, Resource=Resource,
        TracerProvider=TracerProvider, BatchSpanProcessor=BatchSpanProcessor,
        IdGenerator=IdGenerator, ALWAYS_ON=ALWAYS_ON)


def check_available() -> None:
    """Raise ConfigError when the ``[otel]`` extra is not installed."""
    _load()


class Tracer:
    """Traces requests for one worker process; create it in the worker (the batch
    exporter runs a thread) and call :meth:`shutdown` when the worker stops.

    ``rng`` draws trace and span ids and the sampling decision (tests pass a seeded
    ``random.Random``); by default the ``random`` module's own generator, which Python
    reseeds in forked children, so workers never share a sequence of ids."""

    def __init__(self, spec: Tracing, *, rng: random.Random | None = None) -> None:
        o = _load()
        self._bits = (rng or random).getrandbits
        self._bound = round(spec.sample_ratio * (1 << 64))
        api = o.trace
        self._api = api
        self._server_kind, self._client_kind = api.SpanKind.SERVER, api.SpanKind.CLIENT
        self._error = api.StatusCode.ERROR
        self._empty = o.Context()
        bits = self._bits

        class _Ids(o.IdGenerator):
            # The trace id of a new trace is drawn before the SDK is asked (it decides
            # the sampling), so the SDK must take that one instead of drawing its own.
            next_trace = 0

            def generate_span_id(self) -> int:
                return bits(64) or 1

            def generate_trace_id(self) -> int:
                tid, self.next_trace = self.next_trace, 0
                return tid or bits(128) or 1

        self._ids = _Ids()
        resource = o.Resource.create(
            {"service.name": spec.service_name, "service.version": __version__})
        self._provider = o.TracerProvider(
            sampler=o.ALWAYS_ON, resource=resource, id_generator=self._ids,
            shutdown_on_exit=False)
        self.endpoint = f"{spec.otlp_endpoint.rstrip('/')}/v1/traces"
        self._exporter = o.OTLPSpanExporter(endpoint=self.endpoint)
        self._provider.add_span_processor(o.BatchSpanProcessor(self._exporter))
        self._tracer = self._provider.get_tracer("poise", __version__)
        self._stopped = False

    def __repr__(self) -> str:
        return f"<Tracer {self.endpoint} ratio={self._bound / (1 << 64):g}>"

    def start(self, traceparent: bytes | None, tracestate: bytes | None, method: bytes,
              target: bytes, host: bytes | None, client_ip: bytes, listener: str, *,
              scheme: str = "http", version: str = "1.1") -> RequestTrace:
        """The trace of one request, from its head; never raises on hostile headers.
        ``scheme`` and ``version`` (HTTP version of the client connection) become
        ``url.scheme`` and ``network.protocol.version``."""
        parsed = parse_traceparent(traceparent) if traceparent else None
        if parsed is None:
            tid = self._bits(128) or 1
            trace, parent, state = b"%032x" % tid, None, None
            sampled = (tid & _LOW64) < self._bound
        else:
            trace, parent, sampled = parsed
            state = tracestate.strip(b" \t") if tracestate else None
            if state is not None and not (state and valid_tracestate(state)):
                state = None
        if not sampled:
            return RequestTrace(trace, parent, state, self._bits)
        return _SampledTrace(self, trace, parent, state, method, target, host, client_ip,
                             listener, scheme, version)

    def shutdown(self, timeout: float = SHUTDOWN_TIMEOUT) -> None:
        """Export the spans still queued, waiting ``timeout`` seconds at most (an
        unreachable collector must not hold a stopping worker), then stop. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        flusher = threading.Thread(target=self._provider.shutdown, name="poise-otel-shutdown",
                                   daemon=True)
        flusher.start()
        flusher.join(timeout)
        if flusher.is_alive():
            # Cuts a retry back-off short; whatever is still queued is lost.
            self._exporter.shutdown()


class RequestTrace:
    """The trace of one request.  This base class is the unsampled case: it only
    propagates the trace context and never calls OpenTelemetry."""

    __slots__ = ("trace_id", "sampled", "_trace", "_parent", "_state", "_bits", "_headers")

    def __init__(self, trace: bytes, parent: bytes | None, state: bytes | None,
                 bits: Any) -> None:
        self.trace_id = trace.decode()
        self.sampled = False
        self._trace, self._parent, self._state, self._bits = trace, parent, state, bits
        self._headers: bytes | None = None

    def __repr__(self) -> str:
        return f"<RequestTrace {self.trace_id} sampled={self.sampled}>"

    def _propagate(self, span_id: bytes, flags: bytes) -> bytes:
        head = b"traceparent: 00-%s-%s-%s\r\n" % (self._trace, span_id, flags)
        return head + b"tracestate: %s\r\n" % self._state if self._state else head

    def try_headers(self, backend: str, attempt: int) -> bytes:
        """Header lines (CRLF-terminated) to add to the upstream request of this try;
        the caller removes the client's ``traceparent``/``tracestate`` first."""
        if self._headers is None:
            self._headers = self._propagate(
                self._parent or b"%016x" % (self._bits(64) or 1), b"00")
        return self._headers

    def end_try(self, status: int | None, error: str | None) -> None:
        """End the current try: ``status`` of the backend's response, or None with a
        low-cardinality ``error`` (e.g. ``timeout``, ``connect``, ``reset``; ``_OTHER``
        when None).  An ``error`` with a status marks a response poise refused."""

    def finish(self, status: int, cluster: str, backend: str | None) -> None:
        """End the request: ``status`` sent to the client (499 = it went away first)."""


class _SampledTrace(RequestTrace):
    """A traced request: a SERVER span, and a CLIENT span per upstream try."""

    __slots__ = ("_t", "_span", "_ctx", "_method", "_name", "_tail", "_try", "_try_backend")

    def __init__(self, t: Tracer, trace: bytes, parent: bytes | None, state: bytes | None,
                 method: bytes, target: bytes, host: bytes | None, client_ip: bytes,
                 listener: str, scheme: str, version: str) -> None:
        super().__init__(trace, parent, state, t._bits)
        self.sampled = True
        self._t = t
        self._try: Any = None
        self._try_backend: str | None = None
        api = t._api
        if parent is None:
            t._ids.next_trace = int(trace, 16)
            ctx = t._empty
        else:
            remote = api.SpanContext(
                int(trace, 16), int(parent, 16), is_remote=True,
                trace_flags=api.TraceFlags(api.TraceFlags.SAMPLED),
                trace_state=api.TraceState.from_header([state.decode()]) if state else None)
            ctx = api.set_span_in_context(api.NonRecordingSpan(remote), t._empty)
        raw = method.decode("latin-1")
        self._method = _KNOWN.get(method, "_OTHER")
        self._name = "HTTP" if self._method == "_OTHER" else self._method
        tail = target.decode("latin-1")
        if tail[:1] != "/" and "://" in tail:
            # absolute-form: keep the path and query, the authority is in server.address
            slash = tail.find("/", tail.find("://") + 3)
            tail = tail[slash:] if slash >= 0 else "/"
        self._tail = tail
        path, _, query = tail.partition("?")
        attrs: dict[str, Any] = {
            "http.request.method": self._method, "url.path": path, "url.scheme": scheme,
            "client.address": client_ip.decode("latin-1"),
            "network.protocol.version": version, "poise.listener": listener}
        if query:
            attrs["url.query"] = query
        if self._method == "_OTHER":
            attrs["http.request.method_original"] = raw
        if host:
            name, port = _host_port(host.decode("latin-1"), 443 if scheme == "https" else 80)
            attrs["server.address"] = name
            if port is not None:
                attrs["server.port"] = port
        self._span = t._tracer.start_span(
            self._name, context=ctx, kind=t._server_kind, attributes=attrs)
        self._ctx = api.set_span_in_context(self._span, t._empty)

    def try_headers(self, backend: str, attempt: int) -> bytes:
        if self._try is not None:
            self.end_try(None, "abandoned")
        name, port = _host_port(backend, 80)
        attrs: dict[str, Any] = {
            "http.request.method": self._method, "server.address": name,
            "url.full": f"http://{backend}{self._tail}", "network.protocol.version": "1.1",
            "poise.attempt": attempt}
        if port is not None:
            attrs["server.port"] = port
        if attempt > 1:
            attrs["http.request.resend_count"] = attempt - 1
        span = self._t._tracer.start_span(
            self._name, context=self._ctx, kind=self._t._client_kind, attributes=attrs)
        self._try, self._try_backend = span, backend
        return self._propagate(b"%016x" % span.get_span_context().span_id, b"01")

    def end_try(self, status: int | None, error: str | None) -> None:
        span = self._try
        if span is None:
            return
        self._try = self._try_backend = None
        if status is None:
            # no response is a failure even when the caller cannot say why ("_OTHER" is
            # the conventions' fallback error.type)
            error = error or "_OTHER"
        else:
            span.set_attribute("http.response.status_code", status)
        # CLIENT spans: a 4xx is an error too (the conventions' rule for clients).
        if error is not None or (status is not None and status >= 400):
            span.set_attribute("error.type", error or str(status))
            span.set_status(self._t._error, error)
        span.end()

    def finish(self, status: int, cluster: str, backend: str | None) -> None:
        span = self._span
        if span is None:
            return
        self._span = None
        if self._try is not None:
            if backend is not None and backend == self._try_backend and status != 499:
                self.end_try(status, None)
            else:
                self.end_try(None, "aborted")
        attrs: dict[str, Any] = {"poise.cluster": cluster}
        if backend is not None:
            attrs["poise.backend"] = backend
        if status == 499:
            # no response was sent: the client closed the connection first
            attrs["error.type"] = "client_closed"
        else:
            attrs["http.response.status_code"] = status
            if status >= 500:
                attrs["error.type"] = str(status)
        span.set_attributes(attrs)
        if status >= 499:
            span.set_status(self._t._error)
        span.end()
