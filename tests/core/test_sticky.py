"""sticky: signed cookie sessions over a fallback policy (poise.core.policies.sticky)."""

import random
import re

import pytest

from poise.core.backend import Backend
from poise.core.clock import FakeClock
from poise.core.cluster import ClusterSnapshot
from poise.core.context import RequestContext
from poise.core.policies import POLICIES, build_picker, create_policy
from poise.core.policies.round_robin import RoundRobin
from poise.core.policies.sticky import Sticky, StickyPicker

SECRET = "correct-horse-battery-staple"
A, B, C, D = (Backend(f"10.0.0.{i}", 8080) for i in range(1, 5))
VALUE = re.compile(rb"[A-Za-z0-9_-]{12}\.[A-Za-z0-9_-]{16}")


def sticky(**options) -> Sticky:
    options.setdefault("secret", SECRET)
    return Sticky(**options, rng=random.Random(1), clock=FakeClock())


def setup(members=(A, B, C), **options):
    policy = sticky(**options)
    snap = ClusterSnapshot.build("c", members)
    return policy, snap, policy.build(snap)


def with_cookie(value: bytes, name: bytes = b"poise_sticky") -> RequestContext:
    return RequestContext(headers=[(b"Host", b"example.com"),
                                   (b"Cookie", b"theme=dark; " + name + b"=" + value)])


def issued(header: bytes) -> tuple[bytes, bytes]:
    """(name, value) of a Set-Cookie header value."""
    name, _, rest = header.partition(b"=")
    return name, rest.split(b";", 1)[0]


def fallback_sequence(members, count: int) -> list[Backend]:
    picker = RoundRobin().build(ClusterSnapshot.build("c", members))
    return [picker.pick() for _ in range(count)]


# -- options -----------------------------------------------------------------------------------


def test_defaults():
    policy = sticky()
    assert Sticky.needs_context is True
    assert (policy.cookie, policy.fallback_name, policy.max_age, policy.path) == (
        "poise_sticky", "round_robin", None, "/")
    assert (policy.http_only, policy.same_site, policy.secure) == (True, "Lax", False)
    assert isinstance(policy.fallback, RoundRobin)


def test_secret_is_required_and_long_enough():
    with pytest.raises(TypeError):
        Sticky(rng=random.Random(), clock=FakeClock())
    with pytest.raises(ValueError, match="at least 16") as e:
        sticky(secret="short-secret")
    assert "short-secret" not in str(e.value)
    with pytest.raises(TypeError) as e:
        sticky(secret=1234567890123456789)
    assert "1234567890123456789" not in str(e.value)
    sticky(secret="x" * 16)
    sticky(secret=b"0123456789abcdef")


@pytest.mark.parametrize("options", [
    {"cookie": ""}, {"cookie": "has space"}, {"cookie": "semi;colon"}, {"cookie": "a=b"},
    {"path": "relative"}, {"path": "/a;b"}, {"path": "/a\nb"}, {"path": ""},
    {"same_site": "sometimes"}, {"same_site": "None"},      # None needs secure
    {"max_age": 0}, {"max_age": -5}, {"max_age": "0s"}, {"max_age": float("inf")},
    {"max_age": "forever"},
    {"fallback": "sticky"}, {"fallback": "fastest"}, {"fallback": {"type": "sticky"}},
])
def test_bad_options_are_value_errors(options):
    with pytest.raises(ValueError):
        sticky(**options)


@pytest.mark.parametrize("options", [
    {"cookie": 7}, {"path": None}, {"same_site": 1}, {"http_only": "yes"}, {"secure": 1}, {"max_age": True},
    {"fallback": 3}, {"fallback": {"key": "ip"}}, {"fallback": {"type": "round_robin",
                                                                "spread": 2}},
    {"domain": "example.com"},
])
def test_bad_option_types_are_type_errors(options):
    with pytest.raises(TypeError):
        sticky(**options)


def test_repr_never_shows_the_secret():
    policy, _, picker = setup(max_age="1h")
    assert repr(policy) == "<Sticky cookie=poise_sticky max_age=3600s fallback=round_robin>"
    assert repr(picker).startswith("<StickyPicker cookie=poise_sticky backends=3 fallback=")
    assert SECRET not in repr(policy) + repr(picker)


def test_registered():
    assert POLICIES["sticky"] is Sticky
    policy = create_policy("sticky", {"secret": SECRET, "fallback": {"type": "round_robin"}},
                           rng=random.Random(1), clock=FakeClock())
    assert isinstance(policy, Sticky)


# -- the cookie --------------------------------------------------------------------------------


def test_set_cookie_default_attributes():
    _, _, picker = setup()
    header = picker.set_cookie(None, A)
    assert re.fullmatch(rb"poise_sticky=[A-Za-z0-9_-]{12}\.[A-Za-z0-9_-]{16}; Path=/; "
                        rb"HttpOnly; SameSite=Lax", header)


def test_set_cookie_all_attributes():
    _, _, picker = setup(cookie="srv", max_age="12h", path="/app", secure=True,
                         same_site="strict")
    name, value = issued(picker.set_cookie(None, A))
    assert name == b"srv" and VALUE.fullmatch(value)
    assert picker.set_cookie(None, A) == (b"srv=" + value + b"; Path=/app; Max-Age=43200; "
                                          b"Secure; HttpOnly; SameSite=Strict")


def test_set_cookie_minimal_attributes():
    _, _, picker = setup(http_only=False, same_site=None, max_age=90.4)
    header = picker.set_cookie(None, A)
    assert header.endswith(b"; Path=/; Max-Age=90")
    _, _, picker = setup(same_site="None", secure=True)
    assert picker.set_cookie(None, A).endswith(b"; Path=/; Secure; HttpOnly; SameSite=None")


def test_cookie_holds_neither_the_secret_nor_the_address():
    _, _, picker = setup()
    for backend in (A, B, Backend("db-7.internal.example", 5432), Backend("::1", 8080)):
        header = picker.set_cookie(None, backend)
        _, value = issued(header)
        assert SECRET.encode() not in header
        assert backend.host.encode() not in value and b"8080" not in value
        assert VALUE.fullmatch(value)


def test_cookie_values_are_stable_and_depend_on_the_secret():
    # Another worker, a restarted process or another poise with the same secret agree.
    one, two, other = sticky(), sticky(), sticky(secret="another-secret-of-16+")
    assert one.value(A) == two.value(A)
    assert len({one.value(b) for b in (A, B, C, D)}) == 4
    assert other.value(A) != one.value(A)
    assert other.value(A).partition(b".")[0] != one.value(A).partition(b".")[0]


# -- sessions ----------------------------------------------------------------------------------


def test_round_trip_every_backend():
    _, snap, picker = setup()
    for backend in snap.backends:
        _, value = issued(picker.set_cookie(None, backend))
        ctx = with_cookie(value)
        assert [picker.pick(ctx) for _ in range(20)] == [backend] * 20
        assert picker.set_cookie(ctx, backend) is None          # nothing to re-issue


def test_round_trip_across_workers():
    _, _, worker1 = setup()
    _, _, worker2 = setup()
    _, value = issued(worker1.set_cookie(None, C))
    assert worker2.pick(with_cookie(value)) is C


def test_no_cookie_uses_the_fallback_and_issues_one():
    _, snap, picker = setup()
    ctxs = [RequestContext(), with_cookie(b"x", name=b"other"), None]
    chosen = [picker.pick(ctxs[i % 3]) for i in range(9)]
    assert chosen == fallback_sequence(snap.backends, 9)
    assert issued(picker.set_cookie(RequestContext(), chosen[0]))[0] == b"poise_sticky"
    assert picker.set_cookie(None, chosen[0]) is not None


def test_tampered_foreign_and_garbage_cookies_are_ignored():
    _, snap, picker = setup()
    good = sticky().value(B)
    backend_id, _, tag = good.partition(b".")
    flipped = bytes([tag[0] ^ 1]) + tag[1:]
    bad = [
        backend_id + b"." + flipped,                         # tag tampered
        bytes([backend_id[0] ^ 1]) + backend_id[1:] + b"." + tag,    # id tampered
        backend_id + b"." + sticky().value(C).partition(b".")[2],   # C's tag on B's id
        backend_id, backend_id + b".", good[:-1], good + b"A", b"." + tag,
        sticky(secret="another-secret-of-16+").value(B),    # foreign secret
        sticky(cookie="other").value(B),                     # issued under another name
        b"", b".", b"..", b"garbage", b"\xff\xfe\x00", b"A" * 10_000, b'"' + good + b'"',
    ]
    expected = fallback_sequence(snap.backends, len(bad))
    for value, fallback_choice in zip(bad, expected, strict=True):
        ctx = with_cookie(value)
        assert picker.pick(ctx) is fallback_choice, value
        assert picker.set_cookie(ctx, fallback_choice) == picker.set_cookie(None,
                                                                            fallback_choice)


def test_first_cookie_of_that_name_counts():
    _, _, picker = setup()
    ctx = RequestContext(headers=[(b"Cookie", b"poise_sticky=" + sticky().value(A)),
                                  (b"Cookie", b"poise_sticky=" + sticky().value(C))])
    assert picker.pick(ctx) is A


def test_served_by_another_backend_reissues_for_that_backend():
    _, _, picker = setup()
    ctx = with_cookie(sticky().value(A))
    header = picker.set_cookie(ctx, B)
    assert header is not None and issued(header)[1] == sticky().value(B)


def test_removed_backend_falls_back_and_reissues():
    policy, snap, _ = setup((A, B, C))
    ctx = with_cookie(policy.value(C))
    shrunk = ClusterSnapshot.build("c", (A, B), previous=snap)
    picker = policy.build(shrunk)
    served = picker.pick(ctx)
    assert served in (A, B)
    assert C not in list(picker.candidates(ctx))
    _, value = issued(picker.set_cookie(ctx, served))
    assert picker.pick(with_cookie(value)) is served
    # C comes back (same address): old cookies name it again.
    regrown = ClusterSnapshot.build("c", (A, B, C), previous=shrunk)
    assert policy.build(regrown).pick(ctx) is C


def test_session_survives_a_weight_change():
    policy, snap, _ = setup((A, B))
    ctx = with_cookie(policy.value(B))
    heavier = Backend(B.host, B.port, weight=5)
    picker = policy.build(ClusterSnapshot.build("c", (A, heavier), previous=snap))
    assert picker.pick(ctx) is heavier


# -- candidates ----------------------------------------------------------------------------------


def test_candidates_cookie_backend_first_then_fallback_without_repeats():
    _, snap, picker = setup((A, B, C, D))
    ctx = with_cookie(sticky().value(C))
    for _ in range(8):
        proposed = list(picker.candidates(ctx))
        assert proposed[0] is C
        assert sorted(proposed, key=lambda b: b.address) == [A, B, C, D]


def test_candidates_without_a_session_are_the_fallbacks():
    _, snap, picker = setup((A, B, C, D))
    reference = RoundRobin().build(snap)
    for _ in range(8):
        assert list(picker.candidates(RequestContext())) == list(reference.candidates())


def test_unready_session_backend_is_skipped_by_the_caller_and_reissued():
    policy = sticky()
    snap = ClusterSnapshot.build("c", (A, B, C), unready=[B])
    picker = policy.build(snap)
    ctx = with_cookie(policy.value(B))
    # The policy still proposes B first; the caller judges readiness (DESIGN.md §5).
    served = next(b for b in picker.candidates(ctx) if snap.ready(b))
    assert served is not B
    assert issued(picker.set_cookie(ctx, served))[1] == policy.value(served)


def test_sessions_with_backup_backends():
    policy = sticky()
    backup = Backend("10.0.0.9", 8080, backup=True)
    snap = ClusterSnapshot.build("c", (A, B, backup))
    picker = build_picker(policy, snap)
    assert picker.pick(with_cookie(policy.value(B))) is B
    # A session on a backup is honoured only once no primary is taken: it heads the
    # backups' candidates, after every primary.
    proposed = list(picker.candidates(with_cookie(policy.value(backup))))
    assert proposed[-1] is backup and set(proposed[:2]) == {A, B}
    assert policy.set_cookie(None, backup) is not None     # policy-level: any backend


def test_fallback_given_as_a_mapping():
    policy, snap, picker = setup(fallback={"type": "round_robin"})
    assert isinstance(policy.fallback, RoundRobin)
    assert isinstance(picker, StickyPicker)
    assert [picker.pick(None) for _ in range(3)] == fallback_sequence(snap.backends, 3)


def test_empty_cluster_has_no_candidates():
    _, _, picker = setup(())
    assert list(picker.candidates(with_cookie(sticky().value(A)))) == []
