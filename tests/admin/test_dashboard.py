"""The dashboard's side of the admin API: the page and its assets are public static
files with their own content types and cache headers; its data needs the token."""

from __future__ import annotations

import http.client
import re
import tomllib
from pathlib import Path

import pytest

from poise.admin import assets
from poise.admin.api import AdminApi
from tests.admin.conftest import serve
from tests.admin.fakes import FakeOps

TOKEN = "dash-Token"
AUTH = [(b"authorization", b"Bearer " + TOKEN.encode())]
STATIC = Path(assets.__file__).parent / "static"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def secured_server(ops):
    yield from serve(AdminApi(ops, TOKEN))


def get(addr, path: str, method: str = "GET", token: str | None = None):
    conn = http.client.HTTPConnection(*addr, timeout=5)
    try:
        conn.request(method, path, headers={"Authorization": f"Bearer {token}"} if token else {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


@pytest.mark.parametrize(("path", "media", "cache"), [
    ("/", "text/html", "no-cache"),
    (f"/dashboard/app.js?v={assets.version()}", "text/javascript", "immutable"),
    ("/dashboard/style.css", "text/css", "immutable"),
])
def test_static_files_are_public_with_their_type_and_cache_headers(secured_server, ops,
                                                                   path, media, cache):
    status, headers, body = get(secured_server.addr, path)
    assert status == 200
    assert headers["content-type"].startswith(media + ";")
    assert cache in headers["cache-control"] and "no-store" not in headers["cache-control"]
    assert headers["x-content-type-options"] == "nosniff"
    assert int(headers["content-length"]) == len(body) > 100
    status, head_headers, head_body = get(secured_server.addr, path, "HEAD")
    assert (status, head_body) == (200, b"")
    assert head_headers["content-length"] == headers["content-length"]
    assert ops.calls == []          # (nothing asked of the control plane)


def test_the_page_names_its_assets_by_their_content_and_forbids_the_rest(secured_server):
    _, headers, body = get(secured_server.addr, "/")
    page = body.decode()
    assert assets.VERSION_MARK not in page
    linked = set(re.findall(r'(?:src|href)="(/[^"]+)"', page))
    version = assets.version()
    assert linked == {f"/dashboard/app.js?v={version}", f"/dashboard/style.css?v={version}"}
    for target in linked:
        assert get(secured_server.addr, target)[0] == 200
    csp = headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp
    assert "frame-ancestors 'none'" in csp
    # (no inline script the policy would block)
    assert re.search(r"<script(?![^>]*\bsrc=)", page) is None
    assert re.search(r"\son[a-z]+=", page) is None


def test_the_data_needs_the_token(secured_server, ops):
    status, headers, body = get(secured_server.addr, "/dashboard/data")
    assert (status, headers["www-authenticate"]) == (401, "Bearer")
    assert ops.calls == []
    status, headers, body = get(secured_server.addr, "/dashboard/data", token=TOKEN)
    assert status == 200
    assert headers["content-type"] == "application/json"
    assert headers["cache-control"] == "no-store"
    assert ops.calls == [("dashboard",)]


def test_a_fault_in_the_data_is_a_500_not_a_crash(caplog):
    ops = FakeOps()
    ops.raises["dashboard"] = RuntimeError("a bug")
    r = AdminApi(ops, None).handle("GET", "/dashboard/data", [], b"")
    assert (r.status, r.json()) == (500, {"error": "internal error"})


def test_the_version_follows_the_content(monkeypatch):
    files = {"app.js": b"one", "style.css": b"css"}
    monkeypatch.setattr(assets, "_read", lambda name: files[name])
    assets.version.cache_clear()
    try:
        first = assets.version()
        files["app.js"] = b"two"
        assets.version.cache_clear()
        assert assets.version() != first
    finally:
        assets.version.cache_clear()
        assets.asset.cache_clear()


def test_the_script_uses_only_elements_the_page_has():
    page = (STATIC / "index.html").read_text()
    script = (STATIC / "app.js").read_text()
    ids = set(re.findall(r'id="([^"]+)"', page))
    used = set(re.findall(r'\$\("([^"]+)"\)', script))
    assert used and used <= ids, used - ids


def test_the_static_files_are_shipped_as_package_data():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["poise.admin"]
    shipped = {p.name for pattern in patterns for p in (STATIC.parent).glob(pattern)}
    assert {filename for filename, _ in assets.FILES.values()} <= shipped
