"""Rate limiting with GCRA (the generic cell rate algorithm), over a bounded table that
several processes may share.

A limit of ``rate`` requests per second with a ``burst`` (an integer >= 1) admits at
most ``burst`` requests at once from an idle key, then one per ``1/rate`` seconds: the
token bucket's behaviour, kept as a single number per key, the *theoretical arrival
time* (TAT).  With ``interval`` the time between two requests and ``span = burst *
interval``, taking one request at ``now``::

    tat = max(stored_tat, now) + interval
    admitted  iff  tat - now <= span          (then stored_tat = tat)
    otherwise wait tat - now - span           (stored_tat unchanged)

Times are integer nanoseconds (``time.monotonic_ns()``; :func:`limit_ns` turns a rate
into ``interval`` and ``span``): exact arithmetic, where floating-point seconds since
boot would lose the last request of a burst to rounding after days of uptime.

So over any window of ``d`` seconds a key is admitted at most ``burst + rate * d``
requests.  :func:`gcra` is that step; :class:`RateTable` keeps TATs for many keys in a
fixed-size buffer: a ``bytearray`` for one process, or a shared mapping
(:mod:`poise.ratelimit.shared`) so that every worker process of one poise reads and
writes the same TATs and a 100/s limit stays 100/s with N workers.

Pure: no clock is read here (``now`` is passed in; the data path passes
``time.monotonic()``, one clock for every process of the machine).
"""

from __future__ import annotations

from typing import Final

__all__ = ["RateTable", "gcra", "limit_ns", "parse_rate", "table_bytes", "SLOT_BYTES", "WAYS"]

# One slot: the key's tag (0 = empty) and its TAT (ns), two signed 64-bit integers.
SLOT_BYTES: Final = 16
# Keys are hashes of this many bits: below mypyc's native integer range (63 bits), so
# the arithmetic on them never falls back to Python's big integers.
KEY_BITS: Final = 62
# Slots per bucket: a key may live in any of its bucket's WAYS slots (one cache line).
WAYS: Final = 4
NS: Final = 1_000_000_000
_UNITS: Final = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0,
                 "minute": 60.0, "h": 3600.0, "hour": 3600.0}


def parse_rate(text: object) -> tuple[int, float]:
    """``"100/s"`` → ``(100, 1.0)``: a count of requests per a unit of time (``s``,
    ``m``, ``h``; also ``sec``/``second``, ``min``/``minute``, ``hour``).  Raises
    ValueError with a message fit for a config error."""
    if not isinstance(text, str):
        raise ValueError(f"expected a rate like 100/s, 20/m or 1000/h, not {text!r}")
    count, sep, unit = text.strip().partition("/")
    count = count.strip()
    seconds = _UNITS.get(unit.strip().lower())
    if not sep or seconds is None or not (count.isascii() and count.isdigit()) \
            or int(count) < 1:
        raise ValueError(f"expected a rate like 100/s, 20/m or 1000/h, not {text!r}")
    return int(count), seconds


def limit_ns(per_second: float, burst: int) -> tuple[int, int]:
    """``(interval, span)`` in nanoseconds for ``per_second`` requests per second with
    bursts of ``burst`` (the span is a whole number of intervals, so a burst is exact)."""
    interval = max(1, round(NS / per_second))
    return interval, burst * interval


def gcra(tat: int, now: int, interval: int, span: int) -> tuple[int, int]:
    """One request against a key whose stored TAT is ``tat`` (0 when never seen), all
    in nanoseconds: ``(new_tat, 0)`` when admitted, ``(tat, wait)`` with ``wait > 0``
    when denied."""
    new = (tat if tat > now else now) + interval
    over = new - now - span
    if over > 0:
        return tat, over
    return new, 0


def table_bytes(slots: int) -> int:
    """The buffer size for a :class:`RateTable` of ``slots`` slots."""
    return slots * SLOT_BYTES


class RateTable:
    """TATs for up to ``slots`` keys (a power of two, >= WAYS) in ``buffer``.

    A key is a hash of KEY_BITS bits (the caller mixes the limit's identity into it, so
    many limits share one table).  It lives in one of the WAYS slots of its bucket.  A key
    not found takes an empty slot, or one whose TAT has passed (such a key is as good as
    absent: forgetting it changes no answer), or else the slot with the earliest TAT:
    that live key is *evicted* (counted in ``evictions``) and starts afresh next time,
    so a full table errs towards admitting.  Memory is ``slots * 16`` bytes, whatever
    the number of distinct keys, and no operation scans more than one bucket.

    Several processes may use one shared buffer without a lock: a slot is a tag and a
    TAT written separately, so two processes taking the same key at the same instant
    can both read the old TAT and one admission goes uncounted (an error of one request
    per collision, within a window of about a microsecond).
    """

    __slots__ = ("_tags", "_mask", "evictions", "slots")

    def __init__(self, buffer: bytearray | memoryview | object, slots: int) -> None:
        if slots < WAYS or slots & (slots - 1):
            raise ValueError(f"slots must be a power of two >= {WAYS}, not {slots}")
        view = memoryview(buffer)   # type: ignore[arg-type]
        if view.nbytes < table_bytes(slots):
            raise ValueError(f"buffer of {view.nbytes} bytes is too small for {slots} slots")
        view = view[: table_bytes(slots)]
        self._tags = view.cast("q")     # tag of slot i at 2*i, its TAT at 2*i + 1
        self._mask = slots // WAYS - 1
        self.slots = slots
        self.evictions = 0

    def take(self, key: int, now: int, interval: int, span: int) -> int:
        """Count one request of ``key`` (a KEY_BITS-bit hash) at ``now``: 0 when admitted,
        else the nanoseconds until one would be (a denied request records nothing).
        ``interval`` and ``span`` as :func:`limit_ns` gives them (span >= interval)."""
        tag = key | 1       # never 0, which marks an empty slot
        slots = self._tags
        first = (key >> 8 & self._mask) * (2 * WAYS)
        victim = -1
        earliest = -1
        for i in range(first, first + 2 * WAYS, 2):
            if slots[i] == tag:
                new, wait = gcra(slots[i + 1], now, interval, span)
                if wait == 0:
                    slots[i + 1] = new
                return wait
            tat = slots[i + 1]
            if victim < 0 or tat < earliest:
                earliest = tat
                victim = i
        if earliest > now:      # every slot holds a live key: evict the nearest to expiry
            self.evictions += 1
        slots[victim] = tag
        slots[victim + 1] = now + interval
        return 0      # a fresh key: burst >= 1 (span >= interval) admits it

    def peek(self, key: int) -> int | None:
        """The stored TAT of ``key``, None when it holds no slot (for tests, /debug)."""
        tag = key | 1
        first = (key >> 8 & self._mask) * (2 * WAYS)
        for i in range(first, first + 2 * WAYS, 2):
            if self._tags[i] == tag:
                return int(self._tags[i + 1])
        return None

    def clear(self) -> None:
        for i in range(2 * self.slots):
            self._tags[i] = 0

    def __repr__(self) -> str:
        return f"<RateTable slots={self.slots} evictions={self.evictions}>"
