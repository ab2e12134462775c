"""Route matching without sockets (poise.proxy.http.router.Router).

The router is given the method, the path without query string, the host lower-cased
without port, and the request's header pairs; it returns the first matching route's
target or None (which the proxy answers with 404).
"""

import pytest

from poise.config.model import Match, Route
from poise.proxy.http.router import Router

TARGETS = {name: f"<{name}>" for name in ("api", "web", "admin", "static", "fallback")}


def route(cluster: str, **match) -> Route:
    return Route.model_validate({"cluster": cluster, **({"match": match} if match else {})})


def router(*routes: Route) -> Router:
    return Router(list(routes), TARGETS)


def match(r: Router, method=b"GET", path=b"/", host=b"example.com", headers=()):
    return r.match(method, path, host, list(headers))


# -- order ---------------------------------------------------------------------------------------


def test_first_match_wins():
    r = router(route("api", path_prefix="/api"),
               route("admin", path_prefix="/api/admin"),
               route("web"))
    assert match(r, path=b"/api/admin/users") == "<api>"
    assert match(r, path=b"/other") == "<web>"


def test_later_routes_are_tried_in_order():
    r = router(route("api", host="api.example.com"),
               route("admin", path_prefix="/admin"),
               route("static", path_prefix="/"))
    assert match(r, host=b"api.example.com", path=b"/admin") == "<api>"
    assert match(r, host=b"www.example.com", path=b"/admin") == "<admin>"
    assert match(r, host=b"www.example.com", path=b"/x") == "<static>"


def test_no_match_is_none():
    r = router(route("api", host="api.example.com"), route("web", path="/index.html"))
    assert match(r, host=b"other.example.com", path=b"/") is None


# -- catch-all -----------------------------------------------------------------------------------


def test_route_without_match_is_a_catch_all():
    r = router(route("web"))
    assert r.catch_all == "<web>"
    assert match(r, method=b"DELETE", path=b"/anything", host=b"") == "<web>"


def test_empty_match_is_a_catch_all():
    r = Router([Route(cluster="web", match=Match())], TARGETS)
    assert r.catch_all == "<web>"
    assert match(r, path=b"/x") == "<web>"


def test_catch_all_only_when_the_first_route_is_unconditional():
    r = router(route("api", path_prefix="/api"), route("web"))
    assert r.catch_all is None
    assert match(r, path=b"/api/x") == "<api>"
    assert match(r, path=b"/x") == "<web>"


def test_routes_after_a_catch_all_are_unreachable():
    r = router(route("web"), route("api", path_prefix="/api"))
    assert r.catch_all == "<web>"
    assert match(r, path=b"/api/x") == "<web>"


# -- host ----------------------------------------------------------------------------------------


def test_exact_host():
    r = router(route("api", host="api.example.com"))
    assert match(r, host=b"api.example.com") == "<api>"
    for other in (b"www.example.com", b"example.com", b"api.example.com.evil.net",
                  b"xapi.example.com", b""):
        assert match(r, host=other) is None


def test_exact_host_from_mixed_case_config():
    # The config lower-cases hosts; the proxy lower-cases the request's Host.
    r = router(route("api", host="API.Example.COM"))
    assert match(r, host=b"api.example.com") == "<api>"


def test_wildcard_host():
    r = router(route("api", host="*.example.com"))
    assert match(r, host=b"a.example.com") == "<api>"
    assert match(r, host=b"www.example.com") == "<api>"
    assert match(r, host=b"a.b.example.com") == "<api>"      # any depth
    assert match(r, host=b"example.com") is None             # not the apex
    assert match(r, host=b".example.com") is None
    assert match(r, host=b"badexample.com") is None
    assert match(r, host=b"a.example.com.evil.net") is None
    assert match(r, host=b"a.example.org") is None


def test_exact_and_wildcard_hosts_in_order():
    r = router(route("admin", host="admin.example.com"),
               route("web", host="*.example.com"),
               route("fallback"))
    assert match(r, host=b"admin.example.com") == "<admin>"
    assert match(r, host=b"shop.example.com") == "<web>"
    assert match(r, host=b"example.com") == "<fallback>"


# -- path ----------------------------------------------------------------------------------------


def test_exact_path():
    r = router(route("api", path="/health"))
    assert match(r, path=b"/health") == "<api>"
    assert match(r, path=b"/health/") is None
    assert match(r, path=b"/healthz") is None
    assert match(r, path=b"/Health") is None
    assert match(r, path=b"/") is None


def test_path_prefix_is_a_plain_prefix():
    r = router(route("api", path_prefix="/api"))
    assert match(r, path=b"/api") == "<api>"
    assert match(r, path=b"/api/v1/users") == "<api>"
    assert match(r, path=b"/apiary") == "<api>"              # byte prefix, not segments
    assert match(r, path=b"/ap") is None
    assert match(r, path=b"/API") is None
    assert match(r, path=b"/v1/api") is None


def test_path_prefix_with_trailing_slash_limits_to_a_segment():
    r = router(route("api", path_prefix="/api/"))
    assert match(r, path=b"/api/x") == "<api>"
    assert match(r, path=b"/apiary") is None
    assert match(r, path=b"/api") is None


def test_root_prefix_matches_every_path():
    r = router(route("api", path_prefix="/"))
    assert r.catch_all is None
    assert match(r, path=b"/") == "<api>"
    assert match(r, path=b"/deep/path") == "<api>"


def test_path_and_prefix_together_must_both_hold():
    r = router(route("api", path_prefix="/api", path="/api/ping"))
    assert match(r, path=b"/api/ping") == "<api>"
    assert match(r, path=b"/api/pong") is None


# -- methods -------------------------------------------------------------------------------------


def test_methods():
    r = router(route("api", methods=["get", "HEAD"]), route("web"))
    assert match(r, method=b"GET") == "<api>"
    assert match(r, method=b"HEAD") == "<api>"
    assert match(r, method=b"POST") == "<web>"
    assert match(r, method=b"DELETE") == "<web>"


# -- headers -------------------------------------------------------------------------------------


def test_header_name_is_case_insensitive_value_is_exact():
    r = router(route("api", headers={"X-Env": "prod"}))
    assert match(r, headers=[(b"X-Env", b"prod")]) == "<api>"
    assert match(r, headers=[(b"x-env", b"prod")]) == "<api>"
    assert match(r, headers=[(b"X-ENV", b"prod")]) == "<api>"
    assert match(r, headers=[(b"X-Env", b"Prod")]) is None
    assert match(r, headers=[(b"X-Env", b"prod2")]) is None
    assert match(r, headers=[(b"X-Other", b"prod")]) is None
    assert match(r, headers=[]) is None


def test_every_listed_header_must_match():
    r = router(route("api", headers={"X-Env": "prod", "X-Tenant": "blue"}))
    assert match(r, headers=[(b"x-tenant", b"blue"), (b"x-env", b"prod")]) == "<api>"
    assert match(r, headers=[(b"x-env", b"prod")]) is None
    assert match(r, headers=[(b"x-env", b"prod"), (b"x-tenant", b"red")]) is None


def test_any_repeated_header_line_may_match():
    r = router(route("api", headers={"X-Env": "prod"}))
    assert match(r, headers=[(b"x-env", b"dev"), (b"x-env", b"prod")]) == "<api>"


# -- combinations --------------------------------------------------------------------------------


def test_all_conditions_must_hold():
    r = router(route("api", host="*.example.com", path_prefix="/v1/", methods=["POST"],
                     headers={"Content-Type": "application/json"}),
               route("fallback"))
    ok = dict(method=b"POST", path=b"/v1/items", host=b"shop.example.com",
              headers=[(b"content-type", b"application/json")])
    assert match(r, **ok) == "<api>"
    assert match(r, **{**ok, "method": b"GET"}) == "<fallback>"
    assert match(r, **{**ok, "path": b"/v2/items"}) == "<fallback>"
    assert match(r, **{**ok, "host": b"example.com"}) == "<fallback>"
    assert match(r, **{**ok, "headers": [(b"content-type", b"text/plain")]}) == "<fallback>"


@pytest.mark.parametrize(("routes", "text"), [
    ([route("web")], "<Router routes=1 catch_all=True>"),
    ([route("api", path="/x"), route("web")], "<Router routes=2 catch_all=False>"),
])
def test_repr(routes, text):
    assert repr(Router(routes, TARGETS)) == text
