"""The lease book of global rate limits (poise.core.leases), with a fake clock and the
store played by the test: drain() the refills, settle() or fail() them."""

import tracemalloc

import pytest

from poise.core.clock import FakeClock
from poise.core.leases import LeaseBook


class Store:
    """Plays the I/O layer: counts wakes, answers drained refills as told."""

    def __init__(self) -> None:
        self.wakes = 0

    def wake(self) -> None:
        self.wakes += 1


def book_for(burst=10, **options) -> tuple[LeaseBook, Store]:
    store = Store()
    return LeaseBook(burst, wake=store.wake, **options), store


class Verdicts(list):
    """Callbacks that record what they were told, in call order."""

    def cb(self, name):
        return lambda verdict: self.append((name, verdict))


def request(book: LeaseBook, key: bytes, now: float, seen: Verdicts | None = None,
            name: object = None) -> float | None:
    """What a request does: take, and park when told to."""
    verdict = book.take(key, now)
    if verdict is None:
        book.park(key, seen.cb(name) if seen is not None else lambda v: None)
    return verdict


def spend_all(book: LeaseBook, key: bytes, now: float) -> None:
    """Requests until one has to park (demand beyond what is leased)."""
    while request(book, key, now) is not None:
        pass


def grant_all(book: LeaseBook, now: float, wait: float = 0.0) -> list[int]:
    """Settle every queued refill in full; the sizes asked."""
    asked = []
    for lease in book.drain():
        asked.append(lease.asking)
        book.settle(lease, lease.asking, wait, now)
    return asked


def test_a_first_take_parks_and_queues_one_token_then_the_grant_admits_it():
    book, store = book_for()
    seen = Verdicts()
    assert book.take(b"k", 0.0) is None
    book.park(b"k", seen.cb("a"))
    assert store.wakes == 1
    [lease] = book.drain()
    assert lease.key == b"k" and lease.asking == 1
    book.settle(lease, 1, 0.0, 0.001)
    assert seen == [("a", 0.0)]
    assert book.lease(b"k").tokens == 0 and book.drain() == []


def test_wake_is_called_only_when_the_queue_turns_non_empty():
    book, store = book_for()
    for key in (b"a", b"b", b"c"):
        assert book.take(key, 0.0) is None
    assert store.wakes == 1 and len(book.drain()) == 3
    book.take(b"d", 0.0)
    assert store.wakes == 2


def test_the_batch_doubles_on_misses_close_together_up_to_the_burst():
    book, _ = book_for(burst=8, lease_ttl=1.0)
    asked = []
    now = 0.0
    for _ in range(7):
        spend_all(book, b"k", now)
        asked += grant_all(book, now)
        now += 0.01
    # 1, then a miss soon after: 2; then every prefetch that came too late (requests
    # parked behind it) doubles it, and one soon after the last ask (not right after
    # a growth) does too
    assert asked == [1, 2, 2, 4, 8, 8, 8]
    assert book.lease(b"k").batch == 8


def test_max_batch_caps_the_batch_below_the_burst():
    book, _ = book_for(burst=1000, max_batch=16)
    for i in range(10):
        spend_all(book, b"k", i * 0.01)
        grant_all(book, i * 0.01)
    assert book.lease(b"k").batch == 16 and book.cap == 16


def test_misses_far_apart_keep_a_batch_of_one():
    book, _ = book_for(lease_ttl=1.0)
    for i in range(5):
        assert request(book, b"k", i * 2.0) is None
        assert grant_all(book, i * 2.0) == [1]
        # a key used once in a while never holds a token it did not ask for
        assert book.lease(b"k").tokens == 0 and book.lease(b"k").batch == 1


def test_prefetch_at_half_a_batch_so_steady_traffic_never_parks():
    book, _ = book_for(burst=8)
    request(book, b"k", 0.0)
    grant_all(book, 0.0)
    request(book, b"k", 0.001)              # a second miss: the batch grows to 2
    grant_all(book, 0.001)
    lease = book.lease(b"k")
    assert lease.batch == 2 and lease.tokens == 1
    now = 0.002
    verdicts = []
    for _ in range(1000):
        verdicts.append(request(book, b"k", now))
        grant_all(book, now)                # a refill arrives before the next request
        now += 0.0001
    # (refills every few requests: the batch grows to the cap all the same)
    assert verdicts == [0.0] * 1000 and lease.batch == 8


def test_a_steady_key_asks_about_four_times_per_lease_ttl():
    book, _ = book_for(burst=1000, max_batch=1000, lease_ttl=1.0)
    asks, parked = [], []
    for i in range(1000):                   # 100 requests per second for 10 s
        now = i * 0.01
        if request(book, b"k", now) is None:
            parked.append(i)
        if grant_all(book, now):
            asks.append(now)
    assert parked == [0, 1]                 # (until the batch is 2 and prefetches)
    lease = book.lease(b"k")
    # it grew while asks came less than lease_ttl / 4 apart (16 tokens: 0.16 s)
    assert lease.batch == 32 and lease.tokens < 1.5 * 32
    gaps = [b - a for a, b in zip(asks[-10:-1], asks[-9:], strict=True)]
    assert all(gap == pytest.approx(0.32) for gap in gaps), gaps


def test_tokens_expire_after_the_lease_ttl_and_the_batch_halves():
    book, _ = book_for(burst=8, lease_ttl=0.5)
    for i in range(6):
        spend_all(book, b"k", i * 0.01)
        grant_all(book, i * 0.01)
    lease = book.lease(b"k")
    assert lease.batch == 8 and lease.tokens == 7
    assert book.take(b"k", 0.1) == 0.0
    # unspent tokens are gone at the lease's end: no hoarding for later bursts
    assert book.take(b"k", 0.05 + 0.5) is None
    assert lease.tokens == 0 and lease.batch == 4


def test_parked_requests_are_answered_in_order_and_extra_ones_get_a_new_refill():
    book, store = book_for(burst=100)
    seen = Verdicts()
    for name in "abcde":
        assert book.take(b"k", 0.0) is None
        book.park(b"k", seen.cb(name))
    [lease] = book.drain()
    assert lease.asking == 1                 # asked when "a" came; b..e came meanwhile
    book.settle(lease, 1, 0.0, 0.001)
    assert seen == [("a", 0.0)]
    [again] = book.drain()                   # the four still parked ask for themselves
    assert again is lease and again.asking == 4
    assert book.take(b"k", 0.001) is None
    book.park(b"k", seen.cb("f"))
    book.settle(lease, 4, 0.0, 0.002)
    assert [n for n, _ in seen] == list("abcdef"[:5])
    [last] = book.drain()
    book.settle(last, last.asking, 0.0, 0.003)
    assert seen == [(n, 0.0) for n in "abcdef"]


def test_parked_requests_beyond_max_batch_are_asked_for_at_once_when_the_key_has_room():
    book, _ = book_for(burst=1000, max_batch=8)
    seen = Verdicts()
    for i in range(100):
        request(book, b"k", 0.0, seen, i)
    [lease] = book.drain()
    book.settle(lease, 1, 0.0, 0.001)
    [lease] = book.drain()
    assert lease.asking == 99
    book.settle(lease, 99, 0.0, 0.002)
    assert seen == [(i, 0.0) for i in range(100)]
    assert lease.tokens == 0 and lease.batch == 2


def test_a_partial_grant_admits_the_first_parked_and_denies_the_rest_with_the_wait():
    book, _ = book_for(burst=3)
    seen = Verdicts()
    for name in "abc":
        book.take(b"k", 0.0)
        book.park(b"k", seen.cb(name))
    [lease] = book.drain()
    book.settle(lease, 1, 0.25, 0.0)
    assert seen == [("a", 0.0), ("b", 0.25), ("c", 0.25)]
    assert book.drain() == [] and lease.waiters is None


def test_a_denial_is_remembered_until_it_ends_without_asking_again():
    book, store = book_for()
    seen = Verdicts()
    book.take(b"k", 10.0)
    book.park(b"k", seen.cb("a"))
    [lease] = book.drain()
    book.settle(lease, 0, 0.5, 10.0)
    assert seen == [("a", 0.5)]
    assert book.take(b"k", 10.1) == pytest.approx(0.4)
    assert book.take(b"k", 10.4) == pytest.approx(0.1)
    assert book.drain() == [] and store.wakes == 1
    assert book.take(b"k", 10.5) is None     # over: ask Redis again
    assert len(book.drain()) == 1


def test_a_full_grant_that_fills_the_key_spends_its_tokens_then_denies_locally():
    book, _ = book_for(burst=2)
    book.take(b"k", 0.0)
    book.park(b"k", lambda v: None)
    [lease] = book.drain()
    book.settle(lease, 1, 0.0, 0.0)
    book.take(b"k", 0.001)
    book.park(b"k", lambda v: None)
    [lease] = book.drain()
    assert lease.asking == 2
    book.settle(lease, 2, 0.3, 0.001)       # granted, and the key is now full
    assert book.take(b"k", 0.002) == 0.0    # (no prefetch: Redis would say no)
    assert book.drain() == []
    assert book.take(b"k", 0.003) == pytest.approx(0.298)


def test_error_mode_answers_the_fallback_at_once_but_spends_leased_tokens():
    book, store = book_for()
    seen = Verdicts()
    for i in range(4):                      # grow k's batch so it holds tokens
        spend_all(book, b"k", i * 0.01)
        grant_all(book, i * 0.01)
    held = book.lease(b"k").tokens
    assert held > 1
    book.take(b"parked", 0.03)
    book.park(b"parked", seen.cb("p"))
    [pending] = book.drain()
    # the store goes down: what was in flight fails, then the book is degraded
    book.fail(pending, 1.0)
    book.degrade(1.0)
    assert seen == [("p", 1.0)]
    assert book.take(b"new", 0.04) == 1.0 and book.lease(b"new") is None
    assert [book.take(b"k", 0.04) for _ in range(held + 1)] == [0.0] * held + [1.0]
    assert book.drain() == [] and book.fallbacks == 2
    book.degrade(0.0)                        # on_redis_error: allow
    assert book.take(b"new", 0.05) == 0.0
    book.degrade(None)                       # back up: asks again
    assert book.take(b"new", 0.06) is None and len(book.drain()) == 1


def test_a_refill_settled_after_the_store_went_down_denies_extra_parked_with_the_fallback():
    book, _ = book_for(burst=10)
    seen = Verdicts()
    for name in "ab":
        book.take(b"k", 0.0)
        book.park(b"k", seen.cb(name))
    [lease] = book.drain()
    book.degrade(0.0)
    book.settle(lease, 1, 0.0, 0.001)
    assert seen == [("a", 0.0), ("b", 0.0)] and book.drain() == []


def test_park_without_a_parking_take_is_a_bug():
    book, _ = book_for()
    with pytest.raises(RuntimeError):
        book.park(b"nobody", lambda v: None)


@pytest.mark.parametrize("burst", [0, -1, 1.5, True])
def test_burst_must_be_a_positive_integer(burst):
    with pytest.raises(ValueError):
        LeaseBook(burst)


def test_a_million_distinct_keys_keep_the_table_bounded_and_a_hot_key_leased():
    clock = FakeClock()
    book, _ = book_for(burst=1000, max_batch=64, max_keys=1000)
    hot = Verdicts()
    request(book, b"hot", clock.now(), hot)
    grant_all(book, clock.now())
    hot_lease = book.lease(b"hot")
    for i in range(1_000_000):
        hot.append(("now", request(book, b"hot", clock.now(), hot)))
        request(book, b"k%d" % i, clock.now())
        if i % 100 == 99:
            grant_all(book, clock.now())
            clock.advance(0.001)
            assert len(book) <= 1000
    grant_all(book, clock.now())
    assert len(book) <= 1000
    # the hot key is used between every two insertions: second chances keep its lease
    assert book.lease(b"hot") is hot_lease and hot_lease.batch == 64
    answers = [v for _, v in hot if v is not None]
    assert len(answers) == 1_000_001 and set(answers) == {0.0}


def test_memory_stays_flat_under_key_rotation():
    book, _ = book_for(max_keys=1000)

    def rotate(start: int, count: int) -> None:
        for i in range(start, start + count):
            book.take(b"key-%d" % i, 0.0)
            if i % 100 == 99:
                grant_all(book, 0.0)
    tracemalloc.start()
    try:
        rotate(0, 20_000)                    # the table fills (traced from here)
        before = tracemalloc.get_traced_memory()[0]
        rotate(20_000, 50_000)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(book) <= 1000
    assert grown < 20_000, grown             # 50,000 keys seen, ~nothing kept


def test_a_table_of_busy_entries_still_evicts_and_their_parked_still_get_verdicts():
    book, _ = book_for(max_keys=100)
    seen = Verdicts()
    for i in range(300):                     # every entry awaits a refill
        assert book.take(b"k%d" % i, 0.0) is None
        book.park(b"k%d" % i, seen.cb(i))
        assert len(book) <= 100
    queued = book.drain()
    assert len(queued) == 300
    for lease in queued:
        book.settle(lease, 1, 0.0, 0.001)
    assert sorted(n for n, _ in seen) == list(range(300))
    assert all(v == 0.0 for _, v in seen)


def test_repr_says_size_and_state():
    book, _ = book_for()
    book.take(b"k", 0.0)
    assert repr(book) == "<LeaseBook keys=1 cap=10 queued=1 up>"
    book.degrade(1.0)
    assert "fallback=1.0" in repr(book)
