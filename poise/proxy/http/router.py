"""Routes compiled into predicates at config time; first match wins, no match → 404.

``Router.catch_all`` is set when the first route has no conditions, so the request
path skips matching entirely.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from poise.config.model import Match, Route
from poise.errors import NoRoute

if TYPE_CHECKING:
    from poise.proxy.http.cluster import ClusterRuntime
    from poise.proxy.http.limiting import RouteLimits

# (method, path, host, headers) → bool
Predicate = Callable[[bytes, bytes, bytes, list], bool]


class RouteTarget:
    """Where a route leads: its cluster's runtime, its rate limits (a
    :class:`~poise.proxy.http.limiting.RouteLimits`, or None) and its WebSocket
    settings (a :class:`~poise.config.model.WebSocket`; None: upgrades declined)."""

    __slots__ = ("cluster", "limits", "websocket")

    def __init__(self, cluster: ClusterRuntime, limits: RouteLimits | None = None,
                 websocket: Any = None) -> None:
        self.cluster = cluster
        self.limits = limits
        self.websocket = websocket

    def __repr__(self) -> str:
        return f"<RouteTarget {self.cluster!r} limits={self.limits!r}>"


class Router:
    """Maps a request to the first route whose conditions all hold.

    ``targets``: what a route leads to, by cluster name; or, when ``per_route`` is
    given, per route (in order)."""

    __slots__ = ("_table", "catch_all")

    def __init__(self, routes: Sequence[Route], targets: dict[str, Any],
                 per_route: Sequence[Any] | None = None) -> None:
        chosen = list(per_route) if per_route is not None else [targets[r.cluster]
                                                                 for r in routes]
        self._table = [(_compile(r.match), t) for r, t in zip(routes, chosen, strict=True)]
        first = routes[0].match if routes else None
        self.catch_all = chosen[0] if routes and (first is None or _empty(first)) else None

    def match(self, method: bytes, path: bytes, host: bytes, headers: list) -> Any:
        """The target of the first matching route, or None. ``host`` is lower-case
        without port; ``path`` excludes the query string."""
        for predicate, target in self._table:
            if predicate is None or predicate(method, path, host, headers):
                return target
        return None

    def route(self, method: bytes, target: bytes, host: bytes | None, headers: list) -> Any:
        """The target for a request as received: ``target`` is its request target
        (the query string is ignored), ``host`` its Host header (port and case
        ignored; None: empty).  Raises NoRoute when no route matches."""
        path = target.split(b"?", 1)[0]
        name = (host or b"").lower()
        if name.startswith(b"["):
            name = name[: name.find(b"]") + 1]
        else:
            name = name.split(b":", 1)[0]
        found = self.match(method, path, name, headers)
        if found is None:
            raise NoRoute(f"no route for {name.decode(errors='replace')}"
                          f"{path.decode(errors='replace')}")
        return found

    def __repr__(self) -> str:
        return f"<Router routes={len(self._table)} catch_all={self.catch_all is not None}>"


def sni_matches(pattern: str, name: str | None) -> bool:
    """Whether TLS server name ``name`` (any case) satisfies ``pattern`` (lower-case;
    ``*.example.com`` matches one or more labels before ``.example.com``, as ``host``
    does)."""
    if name is None:
        return False
    name = name.lower().rstrip(".")
    if pattern.startswith("*."):
        return name.endswith(pattern[1:]) and len(name) > len(pattern) - 1
    return name == pattern


def sni_subset(pairs: Sequence[tuple[Route, Any]],
               sni: str | None) -> tuple[list[Route], list[Any]]:
    """The ``(routes, targets)`` among ``pairs`` that a connection with server name
    ``sni`` may take: those without an ``sni`` condition and those whose holds.  (The
    other conditions are left to the request; a Router ignores ``sni``.)"""
    kept = [(r, t) for r, t in pairs
            if r.match is None or not r.match.sni or sni_matches(r.match.sni, sni)]
    return [r for r, _ in kept], [t for _, t in kept]


def _empty(m: Match) -> bool:
    return not (m.host or m.path_prefix or m.path or m.methods or m.headers)


def _compile(m: Match | None) -> Predicate | None:
    if m is None or _empty(m):
        return None
    checks: list[Predicate] = []
    if m.host:
        if m.host.startswith("*."):
            suffix = m.host[1:].encode()  # ".example.com"
            checks.append(lambda me, p, h, hd: h.endswith(suffix) and len(h) > len(suffix))
        else:
            exact = m.host.encode()
            checks.append(lambda me, p, h, hd: h == exact)
    if m.path is not None:
        path = m.path.encode()
        checks.append(lambda me, p, h, hd: p == path)
    if m.path_prefix is not None:
        prefix = m.path_prefix.encode()
        checks.append(lambda me, p, h, hd: p.startswith(prefix))
    if m.methods:
        methods = frozenset(x.encode() for x in m.methods)
        checks.append(lambda me, p, h, hd: me in methods)
    if m.headers:
        wanted = [(k.lower().encode(), v.encode()) for k, v in m.headers.items()]
        checks.append(lambda me, p, h, hd: all(_has_header(hd, k, v) for k, v in wanted))

    def predicate(method: bytes, path: bytes, host: bytes, headers: list) -> bool:
        return all(check(method, path, host, headers) for check in checks)

    return predicate


def _has_header(headers: list[tuple[bytes, bytes]], name: bytes, value: bytes) -> bool:
    return any(n.lower() == name and v == value for n, v in headers)
