"""hash / ip_hash as policies: options, keys, fallback, candidates, builds.

(poise.core.policies.hashing; the mapping's statistical properties are in
test_hashing.py.)
"""

import math
import random
from collections import Counter

import pytest

from poise.core.backend import Backend
from poise.core.clock import FakeClock
from poise.core.cluster import ClusterSnapshot
from poise.core.context import RequestContext
from poise.core.policies import POLICIES, build_picker, create_policy
from poise.core.policies.hash_tables import MAX_RING_POINTS
from poise.core.policies.hashing import Hash, IpHash, parse_key
from poise.core.policies.round_robin import RoundRobin

ALGORITHMS = ("ring", "maglev", "rendezvous")


def backends(n: int, weights=None) -> list[Backend]:
    return [Backend(f"10.2.0.{1 + i}", 9000, weight=weights[i] if weights else 1)
            for i in range(n)]


def snap(n: int = 5, weights=None) -> ClusterSnapshot:
    return ClusterSnapshot.build("c", backends(n, weights))


def user(name: bytes, **kw) -> RequestContext:
    return RequestContext(headers=[(b"X-User", name)], **kw)


# -- registry ------------------------------------------------------------------------------------


def test_registered():
    assert POLICIES["hash"] is Hash
    assert POLICIES["ip_hash"] is IpHash
    policy = create_policy("hash", {"key": "cookie:sid", "algorithm": "maglev"},
                           rng=random.Random(1), clock=FakeClock())
    assert isinstance(policy, Hash) and policy.needs_context
    assert isinstance(create_policy("ip_hash"), IpHash)


# -- options -------------------------------------------------------------------------------------


@pytest.mark.parametrize("options, message", [
    ({"key": ""}, "key must be one of"),
    ({"key": "host"}, "key must be one of"),
    ({"key": "IP"}, "key must be one of"),
    ({"key": 5}, "key must be a string"),
    ({"key": "header:"}, "header name must be a non-empty token"),
    ({"key": "header:x user"}, "header name must be a non-empty token"),
    ({"key": "cookie:"}, "cookie name must be a non-empty token"),
    ({"key": "cookie:a;b"}, "cookie name must be a non-empty token"),
    ({"key": "query:"}, "query parameter name must be non-empty printable ASCII"),
    ({"key": "query:a=b"}, "query parameter name must be non-empty printable ASCII"),
    ({"key": "query:café"}, "query parameter name must be non-empty printable ASCII"),
    ({"key": "ip", "algorithm": "consistent"}, "algorithm must be one of"),
    ({"key": "ip", "points_per_weight": 0}, "points_per_weight must be between"),
    ({"key": "ip", "points_per_weight": 1001}, "points_per_weight must be between"),
    ({"key": "ip", "points_per_weight": 1.5}, "points_per_weight must be an integer"),
    ({"key": "ip", "points_per_weight": True}, "points_per_weight must be an integer"),
    ({"key": "ip", "table_size": 65536}, "table_size must be a prime"),
    ({"key": "ip", "table_size": 2}, "table_size must be between"),
    ({"key": "ip", "table_size": 2_000_003}, "table_size must be between"),
    ({"key": "ip", "table_size": "65537"}, "table_size must be an integer"),
    ({"key": "ip", "bounded_load": 0.99}, "bounded_load must be at least 1.0"),
    ({"key": "ip", "bounded_load": -2}, "bounded_load must be at least 1.0"),
    ({"key": "ip", "bounded_load": "1.25"}, "bounded_load must be a number"),
    ({"key": "ip", "bounded_load": True}, "bounded_load must be a number"),
    ({"key": "ip", "bounded_load": math.inf}, "bounded_load must be finite"),
    ({"key": "ip", "bounded_load": math.nan}, "bounded_load must be finite"),
    ({"key": "ip", "fallback": "fastest"}, "fallback must be a policy name"),
    ({"key": "ip", "fallback": 3}, "fallback must be a policy name"),
    ({"key": "ip", "fallback": "hash"}, "fallback cannot be hash"),
])
def test_bad_options_are_value_errors(options, message):
    with pytest.raises(ValueError, match=message):
        Hash(**options)


def test_key_is_required_for_hash_and_refused_by_ip_hash():
    with pytest.raises(TypeError):
        Hash()
    with pytest.raises(TypeError):
        IpHash(key="path")


@pytest.mark.parametrize("options", [
    {"key": "ip"}, {"key": "uri", "algorithm": "rendezvous", "bounded_load": 1},
    {"key": "query:q", "algorithm": "maglev", "table_size": 655373, "bounded_load": 2.5},
    {"key": "header:X-Tenant", "points_per_weight": 1000, "fallback": "ip_hash"},
])
def test_good_options(options):
    assert Hash(**options).build(snap()).pick(user(b"u", client_ip="192.0.2.1"))


def test_maglev_table_must_be_ten_slots_per_backend():
    policy = Hash(key="ip", algorithm="maglev", table_size=101)
    assert policy.build(snap(10)).pick(RequestContext("192.0.2.1"))
    with pytest.raises(ValueError, match="too small for 11 backends"):
        policy.build(snap(11))


def test_ring_size_is_limited():
    policy = Hash(key="ip", points_per_weight=1000)
    policy.build(snap(2, weights=[1000, 1000]))
    with pytest.raises(ValueError, match="points"):
        policy.build(snap(3, weights=[1000, 1000, MAX_RING_POINTS // 1000]))


def test_weights_below_one_are_refused():
    with pytest.raises(ValueError, match="at least 1"):
        Hash(key="ip").build(snap(3, weights=[1, 0, 1]))


# -- key extraction ------------------------------------------------------------------------------

CTX = RequestContext(
    client_ip="203.0.113.5", target=b"/shop/cart?item=42&q=a%20b%2Bc&q=tea",
    headers=[(b"Host", b"example.com"), (b"X-Tenant", b"acme"), (b"x-tenant", b"other"),
             (b"Cookie", b"theme=dark; sid=s3cr3t"), (b"Cookie", b"sid=later; lang=fr")])


@pytest.mark.parametrize("spec, value", [
    ("ip", b"203.0.113.5"),
    ("path", b"/shop/cart"),
    ("uri", b"/shop/cart?item=42&q=a%20b%2Bc&q=tea"),
    ("header:x-tenant", b"acme"),
    ("header:X-TENANT", b"acme"),           # header names in any case, first value
    ("cookie:sid", b"s3cr3t"),              # first occurrence over Cookie headers
    ("cookie:lang", b"fr"),
    ("query:q", b"a b+c"),                  # percent-decoded, first value
    ("query:item", b"42"),
    ("header:x-missing", None),
    ("cookie:missing", None),
    ("query:missing", None),
])
def test_each_key_kind_is_extracted(spec, value):
    canonical, extract = parse_key(spec)
    assert extract(CTX) == value
    assert canonical == spec.lower() if spec.startswith("header:") else canonical == spec


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("target", [b"/?q=%E2%82%AC", b"/?q=%FF", b"/?x=%E2%82%AC&q=1"])
def test_hostile_query_strings_do_not_fail_the_pick(algorithm, target):
    """RequestContext.query raises on some percent-decoded text; a query key must
    still pick a backend (hashing the value or, failing that, the fallback)."""
    p = Hash(key="query:q", algorithm=algorithm).build(snap())
    ctx = RequestContext(target=target)
    assert p.pick(ctx) in snap().backends
    assert len(list(p.candidates(ctx))) == 5


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("spec", ["ip", "path", "uri", "header:x-tenant", "cookie:sid",
                                  "query:q"])
def test_pick_depends_on_the_extracted_key_only(algorithm, spec):
    """Requests that differ in everything but the key agree; the key is what's hashed."""
    _, extract = parse_key(spec)
    p = Hash(key=spec, algorithm=algorithm).build(snap(7))
    rng = random.Random(2)
    for i in range(200):
        ctx = RequestContext(
            client_ip=f"192.0.2.{i}", target=b"/p/%d?q=v%d&other=%d" % (i, i, rng.random()),
            headers=[(b"X-Tenant", b"t%d" % i), (b"Cookie", b"sid=s%d; x=%d" % (i, i)),
                     (b"X-Noise", b"%f" % rng.random())])
        same = RequestContext(client_ip=ctx.client_ip, target=ctx.target,
                              headers=[(b"Accept", b"*/*"), (b"x-tenant", b"t%d" % i),
                                       (b"cookie", b"y=1; sid=s%d" % i)])
        if spec in ("path", "uri", "query:q"):
            same = RequestContext(client_ip="198.51.100.1", target=ctx.target,
                                  headers=[(b"X-Tenant", b"zzz")])
        assert p.pick(ctx) is p.pick(same)
        assert list(p.candidates(ctx)) == list(p.candidates(same))
    keys = {extract(RequestContext(f"192.0.2.{i}", b"/p/%d?q=v%d" % (i, i),
                                   headers=[(b"x-tenant", b"t%d" % i),
                                            (b"cookie", b"sid=s%d" % i)]))
            for i in range(200)}
    assert len(keys) == 200          # the keys above really differed


def test_ipv4_mapped_ipv6_is_the_ipv4_client():
    p = IpHash().build(snap(50))
    for i in range(200):
        assert p.pick(RequestContext(f"::ffff:198.51.{i}.7")) is p.pick(
            RequestContext(f"198.51.{i}.7"))
    hits = Counter(p.pick(RequestContext(f"2001:db8::{i:x}")) for i in range(2000))
    assert len(hits) == 50


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_ip_hash_is_hash_on_ip(algorithm):
    s = snap(9)
    a = IpHash(algorithm=algorithm).build(s)
    b = Hash(key="ip", algorithm=algorithm).build(s)
    for i in range(300):
        ctx = RequestContext(f"10.9.{i // 250}.{i % 250}")
        assert a.pick(ctx) is b.pick(ctx)


# -- missing key: fallback -----------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("ctx", [
    RequestContext("192.0.2.1"),                                # no header at all
    RequestContext("192.0.2.1", headers=[(b"X-User", b"")]),    # empty value
    None,                                                        # no context
])
def test_missing_key_uses_the_fallback_round_robin(algorithm, ctx):
    s = snap(4)
    p = Hash(key="header:x-user", algorithm=algorithm).build(s)
    assert [p.pick(ctx) for _ in range(8)] == list(s.backends) * 2
    rr = RoundRobin().build(s)          # in lockstep with the fallback from here
    for _ in range(6):
        assert list(p.candidates(ctx)) == list(rr.candidates())
        assert p.pick(ctx) is rr.pick()


def test_missing_ip_falls_back_and_fallback_can_be_ip_hash():
    s = snap(6)
    p = Hash(key="cookie:sid", fallback="ip_hash").build(s)
    ip = IpHash().build(s)
    for i in range(100):
        ctx = RequestContext(f"192.0.2.{i}")
        assert p.pick(ctx) is ip.pick(ctx)
    # ip_hash's own fallback (round robin) covers requests without an address.
    no_ip = IpHash().build(s)
    assert [no_ip.pick(RequestContext("")) for _ in range(6)] == list(s.backends)


def test_fallback_policy_is_created_lazily_with_the_injected_rng_and_clock(monkeypatch):
    seen = []
    real = create_policy

    def spy(name, options=None, *, rng=None, clock=None):
        seen.append((name, rng, clock))
        return real(name, options, rng=rng, clock=clock)

    monkeypatch.setattr("poise.core.policies.hashing.create_policy", spy)
    rng, clock = random.Random(9), FakeClock()
    policy = Hash(key="ip", rng=rng, clock=clock)
    assert seen == []
    policy.build(snap())
    policy.build(snap(3))
    assert seen == [("round_robin", rng, clock)]


# -- candidates ----------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("weights", [(1,), (1, 1, 1), (1, 5, 2, 1, 3, 1, 1, 4), (1,) * 40])
@pytest.mark.parametrize("bounded", [None, 1.25])
def test_candidates_yield_every_backend_once_pick_first(algorithm, weights, bounded):
    s = ClusterSnapshot.build("c", backends(len(weights), list(weights)))
    rng = random.Random(4)
    for b in s.backends:
        s.stats[b].in_flight = rng.randrange(4)
    p = Hash(key="header:x-user", algorithm=algorithm, bounded_load=bounded).build(s)
    for i in range(100):
        ctx = user(b"u%d" % i)
        order = list(p.candidates(ctx))
        assert order[0] is p.pick(ctx)
        assert len(order) == len(s.backends)
        assert {id(b) for b in order} == {id(b) for b in s.backends}


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_backends_with_the_same_address_are_distinct_members(algorithm):
    a, b = Backend("10.2.0.1", 9000, zone="a"), Backend("10.2.0.1", 9000, zone="b")
    s = ClusterSnapshot.build("c", [a, b, Backend("10.2.0.2", 9000)])
    p = Hash(key="header:x-user", algorithm=algorithm).build(s)
    hits = Counter(p.pick(user(b"u%d" % i)) for i in range(3000))
    assert set(hits) == set(s.backends)
    assert all(len(list(p.candidates(user(b"u%d" % i)))) == 3 for i in range(50))


def test_backups_come_after_every_primary():
    members = backends(4) + [Backend("10.2.1.1", 9000, backup=True),
                             Backend("10.2.1.2", 9000, backup=True)]
    p = build_picker(Hash(key="header:x-user"), ClusterSnapshot.build("c", members))
    for i in range(50):
        order = list(p.candidates(user(b"u%d" % i)))
        assert [b.backup for b in order] == [False] * 4 + [True] * 2
        assert not p.pick(user(b"u%d" % i)).backup


def test_empty_snapshot_has_no_candidates():
    p = Hash(key="ip").build(ClusterSnapshot.build("c", []))
    assert list(p.candidates(RequestContext("192.0.2.1"))) == []
    assert repr(p) == "<NoBackends>"


# -- builds and repr -----------------------------------------------------------------------------


def test_tables_are_reused_while_membership_and_weights_stay():
    policy = Hash(key="ip", algorithm="maglev")
    members = backends(6)
    one = policy.build(ClusterSnapshot.build("c", members))
    flipped = policy.build(ClusterSnapshot.build("c", members, unready=members[:2]))
    assert flipped._table is one._table
    reweighted = policy.build(ClusterSnapshot.build("c", backends(6, [2, 1, 1, 1, 1, 1])))
    assert reweighted._table is not one._table
    for n in (2, 3, 4, 5):                       # the cache stays small
        policy.build(snap(n))
    assert len(policy._tables) <= 4


def test_reprs():
    assert repr(Hash(key="header:X-User", algorithm="maglev", bounded_load=1.25)) == (
        "<Hash key=header:x-user algorithm=maglev table_size=65537 bounded_load=1.25 "
        "fallback=round_robin>")
    assert repr(IpHash(points_per_weight=40)) == (
        "<IpHash key=ip algorithm=ring points_per_weight=40 fallback=round_robin>")
    s = snap(3, [1, 2, 1])
    assert repr(Hash(key="ip").build(s)) == (
        "<RingPicker key=ip backends=3 points=640 "
        "fallback=<RotationPicker schedule=4 backends=3>>")
    assert repr(Hash(key="uri", algorithm="rendezvous", bounded_load=2).build(s)) == (
        "<RendezvousPicker key=uri backends=3 weighted bounded_load=2 "
        "fallback=<RotationPicker schedule=4 backends=3>>")
    assert repr(Hash(key="query:q", algorithm="maglev", table_size=101).build(s)).startswith(
        "<MaglevPicker key=query:q backends=3 table=101 fallback=")
