"""Every admin API endpoint through a real poise (a supervisor with two workers, h11
backends): authentication, bad input, unknown names, wrong methods, the effective config
with its token redacted, the OpenAPI document — and every answer checked against the
schema that very document gives for it.  Plus: the admin API is not reachable through
the proxy's listener.

One poise serves the module; each test leaves the backends as it found them.
"""

from __future__ import annotations

import re

import pytest
from openapi_spec_validator import validate

from poise.admin.api import ROUTES
from tests.support.client import H11Client
from tests.support.control import (
    TOKEN,
    by_worker,
    snapshot,
    spread,
    wait_snapshot,
    worker_pids,
)
from tests.support.openapi import validate_response
from tests.support.waiting import wait_for

BACKEND = "/clusters/{name}/backends/{address}"
SECRET = "sticky-e2e-secret-0123456789"


@pytest.fixture(scope="module")
def backends(module_stack):
    return module_stack.backend("b1"), module_stack.backend("b2")


@pytest.fixture(scope="module")
def px(module_stack, backends):
    # A second cluster (no route leads to it) for its sticky-session secret.
    sticky = {"name": "sticky", "policy": {"type": "sticky", "secret": SECRET},
              "backends": [{"address": backends[1].address}]}
    return module_stack.poise(list(backends), workers=2, admin={"token": TOKEN},
                              extra_clusters=[sticky])


@pytest.fixture(scope="module")
def document(px) -> dict:
    r = px.admin.get("/openapi.json")
    assert r.status == 200, r
    return r.json()


@pytest.fixture
def check(document):
    """``check(method, template, response)``: the response fits the schema the served
    document gives for its status (or its default response), headers included."""
    def check(method: str, template: str, response) -> None:
        assert response.headers["content-type"] == "application/json"
        if method == "HEAD":        # (answered as GET, without the body)
            assert response.body == b""
            return
        validate_response(document, method, template, response.status, response.headers,
                          response.json())
    return check


def target(template: str, address: str, name: str = "app") -> str:
    return template.format(name=name, address=address)


def routes(address: str) -> list[tuple[str, str, str, dict | None]]:
    """(method, template, target, body) of every route that needs the token."""
    return [(r.method, r.template, target(r.template, address),
             {"weight": 1} if r.method == "PUT" else None) for r in ROUTES if not r.public]


def states(px) -> dict[str, tuple[str, int]]:
    return {b["address"]: (b["state"], b["weight"])
            for b in px.admin.get("/clusters/app").json()["backends"]}


def test_healthz_is_open(px, check):
    for token in (None, "wrong", TOKEN):
        r = px.admin.get("/healthz", token=token)
        assert (r.status, r.json()) == (200, {"status": "ok"})
        check("GET", "/healthz", r)


def test_every_other_route_needs_the_token(px, backends, check):
    b1, _ = backends
    before = states(px)
    reloads = len(re.findall("reload", px.log()))
    covered = set()
    for method, template, path, body in routes(b1.address):
        for token, headers in ((None, None), ("wrong", None), (TOKEN + "x", None),
                               (None, {"Authorization": f"Basic {TOKEN}"}),
                               (None, {"Authorization": TOKEN})):
            r = px.admin.request(method, path, body, token=token, headers=headers)
            assert r.status == 401, (method, path, token, headers, r)
            assert r.headers["www-authenticate"] == "Bearer"
            check(method, template, r)
        covered.add((method, template))
    assert covered == {(r.method, r.template) for r in ROUTES if not r.public}
    # Refused before a path is looked up: an unknown path is 401 too, not 404.
    assert px.admin.get("/no/such/path", token=None).status == 401
    assert px.admin.get("/no/such/path").status == 404
    # Nothing was done.
    assert states(px) == before
    assert len(re.findall("reload", px.log())) == reloads


def test_clusters_show_every_backend_and_the_requests_of_both_workers(px, backends, check):
    b1, b2 = backends
    r = px.admin.get("/clusters")
    assert r.status == 200
    check("GET", "/clusters", r)
    app, sticky = r.json()["clusters"]
    assert (app["name"], app["policy"], app["panic"]) == ("app", "round_robin", False)
    assert (sticky["name"], sticky["policy"]) == ("sticky", "sticky")
    assert [b["address"] for b in sticky["backends"]] == [b2.address]
    assert [(b["address"], b["state"], b["weight"], b["reason"]) for b in app["backends"]] \
        == [(b1.address, "up", 1, None), (b2.address, "up", 1, None)]
    r = px.admin.get("/clusters/app")
    check("GET", "/clusters/{name}", r)
    assert {k: v for k, v in r.json().items() if k != "backends"} \
        == {k: v for k, v in app.items() if k != "backends"}

    def requests() -> int:
        return sum(b["requests"] for b in px.admin.get("/clusters/app").json()["backends"])
    start = requests()
    pids = worker_pids(px)
    answers = spread(px, 30, pids)
    assert set(by_worker(answers)) == set(pids)
    # Workers report about every second: the sum over both catches up.
    wait_for(lambda: requests() == start + 30, 5, "the 30 requests counted")


def test_drain_enable_and_weight(px, backends, check):
    b1, b2 = backends
    v = snapshot(px)
    try:
        r = px.admin.post(target(BACKEND + "/drain", b2.address))
        check("POST", BACKEND + "/drain", r)
        assert r.json() | {"requests": 0, "in_flight": 0, "errors": 0} == {
            "address": b2.address, "weight": 1, "backup": False, "state": "drained",
            "reason": "drained by an operator", "requests": 0, "in_flight": 0, "errors": 0}
        # Draining twice changes nothing: no new snapshot.
        assert px.admin.post(target(BACKEND + "/drain", b2.address)).json()["state"] \
            == "drained"
        wait_snapshot(px, v + 1)
        assert {a.backend for a in spread(px, 10)} == {"b1"}

        r = px.admin.put(target(BACKEND + "/weight", b1.address), {"weight": 7})
        check("PUT", BACKEND + "/weight", r)
        assert (r.json()["address"], r.json()["weight"]) == (b1.address, 7)
        # An address may be percent-encoded.
        encoded = b2.address.replace(":", "%3A")
        r = px.admin.post(f"/clusters/app/backends/{encoded}/enable")
        check("POST", BACKEND + "/enable", r)
        assert (r.json()["address"], r.json()["state"]) == (b2.address, "up")
        wait_snapshot(px, v + 3)
        assert states(px) == {b1.address: ("up", 7), b2.address: ("up", 1)}
    finally:
        px.admin.post(target(BACKEND + "/enable", b2.address))
        px.admin.put(target(BACKEND + "/weight", b1.address), {"weight": 1})
    assert states(px) == {b1.address: ("up", 1), b2.address: ("up", 1)}


@pytest.mark.parametrize("body", [
    b"", b"7", b"not json", b'{"weight": 0}', b'{"weight": -1}', b'{"weight": 10001}',
    b'{"weight": 2.0}', b'{"weight": true}', b'{"weight": "2"}', b'{"weight": null}',
    b'{"weight": 2, "backup": true}', b'{}', b'[{"weight": 2}]', b"[" * 60_000,
])
def test_a_bad_weight_is_400_and_changes_nothing(px, backends, check, body):
    b1, _ = backends
    v = snapshot(px)
    before = states(px)
    r = px.admin.put(target(BACKEND + "/weight", b1.address), body)
    assert r.status == 400, r
    assert "weight" in r.json()["error"] or "JSON" in r.json()["error"], r.json()
    check("PUT", BACKEND + "/weight", r)
    assert states(px) == before
    assert snapshot(px) == v


def test_unknown_clusters_backends_and_paths_are_404(px, backends, check):
    b1, _ = backends
    cases = [
        ("GET", "/clusters/{name}", "/clusters/nope", None),
        ("POST", BACKEND + "/drain", target(BACKEND + "/drain", b1.address, "nope"), None),
        ("POST", BACKEND + "/drain", target(BACKEND + "/drain", "127.0.0.1:1"), None),
        ("POST", BACKEND + "/enable", target(BACKEND + "/enable", "nonsense"), None),
        ("PUT", BACKEND + "/weight", target(BACKEND + "/weight", "127.0.0.1:1"), {"weight": 2}),
    ]
    for method, template, path, body in cases:
        r = px.admin.request(method, path, body)
        assert r.status == 404, (path, r)
        check(method, template, r)
    r = px.admin.get("/no/such/path")
    assert (r.status, r.json()) == (404, {"error": "no such path"})


def test_a_method_a_path_does_not_list_is_405_with_allow(px, backends, check):
    b1, _ = backends
    # (method sent, path, the route's own method, Allow)
    cases = [("GET", "/reload", "POST", "POST"),
             ("POST", "/clusters", "GET", "GET, HEAD"),
             ("DELETE", "/clusters/{name}", "GET", "GET, HEAD"),
             ("GET", BACKEND + "/drain", "POST", "POST"),
             ("POST", BACKEND + "/weight", "PUT", "PUT"),
             ("PUT", "/workers", "GET", "GET, HEAD")]
    for method, template, documented, allow in cases:
        path = target(template, b1.address)
        r = px.admin.request(method, path, b"{}" if method in ("POST", "PUT") else None)
        assert (r.status, r.headers.get("allow")) == (405, allow), (method, path, r)
        check(documented, template, r)
    r = px.admin.request("HEAD", "/clusters")
    assert r.status == 200 and r.body == b"" and int(r.headers["content-length"]) > 0
    check("HEAD", "/clusters", r)


def test_config_is_the_effective_config_with_the_token_redacted(px, check):
    r = px.admin.get("/config")
    assert r.status == 200
    check("GET", "/config", r)
    assert TOKEN.encode() not in r.body and SECRET.encode() not in r.body
    config = r.json()
    assert config["admin"] == {"bind": px.config["admin"]["bind"], "token": "<redacted>"}
    assert config["workers"] == 2
    assert [lst["bind"] for lst in config["listeners"]] == [f"127.0.0.1:{px.port}"]
    assert [b["address"] for b in config["clusters"][0]["backends"]] \
        == [b["address"] for b in px.config["clusters"][0]["backends"]]
    assert config["clusters"][1]["policy"] == {"type": "sticky", "secret": "<redacted>"}
    assert config["drain_timeout"] == 30.0          # defaults filled in: the effective one


def test_openapi_document_describes_the_routes_served(px, document):
    validate(document)
    assert document["openapi"].startswith("3.1.")
    documented = {(m.upper(), p) for p, item in document["paths"].items()
                  for m in item if m != "parameters"}
    assert documented == {(r.method, r.template) for r in ROUTES}
    assert px.admin.get("/openapi.json", token=None).status == 401


def test_reload_and_workers(px, check):
    r = px.admin.post("/reload")
    check("POST", "/reload", r)
    assert (r.status, r.json()) == (200, {"applied": True, "version": 1})
    r = px.admin.get("/workers")
    check("GET", "/workers", r)
    workers = r.json()["workers"]
    assert [w["slot"] for w in workers] == [0, 1]
    assert sorted(w["pid"] for w in workers) == sorted(px.children())
    assert all(w["state"] == "running" and w["restarts"] == 0 and w["config_version"] == 1
               for w in workers), workers


def test_the_admin_api_is_not_reachable_through_the_proxy(px):
    auth = [("Authorization", f"Bearer {TOKEN}")]
    reloads = px.log().count("reload")
    with H11Client(px.addr) as c:
        for method, path in (("GET", "/clusters"), ("GET", "/healthz"), ("POST", "/reload"),
                             ("GET", "/openapi.json")):
            r = c.request(method, path, auth, body=b"" if method == "POST" else None)
            assert r.status == 200 and r.header("x-backend") in ("b1", "b2"), (path, r)
            assert (r.json()["method"], r.json()["target"]) == (method, path)
    assert px.log().count("reload") == reloads
    # ...and the admin API proxies nothing.
    r = px.admin.get("/echo")
    assert (r.status, r.json()) == (404, {"error": "no such path"})
