"""hash / ip_hash with bounded_load: consistent hashing with bounded loads.

(poise.core.policies.hashing and hash_tables.LoadBound.)  Traffic is simulated: requests
arrive with Zipf-distributed keys and complete at random (fixed seeds), and the tests
read the in-flight counts the picker sees in the snapshot's stats.
"""

import random

import pytest

from poise.core.backend import Backend
from poise.core.cluster import ClusterSnapshot
from poise.core.context import RequestContext
from poise.core.policies.hashing import Hash

ALGORITHMS = ("ring", "maglev", "rendezvous")


def snap(n: int, weights=None) -> ClusterSnapshot:
    return ClusterSnapshot.build("c", [Backend(f"10.3.0.{1 + i}", 9000,
                                               weight=weights[i] if weights else 1)
                                       for i in range(n)])


def user(name: bytes) -> RequestContext:
    return RequestContext(headers=[(b"X-User", name)])


def zipf_keys(count: int, distinct: int, s: float, seed: int) -> list[RequestContext]:
    """Skewed traffic: key k is drawn with probability ∝ 1 / k**s (the top key of 1,000
    with s = 1.1 gets about 18% of requests)."""
    rng = random.Random(seed)
    pool = [user(b"user-%d" % k) for k in range(distinct)]
    weights = [1 / (k + 1) ** s for k in range(distinct)]
    return rng.choices(pool, weights, k=count)


def simulate(picker, s: ClusterSnapshot, requests, concurrency: int, seed: int):
    """Requests arrive one by one; once ``concurrency`` are in flight, a random one
    completes before the next arrives.  Yields (chosen, its load after, total after)."""
    rng = random.Random(seed)
    in_flight: list[Backend] = []
    for ctx in requests:
        if len(in_flight) >= concurrency:
            done = in_flight.pop(rng.randrange(len(in_flight)))
            s.stats[done].in_flight -= 1
        chosen = picker.pick(ctx)
        s.stats[chosen].in_flight += 1
        in_flight.append(chosen)
        yield chosen, s.stats[chosen].in_flight, len(in_flight)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("factor", [1.25, 2])
def test_bounded_load_caps_every_backend(algorithm, factor):
    """With bounded_load = c, a backend takes a request only while its load stays within
    ceil(c × (total + 1) / n): after each assignment it holds ≤ c × mean + 1."""
    s = snap(10)
    p = Hash(key="header:x-user", algorithm=algorithm, bounded_load=factor).build(s)
    n = len(s.backends)
    for _, load, total in simulate(p, s, zipf_keys(20_000, 1000, 1.1, 8), 200, 9):
        assert load <= factor * total / n + 1
    assert sum(st.in_flight for st in s.stats.values()) == 200


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_without_a_bound_the_hot_key_overloads_its_backend(algorithm):
    """The same traffic unbounded: the hot key's backend exceeds 1.25 × mean + 1 (so the
    bound above is what keeps it down)."""
    s = snap(10)
    p = Hash(key="header:x-user", algorithm=algorithm).build(s)
    worst = max(load - (1.25 * total / 10 + 1)
                for _, load, total in simulate(p, s, zipf_keys(20_000, 1000, 1.1, 8), 200, 9))
    assert worst > 5


def test_bounded_load_respects_weights():
    weights = [1, 1, 2, 4]
    s = snap(4, weights)
    p = Hash(key="header:x-user", algorithm="maglev", bounded_load=1.25).build(s)
    for chosen, load, total in simulate(p, s, zipf_keys(10_000, 500, 1.1, 5), 80, 6):
        assert load <= 1.25 * total * chosen.weight / sum(weights) + 1


def test_bounded_load_keeps_keys_home_when_there_is_room():
    s = snap(10)
    bounded = Hash(key="header:x-user", algorithm="ring", bounded_load=1.25).build(s)
    free = Hash(key="header:x-user", algorithm="ring").build(s)
    for b in s.backends:
        s.stats[b].in_flight = 3          # even load: everyone is under the cap
    for i in range(500):
        assert bounded.pick(user(b"u%d" % i)) is free.pick(user(b"u%d" % i))


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_a_full_backend_is_passed_over_in_candidate_order(algorithm):
    """The key's first choice at the cap: pick takes the next candidate with room, in
    the algorithm's own order, and candidates() puts the full one last."""
    s = snap(5)
    p = Hash(key="header:x-user", algorithm=algorithm, bounded_load=1.5).build(s)
    free = Hash(key="header:x-user", algorithm=algorithm).build(s)
    ctx = user(b"alice")
    natural = list(free.candidates(ctx))
    s.stats[natural[0]].in_flight = 2      # cap: ceil(1.5 × 3 / 5) = 1 → full
    assert p.pick(ctx) is natural[1]
    assert list(p.candidates(ctx)) == natural[1:] + natural[:1]


def test_bounded_load_boundary_is_exact():
    """11 backends, 9 in flight, factor 1.1: the cap is 1.1 × (9 + 1) / 11 = 1 exactly,
    so a first choice holding 1 is full.  Float arithmetic gives 1.0000000000000002
    (and the binary value of 1.1 is slightly above 1.1) and would let it in."""
    s = snap(11)
    ctx = user(b"bob")
    first = Hash(key="header:x-user").build(s).pick(ctx)
    s.stats[first].in_flight = 1
    s.stats[next(b for b in s.backends if b is not first)].in_flight = 8
    assert Hash(key="header:x-user", bounded_load=1.1).build(s).pick(ctx) is not first
    assert Hash(key="header:x-user", bounded_load=1.2).build(s).pick(ctx) is first
