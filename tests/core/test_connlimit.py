"""Connection counts kept by several workers together (poise.core.connlimit), and the
memory they share (poise.ratelimit.shared): one memfd mapped twice in this process, or
in a forked child, is one memory."""

from __future__ import annotations

import multiprocessing
import os

import pytest

from poise.config.model import Listener
from poise.core.connlimit import COUNT_BYTES, ConnectionCounts, counts_bytes
from poise.proxy.ratelimits import TOTAL_BUCKETS, Limiters
from poise.ratelimit.shared import CONNECTION_BUCKETS, MAX_WORKERS, SharedState

SLOTS = 1024

S = 1_000_000_000     # one second in the rate table's unit (ns)


def counts(buf: bytearray, own: int, readers: int, regions: int = 4,
           buckets: int = 16) -> ConnectionCounts:
    return ConnectionCounts(buf, regions, buckets, own, readers)


@pytest.fixture
def shared():
    state = SharedState.create(SLOTS)
    yield state
    close(state)


def close(state: SharedState) -> None:
    """Close the memfd (a second mapping attached to it shares the fd)."""
    if state.fd is not None:
        os.close(state.fd)
        state.fd = None


# -- ConnectionCounts over a plain buffer ------------------------------------------------------


def test_counts_bytes():
    assert counts_bytes(4, 16) == 4 * 16 * COUNT_BYTES == 256


@pytest.mark.parametrize(("own", "readers"), [(-1, 1), (4, 1), (0, 0), (0, 5)])
def test_region_and_readers_must_lie_in_the_regions(own, readers):
    with pytest.raises(ValueError, match="outside 0..3"):
        counts(bytearray(256), own, readers)


def test_each_worker_writes_its_own_region_and_reads_the_sum():
    buf = bytearray(counts_bytes(4, 16))
    w0, w1, w2 = (counts(buf, own, readers=3) for own in range(3))
    w0.add(5, 2)
    w1.add(5, 3)
    w2.add(5, 1)
    w2.add(6, 7)
    for w in (w0, w1, w2):
        assert (w.total(5), w.total(6), w.total(4)) == (6, 7, 0)
    # the regions are separate words in the buffer: region r's bucket b at (r*16 + b)*4
    view = memoryview(buf).cast("I")
    assert (view[0 * 16 + 5], view[1 * 16 + 5], view[2 * 16 + 5], view[2 * 16 + 6]) == \
        (2, 3, 1, 7)
    w1.add(5, -3)
    assert w0.total(5) == 3


def test_a_count_never_goes_below_zero():
    w = counts(bytearray(counts_bytes(4, 16)), 0, 1)
    w.add(3, 1)
    w.add(3, -5)
    assert w.total(3) == 0
    w.add(3, 1)
    assert w.total(3) == 1


def test_readers_bound_the_sum_but_the_own_region_always_counts():
    buf = bytearray(counts_bytes(4, 16))
    w0, w3 = counts(buf, 0, 2), counts(buf, 3, 2)
    w0.add(1, 4)
    w3.add(1, 10)
    assert w0.total(1) == 4       # region 3 is beyond the readers
    assert w3.total(1) == 14      # its own region, even so
    w0.readers = 4
    assert w0.total(1) == 14


def test_clear_zeroes_one_region_only():
    buf = bytearray(counts_bytes(4, 16))
    ws = [counts(buf, own, 4) for own in range(4)]
    for own, w in enumerate(ws):
        for bucket in range(16):
            w.add(bucket, own + 1)
    ws[0].clear(2)
    assert ws[1].total(0) == 1 + 2 + 4
    assert all(ws[3].total(b) == 7 for b in range(16))
    assert memoryview(buf).cast("I")[2 * 16: 3 * 16].tolist() == [0] * 16
    ws[0].clear(3)          # the last region: nothing beyond the buffer is touched
    assert ws[0].total(15) == 1 + 2


def test_bucket_of_a_key_hash():
    w = counts(bytearray(counts_bytes(4, 16)), 0, 1)
    assert [w.bucket(k) for k in (0, 15, 16, 33, 2**64 - 1)] == [0, 15, 0, 1, 15]
    assert repr(w) == "<ConnectionCounts region 0 of 1/4 buckets=16>"


# -- the shared memory -------------------------------------------------------------------------


def test_create_lays_out_the_table_then_the_counts(shared):
    assert shared.fd is not None and shared.slots == SLOTS
    assert len(shared.memory) == SLOTS * 16 + MAX_WORKERS * CONNECTION_BUCKETS * COUNT_BYTES
    assert shared.describe() == f"{shared.fd}:{SLOTS}"
    assert (shared.connections.own, shared.connections.readers) == (0, 1)
    assert shared.connections.buckets == CONNECTION_BUCKETS
    assert repr(shared) == f"<SharedState slots={SLOTS} fd={shared.fd}>"


def test_a_private_state_has_no_fd():
    state = SharedState.create(SLOTS, shareable=False)
    try:
        assert state.fd is None
        assert state.rates.take(123, S, S, S) == 0
        state.connections.add(7, 1)
        assert state.connections.total(7) == 1
    finally:
        close(state)


def test_two_mappings_of_one_memfd_see_each_others_writes(shared):
    other = SharedState.from_argument(shared.describe(), own=1, workers=2)
    shared.set_workers(2)
    # rate table: a key limited through one mapping is limited through the other
    assert shared.rates.take(0xABCDEF00, 10 * S, S, S) == 0
    assert other.rates.peek(0xABCDEF00) == 11 * S
    assert other.rates.take(0xABCDEF00, 10 * S + S // 2, S, S) == S // 2
    # connection counts: each writes its region, both read the sum
    shared.connections.add(9, 2)
    other.connections.add(9, 3)
    assert shared.connections.total(9) == other.connections.total(9) == 5
    # a worker gone: its region is forgotten by everyone
    shared.worker_gone(1)
    assert other.connections.total(9) == shared.connections.total(9) == 2


def test_the_rate_table_regions_and_counts_do_not_overlap(shared):
    for k in range(0, 1 << 16, 97):
        shared.rates.take(k << 8, 10**6, 10**6, 10**6)
    assert all(shared.connections.total(b) == 0 for b in range(0, CONNECTION_BUCKETS, 61))
    shared.set_workers(MAX_WORKERS)
    for b in range(0, CONNECTION_BUCKETS, 61):
        shared.connections.add(b, 1)
    shared.connections.own = MAX_WORKERS - 1
    for b in range(0, CONNECTION_BUCKETS, 61):
        shared.connections.add(b, 1)
    assert all(shared.connections.total(b) == 2 for b in range(0, CONNECTION_BUCKETS, 61))
    assert shared.rates.peek(97 << 8) == 2 * 10**6


def test_set_workers_is_clamped(shared):
    shared.set_workers(0)
    assert shared.connections.readers == 1
    shared.set_workers(10_000)
    assert shared.connections.readers == MAX_WORKERS


def _child(argument: str, done) -> None:
    state = SharedState.from_argument(argument, own=1, workers=2)
    state.connections.add(100, 4)
    state.connections.add(101, 1)
    waits = [state.rates.take(0x5555_0000, 50 * S, S, 3 * S) for _ in range(4)]
    done.send((waits, state.connections.total(100)))
    done.close()


def test_a_forked_worker_shares_the_memory(shared):
    shared.set_workers(2)
    shared.connections.add(100, 1)
    ctx = multiprocessing.get_context("fork")
    parent_end, child_end = ctx.Pipe()
    child = ctx.Process(target=_child, args=(shared.describe(), child_end))
    child.start()
    try:
        waits, seen = parent_end.recv()
    finally:
        child.join(10)
    assert child.exitcode == 0
    assert waits == [0, 0, 0, S]
    assert seen == 5
    assert shared.connections.total(100) == 5
    assert shared.connections.total(101) == 1
    # the child's TATs are ours: its key is limited here too, until one interval passes
    assert shared.rates.take(0x5555_0000, 50 * S, S, 3 * S) == S
    assert shared.rates.take(0x5555_0000, 51 * S, S, 3 * S) == 0
    shared.worker_gone(1)
    assert shared.connections.total(100) == 1


def test_the_memfd_is_not_inherited_across_exec(shared):
    assert not os.get_inheritable(shared.fd)


# -- ConnectionGuard: max_connections and max_connections_per_ip ---------------------------------


def listener(**fields) -> Listener:
    return Listener.model_validate({"name": "web", "bind": "127.0.0.1:8080",
                                    "routes": [{"cluster": "app"}], **fields})


def test_no_connection_limit_no_guard(shared):
    limiters = Limiters(shared)
    limiters.begin(["web"])
    assert limiters.guard(listener()) is None


def test_max_connections_counts_every_worker(shared):
    other = SharedState.attach(shared.fd, SLOTS, own=1, workers=2)
    shared.set_workers(2)
    guards = []
    for state in (shared, other):
        limiters = Limiters(state)
        limiters.begin(["web"])
        guards.append(limiters.guard(listener(max_connections=3)))
    g0, g1 = guards
    held = [g0.admit(b"10.0.0.1"), g1.admit(b"10.0.0.2"), g0.admit(b"10.0.0.3")]
    assert all(h is not None for h in held)
    assert g0.open_connections() == g1.open_connections() == 3
    assert g1.admit(b"10.0.0.4") is None
    assert (g1.rejected_total, g0.rejected_total) == (1, 0)
    g0.release(held[0])
    assert g1.admit(b"10.0.0.4") is not None
    assert repr(g0) == "<ConnectionGuard web open=3 max=3 per_ip=None>"


def test_max_connections_per_ip(shared):
    limiters = Limiters(shared)
    limiters.begin(["web"])
    guard = limiters.guard(listener(max_connections_per_ip=2))
    a1, a2 = guard.admit(b"192.0.2.1"), guard.admit(b"192.0.2.1")
    assert a1 is not None and a2 is not None
    assert a1[1] >= TOTAL_BUCKETS, "an address's bucket is outside the totals"
    assert guard.admit(b"192.0.2.1") is None
    assert guard.rejected_per_ip == 1
    assert guard.admit(b"192.0.2.2") is not None
    guard.release(a1)
    assert guard.admit(b"192.0.2.1") is not None
    assert guard.open_connections() == 3


def test_a_reload_keeps_the_guard_and_its_counts(shared):
    limiters = Limiters(shared)
    limiters.begin(["web"])
    guard = limiters.guard(listener(max_connections=1))
    held = guard.admit(b"192.0.2.1")
    assert guard.admit(b"192.0.2.1") is None
    limiters.begin(["web", "api"])
    again = limiters.guard(listener(max_connections=2))
    assert again is guard and again.rejected_total == 1
    assert again.admit(b"192.0.2.1") is not None
    again.release(held)
    limiters.begin(["web"])
    assert limiters.guard(listener()) is None
    assert "web" not in limiters.guards


def test_listeners_totals_have_buckets_of_their_own(shared):
    limiters = Limiters(shared)
    names = ["web", "api", "admin", "metrics"]
    limiters.begin(names)
    guards = {n: limiters.guard(listener(name=n, max_connections=1)) for n in names}
    assert len({g.total_bucket for g in guards.values()}) == 4
    for g in guards.values():
        assert g.admit(b"192.0.2.1") is not None
    # one address holds a different per-address bucket on each listener (seeded by name)
    per_ip = {n: limiters.guard(listener(name=n, max_connections_per_ip=1)) for n in names}
    buckets = {per_ip[n].admit(b"192.0.2.1")[1] for n in names}
    assert len(buckets) == 4
