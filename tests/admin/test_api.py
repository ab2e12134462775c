"""The admin API's routes, through AdminApi.handle with a fake control plane."""

from __future__ import annotations

import logging

import pytest

from poise.admin.api import ROUTES, AdminApi, Response
from poise.admin.ops import ReloadResult
from poise.errors import ControlError, UnknownBackend, UnknownCluster
from tests.admin.fakes import CLUSTERS, WORKERS, FakeOps

TOKEN = "s3cret-Token"


def ask(api: AdminApi, method: str, target: str, body: bytes = b"",
        headers: list[tuple[bytes, bytes]] | None = None) -> Response:
    return api.handle(method, target, headers or [], body)


def bearer(token: str) -> list[tuple[bytes, bytes]]:
    return [(b"Authorization", b"Bearer " + token.encode())]


# -- every endpoint -----------------------------------------------------------------------

def test_healthz(api):
    r = ask(api, "GET", "/healthz")
    assert (r.status, r.json(), r.headers) == (200, {"status": "ok"}, ())
    assert r.body.endswith(b"\n")


def test_clusters(api):
    r = ask(api, "GET", "/clusters")
    assert (r.status, r.json()) == (200, {"clusters": CLUSTERS})


def test_one_cluster(api):
    r = ask(api, "GET", "/clusters/api")
    assert (r.status, r.json()) == (200, CLUSTERS[1])


def test_drain_and_enable(api, ops):
    r = ask(api, "POST", "/clusters/app/backends/127.0.0.1:9001/drain")
    assert r.status == 200
    assert r.json()["address"] == "127.0.0.1:9001" and r.json()["state"] == "drained"
    r = ask(api, "POST", "/clusters/app/backends/127.0.0.1:9001/enable")
    assert r.status == 200 and r.json()["state"] == "up"
    assert ops.calls == [("set_drained", "app", "127.0.0.1:9001", True),
                         ("cluster", "app"),
                         ("set_drained", "app", "127.0.0.1:9001", False),
                         ("cluster", "app")]


def test_weight(api, ops):
    r = ask(api, "PUT", "/clusters/app/backends/127.0.0.1:9001/weight", b'{"weight": 7}')
    assert r.status == 200 and r.json()["weight"] == 7
    assert ("set_weight", "app", "127.0.0.1:9001", 7) in ops.calls


@pytest.mark.parametrize("weight", [1, 10_000])
def test_weight_bounds_are_accepted(api, weight):
    body = b'{"weight": %d}' % weight
    r = ask(api, "PUT", "/clusters/app/backends/127.0.0.1:9001/weight", body)
    assert r.status == 200 and r.json()["weight"] == weight


def test_config(api):
    r = ask(api, "GET", "/config")
    assert r.status == 200 and r.json()["admin"]["token"] == "<redacted>"


def test_reload_applied(api, ops):
    ops.reload_result = ReloadResult(True, 5)
    r = ask(api, "POST", "/reload")
    assert (r.status, r.json()) == (200, {"applied": True, "version": 5})


def test_reload_rejected(api, ops):
    ops.reload_result = ReloadResult(False, 4, [("clusters[0].name", "required"),
                                                ("", "not valid YAML")])
    r = ask(api, "POST", "/reload")
    assert r.status == 400
    assert r.json() == {"applied": False, "version": 4, "error": "invalid configuration",
                        "errors": [{"field": "clusters[0].name", "message": "required"},
                                   {"field": "", "message": "not valid YAML"}]}


def test_workers(api):
    r = ask(api, "GET", "/workers")
    assert (r.status, r.json()) == (200, {"workers": WORKERS})


def test_openapi(api):
    r = ask(api, "GET", "/openapi.json")
    assert r.status == 200 and r.json()["openapi"].startswith("3.1")


def test_head_is_get_without_side_effects(api, ops):
    assert ask(api, "HEAD", "/clusters").json() == ask(api, "GET", "/clusters").json()
    assert ask(api, "HEAD", "/reload").status == 405
    assert ("reload",) not in ops.calls


def test_query_string_is_ignored(api):
    assert ask(api, "GET", "/clusters/app?verbose=1&x").json()["name"] == "app"


def test_absolute_form_target(api):
    assert ask(api, "GET", "http://admin:9901/clusters/app").json()["name"] == "app"
    assert ask(api, "GET", "http://admin:9901").content_type.startswith("text/html")


@pytest.mark.parametrize("target", ["*", "clusters", "ftp://x/clusters", "admin:9901"])
def test_bad_target(api, target):
    r = ask(api, "GET", target)
    assert (r.status, r.json()) == (400, {"error": "bad request target"})


# -- percent-decoding ---------------------------------------------------------------------

@pytest.mark.parametrize("address", ["[::1]:9002", "%5B%3A%3A1%5D%3A9002",
                                     "%5b%3a%3a1%5d%3a9002", "[%3A%3A1]:9002"])
def test_ipv6_backend_percent_decoded(api, ops, address):
    r = ask(api, "POST", f"/clusters/app/backends/{address}/drain")
    assert r.status == 200 and r.json()["address"] == "[::1]:9002"
    assert ops.calls[0] == ("set_drained", "app", "[::1]:9002", True)


def test_encoded_slash_stays_in_its_segment(api, ops):
    r = ask(api, "GET", "/clusters/a%2Fb")
    assert r.status == 404 and ops.calls == [("cluster", "a/b")]


def test_literal_segments_are_decoded_too(api):
    assert ask(api, "GET", "/%68ealthz").status == 200


def test_not_utf8_after_decoding(api):
    assert ask(api, "GET", "/clusters/%FF").status == 400


# -- 404 and 405 --------------------------------------------------------------------------

@pytest.mark.parametrize("target", ["/nope", "/dashboard", "/dashboard/", "/clusters/",
                                    "/clusters/app/", "/clusters/app/backends", "//clusters",
                                    "/clusters/app/backends/127.0.0.1:9001/frob",
                                    "/clusters/app/backends//drain", "/HEALTHZ"])
def test_unknown_path(api, ops, target):
    r = ask(api, "GET", target)
    assert (r.status, r.json()) == (404, {"error": "no such path"})
    assert ops.calls == []


@pytest.mark.parametrize(("method", "target", "allow"), [
    ("POST", "/healthz", "GET, HEAD"),
    ("DELETE", "/clusters", "GET, HEAD"),
    ("PUT", "/clusters/app", "GET, HEAD"),
    ("GET", "/clusters/app/backends/127.0.0.1:9001/drain", "POST"),
    ("PUT", "/clusters/app/backends/127.0.0.1:9001/enable", "POST"),
    ("POST", "/clusters/app/backends/127.0.0.1:9001/weight", "PUT"),
    ("GET", "/reload", "POST"),
    ("OPTIONS", "/workers", "GET, HEAD"),
])
def test_wrong_method(api, ops, method, target, allow):
    r = ask(api, method, target)
    assert r.status == 405 and dict(r.headers) == {"allow": allow}
    assert "error" in r.json() and ops.calls == []


# -- weight bodies ------------------------------------------------------------------------

@pytest.mark.parametrize("body", [
    b"", b"7", b"weight=7", b"{", b'{"weight": 7', b"\xff\xfe", b"[7]", b'"7"', b"null",
    b"{}", b'{"Weight": 7}', b'{"weight": 7, "extra": 1}', b'{"weight": null}',
    b'{"weight": true}', b'{"weight": false}', b'{"weight": 7.0}', b'{"weight": 7.5}',
    b'{"weight": "7"}', b'{"weight": [7]}', b'{"weight": {"n": 7}}', b'{"weight": 0}',
    b'{"weight": -1}', b'{"weight": 10001}', b'{"weight": 1e3}', b'{"weight": NaN}',
    b'{"weight": Infinity}', b'{"weight": 9' + b"9" * 5000 + b"}",
    b"[" * 60_000 + b"]" * 60_000,
])
def test_bad_weight_body(api, ops, body):
    r = ask(api, "PUT", "/clusters/app/backends/127.0.0.1:9001/weight", body)
    assert r.status == 400 and isinstance(r.json()["error"], str)
    assert [c for c in ops.calls if c[0] == "set_weight"] == []


# -- errors from the control plane ---------------------------------------------------------

def test_unknown_cluster_and_backend(api):
    r = ask(api, "GET", "/clusters/nope")
    assert (r.status, r.json()) == (404, {"error": "no cluster 'nope'"})
    r = ask(api, "POST", "/clusters/nope/backends/127.0.0.1:9001/drain")
    assert r.status == 404
    r = ask(api, "PUT", "/clusters/app/backends/127.0.0.1:1/weight", b'{"weight": 2}')
    assert (r.status, r.json()) == (404, {"error": "cluster 'app' has no backend 127.0.0.1:1"})


@pytest.mark.parametrize(("exc", "status"), [
    (UnknownCluster("gone"), 404), (UnknownBackend("gone"), 404),
    (ControlError("cannot do that now"), 400), (ControlError(), 400),
])
@pytest.mark.parametrize(("method", "target", "op"), [
    ("GET", "/clusters", "clusters"),
    ("GET", "/clusters/app", "cluster"),
    ("POST", "/clusters/app/backends/127.0.0.1:9001/drain", "set_drained"),
    ("POST", "/clusters/app/backends/127.0.0.1:9001/enable", "set_drained"),
    ("PUT", "/clusters/app/backends/127.0.0.1:9001/weight", "set_weight"),
    ("GET", "/config", "config"),
    ("POST", "/reload", "reload"),
    ("GET", "/workers", "workers"),
])
def test_control_errors(api, ops, exc, status, method, target, op):
    ops.raises[op] = exc
    r = ask(api, method, target, b'{"weight": 3}')
    assert (r.status, r.json()) == (status, {"error": str(exc)})
    assert r.json()["error"]        # (a bare ControlError says what it is)


def test_unexpected_exception_is_500_and_logged(api, ops, caplog):
    ops.raises["clusters"] = KeyError("backends")
    with caplog.at_level(logging.ERROR, logger="poise"):
        r = ask(api, "GET", "/clusters")
    assert (r.status, r.json()) == (500, {"error": "internal error"})
    [record] = caplog.records
    assert record.name == "poise" and record.exc_info[0] is KeyError
    assert "GET /clusters" in record.getMessage()


def test_unencodable_answer_is_500(api, ops, caplog):
    ops.data = [{"name": "app", "weight": float("nan")}]
    with caplog.at_level(logging.ERROR, logger="poise"):
        assert ask(api, "GET", "/clusters").status == 500
    ops.data = [{"name": object()}]
    with caplog.at_level(logging.ERROR, logger="poise"):
        assert ask(api, "GET", "/clusters").status == 500
    assert len(caplog.records) == 2


# -- authentication -----------------------------------------------------------------------

@pytest.fixture
def secured(ops) -> AdminApi:
    return AdminApi(ops, TOKEN)


@pytest.mark.parametrize("headers", [
    [],
    bearer("wrong"),
    bearer(TOKEN + "x"),
    bearer(TOKEN[:-1]),
    bearer(""),
    [(b"Authorization", TOKEN.encode())],
    [(b"Authorization", b"Basic " + TOKEN.encode())],
    [(b"Authorization", b"Bearer")],
    [(b"X-Token", TOKEN.encode())],
    bearer(TOKEN) + bearer(TOKEN),       # two Authorization headers
    bearer(TOKEN) + bearer("wrong"),
])
def test_missing_or_wrong_token(secured, ops, headers):
    for route in ROUTES:
        if route.public:
            continue
        target = route.template.format(name="app", address="127.0.0.1:9001")
        r = ask(secured, route.method, target, b'{"weight": 2}', headers)
        assert r.status == 401, route
        assert dict(r.headers) == {"www-authenticate": "Bearer"}
        assert r.json() == {"error": "missing or wrong bearer token"}
    assert ops.calls == []


def test_unknown_paths_need_the_token_too(secured):
    assert ask(secured, "GET", "/nope").status == 401
    assert ask(secured, "GET", "/nope", headers=bearer(TOKEN)).status == 404


@pytest.mark.parametrize("headers", [
    bearer(TOKEN),
    [(b"authorization", b"bearer " + TOKEN.encode())],
    [(b"AUTHORIZATION", b"BEARER  " + TOKEN.encode() + b"  ")],
])
def test_right_token(secured, headers):
    for route in ROUTES:
        target = route.template.format(name="app", address="127.0.0.1:9001")
        r = ask(secured, route.method, target, b'{"weight": 2}', headers)
        assert r.status == 200, route


def test_healthz_is_open(secured):
    assert ask(secured, "GET", "/healthz").status == 200
    assert ask(secured, "GET", "/healthz", headers=bearer("wrong")).status == 200
    assert ask(secured, "HEAD", "/healthz").status == 200
    assert ask(secured, "POST", "/healthz").status == 405


def test_token_can_change(secured):
    assert ask(secured, "GET", "/workers", headers=bearer(TOKEN)).status == 200
    secured.token = "rotated"
    assert ask(secured, "GET", "/workers", headers=bearer(TOKEN)).status == 401
    assert ask(secured, "GET", "/workers", headers=bearer("rotated")).status == 200
    secured.token = None
    assert ask(secured, "GET", "/workers").status == 200


def test_non_ascii_token_header(secured):
    assert ask(secured, "GET", "/workers", headers=bearer("tökén")).status == 401


def test_repr():
    assert repr(AdminApi(FakeOps(), None)) == f"<AdminApi routes={len(ROUTES)} token=none>"
