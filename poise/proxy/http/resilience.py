"""The slow paths of an exchange: circuit-breaker admission, opening a connection
(with failover to other backends), waiting in the cluster's queue for a connection,
the request deadline, and retries.

A mixin of :class:`~poise.proxy.http.exchange.Exchange` (its slots are declared and
initialised there).  None of this runs for a cluster without limits, retries or a
request timeout, beyond a few attribute checks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from poise.core.limits import Overflow
from poise.core.outlier import Outcome
from poise.core.retry import backoff
from poise.errors import Overloaded, PoiseError, RequestDeadlineExceeded, UpstreamProtocolError
from poise.proxy.deadline import SLACK

if TYPE_CHECKING:
    from collections.abc import Awaitable

    from poise.proxy.http.cluster import ClusterRuntime
    from poise.proxy.http.upstream import UpstreamConnection, UpstreamPool

# Slots an exchange holds in its cluster's limits (bits of ``_held``).
REQUEST = 1
RETRY = 2
PENDING = 4


class Resilience:
    # Its slots (_held, _tried, _deadline_at, _timer) are Exchange's: two bases
    # with slots of their own cannot be combined.
    __slots__ = ()

    # -- admission ---------------------------------------------------------------------

    def _admit(self, cluster: ClusterRuntime) -> None:
        """Take a request slot (raises Overloaded), start the request deadline, count
        the request for the retry budget and keep the body to replay if allowed."""
        limits = cluster.limits
        if limits is not None:
            if not limits.try_request():
                raise Overloaded(Overflow.MAX_REQUESTS.value)
            self._held |= REQUEST
        if cluster.request_timeout is not None:
            self._deadline_at = self.client.loop.time() + cluster.request_timeout
        retry = cluster.retry
        if retry is not None:
            retry.budget.record_request()
            self._replay_limit = retry.max_buffered_body
            if self._replay is None and retry.non_idempotent:
                # Not started yet, so nothing was sent: what _up_out holds is the whole
                # (framed) body so far, a chunked body's last chunk included.
                self._replay = list(self._up_out)
                self._replay_size = sum(len(b) for b in self._up_out)
            if self._replay_size > self._replay_limit:
                self._replay = None

    # -- opening a connection, failing over to other backends --------------------------

    def _open(self) -> None:
        """Open a connection to ``self.pool`` (counted against the limits at once)."""
        self.client.loop.create_task(self._connect(self.pool.connect(self._connect_timeout())))

    async def _connect(self, connecting: Awaitable[UpstreamConnection]) -> None:
        """Finish opening a connection; when connecting fails (nothing was sent yet)
        try the other ready backends once each before answering with the last error."""
        tried: list[UpstreamPool] = list(self._tried or ())     # (earlier tries failed)
        cluster = self.cluster
        while True:
            pool = self.pool
            try:
                conn = await connecting
                break
            except PoiseError as e:
                if self.finished:
                    return
                tried.append(pool)
                if cluster.observe is not None:
                    self._observe(False)
                if cluster.failure_statuses is not None:
                    cluster.report(pool, Outcome.GATEWAY_ERROR)
                # Nothing was sent: another backend is always safe to try, unless the
                # cluster's retries leave connect failures out.
                failover = e.retryable and (cluster.retry is None
                                            or cluster.retry.on_connect_failure)
                nxt = cluster.fallback(self, tried) if failover else None
                if nxt is not None and cluster.limits is not None and \
                        cluster.limits.can_connect(nxt.active, nxt.max_connections) is not None:
                    nxt = None
                if nxt is None:
                    self.respond_error(self._deadline_error(e))
                    return
                pool.stats.in_flight -= 1
                nxt.stats.in_flight += 1
                self.pool = nxt
                connecting = nxt.connect(self._connect_timeout())
                if self.cluster.load_changed is not None:
                    self.cluster.load_changed(pool.backend)
                    self.cluster.load_changed(nxt.backend)
        if self.finished:
            pool.release(conn)      # the client went away while we connected
            return
        conn.reused = False
        self._attach(conn)
        self.flush_upstream()

    # -- waiting for a connection ----------------------------------------------------

    def _may_connect(self) -> bool:
        """True when a new connection to ``self.pool`` is within the limits; otherwise
        wait in the cluster's queue (or answer 503 when the queue is full)."""
        cluster = self.cluster
        pool = self.pool
        limits = cluster.limits
        blocked = limits.can_connect(pool.active, pool.max_connections)
        if blocked is None:
            return True
        if not limits.try_pend():
            self._overflow(Overflow.MAX_PENDING)
            return False
        self._held |= PENDING
        cluster.pending.append(self)
        timeout = cluster.queue_timeout
        if self._deadline_at is not None:
            timeout = min(timeout, self._deadline_at - self.client.loop.time())
        self._timer = self.client.loop.call_later(max(0.0, timeout), self._queue_expired)
        if blocked is Overflow.MAX_CONNECTIONS:
            cluster.free_idle_connection()
        return False

    def dequeued(self, conn: UpstreamConnection | None) -> None:
        """Our turn: use ``conn`` (released by a finished request), or connect."""
        self._leave_queue()
        if conn is not None:
            conn.reused = True
            self._attach(conn)
            self.flush_upstream()
        else:
            self._open()

    def _queue_expired(self) -> None:
        self._timer = None
        self._leave_queue()
        if self._deadline_passed():
            self.respond_error(RequestDeadlineExceeded("request_timeout passed in the queue"))
        else:
            self._overflow(Overflow.QUEUE_TIMEOUT)

    def _leave_queue(self) -> None:
        if self._held & PENDING:
            self._held &= ~PENDING
            self.cluster.limits.end_pend()
            try:
                self.cluster.pending.remove(self)
            except ValueError:
                pass
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _overflow(self, which: Overflow) -> None:
        if which is Overflow.QUEUE_TIMEOUT:
            self.cluster.limits.trip(which)
        self.respond_error(Overloaded(which.value))

    # -- the request deadline ----------------------------------------------------------

    def _connect_timeout(self) -> float | None:
        """The connect timeout, shortened to what is left of the request deadline."""
        if self._deadline_at is None:
            return None
        left = self._deadline_at - self.client.loop.time()
        return max(0.0, min(self.pool.connect_timeout, left))

    def _arm_response_deadline(self, conn: UpstreamConnection) -> None:
        left = self._deadline_at - self.client.loop.time()
        conn.deadline.set(max(0.0, min(conn.pool.response_timeout, left)))

    def _deadline_passed(self) -> bool:
        # (libuv timers have millisecond granularity: one firing at the deadline may
        # read a clock a hair before it.)
        return (self._deadline_at is not None
                and self.client.loop.time() + SLACK >= self._deadline_at)

    def _deadline_error(self, error: PoiseError) -> PoiseError:
        """``error``, or a deadline error when the request deadline is what ran out."""
        if self._deadline_passed():
            return RequestDeadlineExceeded(
                f"request_timeout ({self.cluster.request_timeout:g}s) passed: {error}")
        return error

    # -- retries -------------------------------------------------------------------------

    def _may_retry(self, trigger: str) -> bool:
        """Whether this failed try may be retried: the cluster retries on ``trigger``
        (a RetryPolicy flag name, or "on_status"), tries are left, the request is
        replayable and nothing of the response was relayed, time is left, and the
        budget and the max_retries limit allow it (the retry is counted then)."""
        retry = self.cluster.retry
        if retry is None or self.finished:
            return False
        if 1 + (len(self._tried) if self._tried else 0) >= retry.attempts:
            return False
        if trigger != "on_status" and not getattr(retry, trigger):
            return False
        if self._replay is None or self.response_head_sent or self._wrote_client:
            return False
        if self._deadline_passed() or not retry.budget.try_withdraw():
            return False
        limits = self.cluster.limits
        if limits is not None and not self._held & RETRY:
            if not limits.try_retry():
                return False
            self._held |= RETRY
        return True

    def _drop_response(self) -> None:
        """Stop relaying the response being received (its status is one to retry):
        the connection is closed once its parser returns, then the request retried."""
        conn = self.conn
        self.conn = None
        conn.exchange = None
        conn.usable = False
        self._retry(UpstreamProtocolError("retried status"))

    def _retry(self, error: PoiseError) -> None:
        """Send the request again after a backoff, to another backend when one is left
        (``error``, this try's failure, is the answer if that cannot happen after all)."""
        cluster = self.cluster
        retry = cluster.retry
        failed = self.pool
        self._uncount()
        tried = self._tried = [*(self._tried or ()), failed]
        nxt = cluster.fallback(self, tried) or failed
        delay = backoff(len(tried), cluster.rng, retry.backoff_base, retry.backoff_max)
        if self._deadline_at is not None and \
                self.client.loop.time() + delay >= self._deadline_at:
            self.respond_error(RequestDeadlineExceeded(
                f"request_timeout ({cluster.request_timeout:g}s) passed before a retry"))
            return
        self._timer = self.client.loop.call_later(delay, self._resend, nxt, error)

    def _resend(self, pool: UpstreamPool, error: PoiseError) -> None:
        self._timer = None
        if self.finished:
            return
        if self._replay is None:    # the body kept arriving and outgrew the replay buffer
            self.respond_error(error)
            return
        self.pool = pool
        # The body seen so far is all in _replay (whatever waited in _up_out too).
        self._up_out = [self._request_head(), *self._replay]
        self._up_size = sum(len(b) for b in self._up_out)
        self._send(pool)
        self.flush_upstream()

    # -- the end ---------------------------------------------------------------------------

    def _end(self) -> None:
        """The exchange is over: nothing counts as in flight or held any more."""
        if self._counted:       # (_uncount, inlined: this runs for every request)
            self._counted = False
            self.pool.stats.in_flight -= 1
            if self.cluster.load_changed is not None:
                self.cluster.load_changed(self.pool.backend)
        if self._held:
            if self._held & PENDING or self._timer is not None:
                self._leave_queue()
            limits = self.cluster.limits
            if self._held & REQUEST:
                limits.end_request()
            if self._held & RETRY:
                limits.end_retry()
            self._held = 0
        elif self._timer is not None:
            self._timer.cancel()
            self._timer = None
