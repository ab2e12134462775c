"""The admin API's OpenAPI 3.1 document (:data:`DOCUMENT`, served at ``/openapi.json``).

It describes exactly the routes of :data:`poise.admin.api.ROUTES` (a test holds the two
together) and every request and response body, in the shapes of
:mod:`poise.admin.ops` (the dashboard's static files as text of their media type).
"""

from __future__ import annotations

from typing import Any

from poise import __version__
from poise.config.model import MAX_WEIGHT

_STATES = ["up", "down", "ejected", "drained"]
_WORKER_STATES = ["starting", "running", "restarting", "stopping"]


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _text(description: str, media: str) -> dict[str, Any]:
    return {"description": description, "content": {media: {"schema": {"type": "string"}}}}


def _object(properties: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A closed object whose properties are all required."""
    return {"type": "object", "properties": properties, "required": list(properties),
            "additionalProperties": False, **extra}


_COUNT = {"type": "integer", "minimum": 0}
_VERSION = {"type": "integer", "minimum": 0}
_WEIGHT = {"type": "integer", "minimum": 1, "maximum": MAX_WEIGHT}
_RATIO = {"type": ["number", "null"], "minimum": 0, "maximum": 1}
_MS = {"type": ["number", "null"], "minimum": 0}

SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"],
        "description": "Every error response; some add fields (see /reload).",
    },
    "Health": _object({"status": {"const": "ok"}}),
    "Backend": _object({
        "address": {"type": "string", "examples": ["127.0.0.1:9001", "[::1]:9001"]},
        "weight": _WEIGHT,
        "backup": {"type": "boolean"},
        "state": {"enum": _STATES},
        "reason": {"type": ["string", "null"],
                   "description": "Why the backend is not up, when it is not."},
        "in_flight": _COUNT,
        "requests": _COUNT,
        "errors": _COUNT,
    }, description="Counts are summed over workers and at most about a second old."),
    "Cluster": _object({
        "name": {"type": "string"},
        "policy": {"type": "string"},
        "version": _VERSION,
        "panic": {"type": "boolean",
                  "description": "Too few backends are healthy: all are used (fail open)."},
        "backends": {"type": "array", "items": _ref("Backend")},
        "discovery": {"oneOf": [{"type": "null"}, _object({
            "type": {"enum": ["file", "dns", "etcd", "zookeeper", "consul"]},
            "state": {"enum": ["starting", "up", "down"],
                      "description": "down: the source failed; the last set is kept."},
            "last_update": {"type": ["number", "null"],
                            "description": "Unix time the source last answered."},
            "error": {"type": ["string", "null"]},
        })], "description": "The cluster's discovery source (null: static backends)."},
    }),
    "ClusterList": _object({"clusters": {"type": "array", "items": _ref("Cluster")}}),
    "WeightRequest": _object({"weight": _WEIGHT}),
    "Config": {"type": "object",
               "description": "The effective configuration (see docs/configuration.md), "
                              "the admin token redacted."},
    "ReloadApplied": _object({"applied": {"const": True}, "version": _VERSION}),
    "FieldError": _object({"field": {"type": "string",
                                     "description": "Path of the field, empty for the file."},
                           "message": {"type": "string"}}),
    "ReloadRejected": _object({
        "applied": {"const": False},
        "version": {**_VERSION, "description": "The version still running."},
        "errors": {"type": "array", "items": _ref("FieldError"), "minItems": 1},
        "error": {"const": "invalid configuration"},
    }),
    "Worker": _object({
        "slot": {"type": "integer", "minimum": 0},
        "pid": {"type": ["integer", "null"]},
        "state": {"enum": _WORKER_STATES},
        "restarts": _COUNT,
        "config_version": _VERSION,
        "snapshot_versions": {"type": "object", "additionalProperties": _VERSION,
                              "description": "Cluster name → snapshot version applied."},
        "requests": {**_COUNT, "description": "Requests this worker sent to backends "
                                              "(its latest report, about a second old)."},
    }),
    "WorkerList": _object({"workers": {"type": "array", "items": _ref("Worker")}}),
    "OpenApi": {"type": "object", "required": ["openapi", "info", "paths"]},
}

# The dashboard's data: the clusters and backends above, each with its series.
SCHEMAS.update({
    "Series": _object({
        "t": {"type": "array", "items": {"type": "number", "maximum": 0},
              "description": "Seconds before `now`, oldest first."},
        "rps": {"type": "array", "items": {"type": "number", "minimum": 0},
                "description": "Requests per second over the interval before `t`."},
        "error_rate": {"type": "array", "items": _RATIO,
                       "description": "Errors / requests over that interval (null: none)."},
        "p50_ms": {"type": "array", "items": _MS,
                   "description": "Median latency over `quantile_window` (null: none)."},
        "p99_ms": {"type": "array", "items": _MS,
                   "description": "99th percentile latency over `quantile_window`."},
    }, description="Columns of equal length, one entry per sample."),
    "DashboardListener": _object({
        "name": {"type": "string"},
        "bind": {"type": "string"},
        "protocol": {"type": "string"},
        "connections": {"type": ["integer", "null"], "minimum": 0,
                        "description": "Open client connections (null: not counted)."},
        "series": _ref("Series"),
    }),
    "DashboardBackend": _object({**SCHEMAS["Backend"]["properties"], "series": _ref("Series")}),
    "DashboardCluster": _object({**SCHEMAS["Cluster"]["properties"], "backends": {
        "type": "array", "items": _ref("DashboardBackend")}}),
    "Dashboard": _object({
        "now": {"type": "number", "description": "Unix time of this answer."},
        "span": {"type": "number", "description": "Seconds of history kept."},
        "interval": {"type": "number", "description": "Seconds between samples."},
        "quantile_window": {"type": "number",
                            "description": "Seconds the latency quantiles cover."},
        "version": {**_VERSION, "description": "The config version running."},
        "listeners": {"type": "array", "items": _ref("DashboardListener")},
        "clusters": {"type": "array", "items": _ref("DashboardCluster")},
    }, description="What the dashboard shows: every listener and cluster with the "
                   "series of the last `span` seconds."),
})

_ERROR = _ref("Error")
RESPONSES: dict[str, Any] = {
    "BadRequest": _json("The request cannot be carried out.", _ERROR),
    "Unauthorized": {
        **_json("The bearer token is missing or wrong (only when a token is set).", _ERROR),
        "headers": {"WWW-Authenticate": {"schema": {"const": "Bearer"}}},
    },
    "NotFound": _json("No such cluster, or no such backend in it.", _ERROR),
    "Error": _json("Any other error: 405 (with Allow) for a method the path does not "
                   "list; 400, 408, 413, 414, 431 or 505 for a request the server "
                   "refuses (it then closes the connection); 500 for a fault.", _ERROR),
}

_PARAMETERS = {
    "name": {"name": "name", "in": "path", "required": True,
             "schema": {"type": "string", "minLength": 1},
             "description": "Cluster name, percent-encoded as needed."},
    "address": {"name": "address", "in": "path", "required": True,
                "schema": {"type": "string", "minLength": 1},
                "description": "Backend address as in the config (host:port, IPv6 in "
                               "brackets), percent-encoded as needed: [::1]:9001 may be "
                               "sent as %5B%3A%3A1%5D%3A9001."},
}


def _response(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/responses/{name}"}


_BAD = {"400": _response("BadRequest")}
_BAD_OR_MISSING = {**_BAD, "404": _response("NotFound")}


def _op(op_id: str, summary: str, ok: dict[str, Any], errors: dict[str, Any] | None = None,
        *, public: bool = False, **extra: Any) -> dict[str, Any]:
    """An operation answering ``ok`` (200) or ``errors`` (status → response), 401
    unless ``public``, and the generic error response for any other status."""
    responses = {"200": ok, **(errors or {})}
    if not public:
        responses["401"] = _response("Unauthorized")
    responses["default"] = _response("Error")
    op = {"operationId": op_id, "summary": summary, "responses": responses, **extra}
    if public:
        op["security"] = []     # overrides the document's bearer requirement
    return op


def _backend_op(op_id: str, summary: str, **extra: Any) -> dict[str, Any]:
    return _op(op_id, summary, _json("The backend, as now.", _ref("Backend")),
               _BAD_OR_MISSING, **extra)


_BACKEND_PARAMS = [_PARAMETERS["name"], _PARAMETERS["address"]]

PATHS: dict[str, Any] = {
    "/healthz": {"get": _op("healthz", "Is the control plane answering?",
                            _json("Always.", _ref("Health")), public=True)},
    "/clusters": {"get": _op("listClusters", "Every cluster, in config order.",
                             _json("The clusters.", _ref("ClusterList")))},
    "/clusters/{name}": {
        "parameters": [_PARAMETERS["name"]],
        "get": _op("getCluster", "One cluster.", _json("The cluster.", _ref("Cluster")),
                   _BAD_OR_MISSING),
    },
    "/clusters/{name}/backends/{address}/drain": {
        "parameters": _BACKEND_PARAMS,
        "post": _backend_op("drainBackend", "Send the backend no new requests; those in "
                                            "flight finish."),
    },
    "/clusters/{name}/backends/{address}/enable": {
        "parameters": _BACKEND_PARAMS,
        "post": _backend_op("enableBackend", "Undo a drain."),
    },
    "/clusters/{name}/backends/{address}/weight": {
        "parameters": _BACKEND_PARAMS,
        "put": _backend_op("setBackendWeight", "Change the backend's weight in every worker.",
                           requestBody={"required": True, "content": {
                               "application/json": {"schema": _ref("WeightRequest")}}}),
    },
    "/config": {"get": _op("getConfig", "The effective configuration.",
                           _json("The configuration.", _ref("Config")))},
    "/reload": {"post": _op(
        "reload", "Re-read the config file and apply it.",
        _json("Applied (the version is unchanged when the file changed nothing).",
              _ref("ReloadApplied")),
        {"400": _json("Not applied: the file is invalid (or the control plane cannot "
                      "reload now); the old config keeps running.",
                      {"anyOf": [_ref("ReloadRejected"), _ERROR]})})},
    "/workers": {"get": _op("listWorkers", "Each worker slot.",
                            _json("The workers.", _ref("WorkerList")))},
    "/openapi.json": {"get": _op("openapi", "This document.",
                                 _json("The document.", _ref("OpenApi")))},
    "/metrics": {"get": _op("metrics", "Prometheus metrics (text format 0.0.4), summed "
                                       "over workers.",
                            _text("The exposition.", "text/plain"))},
    "/": {"get": _op("dashboardPage", "The dashboard (an HTML page; its data needs the "
                                      "token, which the page asks for).",
                     _text("The page.", "text/html"), public=True)},
    "/dashboard/app.js": {"get": _op("dashboardScript", "The dashboard's script.",
                                     _text("The script.", "text/javascript"), public=True)},
    "/dashboard/style.css": {"get": _op("dashboardStyle", "The dashboard's style sheet.",
                                        _text("The style sheet.", "text/css"), public=True)},
    "/dashboard/data": {"get": _op("dashboardData", "What the dashboard shows.",
                                   _json("Listeners, clusters, backends and their series.",
                                         _ref("Dashboard")))},
}

DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "poise admin API",
        "version": __version__,
        "description": (
            "JSON over HTTP/1.1, served by poise's control plane on `admin.bind`. "
            "With `admin.token` set, every endpoint but /healthz and the dashboard's "
            "static files needs `Authorization: Bearer <token>`. "
            "HEAD is answered as GET without a body. "
            "Path segments are percent-decoded; a query string is ignored. Requests are "
            "limited to a 16 KiB head, a 4 KiB target and a 64 KiB body."),
    },
    "paths": PATHS,
    "components": {
        "schemas": SCHEMAS,
        "responses": RESPONSES,
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
    },
    "security": [{"bearer": []}],
}
