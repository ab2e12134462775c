"""Checking an admin API response against an OpenAPI document (the one in
poise/admin/openapi.py, or the one a running poise serves)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jsonschema


def resolve(document: dict, obj: dict) -> dict:
    """``obj`` with its ``$ref`` (into ``document``) followed, as often as needed."""
    while "$ref" in obj:
        node: Any = document
        for part in obj["$ref"].removeprefix("#/").split("/"):
            node = node[part]
        obj = node
    return obj


def validate_response(document: dict, method: str, template: str, status: int,
                      headers: Mapping[str, str], body: Any) -> str:
    """Validate a response (``headers`` by lower-case name, ``body`` its JSON, or its
    text when its content-type is not JSON) against what ``document`` says of ``method
    template`` for ``status`` (or its default); returns the key of the documented
    response used."""
    op = document["paths"][template][method.lower()]
    key = str(status) if str(status) in op["responses"] else "default"
    documented = resolve(document, op["responses"][key])
    media = headers.get("content-type", "application/json").partition(";")[0].strip()
    schema = documented["content"][media]["schema"]
    # The schema's $refs resolve against the document's components.
    jsonschema.Draft202012Validator(
        {**schema, "components": document["components"]}).validate(body)
    for name, header in documented.get("headers", {}).items():
        jsonschema.validate(headers[name.lower()], header["schema"])
    return key
