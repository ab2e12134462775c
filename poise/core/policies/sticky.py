"""sticky: cookie sessions, signed so that clients cannot choose their backend.

The first response of a session carries ``Set-Cookie: <cookie>=<id>.<tag>``:

- ``id`` names the backend: 72 bits of HMAC-SHA256(secret, "id" ‖ address), base64url.
  Keyed, so the cookie does not reveal the address even to someone who enumerates
  likely private addresses; stable across restarts, workers and poise instances that
  share the secret.
- ``tag`` authenticates it: 96 bits of HMAC-SHA256(secret, "tag" ‖ cookie name ‖ id),
  base64url, checked with :func:`hmac.compare_digest`.

Later requests that present a valid cookie go to its backend.  A missing, malformed,
tampered or foreign cookie, or one naming a backend that is no longer in the cluster,
is ignored: the ``fallback`` policy chooses, and the response re-issues the cookie for
the backend that served (see :meth:`StickyPicker.set_cookie`).  So does a response
served by another backend because the cookie's one was unavailable.
"""

from __future__ import annotations

import hashlib
import hmac
import random
import re
from base64 import urlsafe_b64encode
from collections.abc import Iterator
from typing import Any

from poise.core.backend import Backend
from poise.core.clock import Clock
from poise.core.cluster import ClusterSnapshot
from poise.core.context import RequestContext
from poise.core.policies import POLICIES, Picker, Policy, create_policy
from poise.core.units import duration_option

MIN_SECRET_LENGTH = 16
_ID_BYTES = 9       # 72 bits: ids only need to differ between one cluster's backends
_TAG_BYTES = 12     # 96 bits: forging means guessing this
# RFC 6265 cookie-name (an RFC 7230 token) and a path attribute without ';' or CTLs.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_PATH = re.compile(r"/[\x20-\x3a\x3c-\x7e]*")
_SAME_SITE = {"lax": "Lax", "strict": "Strict", "none": "None"}
# Cookies for backends met outside a picker's own snapshot are cached up to this many.
_CACHE_LIMIT = 4096


def _b64(data: bytes) -> bytes:
    return urlsafe_b64encode(data).rstrip(b"=")


class Sticky:
    """Policy factory for ``sticky``.

    Options:

    - ``secret`` (required, ≥ 16 characters): the HMAC-SHA256 key.  Changing it
      invalidates every session (each client is re-pinned once).
    - ``cookie`` (default ``poise_sticky``): the cookie name.
    - ``fallback`` (default ``round_robin``): the policy, by name or as
      ``{type: NAME, ...options}``, that chooses when there is no valid cookie.
    - ``max_age`` (default None: a session cookie): seconds, or a duration string.
    - ``path`` (default ``/``), ``http_only`` (default true), ``same_site`` (default
      ``Lax``; ``Strict``, ``None`` or null to omit), ``secure`` (default false;
      required by browsers for ``SameSite=None``).
    """

    needs_context = True

    def __init__(self, *, secret: str | bytes, cookie: str = "poise_sticky",
                 fallback: str | dict[str, Any] = "round_robin",
                 max_age: float | str | None = None, path: str = "/",
                 http_only: bool = True, same_site: str | None = "Lax",
                 secure: bool = False, rng: random.Random, clock: Clock) -> None:
        self._key = _secret(secret)
        for name, text in (("cookie", cookie), ("path", path)):
            if not isinstance(text, str):
                raise TypeError(f"{name}: expected a string, got {type(text).__name__}")
        if not _TOKEN.fullmatch(cookie):
            raise ValueError(f"cookie: {cookie!r} is not a valid cookie name")
        self.cookie = cookie
        self.fallback_name, options = _fallback_spec(fallback)
        self.fallback: Policy = create_policy(self.fallback_name, options, rng=rng,
                                              clock=clock)
        self.max_age = _max_age(max_age)
        if not _PATH.fullmatch(path):
            raise ValueError(f"path: {path!r} must start with / and hold no ';' or "
                             "control characters")
        self.path = path
        for name, flag in (("http_only", http_only), ("secure", secure)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name}: expected true or false, got {flag!r}")
        self.http_only = http_only
        self.secure = secure
        if same_site is None:
            self.same_site = None
        elif not isinstance(same_site, str):
            raise TypeError(f"same_site: expected Lax, Strict, None or null, "
                            f"got {type(same_site).__name__}")
        elif same_site.lower() in _SAME_SITE:
            self.same_site = _SAME_SITE[same_site.lower()]
        else:
            raise ValueError(f"same_site: expected Lax, Strict, None or null, "
                             f"got {same_site!r}")
        if self.same_site == "None" and not secure:
            raise ValueError("same_site: None requires secure: true (browsers drop the "
                             "cookie otherwise)")
        self._name = cookie.encode("ascii")
        attributes = [b"Path=" + path.encode("ascii")]
        if self.max_age is not None:
            attributes.append(b"Max-Age=%d" % self.max_age)
        if secure:
            attributes.append(b"Secure")
        if http_only:
            attributes.append(b"HttpOnly")
        if self.same_site is not None:
            attributes.append(b"SameSite=" + self.same_site.encode("ascii"))
        self._attributes = b"; " + b"; ".join(attributes)
        self._cache: dict[Backend, tuple[bytes, bytes]] = {}

    def build(self, snapshot: ClusterSnapshot) -> StickyPicker:
        return StickyPicker(self, snapshot, self.fallback.build(snapshot))

    def value(self, backend: Backend) -> bytes:
        """The cookie value naming ``backend``: ``<id>.<tag>``."""
        return self._entry(backend)[0]

    def set_cookie(self, ctx: RequestContext | None, backend: Backend) -> bytes | None:
        """The ``Set-Cookie`` header value for a response ``backend`` served to ``ctx``,
        or None when the request already carried a valid cookie naming that backend."""
        value, header = self._entry(backend)
        raw = ctx.cookie(self._name) if ctx is not None else None
        if raw is not None and hmac.compare_digest(raw, value):
            return None
        return header

    def _entry(self, backend: Backend) -> tuple[bytes, bytes]:
        entry = self._cache.get(backend)
        if entry is None:
            address = backend.address.encode()
            backend_id = _b64(hmac.digest(self._key, b"id\0" + address,
                                          hashlib.sha256)[:_ID_BYTES])
            tag = _b64(hmac.digest(self._key, b"tag\0" + self._name + b"\0" + backend_id,
                                   hashlib.sha256)[:_TAG_BYTES])
            value = backend_id + b"." + tag
            entry = value, self._name + b"=" + value + self._attributes
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[backend] = entry
        return entry

    def __repr__(self) -> str:
        age = "session" if self.max_age is None else f"{self.max_age}s"
        return f"<Sticky cookie={self.cookie} max_age={age} fallback={self.fallback_name}>"


class StickyPicker:
    """The cookie's backend when valid and in this snapshot, else the fallback's choice."""

    __slots__ = ("_policy", "_fallback", "_by_id", "_name")

    def __init__(self, policy: Sticky, snapshot: ClusterSnapshot, fallback: Picker) -> None:
        self._policy = policy
        self._fallback = fallback
        self._name = policy._name
        # id → (backend, full cookie value): a pick is a split, a lookup and a compare.
        self._by_id: dict[bytes, tuple[Backend, bytes]] = {}
        for backend in snapshot.backends:
            value = policy.value(backend)
            self._by_id[value.partition(b".")[0]] = (backend, value)

    def session(self, ctx: RequestContext | None) -> Backend | None:
        """The backend named by a valid cookie in ``ctx``, if it is in this snapshot."""
        if ctx is None:
            return None
        raw = ctx.cookie(self._name)
        if raw is None:
            return None
        entry = self._by_id.get(raw.partition(b".")[0])
        if entry is not None and hmac.compare_digest(raw, entry[1]):
            return entry[0]
        return None

    def pick(self, ctx: RequestContext | None = None) -> Backend:
        backend = self.session(ctx)
        return backend if backend is not None else self._fallback.pick(ctx)

    def candidates(self, ctx: RequestContext | None = None) -> Iterator[Backend]:
        backend = self.session(ctx)
        if backend is None:
            yield from self._fallback.candidates(ctx)
            return
        yield backend
        for other in self._fallback.candidates(ctx):
            if other is not backend:
                yield other

    def set_cookie(self, ctx: RequestContext | None, backend: Backend) -> bytes | None:
        """See :meth:`Sticky.set_cookie` (works for any backend, in this snapshot or not)."""
        return self._policy.set_cookie(ctx, backend)

    def __repr__(self) -> str:
        return (f"<StickyPicker cookie={self._policy.cookie} backends={len(self._by_id)} "
                f"fallback={self._fallback!r}>")


def _secret(secret: object) -> bytes:
    if isinstance(secret, str):
        key = secret.encode("utf-8")
        length = len(secret)
    elif isinstance(secret, bytes):
        key, length = secret, len(secret)
    else:
        # Never echo the value: it may be the real secret given with the wrong type.
        raise TypeError(f"secret: expected a string, got {type(secret).__name__}")
    if length < MIN_SECRET_LENGTH:
        raise ValueError(f"secret: must be at least {MIN_SECRET_LENGTH} characters "
                         f"(got {length})")
    return key


def _fallback_spec(fallback: object) -> tuple[str, dict[str, Any]]:
    if isinstance(fallback, str):
        name, options = fallback, {}
    elif isinstance(fallback, dict) and isinstance(fallback.get("type"), str):
        options = dict(fallback)
        name = options.pop("type")
    else:
        raise TypeError("fallback: expected a policy name or {type: NAME, ...options}")
    if name == "sticky":
        raise ValueError("fallback: sticky cannot fall back to itself")
    if name not in POLICIES:
        raise ValueError(f"fallback: unknown policy {name!r} "
                         f"(known: {', '.join(sorted(set(POLICIES) - {'sticky'}))})")
    return name, options


def _max_age(max_age: object) -> int | None:
    if max_age is None:
        return None
    seconds = duration_option("max_age", max_age)
    if not seconds >= 1:
        raise ValueError(f"max_age: expected at least 1 second (or null for a session "
                         f"cookie), got {max_age!r}")
    return round(seconds)
