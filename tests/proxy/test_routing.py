"""Routes over real sockets: host (exact and `*.` wildcard), path, path_prefix,
methods, headers; first match wins; no match → 404 without touching a backend."""

from __future__ import annotations

import pytest

from tests.support.client import H11Client, RawReader, connect

ROUTES = [
    {"match": {"host": "api.example"}, "cluster": "api"},
    {"match": {"host": "*.static.example"}, "cluster": "static"},
    {"match": {"path_prefix": "/admin", "methods": ["GET", "HEAD"]}, "cluster": "admin"},
    {"match": {"headers": {"X-Canary": "1"}}, "cluster": "canary"},
    {"match": {"path": "/exact"}, "cluster": "app"},
]


@pytest.fixture(scope="module")
def routed(module_stack):
    names = ["app", "api", "static", "admin", "canary"]
    backends = {n: module_stack.backend(n) for n in names}
    extra = [{"name": n, "backends": [{"address": backends[n].address}]} for n in names[1:]]
    px = module_stack.poise([backends["app"]], listener={"routes": ROUTES}, extra_clusters=extra)
    return px, backends


def backend_for(px, target: str, host: str = "www.example", method: str = "GET",
                headers=None) -> str | int:
    with H11Client(px.addr) as c:
        r = c.request(method, target, [("Host", host), *(headers or [])])
        return r.header("x-backend") if r.status == 200 else r.status


@pytest.mark.parametrize("host", ["api.example", "API.Example", "api.example:8080"])
def test_exact_host(routed, host):
    assert backend_for(routed[0], "/anything", host) == "api"


@pytest.mark.parametrize("host,expected", [("img.static.example", "static"),
                                           ("a.b.static.example:81", "static"),
                                           ("static.example", 404),
                                           ("xstatic.example", 404)])
def test_wildcard_host(routed, host, expected):
    assert backend_for(routed[0], "/x", host) == expected


def test_path_prefix_with_methods(routed):
    px, _ = routed
    assert backend_for(px, "/admin/users") == "admin"
    assert backend_for(px, "/admin?x=1") == "admin"
    assert backend_for(px, "/admin", method="HEAD") == "admin"
    assert backend_for(px, "/admin/users", method="POST") == 404


def test_header_match(routed):
    px, _ = routed
    assert backend_for(px, "/c", headers=[("x-canary", "1")]) == "canary"
    assert backend_for(px, "/c", headers=[("X-Canary", "2")]) == 404


def test_exact_path(routed):
    px, _ = routed
    assert backend_for(px, "/exact") == "app"
    assert backend_for(px, "/exact?q=1") == "app"
    assert backend_for(px, "/exact/more") == 404


def test_first_match_wins(routed):
    px, _ = routed
    assert backend_for(px, "/admin", host="api.example") == "api"
    assert backend_for(px, "/exact", headers=[("X-Canary", "1")]) == "canary"


def test_absolute_form_target_is_routed_by_its_host(routed):
    px, _ = routed
    with connect(px.addr) as s:
        s.sendall(b"GET http://api.example/v1 HTTP/1.1\r\nHost: www.example\r\n\r\n")
        r = RawReader(s).read_response()
    assert r.header("x-backend") == "api"


def test_no_match_is_404_keeps_the_connection_and_reaches_no_backend(routed):
    px, backends = routed
    for b in backends.values():
        b.reset()
    with H11Client(px.addr) as c:
        r = c.get("/nowhere")
        assert r.status == 404
        assert c.reusable
        assert c.request("HEAD", "/nowhere").status == 404
        assert c.get("/exact").status == 200
    assert sum(len(b.stats()["requests"]) for b in backends.values()) == 1
