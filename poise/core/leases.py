"""The worker-side lease book of one global rate limit (pure: no I/O, ``now`` passed in).

A global limit is enforced by a store shared by every poise instance (Redis, see
:mod:`poise.ratelimit.redis_store`).  Asking the store per request would cost a round
trip each, so a worker *leases* tokens per key in batches and spends them locally.

Hot path, per request::

    verdict = book.take(key, now)
    if verdict is None:                 # no local token: a refill is on its way
        book.park(key, callback)        # callback(verdict) is called exactly once, later
    elif verdict == 0.0: admit
    else: deny, Retry-After = verdict   # seconds until one more request would fit

``take(key, now) -> float | None``: ``0.0`` admitted (a leased token spent), ``> 0``
denied (the wait), ``None`` the request must wait for a refill: the caller calls
``park(key, callback)`` at once (before anything else may run), and ``callback(verdict)``
gets ``0.0`` or a wait ``> 0`` when the refill is settled or failed.  Parked requests of
one key are answered in arrival order.  ``now`` is monotonic seconds, from the same
clock as the ``now`` given to :meth:`LeaseBook.settle`.

I/O side: ``take`` queues a :class:`Lease` that needs tokens (``lease.asking`` of them)
and calls ``wake()`` when the queue turns non-empty; the I/O layer :meth:`drain`\\ s the
queue, asks the store, then calls :meth:`settle` (tokens granted, store's wait) or
:meth:`fail` (store unreachable: the ``on_redis_error`` verdict) exactly once per lease
drained.  While the store is known to be down, :meth:`degrade` sets a fallback verdict
that ``take`` answers at once instead of parking.

Decisions (defaults in :class:`LeaseBook`):

- **Batch size** starts at 1 per key and doubles whenever demand outran the lease: a
  miss (no local token, no refill on its way) within ``lease_ttl`` of the previous ask,
  requests parked behind a prefetch that came too late, or a prefetch within a
  quarter of ``lease_ttl`` of the previous ask (so a busy key asks about 4 times per
  ``lease_ttl`` at most).  It halves when leased tokens expire unspent and never
  exceeds ``min(burst, max_batch)`` (the store could not grant more at once).  A key
  seen once costs one token, never a batch.
- **Prefetch**: once a key's batch is >= 2, a refill is asked when its tokens fall to
  half a batch, so steady traffic spends tokens while the next batch travels.
- **Lease lifetime**: tokens not spent within ``lease_ttl`` of their grant are dropped.
- **Parked requests** take granted tokens first, in order.  When more are parked than
  were asked for and the key still has room, one more refill asks for all of them (up
  to ``burst``); when the key is full they are denied with the store's wait.
- **Denied-until**: when the store says the key is full for ``wait`` seconds, ``take``
  answers that (decreasing) wait locally until then, without asking again.
- **Table**: at most ``max_keys`` entries; see :class:`LeaseBook`.

Accuracy (while the store answers): every admission spends a token the store granted,
so the store's GCRA bounds admissions; leasing only moves them in time, by at most
``lease_ttl``.  At any moment a holder (one worker process) keeps at most ``1.5 *
min(burst, max_batch)`` tokens of a key, so over any window the total admitted by H holders is within ``H * 1.5 *
min(burst, max_batch)`` of what one exact GCRA would admit: above it by tokens granted
before the window and spent in it, below it by tokens leased and dropped unspent.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

Callback = Callable[[float], None]

# Entries the eviction clock may pass over per insertion (second chances), so that
# one insertion does bounded work even when every entry is busy or recently used.
_CLOCK_STEPS = 8
# Idle entries at the old end of the table dropped per insertion without pressure.
_SWEEP = 2
# A key's batch grows until its refills come at most this often per lease_ttl: so a
# batch lasts a good part of its lease (few calls), yet well before it expires.
_REFILLS_PER_TTL = 4


class Lease:
    """One key's local state.  ``asking`` > 0 while a refill of that many tokens is
    queued or in flight; ``waiters`` the parked callbacks (None when none)."""

    __slots__ = ("key", "tokens", "expires", "denied_until", "asking", "ahead",
                 "waiters", "batch", "low", "last_ask", "grown", "used")

    def __init__(self, key: bytes) -> None:
        self.key = key
        self.tokens = 0
        self.expires = 0.0
        self.denied_until = 0.0
        self.asking = 0
        self.ahead = False      # the refill asked is a prefetch
        self.waiters: list[Callback] | None = None
        self.batch = 1
        self.low = -1           # prefetch when tokens <= low (-1: never, batch 1)
        self.last_ask = float("-inf")
        self.grown = False      # the batch grew since the last prefetch
        self.used = False       # the eviction clock's reference bit

    def idle(self, now: float, ttl: float) -> bool:
        """Nothing leased, awaited or remembered, and no ask for ``ttl`` (so its batch
        size is stale): dropping it loses nothing."""
        return (not self.asking and now - self.last_ask >= ttl
                and (not self.tokens or now >= self.expires) and now >= self.denied_until)

    def __repr__(self) -> str:
        return (f"<Lease {self.key!r} tokens={self.tokens} batch={self.batch} "
                f"asking={self.asking} parked={len(self.waiters or ())}>")


class LeaseBook:
    """Leased tokens per key for one limit of burst ``burst`` (integer >= 1).

    ``max_batch`` (default 64) caps a refill together with ``burst``; ``lease_ttl``
    (default 1.0 s) is how long granted tokens stay spendable; ``max_keys`` (default
    10,000) bounds the table: beyond it an insertion evicts, idle or least recently
    used entries first (a clock with second chances, bounded work per insertion).  An
    evicted entry that still awaits a refill stays valid for the I/O layer: its parked
    requests get their verdicts, only its leftover tokens are lost.  ``wake`` is called
    when the refill queue turns non-empty.  ``fallbacks`` counts requests answered
    with the fallback verdict; ``fallback`` is that verdict (None: the store is up).
    """

    __slots__ = ("burst", "cap", "lease_ttl", "max_keys", "fallback", "fallbacks", "_leases",
                 "_wanted", "_wake")

    def __init__(self, burst: int, *, max_batch: int = 64, lease_ttl: float = 1.0,
                 max_keys: int = 10_000, wake: Callable[[], None] | None = None) -> None:
        if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
            raise ValueError(f"burst must be an integer >= 1, not {burst!r}")
        if max_batch < 1 or lease_ttl <= 0 or max_keys < 1:
            raise ValueError("max_batch and max_keys must be >= 1, lease_ttl > 0")
        self.burst = burst
        self.cap = min(burst, max_batch)
        self.lease_ttl = lease_ttl
        self.max_keys = max_keys
        self.fallback: float | None = None
        self.fallbacks = 0
        self._leases: OrderedDict[bytes, Lease] = OrderedDict()
        self._wanted: list[Lease] = []
        self._wake = wake

    # -- the hot path ---------------------------------------------------------------

    def take(self, key: bytes, now: float) -> float | None:
        """One token for ``key``: 0.0 admitted, > 0 denied (seconds to wait), None park
        (see the module docstring)."""
        lease = self._leases.get(key)
        if lease is None:
            return self._first(key, now)
        if lease.tokens and now < lease.expires:
            lease.tokens -= 1
            lease.used = True
            if lease.tokens <= lease.low and not lease.asking:
                self._prefetch(lease, now)
            return 0.0
        if now < lease.denied_until:
            return lease.denied_until - now
        return self._miss(lease, now)

    def park(self, key: bytes, callback: Callback) -> None:
        """Wait for ``key``'s refill: ``callback(verdict)`` exactly once, in arrival
        order.  Only right after ``take(key, ...)`` returned None."""
        lease = self._leases.get(key)
        if lease is None or not lease.asking:
            raise RuntimeError(f"park({key!r}) without a take that returned None")
        if lease.waiters is None:
            lease.waiters = [callback]
        else:
            lease.waiters.append(callback)

    # -- slower paths of take -------------------------------------------------------

    def _first(self, key: bytes, now: float) -> float | None:
        if self.fallback is not None:
            self.fallbacks += 1
            return self.fallback
        lease = Lease(key)
        self._insert(lease, now)
        self._ask(lease, now, lease.batch)
        return None

    def _miss(self, lease: Lease, now: float) -> float | None:
        if lease.tokens:                    # expired unspent: demand was overestimated
            lease.tokens = 0
            self._resize(lease, lease.batch // 2)
        if self.fallback is not None:
            self.fallbacks += 1
            return self.fallback
        lease.used = True
        if not lease.asking:
            if now - lease.last_ask < self.lease_ttl:
                self._resize(lease, lease.batch * 2)
            self._ask(lease, now, lease.batch)
        return None

    def _prefetch(self, lease: Lease, now: float) -> None:
        if self.fallback is None and now >= lease.denied_until:
            # (not right after a growth: the watermark rose with the batch, so the
            # time since the last ask says little about the demand)
            if lease.grown:
                lease.grown = False
            elif now - lease.last_ask < self.lease_ttl / _REFILLS_PER_TTL:
                self._resize(lease, lease.batch * 2)
            self._ask(lease, now, lease.batch)
            lease.ahead = True

    def _resize(self, lease: Lease, batch: int) -> None:
        batch = max(1, min(batch, self.cap))
        lease.grown = batch > lease.batch
        lease.batch = batch
        lease.low = batch // 2 if batch > 1 else -1

    def _ask(self, lease: Lease, now: float, n: int) -> None:
        lease.asking = n
        lease.ahead = False
        lease.last_ask = now
        self._wanted.append(lease)
        if len(self._wanted) == 1 and self._wake is not None:
            self._wake()

    # -- the table --------------------------------------------------------------------

    def _insert(self, lease: Lease, now: float) -> None:
        leases = self._leases
        for _ in range(_SWEEP):
            if not leases:
                break
            oldest = next(iter(leases.values()))
            if oldest.used or not oldest.idle(now, self.lease_ttl):
                break
            leases.popitem(last=False)
        if len(leases) >= self.max_keys:
            self._evict_one()
        leases[lease.key] = lease

    def _evict_one(self) -> None:
        """Drop the oldest entry not used since the clock last passed it and not
        awaiting a refill; after ``_CLOCK_STEPS`` second chances, the oldest one."""
        leases = self._leases
        for _ in range(_CLOCK_STEPS):
            key, lease = next(iter(leases.items()))
            if not (lease.used or lease.asking):
                break
            lease.used = False
            leases.move_to_end(key)
        leases.popitem(last=False)

    # -- the I/O side -----------------------------------------------------------------

    def drain(self) -> list[Lease]:
        """The leases queued for a refill since the last drain (each asks
        ``lease.asking`` tokens); each must get one :meth:`settle` or :meth:`fail`."""
        wanted, self._wanted = self._wanted, []
        return wanted

    def settle(self, lease: Lease, granted: int, wait: float, now: float) -> None:
        """The store granted ``granted`` (0..asking) tokens and, when ``wait`` > 0, says
        one more would fit only ``wait`` seconds from ``now``.  Parked requests take
        the tokens first, in order; the rest is leased for ``lease_ttl``.  Parked
        requests left over are denied with ``wait`` when the key is full, else they
        stay parked behind a new refill."""
        lease.asking = 0
        admitted: list[Callback] = []
        denied: list[Callback] = []
        waiters = lease.waiters
        if waiters:
            # demand outran the lease (parked behind a prefetch, or more parked than
            # asked for): ask more, and earlier, next time
            if lease.ahead or len(waiters) > granted:
                self._resize(lease, lease.batch * 2)
            admitted, waiters = waiters[:granted], waiters[granted:]
            granted -= len(admitted)
        if granted:
            lease.tokens = granted + (lease.tokens if now < lease.expires else 0)
            lease.expires = now + self.lease_ttl
        if wait > 0:
            lease.denied_until = now + wait
        if waiters:
            if wait > 0 or self.fallback is not None:
                denied, waiters = waiters, None
            else:
                # the key has room: ask for all of them (the burst is the only bound:
                # max_batch bounds what is held, and these are spent on arrival), so
                # a queue outgrows one round trip's grant only when the key is full
                self._ask(lease, now, min(self.burst, max(lease.batch, len(waiters))))
        lease.waiters = waiters or None
        verdict = wait if wait > 0 else self.fallback
        for callback in admitted:
            callback(0.0)
        for callback in denied:
            callback(verdict)

    def fail(self, lease: Lease, verdict: float) -> None:
        """The store could not be asked: the parked requests get ``verdict``."""
        lease.asking = 0
        waiters, lease.waiters = lease.waiters, None
        for callback in waiters or ():
            callback(verdict)

    def degrade(self, fallback: float | None) -> None:
        """While the store is down: ``take`` answers ``fallback`` when it would park
        (leased tokens and known denials still count).  None: the store is up."""
        self.fallback = fallback

    # -- reading ----------------------------------------------------------------------

    def lease(self, key: bytes) -> Lease | None:
        """``key``'s entry (None when not tracked), for tests and the admin API."""
        return self._leases.get(key)

    def __len__(self) -> int:
        return len(self._leases)

    def __repr__(self) -> str:
        state = "up" if self.fallback is None else f"fallback={self.fallback}"
        return (f"<LeaseBook keys={len(self._leases)} cap={self.cap} "
                f"queued={len(self._wanted)} {state}>")
