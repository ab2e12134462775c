"""hash / ip_hash mapping properties: stable, even, weighted, consistent under change.

(poise.core.policies.hashing; options, keys, fallback and candidates are in
test_hashing_policy.py, bounded load in test_hashing_bounded.py.)  Every statistical
test uses fixed keys and backends, so it is deterministic; the tolerances say how far
from the ideal a correct implementation lands and why.
"""

import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from poise.core.backend import Backend
from poise.core.cluster import ClusterSnapshot
from poise.core.context import RequestContext
from poise.core.policies.hashing import Hash, IpHash

ALGORITHMS = ("ring", "maglev", "rendezvous")
KEYS = 100_000
ROOT = Path(__file__).resolve().parents[2]


def backends(n: int, weights=None, base: int = 1) -> list[Backend]:
    return [Backend(f"10.1.0.{base + i}", 8080, weight=weights[i] if weights else 1)
            for i in range(n)]


def contexts(count: int, prefix: bytes = b"key-") -> list[RequestContext]:
    return [RequestContext(headers=[(b"x-k", prefix + b"%d" % i)]) for i in range(count)]


CTX = contexts(KEYS)


def picker(algorithm: str, members, **options):
    policy = Hash(key="header:x-k", algorithm=algorithm, **options)
    return policy.build(ClusterSnapshot.build("c", members))


def mapping(algorithm: str, members, ctxs=CTX, **options) -> list[str]:
    pick = picker(algorithm, members, **options).pick
    return [pick(c).address for c in ctxs]


# -- same key, same backend ----------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_same_key_same_backend(algorithm):
    members = backends(10)
    one, two = picker(algorithm, members), picker(algorithm, members)
    for c in CTX[:2000]:
        first = one.pick(c)
        assert one.pick(c) is first
        assert two.pick(c) is first
        # Only the key matters: another request with the same key agrees.
        other = RequestContext(client_ip="198.51.100.9", target=b"/elsewhere?x=1",
                               headers=[(b"Accept", b"*/*"), (b"X-K", c.header(b"x-k"))])
        assert one.pick(other) is first


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_config_order_does_not_matter(algorithm):
    members = backends(10, weights=[1, 2, 3, 1, 2, 3, 1, 2, 3, 4])
    shuffled = members[:]
    random.Random(5).shuffle(shuffled)
    assert mapping(algorithm, members, CTX[:20_000]) == mapping(algorithm, shuffled,
                                                                CTX[:20_000])


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_returns_the_snapshots_own_backend_objects(algorithm):
    snap = ClusterSnapshot.build("c", backends(5))
    p = Hash(key="header:x-k", algorithm=algorithm).build(snap)
    for c in CTX[:200]:
        assert any(p.pick(c) is b for b in snap.backends)


# -- stable across processes and releases --------------------------------------------------------

_CHILD = """
import json, sys
from poise.core.backend import Backend
from poise.core.cluster import ClusterSnapshot
from poise.core.context import RequestContext
from poise.core.policies.hashing import Hash, IpHash
members = [Backend(f"10.1.0.{1 + i}", 8080, weight=1 + i % 3) for i in range(10)]
snap = ClusterSnapshot.build("c", members[::-1])
out = {}
for alg in ("ring", "maglev", "rendezvous"):
    p = Hash(key="header:x-k", algorithm=alg).build(snap)
    out[alg] = [p.pick(RequestContext(headers=[(b"x-k", b"key-%d" % i)])).address
                for i in range(3000)]
    p = IpHash(algorithm=alg).build(snap)
    out["ip-" + alg] = [p.pick(RequestContext(client_ip=ip)).address
                        for ip in ("192.0.2.7", "2001:db8::1", "::ffff:192.0.2.7")]
json.dump(out, sys.stdout)
"""


def test_same_mapping_in_another_process():
    """A fresh interpreter with another str-hash seed (so builtin hash() would differ)
    and the backends listed in reverse maps every key as this process does."""
    env = dict(os.environ, PYTHONHASHSEED="12345", PYTHONPATH=str(ROOT))
    child = subprocess.run([sys.executable, "-c", _CHILD], env=env, cwd=ROOT, check=True,
                           capture_output=True, text=True, timeout=60)
    theirs = json.loads(child.stdout)
    members = [Backend(f"10.1.0.{1 + i}", 8080, weight=1 + i % 3) for i in range(10)]
    snap = ClusterSnapshot.build("c", members)
    for alg in ALGORITHMS:
        assert mapping(alg, members, CTX[:3000]) == theirs[alg]
        p = IpHash(algorithm=alg).build(snap)
        assert [p.pick(RequestContext(client_ip=ip)).address
                for ip in ("192.0.2.7", "2001:db8::1", "::ffff:192.0.2.7")] == theirs["ip-" + alg]


# Pinned answers: a change here remaps every user's key on upgrade, so it must be a
# decision (and a release note), never an accident of refactoring.
GOLDEN = {   # equal weights, then weights 1, 2, 3, 1, 2, 3, …
    "ring": (["10.1.0.9", "10.1.0.10", "10.1.0.7", "10.1.0.9", "10.1.0.9", "10.1.0.9",
              "10.1.0.6", "10.1.0.5"],
             ["10.1.0.5", "10.1.0.3", "10.1.0.3", "10.1.0.6", "10.1.0.9", "10.1.0.9",
              "10.1.0.6", "10.1.0.9"]),
    "maglev": (["10.1.0.4", "10.1.0.1", "10.1.0.1", "10.1.0.9", "10.1.0.10", "10.1.0.5",
                "10.1.0.6", "10.1.0.3"],
               ["10.1.0.4", "10.1.0.1", "10.1.0.1", "10.1.0.9", "10.1.0.10", "10.1.0.5",
                "10.1.0.6", "10.1.0.3"]),
    "rendezvous": (["10.1.0.10", "10.1.0.10", "10.1.0.6", "10.1.0.8", "10.1.0.8",
                    "10.1.0.7", "10.1.0.5", "10.1.0.4"],
                   ["10.1.0.8", "10.1.0.9", "10.1.0.6", "10.1.0.8", "10.1.0.8", "10.1.0.7",
                    "10.1.0.5", "10.1.0.4"]),
}


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_mapping_is_pinned(algorithm):
    equal, weighted = GOLDEN[algorithm]
    assert mapping(algorithm, backends(10), CTX[:8]) == [f"{h}:8080" for h in equal]
    assert (mapping(algorithm, backends(10, [1 + i % 3 for i in range(10)]), CTX[:8])
            == [f"{h}:8080" for h in weighted])


# -- spread and weights --------------------------------------------------------------------------

# Largest relative deviation of any backend's share from 1/10 over 100k keys.  Key
# sampling alone gives a relative standard deviation of 1% (binomial, p = 0.1).  Maglev
# shares differ by at most one slot in 6,553 and rendezvous is exactly even in
# expectation, so 4% is four sigma.  A ring of 160 points per backend has a relative
# share deviation of about 1/sqrt(160) ≈ 8% per backend (arc lengths): the worst of ten
# is typically 15-25%, so 30%; with 1,000 points it shrinks to about 3% each, so 12%.
SPREAD_TOLERANCE = {"ring": 0.30, "maglev": 0.04, "rendezvous": 0.04}


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_even_spread_over_ten_backends(algorithm):
    counts = Counter(mapping(algorithm, backends(10)))
    assert len(counts) == 10
    worst = max(abs(c - KEYS / 10) / (KEYS / 10) for c in counts.values())
    assert worst <= SPREAD_TOLERANCE[algorithm]


def test_more_ring_points_spread_better():
    coarse = Counter(mapping("ring", backends(10), points_per_weight=20))
    fine = Counter(mapping("ring", backends(10), points_per_weight=1000))
    dev = [max(abs(c - KEYS / 10) / (KEYS / 10) for c in counts.values())
           for counts in (coarse, fine)]
    assert dev[1] <= 0.12
    assert dev[1] < dev[0]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_ipv4_and_ipv6_clients_spread_evenly(algorithm):
    rng = random.Random(3)
    ips = [f"198.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(256)}"
           for _ in range(KEYS // 2)]
    ips += [f"2001:db8:{rng.randrange(1 << 16):x}::{rng.randrange(1 << 16):x}"
            for _ in range(KEYS // 2)]
    p = IpHash(algorithm=algorithm).build(ClusterSnapshot.build("c", backends(10)))
    counts = Counter(p.pick(RequestContext(client_ip=ip)) for ip in ips)
    worst = max(abs(c - KEYS / 10) / (KEYS / 10) for c in counts.values())
    assert len(counts) == 10
    assert worst <= SPREAD_TOLERANCE[algorithm]


# Shares for weights 1:2:3:4 (ideal 10/20/30/40%).  Rendezvous and Maglev are within key
# sampling noise (≤ 0.15 points sigma): ±1 point.  The ring's arcs add ~8%/sqrt(w)
# relative noise per backend: ±2.5 points.
WEIGHT_TOLERANCE = {"ring": 0.025, "maglev": 0.01, "rendezvous": 0.01}


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_weights_are_respected(algorithm):
    members = backends(4, weights=[1, 2, 3, 4])
    counts = Counter(mapping(algorithm, members))
    for b in members:
        assert counts[b.address] / KEYS == pytest.approx(b.weight / 10,
                                                         abs=WEIGHT_TOLERANCE[algorithm])


# -- consistency: few keys move when membership changes -----------------------------------------

IDEAL_MOVE = 1 / 11       # adding an 11th backend should take 1/11 of the keys


def moved(before: list[str], after: list[str]) -> list[tuple[str, str]]:
    return [(a, b) for a, b in zip(before, after, strict=True) if a != b]


@pytest.mark.parametrize("algorithm", ["ring", "rendezvous"])
def test_adding_a_backend_moves_about_one_in_n_plus_one(algorithm):
    """Ring and rendezvous: within 20% of the ideal 1/11 (measured: ring 0.94×,
    rendezvous 0.99×), and every moved key moves to the new backend."""
    before = mapping(algorithm, backends(10))
    after = mapping(algorithm, backends(11))
    changes = moved(before, after)
    assert len(changes) / KEYS == pytest.approx(IDEAL_MOVE, rel=0.20)
    assert {b for _, b in changes} == {"10.1.0.11:8080"}


def test_adding_a_backend_to_maglev_moves_few_keys():
    """Maglev favours balance over minimal disruption: the paper (Eisenbud et al.,
    NSDI '16, §3.4) promises shares within one slot but only that keys *likely* keep
    their backend, with no closed-form bound; it recommends M > 100·N and disruption
    shrinks as M/N grows.  At the default M = 65537 with 10 → 11 backends (M/N ≈ 6,000)
    we measured 1.03× the ideal with 0.25% of the keys shuffled between old backends;
    the test allows 1.2× and asks that ≥ 95% of moved keys go to the new backend."""
    before = mapping("maglev", backends(10))
    after = mapping("maglev", backends(11))
    changes = moved(before, after)
    assert IDEAL_MOVE * 0.8 <= len(changes) / KEYS <= IDEAL_MOVE * 1.2
    to_new = sum(1 for _, b in changes if b == "10.1.0.11:8080")
    assert to_new >= 0.95 * len(changes)


def test_larger_maglev_tables_disrupt_less():
    """At N = 100 → 101, M = 10007 (M/N ≈ 100) moved 2.4× the ideal and M = 65537
    (≈ 650) 1.65×: the paper's M/N trade-off, measured."""
    ctxs = CTX[:50_000]
    churn = []
    for size in (10007, 65537):
        changes = moved(mapping("maglev", backends(100), ctxs, table_size=size),
                        mapping("maglev", backends(101), ctxs, table_size=size))
        churn.append(len(changes) / len(ctxs))
    assert churn[1] < churn[0]
    assert churn[1] <= 2.0 / 101


@pytest.mark.parametrize("algorithm", ["ring", "rendezvous"])
def test_removing_a_backend_moves_only_its_keys(algorithm):
    before = mapping(algorithm, backends(11))
    after = mapping(algorithm, backends(10))
    assert {a for a, _ in moved(before, after)} == {"10.1.0.11:8080"}


@pytest.mark.parametrize("algorithm", ["ring", "rendezvous"])
def test_raising_a_weight_moves_keys_only_to_that_backend(algorithm):
    weights = [1] * 10
    before = mapping(algorithm, backends(10, weights))
    weights[3] = 2
    changes = moved(before, mapping(algorithm, backends(10, weights)))
    assert {b for _, b in changes} == {"10.1.0.4:8080"}
    # Its share goes from 1/10 to 2/11: about 1/11 - 1/110 ≈ 8.2% of the keys move.
    assert len(changes) / KEYS == pytest.approx(2 / 11 - 1 / 10, rel=0.25)


@pytest.mark.parametrize("algorithm", ["ring", "rendezvous"])
def test_failover_order_matches_removal(algorithm):
    """The second candidate of a key is where the key goes if its first backend is
    removed: skipping an unready backend and rebuilding without it agree."""
    members = backends(8)
    full = picker(algorithm, members)
    for c in CTX[:500]:
        first, second = list(full.candidates(c))[:2]
        without = picker(algorithm, [b for b in members if b != first])
        assert without.pick(c) == second
