"""The admin API's routes: requests in, JSON responses out, no I/O.

:class:`AdminApi` turns one parsed request into a :class:`Response`; the HTTP server
(:mod:`poise.admin.http`) does the bytes.  Handlers are plain functions over
:class:`~poise.admin.ops.Operations` that return at once.  :data:`ROUTES` is the whole
API; the OpenAPI document (:mod:`poise.admin.openapi`) describes exactly these routes.

Rules shared by every route:

- Path segments are percent-decoded after splitting, so a backend ``[::1]:9001`` may
  be sent as ``%5B%3A%3A1%5D%3A9001``; a query string is ignored.
- With a token set, every route but ``/healthz`` and the dashboard's static files
  (``public`` routes) needs ``Authorization: Bearer <token>`` (401 otherwise, before a
  path is looked up, so unauthenticated clients learn nothing about paths).
- ``HEAD`` is answered as ``GET`` (the server sends no body); any other method a path
  does not list is 405 with ``Allow``; an unknown path is 404.
- Answers are JSON, but for the dashboard's static files (:mod:`poise.admin.assets`),
  which are public: they carry no data; ``/dashboard/data`` needs the token.
- Errors are ``{"error": "..."}``: :class:`~poise.errors.ControlError` gives its own
  status (400; 404 for an unknown cluster or backend), anything else raised while
  answering is logged and answered 500 ``{"error": "internal error"}``.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from poise.admin.assets import Asset, asset
from poise.admin.openapi import DOCUMENT
from poise.admin.ops import Operations
from poise.config.model import MAX_WEIGHT
from poise.errors import ControlError
from poise.observability.exposition import CONTENT_TYPE as METRICS_TYPE

log = logging.getLogger("poise")

Headers = list[tuple[bytes, bytes]]
JSON = "application/json"
# A handler answers (status, JSON-able payload or an Asset) from the ops, the decoded
# path parameters and the request body; it raises ControlError for the client's mistakes.
Handler = Callable[[Operations, dict[str, str], bytes], tuple[int, Any]]


@dataclass(frozen=True, slots=True)
class Response:
    """One answer: ``status``, headers beyond content-type/-length, and a body of
    ``content_type`` (JSON but for static files)."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
    content_type: str = JSON

    def json(self) -> Any:
        """The body, decoded (for tests and the CLI)."""
        return json.loads(self.body)


@dataclass(frozen=True, slots=True)
class Route:
    """``method`` on the path ``template`` (``{name}`` matches one non-empty segment)."""

    method: str
    template: str
    handler: Handler
    public: bool = False    # served without the token

    def match(self, segments: list[str]) -> dict[str, str] | None:
        """The path parameters when the decoded ``segments`` fit the template."""
        parts = self.template[1:].split("/")
        if len(parts) != len(segments):
            return None
        params: dict[str, str] = {}
        for part, segment in zip(parts, segments, strict=True):
            if part.startswith("{"):
                if not segment:
                    return None
                params[part[1:-1]] = segment
            elif part != segment:
                return None
        return params


# -- handlers ---------------------------------------------------------------------------

def _healthz(ops: Operations, params: dict[str, str], body: bytes) -> tuple[int, Any]:
    return 200, {"status": "ok"}


def _clusters(ops: Operations, params: dict[str, str], body: bytes) -> tuple[int, Any]:
    return 200, {"clusters": ops.clusters()}


def _cluster(ops: Operations, params: dict[str, str], body: bytes) -> tuple[int, Any]:
    return 200, ops.cluster(params["name"])


def _drain(ops: Operations, params: dict[str, str], body: bytes) -> tuple[int, Any]:
    return 200, ops.set_drained(params["name"], params["address"], True)


def _enable(ops: Operations, params: dict[str, str], body: bytes) -> tuple[int, Any]:
    return 200, ops.set_drained(params["name"], params["address"], False)


def _weight(ops: Operations, params: dict[str, str], body: bytes) -> tuple[int, Any]:
    return 200, ops.set_weight(params["name"], params["address"], weight_of(body))


def _config(ops: Operations, params: dict[str, str], body: bytes) -> tuple[int, Any]:
    return 200, ops.effective_config()


def _reload(ops: Operations, params: dict[str, str], body: bytes) -> tuple[int, Any]:
    result = ops.reload()
    if result.applied:
        return 200, {"applied": True, "version": result.version}
    return 400, {"applied": False, "version": result.version,
                 "errors": [{"field": f, "message": m} for f, m in result.errors],
                 "error": "invalid configuration"}


def _workers(ops: Operations, params: dict[str, str], body: bytes) -> tuple[int, Any]:
    return 200, {"workers": ops.workers()}


def _openapi(ops: Operations, params: dict[str, str], body: bytes) -> tuple[int, Any]:
    return 200, DOCUMENT


def _static(name: str) -> Handler:
    return lambda ops, params, body: (200, asset(name))


def _metrics(ops: Operations, params: dict[str, str], body: bytes) -> tuple[int, Any]:
    return 200, Asset(METRICS_TYPE, ops.metrics_text(), ())


def _dashboard(ops: Operations, params: dict[str, str], body: bytes) -> tuple[int, Any]:
    return 200, ops.dashboard()


_BACKEND = "/clusters/{name}/backends/{address}"

ROUTES: list[Route] = [
    Route("GET", "/healthz", _healthz, public=True),
    Route("GET", "/clusters", _clusters),
    Route("GET", "/clusters/{name}", _cluster),
    Route("POST", _BACKEND + "/drain", _drain),
    Route("POST", _BACKEND + "/enable", _enable),
    Route("PUT", _BACKEND + "/weight", _weight),
    Route("GET", "/config", _config),
    Route("POST", "/reload", _reload),
    Route("GET", "/workers", _workers),
    Route("GET", "/openapi.json", _openapi),
    Route("GET", "/metrics", _metrics),
    Route("GET", "/", _static("page"), public=True),
    Route("GET", "/dashboard/app.js", _static("app.js"), public=True),
    Route("GET", "/dashboard/style.css", _static("style.css"), public=True),
    Route("GET", "/dashboard/data", _dashboard),
]


def weight_of(body: bytes) -> int:
    """The weight in a ``{"weight": N}`` body; ControlError unless it is exactly that
    with N an integer 1..MAX_WEIGHT (a bool or a float such as 2.0 is not)."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):     # (RecursionError: absurdly nested JSON)
        raise ControlError('the body must be JSON: {"weight": N}') from None
    if not isinstance(data, dict) or set(data) != {"weight"}:
        raise ControlError('the body must be {"weight": N}')
    weight = data["weight"]
    if type(weight) is not int or not 1 <= weight <= MAX_WEIGHT:
        raise ControlError(f"weight must be an integer 1..{MAX_WEIGHT}")
    return weight


# -- the API ----------------------------------------------------------------------------

class AdminApi:
    """Answers admin requests from ``ops``.  ``token`` (None: no authentication) may be
    replaced at any time, e.g. on reload; each request reads it afresh."""

    def __init__(self, ops: Operations, token: str | None) -> None:
        self.ops = ops
        self.token = token

    def __repr__(self) -> str:
        return f"<AdminApi routes={len(ROUTES)} token={'set' if self.token else 'none'}>"

    def handle(self, method: str, target: str, headers: Headers, body: bytes) -> Response:
        """Answer one request; never raises.  ``target`` is the request target as sent
        (origin form ``/path?query`` or absolute form ``http://host/path``),
        ``headers`` the raw header fields in order."""
        segments = path_segments(target)
        if segments is None:
            return error(400, "bad request target")
        matched = [(r, p) for r in ROUTES if (p := r.match(segments)) is not None]
        if not any(r.public for r, _ in matched) and not self.authorized(headers):
            return error(401, "missing or wrong bearer token",
                         (("www-authenticate", "Bearer"),))
        if not matched:
            return error(404, "no such path")
        wanted = "GET" if method == "HEAD" else method
        for route, params in matched:
            if route.method == wanted:
                return self._call(route, params, body)
        allowed = sorted({r.method for r, _ in matched} | ({"HEAD"} if any(
            r.method == "GET" for r, _ in matched) else set()))
        return error(405, f"{method} is not allowed here", (("allow", ", ".join(allowed)),))

    def authorized(self, headers: Headers) -> bool:
        """True without a token, or with exactly one ``Authorization: Bearer <token>``."""
        token = self.token
        if token is None:
            return True
        values = [v for n, v in headers if n.lower() == b"authorization"]
        if len(values) != 1:
            return False
        scheme, _, credential = values[0].strip().partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(
            credential.strip(), token.encode())

    def _call(self, route: Route, params: dict[str, str], body: bytes) -> Response:
        try:
            status, payload = route.handler(self.ops, params, body)
            if isinstance(payload, Asset):
                return Response(status, payload.headers, payload.body, payload.content_type)
            return Response(status, (), encode(payload))
        except ControlError as e:
            return error(e.status, str(e))
        except Exception:
            log.exception("admin API: %s %s failed", route.method, route.template)
            return error(500, "internal error")


def path_segments(target: str) -> list[str] | None:
    """The percent-decoded segments of the target's path, or None when the target is
    neither origin form nor absolute http(s) form, or does not decode as UTF-8."""
    path = target.partition("?")[0].partition("#")[0]
    if not path.startswith("/"):
        scheme, sep, rest = path.partition("://")
        if not sep or scheme.lower() not in ("http", "https"):
            return None
        path = "/" + rest.partition("/")[2]
    try:
        return [unquote(s, errors="strict") for s in path[1:].split("/")]
    except UnicodeDecodeError:
        return None


def encode(payload: Any) -> bytes:
    """Compact JSON plus a newline (friendly to curl); NaN and infinities are refused,
    as they are not JSON."""
    return json.dumps(payload, separators=(",", ":"), allow_nan=False).encode() + b"\n"


def error(status: int, message: str, headers: tuple[tuple[str, str], ...] = ()) -> Response:
    """An error response ``{"error": message}``."""
    return Response(status, headers, encode({"error": message}))
