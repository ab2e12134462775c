"""What the request path counts for metrics, and hands to the access log and tracing.

Counters are plain integers on the objects the request path already holds (a
listener's :class:`~poise.proxy.http.site.Site`, a backend's pool): no locks, no
labels, no Prometheus calls.  The worker reports their totals every second
(:mod:`poise.observability.shipper`) and the control plane renders the exposition.

With ``metrics: {enabled: false}`` the per-request status codes and latency
histograms are skipped; connection and byte counts stay (they cost an addition per
read or write).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Final

from poise.errors import (
    PoiseError,
    UpstreamConnectError,
    UpstreamProtocolError,
    UpstreamReset,
    UpstreamTimeout,
)
from poise.observability.access_format import HTTP2, HTTP10, HTTP11
from poise.observability.buckets import BOUNDS, SIZE
from poise.proxy.http import fasthead

if TYPE_CHECKING:
    from poise.proxy.http.exchange import Exchange
    from poise.proxy.http.site import Site

# (Final: a C static when compiled, not a module dict lookup per call.)
monotonic: Final = fasthead.clock      # (time.monotonic's clock)
# The ``code`` of an upstream try that ended without a response (reset, timeout,
# connect failure, malformed response): "error" in the exposition.
NO_RESPONSE: Final = 0
# A request whose client went away before poise sent any response (nginx's 499).
CLIENT_GONE: Final = 499
_REFERER: Final = b"referer"
_USER_AGENT: Final = b"user-agent"
# (A list, not the tuple: mypyc iterates a list natively.)
_BOUNDS: Final[list[float]] = list(BOUNDS)
# Each bucket's range (low, high]: the first from -inf, the last to +inf.
_LOWS: Final[list[float]] = [-math.inf, *BOUNDS]
_HIGHS: Final[list[float]] = [*BOUNDS, math.inf]


class Counts:
    """Observations by status code and by latency bucket (seconds summed too).

    Most traffic repeats one status and one latency bucket, so the latest status and
    the latest bucket are counted in native integers (``code``/``code_count``,
    ``_bucket``/``_bucket_count``) and folded into ``codes`` and ``_buckets`` only when
    another one comes; readers take both (:meth:`by_code`, :attr:`buckets`).  Latency
    buckets: see :mod:`poise.observability.buckets`."""

    __slots__ = ("codes", "code", "code_count", "_buckets", "_bucket", "_bucket_count",
                 "_low", "_high", "total")

    def __init__(self) -> None:
        self.codes: dict[int, int] = {}
        self.code = -1
        self.code_count = 0
        self._buckets: list[int] = [0] * SIZE
        self._bucket = 0
        self._bucket_count = 0
        self._low = _LOWS[0]        # the latest bucket's range: (_low, _high]
        self._high = _HIGHS[0]
        self.total = 0.0

    def observe(self, code: int, seconds: float) -> None:
        if code == self.code:
            self.code_count += 1
        else:
            self._switch(code)
        if self._low < seconds <= self._high:
            self._bucket_count += 1
        else:
            self._switch_bucket(seconds)
        self.total += seconds

    def _switch_bucket(self, seconds: float) -> None:
        i = 0
        for bound in _BOUNDS:       # (cheaper than bisect for a short list of floats)
            if seconds <= bound:
                break
            i += 1
        if self._bucket_count:
            self._buckets[self._bucket] += self._bucket_count
        self._bucket = i
        self._bucket_count = 1
        self._low = _LOWS[i]
        self._high = _HIGHS[i]

    @property
    def buckets(self) -> list[int]:
        """Every observation so far, per latency bucket (a new list)."""
        out = list(self._buckets)
        out[self._bucket] += self._bucket_count
        return out

    def _switch(self, code: int) -> None:
        if self.code_count:
            codes = self.codes
            codes[self.code] = codes.get(self.code, 0) + self.code_count
        self.code = code
        self.code_count = 1

    def by_code(self) -> dict[int, int]:
        """Every count so far, by status code."""
        out = dict(self.codes)
        if self.code_count:
            out[self.code] = out.get(self.code, 0) + self.code_count
        return out


class Tries(Counts):
    """One backend's upstream tries: by status (``NO_RESPONSE`` for failures), their
    latency (from the try being committed to the backend to its response's end or its
    failure), and the failures that have their own counter."""

    __slots__ = ("connect_errors", "timeouts")

    def __init__(self) -> None:
        super().__init__()
        self.connect_errors = 0
        self.timeouts = 0


# -- the tries and the trace of an exchange ------------------------------------------


def begin_try(ex: Exchange) -> None:
    """A try on ``ex.pool`` begins: a connection is attached or being opened for it
    (counted and timed for metrics; not while it waits in the queue)."""
    ex.attempts += 1
    if ex.client.site.counting:
        ex._try_began = monotonic()


def end_try(ex: Exchange, code: int, error: PoiseError | None = None,
            now: float = 0.0) -> None:
    """``ex``'s current try ended (at ``now``; default: the clock now) with the response
    status ``code`` (NO_RESPONSE: it failed with ``error``); counted once, however many
    ends are reported."""
    began = ex._try_began
    if began > 0.0:
        ex._try_began = 0.0
        if now == 0.0:
            now = monotonic()
        ex.pool.tries.observe(code, now - began)
    if ex.trace is not None:
        ex.trace.end_try(code or None, None if error is None else failure_kind(error))


def start_trace(ex: Exchange, tracer: Any) -> None:
    """Continue the client's trace context (W3C traceparent/tracestate), or start one;
    the context is re-sent to the backend per try (``heads.upstream_head``)."""
    traceparent, tracestate = ex.take_trace_context()
    client = ex.client
    ex.trace = tracer.start(traceparent, tracestate, ex.method, ex.target, ex.host,
                            client.peer_ip, client.site.name,
                            version="2" if client.h2 else "1.1" if ex.http11 else "1.0")


# -- responses ------------------------------------------------------------------------


def count_response(site: Site, cluster: str, status: int, began: float,
                   now: float = 0.0) -> None:
    """One response ``site`` sent for ``cluster`` (``""``: no route matched) at
    ``now`` (default: the clock now) for a request that began at ``began``."""
    if now == 0.0:
        now = monotonic()
    if cluster is site.last_route:      # (the same cluster's str object as last time)
        served = site.last_served
    else:
        found = site.served.get(cluster)
        if found is None:
            found = site.served[cluster] = Counts()
        served = site.last_served = found
        site.last_route = cluster
    served.observe(status, now - began if began > 0.0 else 0.0)


def exchange_over(ex: Exchange) -> None:
    """``ex`` is over (its response sent, failed or abandoned): count it, log it and
    end its trace.  Requests that never started (a parse error, a pipelined request
    the client did not wait for) are counted where their answer is written."""
    route = ex.route_name
    if route is None:
        return
    site = ex.client.site
    site.bytes_out += ex.bytes_sent
    status = ex.status or CLIENT_GONE
    if site.counting:
        count_response(site, route, status, ex.began, ex.ended)
    log = site.access_log
    trace = ex.trace
    if log is None and trace is None:
        return
    upstream = ex.pool.backend.address if ex.attempts else None
    if log is not None:
        referer, agent = _browser_fields(ex.fields)
        version = HTTP2 if ex.client.h2 else HTTP11 if ex.http11 else HTTP10
        log.log(ex.client.peer_ip, ex.method, ex.target, version, status, ex.bytes_sent,
                (ex.ended or monotonic()) - ex.began, route, upstream, ex.attempts,
                trace.trace_id if trace is not None else None, referer, agent)
    if trace is not None:
        trace.finish(status, route, upstream)


def answer_counted(site: Site, status: int, written: int, began: float, peer_ip: bytes,
                   method: bytes, target: bytes, http11: bool) -> None:
    """An error answer written outside an exchange (a request poise could not parse
    or frame, a head that timed out): counted for no cluster, and logged."""
    site.bytes_out += written
    if site.counting:
        count_response(site, "", status, began)
    log = site.access_log
    if log is not None:
        log.log(peer_ip, method, target, HTTP11 if http11 else HTTP10, status, written,
                monotonic() - began if began > 0.0 else 0.0, "", None, 0, None, None, None)


def failure_kind(error: PoiseError) -> str:
    """A try's failure as a short word (a trace's ``error.type``)."""
    if isinstance(error, UpstreamTimeout):
        return "timeout"
    if isinstance(error, UpstreamConnectError):
        return "connect"
    if isinstance(error, UpstreamReset):
        return "reset"
    if isinstance(error, UpstreamProtocolError):
        return "bad_response"
    return type(error).__name__


def _browser_fields(fields: list[bytes]) -> tuple[bytes | None, bytes | None]:
    """Referer and User-Agent from a request's flat header fields (access log only)."""
    referer: bytes | None = None
    agent: bytes | None = None
    for i in range(0, len(fields), 4):
        name = fields[i]
        if len(name) == 7 or len(name) == 10:
            low = name.lower()
            if low == _REFERER:
                referer = fields[i + 2]
            elif low == _USER_AGENT:
                agent = fields[i + 2]
    return referer, agent
