"""The dashboard's static files (``poise/admin/static/``, shipped as package data).

They carry no data (the page fetches ``/dashboard/data`` with the token), so the admin
API serves them without the token.  Each is read once, on first use, and answered from
memory:

- the page (``index.html``): ``cache-control: no-cache`` (revalidated on each load), so
  that a new poise serves its own page at once; it names its script and style sheet
  with a hash of their content (``/dashboard/app.js?v=…``), so they may be cached for
  good (``max-age`` a year, ``immutable``): a new version is a new URL.
- every file: ``x-content-type-options: nosniff``; the page also a Content Security
  Policy that allows only its own script, style and requests (no inline script, no
  other origin, no framing) and ``referrer-policy: no-referrer``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from importlib.resources import files

# Served name → (file in static/, content type).
FILES: dict[str, tuple[str, str]] = {
    "page": ("index.html", "text/html; charset=utf-8"),
    "app.js": ("app.js", "text/javascript; charset=utf-8"),
    "style.css": ("style.css", "text/css; charset=utf-8"),
}
# Where index.html names the assets' version.
VERSION_MARK = "{{version}}"

_NOSNIFF = ("x-content-type-options", "nosniff")
_PAGE_HEADERS = (
    ("cache-control", "no-cache"),
    _NOSNIFF,
    ("content-security-policy",
     "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
     "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    ("referrer-policy", "no-referrer"),
)
_ASSET_HEADERS = (("cache-control", "max-age=31536000, immutable"), _NOSNIFF)


@dataclass(frozen=True, slots=True)
class Asset:
    """A static file as served: its content type, body and headers (cache and
    security; content-type and -length are the server's)."""

    content_type: str
    body: bytes
    headers: tuple[tuple[str, str], ...]


def _read(filename: str) -> bytes:
    return (files("poise.admin") / "static" / filename).read_bytes()


@cache
def version() -> str:
    """A short hash of the script and style sheet: the ``v`` the page asks them with."""
    digest = hashlib.sha256()
    for name in ("app.js", "style.css"):
        digest.update(_read(FILES[name][0]))
    return digest.hexdigest()[:12]


@cache
def asset(name: str) -> Asset:
    """The served file ``name`` (a key of :data:`FILES`); KeyError for any other."""
    filename, content_type = FILES[name]
    body = _read(filename)
    if name == "page":
        body = body.replace(VERSION_MARK.encode(), version().encode())
        return Asset(content_type, body, _PAGE_HEADERS)
    return Asset(content_type, body, _ASSET_HEADERS)
