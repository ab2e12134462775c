"""The OpenAPI document: valid OpenAPI 3.1, exactly the routes served, and every real
response of every route fits the schema documented for its status."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from openapi_spec_validator import validate

from poise.admin.api import ROUTES, AdminApi, Response
from poise.admin.openapi import DOCUMENT
from poise.admin.ops import ReloadResult
from poise.config.model import MAX_WEIGHT
from poise.errors import ControlError, UnknownBackend
from tests.admin.fakes import FakeOps
from tests.support.openapi import validate_response

TOKEN = "t0ken"
AUTH = [(b"authorization", b"Bearer " + TOKEN.encode())]
BACKEND = "/clusters/{name}/backends/{address}"


def test_document_is_valid_openapi_31():
    validate(DOCUMENT)
    assert DOCUMENT["openapi"].startswith("3.1.")


def test_paths_and_methods_are_the_route_table():
    documented = {(method.upper(), path) for path, item in DOCUMENT["paths"].items()
                  for method in item if method != "parameters"}
    assert documented == {(r.method, r.template) for r in ROUTES}
    assert len(ROUTES) == len(documented)


def test_only_healthz_is_public():
    for route in ROUTES:
        op = DOCUMENT["paths"][route.template][route.method.lower()]
        assert (op.get("security") == []) is route.public
        assert ("401" not in op["responses"]) is route.public
    assert DOCUMENT["security"] == [{"bearer": []}]


def test_weight_limits_agree():
    schema = DOCUMENT["components"]["schemas"]["WeightRequest"]["properties"]["weight"]
    assert (schema["minimum"], schema["maximum"]) == (1, MAX_WEIGHT)


def _check(route_method: str, template: str, response: Response) -> str:
    """Validate ``response`` against the documented response for its status (or the
    default); returns the documented key used."""
    json = response.content_type == "application/json"
    return validate_response(DOCUMENT, route_method, template, response.status,
                             {"content-type": response.content_type, **dict(response.headers)},
                             response.json() if json else response.body.decode())


def _target(template: str, name: str = "app", address: str = "127.0.0.1:9001") -> str:
    return template.format(name=name, address=address)


def _raising(op: str, exc: Exception) -> Callable[[FakeOps], None]:
    return lambda ops: ops.raises.__setitem__(op, exc)


def _rejected(ops: FakeOps) -> None:
    ops.reload_result = ReloadResult(False, 3, [("workers", "must be ≥ 1"), ("", "x")])


_WEIGHT = BACKEND + "/weight"
# (method, template, target, body, setup of the fake ops): every route's success and
# each error it documents.
CASES: list[tuple[str, str, str, bytes, Callable[[FakeOps], None] | None]] = [
    *((r.method, r.template, _target(r.template), b'{"weight": 9}', None) for r in ROUTES),
    ("GET", "/clusters/{name}", "/clusters/nope", b"", None),
    ("GET", "/clusters/{name}", "/clusters/app", b"", _raising("cluster", ControlError("x"))),
    ("POST", BACKEND + "/drain", _target(BACKEND + "/drain", address="[::1]:1"), b"", None),
    ("POST", BACKEND + "/drain", _target(BACKEND + "/drain"), b"",
     _raising("set_drained", ControlError("last one"))),
    ("POST", BACKEND + "/enable", _target(BACKEND + "/enable", "nope"), b"", None),
    ("POST", BACKEND + "/enable", _target(BACKEND + "/enable"), b"",
     _raising("set_drained", ControlError("not now"))),
    ("PUT", _WEIGHT, _target(_WEIGHT), b'{"weight": 0}', None),
    ("PUT", _WEIGHT, _target(_WEIGHT), b"{}", None),
    ("PUT", _WEIGHT, _target(_WEIGHT, address="x:1"), b'{"weight": 2}', None),
    ("PUT", _WEIGHT, _target(_WEIGHT), b'{"weight": 2}',
     _raising("set_weight", UnknownBackend("gone"))),
    ("POST", "/reload", "/reload", b"", _rejected),
    ("POST", "/reload", "/reload", b"", _raising("reload", ControlError("busy"))),
    ("GET", "/workers", "/workers", b"", _raising("workers", RuntimeError("a bug"))),
]


def test_real_responses_fit_the_documented_schemas(caplog):
    used: set[tuple[str, str, str]] = set()
    for method, template, target, body, setup in CASES:
        ops = FakeOps()
        if setup is not None:
            setup(ops)
        api = AdminApi(ops, TOKEN)
        # as documented, unauthorized, as HEAD, and with a method the path does not list
        for m, headers in ((method, AUTH), (method, []), ("HEAD", AUTH), ("PATCH", AUTH)):
            if m == "HEAD" and method != "GET":
                continue
            response = api.handle(m, target, headers, body)
            used.add((method, template, _check(method, template, response)))
    documented = {(m.upper(), p, key) for p, item in DOCUMENT["paths"].items()
                  for m, op in item.items() if m != "parameters" for key in op["responses"]}
    assert used == documented


@pytest.mark.parametrize("method", ["DELETE", "PATCH"])
def test_other_errors_fit_the_default_response(method):
    api = AdminApi(FakeOps(), None)
    for route in ROUTES:
        response = api.handle(method, _target(route.template), [], b"")
        assert response.status == 405
        assert _check(route.method, route.template, response) == "default"
