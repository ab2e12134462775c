"""The slow paths of an exchange: circuit-breaker admission, opening a connection
(with failover to other backends), waiting in the cluster's queue for a connection,
the request deadline, and retries.

Functions of an :class:`~poise.proxy.http.exchange.Exchange` (whose attributes they
use).  None of this runs for a cluster without limits, retries or a request timeout,
beyond a few attribute checks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from poise.core.limits import Overflow
from poise.core.outlier import Outcome
from poise.core.retry import backoff
from poise.errors import (
    Overloaded,
    PoiseError,
    RequestDeadlineExceeded,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from poise.proxy.deadline import SLACK
from poise.proxy.http.accounting import NO_RESPONSE, begin_try, end_try, exchange_over
from poise.proxy.http.headers import CRLF
from poise.proxy.http.heads import upstream_head
from poise.proxy.http2.upstream import h2_send

if TYPE_CHECKING:
    from collections.abc import Awaitable

    from poise.proxy.http.cluster import ClusterRuntime
    from poise.proxy.http.exchange import Exchange
    from poise.proxy.http.pool import UpstreamPool
    from poise.proxy.http.upstream import UpstreamConnection

# Slots an exchange holds in its cluster's limits (bits of ``_held``).
REQUEST: Final = 1
RETRY: Final = 2
PENDING: Final = 4


# -- admission ---------------------------------------------------------------------


def admit(ex: Exchange, cluster: ClusterRuntime) -> None:
    """Take a request slot (raises Overloaded), start the request deadline, count
    the request for the retry budget and keep the body to replay if allowed."""
    limits = cluster.limits
    if limits is not None:
        if not limits.try_request():
            raise Overloaded(Overflow.MAX_REQUESTS.value)
        ex._held |= REQUEST
    if cluster.request_timeout is not None:
        ex._deadline_at = ex.client.loop.time() + cluster.request_timeout
    retry = cluster.retry
    if retry is not None:
        retry.budget.record_request()
        ex._replay_limit = retry.max_buffered_body
        if ex._replay is None and retry.non_idempotent:
            # Not started yet, so nothing was sent: what _up_out holds is the whole
            # (framed) body so far, a chunked body's last chunk included.
            ex._replay = list(ex._up_out)
            ex._replay_size = sum(len(b) for b in ex._up_out)
        if ex._replay_size > ex._replay_limit:
            ex._replay = None


# -- opening a connection, failing over to other backends --------------------------


def open_connection(ex: Exchange) -> None:
    """Open a connection to ``ex.pool`` (counted against the limits at once)."""
    ex.connecting = True
    ex.client.loop.create_task(_connect(ex, ex.pool.connect(_connect_timeout(ex), ex.client.owner())))


async def _connect(ex: Exchange, connecting: Awaitable[UpstreamConnection]) -> None:
    """The connect task: ``ex.connecting`` is true exactly while it runs."""
    try:
        await _connect_failing_over(ex, connecting)
    finally:
        ex.connecting = False


async def _connect_failing_over(ex: Exchange,
                                connecting: Awaitable[UpstreamConnection]) -> None:
    """Finish opening a connection; when connecting fails (nothing was sent yet)
    try the other ready backends once each before answering with the last error."""
    tried: list[UpstreamPool] = list(ex._tried or ())     # (earlier tries failed)
    while True:
        pool = ex.pool
        try:
            conn = await connecting
            break
        except PoiseError as e:
            if ex.finished:
                return
            tried.append(pool)
            nxt = fail_over(ex, pool, e, tried)
            if nxt is None:
                return
            if ex.trace is not None:    # nothing was sent: the head names the new try
                ex._up_out[0] = upstream_head(ex)
            begin_try(ex)
            connecting = nxt.connect(_connect_timeout(ex), ex.client.owner())
    if ex.finished:
        pool.release(conn)      # the client went away while we connected
        return
    # (``conn.reused`` as connect made it: False for a new connection, True for a
    # revived parked one, which may have died while parked like any pooled one.)
    ex._attach(conn)
    ex.flush_upstream()


def fail_over(ex: Exchange, pool: UpstreamPool, error: PoiseError,
              tried: list[UpstreamPool]) -> UpstreamPool | None:
    """Connecting to ``pool`` failed with ``error`` (nothing was sent): count the try,
    then move ``ex`` to the next backend not in ``tried`` (its pool is returned), or
    answer the client with the error (None).  Another backend is always safe to try,
    unless the cluster's retries leave connect failures out."""
    cluster = ex.cluster
    pool.errors += 1
    pool.tries.connect_errors += 1
    end_try(ex, NO_RESPONSE, error)
    if cluster.observe is not None:
        ex._observe(False)
    if cluster.failure_statuses is not None:
        cluster.report(pool, Outcome.GATEWAY_ERROR)
    failover = error.retryable and (cluster.retry is None or cluster.retry.on_connect_failure)
    nxt = cluster.fallback(ex, tried) if failover else None
    if nxt is not None and cluster.limits is not None and not cluster.h2 and \
            cluster.limits.can_connect(nxt.active, nxt.max_connections) is not None:
        nxt = None
    if nxt is None:
        ex.respond_error(deadline_error(ex, error))
        return None
    pool.stats.in_flight -= 1
    nxt.stats.in_flight += 1
    nxt.requests += 1
    ex.pool = nxt
    if cluster.load_changed is not None:
        cluster.load_changed(pool.backend)
        cluster.load_changed(nxt.backend)
    return nxt


# -- waiting for a connection ----------------------------------------------------


def may_connect(ex: Exchange) -> bool:
    """True when a new connection to ``ex.pool`` is within the limits, or the pool
    has a parked connection to revive; otherwise wait in the cluster's queue (or
    answer 503 when the queue is full)."""
    cluster = ex.cluster
    pool = ex.pool
    if pool.parked:
        return True     # connecting revives a parked connection: none is added
    limits = cluster.limits
    assert limits is not None       # (called only for a cluster with limits)
    blocked = limits.can_connect(pool.active, pool.max_connections)
    if blocked is None:
        return True
    if not limits.try_pend():
        _overflow(ex, Overflow.MAX_PENDING)
        return False
    ex._held |= PENDING
    cluster.pending.append(ex)
    timeout = cluster.queue_timeout
    if ex._deadline_at is not None:
        timeout = min(timeout, ex._deadline_at - ex.client.loop.time())
    ex._timer = ex.client.loop.call_later(max(0.0, timeout), _queue_expired, ex)
    if blocked is Overflow.MAX_CONNECTIONS:
        cluster.free_idle_connection()
    return False


def resume_from_queue(ex: Exchange, conn: UpstreamConnection | None) -> None:
    """Our turn: use ``conn`` (released by a finished request), or connect."""
    _leave_queue(ex)
    begin_try(ex)
    if conn is not None:
        conn.reused = True
        ex._attach(conn)
        ex.flush_upstream()
    else:
        open_connection(ex)


def _queue_expired(ex: Exchange) -> None:
    ex._timer = None
    _leave_queue(ex)
    if deadline_passed(ex):
        ex.respond_error(RequestDeadlineExceeded("request_timeout passed in the queue"))
    else:
        _overflow(ex, Overflow.QUEUE_TIMEOUT)


def _leave_queue(ex: Exchange) -> None:
    if ex._held & PENDING:
        ex._held &= ~PENDING
        limits = ex.cluster.limits
        assert limits is not None   # (PENDING is held only under limits)
        limits.end_pend()
        try:
            ex.cluster.pending.remove(ex)
        except ValueError:
            pass
    if ex._timer is not None:
        ex._timer.cancel()
        ex._timer = None


def _overflow(ex: Exchange, which: Overflow) -> None:
    limits = ex.cluster.limits
    if which is Overflow.QUEUE_TIMEOUT and limits is not None:
        limits.trip(which)
    ex.respond_error(Overloaded(which.value))


# -- the request deadline ----------------------------------------------------------


def _connect_timeout(ex: Exchange) -> float | None:
    """The connect timeout, shortened to what is left of the request deadline."""
    if ex._deadline_at is None:
        return None
    left = ex._deadline_at - ex.client.loop.time()
    return max(0.0, min(ex.pool.connect_timeout, left))


def arm_response_deadline(ex: Exchange, conn: UpstreamConnection) -> None:
    deadline_at = ex._deadline_at
    assert deadline_at is not None  # (called only for a request with a deadline)
    left = deadline_at - ex.client.loop.time()
    conn.deadline.set(max(0.0, min(conn.pool.response_timeout, left)))


def deadline_passed(ex: Exchange) -> bool:
    # (libuv timers have millisecond granularity: one firing at the deadline may
    # read a clock a hair before it.)
    return (ex._deadline_at is not None
            and ex.client.loop.time() + SLACK >= ex._deadline_at)


def _deadline_name(cluster: ClusterRuntime) -> str:
    """The request deadline, as an error message names it: ``request_timeout``, or
    the client's ``grpc-timeout`` when the cluster has none."""
    timeout = cluster.request_timeout
    return "the grpc-timeout deadline" if timeout is None else f"request_timeout ({timeout:g}s)"


def deadline_error(ex: Exchange, error: PoiseError) -> PoiseError:
    """``error``, or a deadline error when the request deadline is what ran out."""
    if deadline_passed(ex):
        return RequestDeadlineExceeded(f"{_deadline_name(ex.cluster)} passed: {error}")
    return error


# -- retries -------------------------------------------------------------------------


def may_retry(ex: Exchange, trigger: str) -> bool:
    """Whether this failed try may be retried: the cluster retries on ``trigger``
    (a RetryPolicy flag name, or "on_status"), tries are left, the request is
    replayable and nothing of the response was relayed, time is left, and the
    budget and the max_retries limit allow it (the retry is counted then)."""
    retry = ex.cluster.retry
    if retry is None or ex.finished:
        return False
    if 1 + (len(ex._tried) if ex._tried else 0) >= retry.attempts:
        return False
    if trigger != "on_status" and not getattr(retry, trigger):
        return False
    if ex._replay is None or ex.response_head_sent or ex._wrote_client:
        return False
    if deadline_passed(ex) or not retry.budget.try_withdraw():
        return False
    limits = ex.cluster.limits
    if limits is not None and not ex._held & RETRY:
        if not limits.try_retry():
            return False
        ex._held |= RETRY
    return True


def accept_response(ex: Exchange, status: int, fields: list[bytes]) -> bool:
    """Account for a final response head from the backend (errors, latency,
    outlier detection) and add a sticky cookie to ``fields``; False when it is
    dropped for a retry instead (nothing of it reaches the client)."""
    cluster = ex.cluster
    if status >= 500:
        ex.pool.errors += 1
    if cluster.observe is not None:
        ex._observe(status < 500)
    if cluster.failure_statuses is not None:
        if status in cluster.failure_statuses:
            cluster.report(ex.pool, cluster.outcome_of(status))
        elif ex.pool.failing:
            cluster.report(ex.pool, Outcome.SUCCESS)
    if cluster.retry is not None and status in cluster.retry.statuses \
            and may_retry(ex, "on_status"):
        end_try(ex, status)
        drop_response(ex)
        return False
    ex.status = status
    if cluster.set_cookie is not None:
        cookie = cluster.set_cookie(ex._ctx, ex.pool.backend)
        if cookie:
            fields += (b"set-cookie", b": ", cookie, CRLF)
    return True


def drop_response(ex: Exchange) -> None:
    """Stop relaying the response being received (its status is one to retry):
    the connection is closed once its parser returns, then the request retried."""
    conn = ex.conn
    assert conn is not None         # (called while its response head is relayed)
    ex.conn = None
    conn.exchange = None
    conn.usable = False
    retry_request(ex, UpstreamProtocolError("retried status"))


def retry_request(ex: Exchange, error: PoiseError) -> None:
    """Send the request again after a backoff, to another backend when one is left
    (``error``, this try's failure, is the answer if that cannot happen after all)."""
    cluster = ex.cluster
    retry = cluster.retry
    assert retry is not None        # (may_retry said yes)
    failed = ex.pool
    cluster.retries += 1
    ex._uncount()
    tried = ex._tried = [*(ex._tried or ()), failed]
    nxt = cluster.fallback(ex, tried) or failed
    delay = backoff(len(tried), cluster.rng, retry.backoff_base, retry.backoff_max)
    if ex._deadline_at is not None and \
            ex.client.loop.time() + delay >= ex._deadline_at:
        ex.respond_error(RequestDeadlineExceeded(
            f"{_deadline_name(cluster)} passed before a retry"))
        return
    ex._timer = ex.client.loop.call_later(delay, _resend, ex, nxt, error)


def _resend(ex: Exchange, pool: UpstreamPool, error: PoiseError) -> None:
    ex._timer = None
    if ex.finished:
        return
    if ex._replay is None:    # the body kept arriving and outgrew the replay buffer
        ex.respond_error(error)
        return
    ex.pool = pool
    # The body seen so far is all in _replay (whatever waited in _up_out too).
    ex._up_out = [upstream_head(ex), *ex._replay]
    ex._up_size = sum(len(b) for b in ex._up_out)
    ex._send(pool)
    ex.flush_upstream()


# -- failed tries, and the end -----------------------------------------------------


# (failed tries) ------------------------------------------------------------------


def retry_stale(ex: Exchange, conn: UpstreamConnection) -> bool:
    """A reused connection closed under ``ex``: when it died before any response byte
    and the request is replayable, re-send it once on a fresh connection (True)."""
    if (not conn.reused or ex.response_started or ex._retried or ex._replay is None
            or ex.finished):
        return False
    ex._retried = True
    ex.conn = None
    if ex.trace is not None:
        ex.trace.end_try(None, "stale_connection")
    # Everything sent so far, again: the head, then the body bytes seen (some may still
    # wait in _up_out, which follows them).
    ex._up_out[:0] = [upstream_head(ex), *ex._replay]
    if ex.cluster.h2:
        h2_send(ex, ex.pool)        # (a stream on another connection, or a new one)
    elif ex.cluster.limits is None or may_connect(ex):
        open_connection(ex)
    return True


def fail_try(ex: Exchange, conn: UpstreamConnection | None, error: PoiseError) -> None:
    """``ex``'s try failed with ``error``: count it, then retry, answer the client
    (502/503/504) or, when response bytes already went out, cut the client off."""
    cluster = ex.cluster
    ex.pool.errors += 1
    if isinstance(error, UpstreamTimeout):
        ex.pool.tries.timeouts += 1
    end_try(ex, NO_RESPONSE, error)
    if not ex.response_head_sent and cluster is not None:
        if cluster.observe is not None:
            ex._observe(False)
        if cluster.failure_statuses is not None:
            cluster.report(ex.pool, Outcome.GATEWAY_ERROR)
    if conn is not None:
        conn.exchange = None
        conn.close()
    ex.conn = None
    if ex.finished:
        return
    if ex._wrote_client:
        ex.finished = True      # truncated response: the client must see a close
        end_exchange(ex)
        ex.client.abort()
        return
    if may_retry(ex, "on_timeout" if isinstance(error, UpstreamTimeout) else "on_reset"):
        retry_request(ex, error)
        return
    ex._out.clear()
    ex.respond_error(deadline_error(ex, error))


def end_exchange(ex: Exchange) -> None:
    """The exchange is over: nothing counts as in flight or held any more; it is
    counted, logged and its trace ended (``accounting.exchange_over``)."""
    if ex._counted:       # (_uncount, inlined: this runs for every request)
        ex._counted = False
        ex.pool.stats.in_flight -= 1
        if ex.cluster.load_changed is not None:
            ex.cluster.load_changed(ex.pool.backend)
    if ex._held:
        if ex._held & PENDING or ex._timer is not None:
            _leave_queue(ex)
        limits = ex.cluster.limits
        assert limits is not None   # (slots are held only under limits)
        if ex._held & REQUEST:
            limits.end_request()
        if ex._held & RETRY:
            limits.end_retry()
        ex._held = 0
    elif ex._timer is not None:
        ex._timer.cancel()
        ex._timer = None
    exchange_over(ex)
