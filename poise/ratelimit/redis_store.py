"""Global rate limits: one GCRA per key in Redis, spent locally from leases.

Per worker process: one :class:`RedisStore` per Redis URL (get it from
:class:`RedisStores`), shared by every :class:`GlobalLimit` naming that URL.  A limit's
``take``/``park`` are those of its :class:`~poise.core.leases.LeaseBook` (the contract
is in :mod:`poise.core.leases`); the store turns the refills the books queue in one
event-loop turn into one pipelined round trip of ``EVALSHA`` calls of :data:`SCRIPT`.

The script and the keys are in :mod:`poise.ratelimit.gcra_script`.

Failures: every round trip is bounded by ``timeout`` (default 0.050 s, connect
included; redis-py's own retries are off).  On a timeout, connection or Redis error
the requests waiting for that round trip get their limit's ``on_redis_error`` verdict
(``allow``: 0.0, ``deny``: a wait of ``deny_wait``), the store goes down (one warning)
and, until a probe (backoff 0.1 s doubling to 2 s) succeeds (one info line), requests
that would ask Redis get that verdict at once.  Nothing is raised into a caller; a
parked request has its verdict within ``timeout`` (two when the store is saturated:
at most :data:`MAX_IN_FLIGHT` round trips of :data:`MAX_COMMANDS` refills at once).
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections import deque
from collections.abc import Callable
from urllib.parse import urlsplit, urlunsplit

from poise.core.clock import Clock, MonotonicClock
from poise.core.leases import Lease, LeaseBook
from poise.ratelimit.gcra_script import SCRIPT, SHA, key_prefix, redis_key

try:
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.exceptions import NoScriptError, RedisError
except ImportError as e:                                    # pragma: no cover
    raise ImportError("global rate limits need Redis' client: pip install 'poise[redis]'"
                      ) from e

log = logging.getLogger("poise")

MAX_COMMANDS = 512      # refills per round trip: Redis runs them in a few ms
MAX_IN_FLIGHT = 4       # round trips at once per store (so connections at once)
PROBE_FIRST, PROBE_MAX = 0.1, 2.0
PROBE_KEY = b"poise:rl:~probe"       # (no limit's: names are percent-encoded)
_FAILURES = (RedisError, OSError, TimeoutError)
_closing: set[asyncio.Task] = set()     # stores closing in the background


def redact(url: str) -> str:
    """``url`` without its password (for logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + netloc))


class RedisStore:
    """A Redis reached at ``url`` by one ``redis.asyncio`` client (connecting lazily).

    ``timeout`` bounds each round trip; ``clock`` must be the clock whose ``now`` the
    limits' ``take`` receives (default ``time.monotonic``).  Counters for metrics:
    ``up`` (False from a failure until a probe succeeds), ``errors`` (failed round
    trips, probes included), ``calls`` (refills asked), ``round_trips``,
    ``tokens_granted``.  :meth:`close` once done (reload, shutdown).
    """

    def __init__(self, url: str, *, timeout: float = 0.050, clock: Clock | None = None
                 ) -> None:
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0, not {timeout!r}")
        self.url = url
        self.timeout = timeout
        self.clock = clock or MonotonicClock()
        # (retries off: the timeout bounds the whole call, and a probe reconnects)
        self._client = aioredis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0), health_check_interval=0)
        self.up = True
        self.closed = False
        self.errors = self.calls = self.round_trips = self.tokens_granted = 0
        self._limits: weakref.WeakSet[GlobalLimit] = weakref.WeakSet()
        self._ready: list[GlobalLimit] = []
        self._pending: deque[tuple[GlobalLimit, Lease]] = deque()
        self._scheduled = False
        self._in_flight = 0
        self._tasks: set[asyncio.Task] = set()

    def register(self, limit: GlobalLimit) -> None:
        self._limits.add(limit)
        if not self.up or self.closed:
            limit.book.degrade(limit.error_verdict)

    def release(self, limit: GlobalLimit) -> None:
        """``limit`` is closed; the store closes with its last limit."""
        self._limits.discard(limit)
        if not self._limits:
            self.close_soon()

    # -- refills ------------------------------------------------------------------------

    def wake(self, limit: GlobalLimit) -> None:
        """``limit``'s book queued refills: send them at the end of this loop turn."""
        self._ready.append(limit)
        self._schedule()

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        for limit in self._ready:
            self._pending.extend((limit, lease) for lease in limit.book.drain())
        self._ready.clear()
        pending = self._pending
        if not self.up or self.closed:
            self._fail([pending.popleft() for _ in range(len(pending))])
            return
        while pending and self._in_flight < MAX_IN_FLIGHT:
            batch = [pending.popleft() for _ in range(min(len(pending), MAX_COMMANDS))]
            self._in_flight += 1
            self._spawn(self._send(batch))

    async def _send(self, batch: list[tuple[GlobalLimit, Lease]]) -> None:
        self.round_trips += 1
        self.calls += len(batch)
        calls = [(redis_key(limit.prefix, lease.key), limit.interval, limit.burst,
                  lease.asking) for limit, lease in batch]
        try:
            async with asyncio.timeout(self.timeout):
                answers = await self._evaluate(calls)
        except _FAILURES as exc:
            self._fail(batch)
            self._down(exc)
            return
        except asyncio.CancelledError:          # close()
            self._fail(batch)
            raise
        except Exception as exc:                # a bug in the client: still answer
            log.exception("global rate limits: redis %s: unexpected error",
                          redact(self.url))
            self._fail(batch)
            self._down(exc)
            return
        finally:
            self._in_flight -= 1
            if self._pending:
                self._schedule()
        now = self.clock.now()
        failure = None
        for (limit, lease), answer in zip(batch, answers, strict=True):
            try:
                if isinstance(answer, Exception):
                    raise answer
                granted, wait_us = int(answer[0]), int(answer[1])
            except (RedisError, TypeError, ValueError, IndexError) as exc:
                failure = exc
                _resolve(limit.book.fail, lease, limit.error_verdict)
                continue
            self.tokens_granted += granted
            _resolve(limit.book.settle, lease, granted, wait_us / 1e6, now)
        if failure is not None:
            self._down(failure)

    async def _evaluate(self, calls: list[tuple]) -> list:
        """One pipelined round trip of EVALSHAs (a second one when Redis lost the
        script, e.g. after a restart).  redis-py's registered scripts would cost a
        SCRIPT EXISTS round trip per pipeline."""
        pipe = self._client.pipeline(transaction=False)
        for args in calls:
            pipe.evalsha(SHA, 1, *args)
        answers = await pipe.execute(raise_on_error=False)
        missing = [i for i, a in enumerate(answers) if isinstance(a, NoScriptError)]
        if missing:
            pipe = self._client.pipeline(transaction=False)
            pipe.script_load(SCRIPT)
            for i in missing:
                pipe.evalsha(SHA, 1, *calls[i])
            again = await pipe.execute(raise_on_error=False)
            for i, answer in zip(missing, again[1:], strict=True):
                answers[i] = answer
        return answers

    def _fail(self, batch: list[tuple[GlobalLimit, Lease]]) -> None:
        for limit, lease in batch:
            _resolve(limit.book.fail, lease, limit.error_verdict)

    # -- up and down --------------------------------------------------------------------

    def _down(self, exc: BaseException) -> None:
        self.errors += 1
        if not self.up or self.closed:
            return
        self.up = False
        log.warning("global rate limits: redis %s failed (%s); limits follow their "
                    "on_redis_error until it is back", redact(self.url), _describe(exc))
        for limit in list(self._limits):
            limit.book.degrade(limit.error_verdict)
        self._spawn(self._probe())

    def _up(self) -> None:
        self.up = True
        log.info("global rate limits: redis %s answers again; limits enforced",
                 redact(self.url))
        for limit in list(self._limits):
            limit.book.degrade(None)

    async def _probe(self) -> None:
        """Until Redis runs the script again (which also reloads it after a restart
        and proves that writes work): retry with backoff."""
        delay = PROBE_FIRST
        while not self.closed:
            await asyncio.sleep(delay)
            try:
                async with asyncio.timeout(self.timeout):
                    pipe = self._client.pipeline(transaction=False)
                    pipe.script_load(SCRIPT)
                    pipe.evalsha(SHA, 1, PROBE_KEY, "1", "1000000", "1")
                    await pipe.execute()
            except Exception as exc:            # (whatever it is, probe again later)
                self.errors += 1
                log.debug("redis %s probe: %s", redact(self.url), _describe(exc))
                delay = min(PROBE_MAX, delay * 2)
                continue
            self._up()
            return

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def close_soon(self) -> None:
        """:meth:`close` from synchronous code: now, as a task of the running loop
        (without one, nothing of this store can be open any more)."""
        if self.closed:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._mark_closed()
            return
        task = loop.create_task(self.close())
        _closing.add(task)
        task.add_done_callback(_closing.discard)

    def _mark_closed(self) -> None:
        self.closed = True
        for limit in list(self._limits):
            limit.book.degrade(limit.error_verdict)

    async def close(self) -> None:
        """Stop: pending and parked requests get their ``on_redis_error`` verdict, so
        do later ones; the connections are closed."""
        if self.closed:
            return
        self._mark_closed()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._fail(list(self._pending))
        self._pending.clear()
        await self._client.aclose()

    def __repr__(self) -> str:
        return (f"<RedisStore {redact(self.url)} {'up' if self.up else 'down'} "
                f"calls={self.calls} errors={self.errors} in_flight={self._in_flight}>")


def _resolve(fn: Callable, *args) -> None:
    """Hand a verdict to the book; a callback that raises (a bug in the caller) must
    not strand the other requests of the round trip."""
    try:
        fn(*args)
    except Exception:
        log.exception("global rate limit: a parked request's callback raised")


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class GlobalLimit:
    """``rate`` requests per second per key, bursts of ``burst``, shared by every
    instance using the same Redis and ``name``.

    ``take(key, now)``/``park(key, callback)`` as in :mod:`poise.core.leases` (``now``
    from the store's clock).  ``on_error``: ``"allow"`` (default; verdict 0.0) or
    ``"deny"`` (verdict ``deny_wait``, default 1.0 s) while Redis fails.
    ``max_batch``, ``lease_ttl`` and ``max_keys`` go to the book (defaults 64, 1.0 s,
    10,000).  Construction does no I/O.
    """

    __slots__ = ("name", "rate", "burst", "store", "on_error", "error_verdict", "prefix",
                 "interval", "book", "take", "park", "__weakref__")

    def __init__(self, name: str, rate: float, burst: int, store: RedisStore, *,
                 on_error: str = "allow", deny_wait: float = 1.0, max_batch: int = 64,
                 lease_ttl: float = 1.0, max_keys: int = 10_000) -> None:
        if not rate > 0:
            raise ValueError(f"rate must be > 0 per second, not {rate!r}")
        if on_error not in ("allow", "deny"):
            raise ValueError(f"on_error must be 'allow' or 'deny', not {on_error!r}")
        if not deny_wait > 0:
            raise ValueError(f"deny_wait must be > 0, not {deny_wait!r}")
        self.name = name
        self.rate = rate
        self.store = store
        self.on_error = on_error
        self.error_verdict = 0.0 if on_error == "allow" else float(deny_wait)
        self.prefix = key_prefix(name)
        self.interval = format(1e6 / rate, ".17g")      # µs, as the script reads it
        self.book = LeaseBook(burst, max_batch=max_batch, lease_ttl=lease_ttl,
                              max_keys=max_keys, wake=self._wake)
        self.burst = burst
        self.take = self.book.take
        self.park = self.book.park
        store.register(self)

    def _wake(self) -> None:
        self.store.wake(self)

    def close(self) -> None:
        """No longer configured (reload, shutdown): later requests get the
        ``on_redis_error`` verdict, the store closes with its last limit."""
        self.book.degrade(self.error_verdict)
        self.store.release(self)

    def stats(self) -> dict[str, int | bool]:
        """Counters for metrics: the store's (shared by the limits of its URL) and
        this limit's ``fallbacks`` (requests answered ``on_redis_error``) and ``keys``."""
        store = self.store
        return {"up": store.up, "errors": store.errors, "calls": store.calls,
                "round_trips": store.round_trips, "tokens_granted": store.tokens_granted,
                "fallbacks": self.book.fallbacks, "keys": len(self.book)}

    def __repr__(self) -> str:
        return (f"<GlobalLimit {self.name} {self.rate:g}/s burst={self.burst} "
                f"on_error={self.on_error} keys={len(self.book)}>")


class RedisStores:
    """A worker's stores: one per URL, shared by the limits naming it.  A URL asked
    for with several timeouts gets the smallest."""

    def __init__(self, *, clock: Clock | None = None) -> None:
        self.clock = clock or MonotonicClock()
        self._stores: dict[str, RedisStore] = {}

    def get(self, url: str, timeout: float = 0.050) -> RedisStore:
        store = self._stores.get(url)
        if store is None or store.closed:
            store = self._stores[url] = RedisStore(url, timeout=timeout, clock=self.clock)
        elif timeout < store.timeout:
            store.timeout = timeout
        return store

    def __iter__(self):
        return iter(list(self._stores.values()))

    async def close(self) -> None:
        for store in list(self._stores.values()):
            await store.close()
        self._stores.clear()


STORES = RedisStores()      # this worker process's


def global_limit(*, name: str, per_second: float, burst: int, url: str,
                 timeout: float = 0.050, on_error: str = "allow") -> GlobalLimit:
    """A :class:`GlobalLimit` from config values, on this process's store for ``url``
    (:data:`STORES`); :meth:`GlobalLimit.close` it when it is no longer configured."""
    return GlobalLimit(name, per_second, burst, STORES.get(url, timeout), on_error=on_error)
