"""Weighted round robin over real backends, with the issue's config (weights 1 and 2).

The backends listen on free ports instead of 9001/9002 so tests never collide; the
config is otherwise the issue's minimal config exactly.
"""

from __future__ import annotations

from collections import Counter
from itertools import groupby

from tests.support.client import H11Client

REQUESTS = 300
# Smooth weighted round robin is deterministic for sequential requests: 100/200 exactly.
# Allow 2 percentage points for any request the proxy had to route differently.
TOLERANCE = 0.02


def _names(px, n: int, per_connection: int = 50) -> list[str]:
    names = []
    for _ in range(n // per_connection):
        with H11Client(px.addr) as c:
            for _ in range(per_connection):
                r = c.get("/echo")
                assert r.status == 200
                names.append(r.header("x-backend"))
    return names


def test_weights_1_and_2_split_one_third_two_thirds(stack):
    b1, b2 = stack.backend("b9001"), stack.backend("b9002")
    px = stack.poise([b1, (b2, 2)])
    assert px.config["clusters"][0]["backends"][1]["weight"] == 2
    names = _names(px, REQUESTS)
    share = Counter(names)["b9002"] / REQUESTS
    assert abs(share - 2 / 3) <= TOLERANCE, f"b9002 got {share:.3f} of requests, want 2/3"
    # what the backends saw agrees with what the client was told
    assert len(b1.stats()["requests"]) + len(b2.stats()["requests"]) == REQUESTS
    assert abs(len(b2.stats()["requests"]) / REQUESTS - 2 / 3) <= TOLERANCE


def test_weighted_picks_are_interleaved_smoothly(stack):
    b1, b2 = stack.backend("b9001"), stack.backend("b9002")
    px = stack.poise([b1, (b2, 2)])
    names = _names(px, 60, per_connection=60)
    runs = {name: max(len(list(g)) for n, g in groupby(names) if n == name)
            for name in set(names)}
    assert runs["b9001"] == 1, f"the weight-1 backend was picked twice in a row: {names}"
    assert runs["b9002"] <= 2, f"the weight-2 backend was picked {runs['b9002']} times in a row"


def test_equal_weights_rotate(stack):
    backends = [stack.backend(f"eq{i}") for i in range(3)]
    px = stack.poise(backends)
    names = _names(px, 90, per_connection=30)
    assert Counter(names) == {"eq0": 30, "eq1": 30, "eq2": 30}
    assert all(a != b for a, b in zip(names, names[1:], strict=False)), names


def test_balancing_is_per_request_not_per_connection(stack):
    b1, b2 = stack.backend("x1"), stack.backend("x2")
    px = stack.poise([b1, b2])
    with H11Client(px.addr) as c:
        names = {c.get("/echo").header("x-backend") for _ in range(4)}
    assert names == {"x1", "x2"}


def test_backup_backend_only_serves_when_no_primary_can(stack):
    from tests.support.procs import refused_address

    primary, backup = stack.backend("primary"), stack.backend("backup")
    # Primary up: the backup sees nothing.
    px = stack.poise([], cluster={"backends": [{"address": primary.address},
                                                {"address": backup.address, "backup": True}]})
    assert set(_names(px, 50)) == {"primary"}
    assert backup.stats()["requests"] == []
    # Primary refusing connections: every request fails over to the backup.
    px = stack.poise([], cluster={"backends": [{"address": refused_address()},
                                                {"address": backup.address, "backup": True}]})
    assert set(_names(px, 50)) == {"backup"}
