"""Rate limits on the request path: after routing, before a backend is picked.

A route's :class:`RouteLimits` holds its rules (its own ``rate_limit`` entries, or its
listener's, shared by every route that inherits them).  Each rule finds the request's
key (the client address, a header's value, or a constant: the route's or cluster's
name) and asks its store: the shared GCRA table (:class:`~poise.core.ratelimit.RateTable`,
every worker of this poise) or, for ``scope: global``, the Redis lease book
(:mod:`poise.ratelimit.redis_store`), which may have to ask Redis first: the request
then waits, parked, and :meth:`RouteLimits.resume` carries on when the answer comes.

Any rule that denies ends the request with 429 (``RateLimited``, carrying
``Retry-After`` and the IETF ``RateLimit-Policy``/``RateLimit`` fields); a ``shadow``
rule only counts.  Each rule counts the requests it admitted, also those a later rule
of the same route then denied (as Envoy's descriptors do).
"""

from __future__ import annotations

from math import ceil
from time import monotonic
from typing import TYPE_CHECKING, Any, Final

from xxhash import xxh3_64_intdigest

from poise.core.ratelimit import KEY_BITS, RateTable, limit_ns
from poise.errors import PoiseError, RateLimited

if TYPE_CHECKING:
    from poise.proxy.http.exchange import Exchange

_SHIFT: Final = 64 - KEY_BITS

# What a rule's key is.
CLIENT_IP: Final = 0
HEADER: Final = 1
CONSTANT: Final = 2        # the route's or the cluster's name


class Rule:
    """One ``rate_limit`` entry, compiled.  ``table`` (local) or ``remote`` (global:
    an object with ``take(key, now) -> float | None`` and ``park(key, callback)``)."""

    __slots__ = ("name", "kind", "header", "seed", "interval", "span", "shadow", "table",
                 "remote", "policy", "const_of")

    def __init__(self, name: str, kind: int, header: bytes, seed: int, per_second: float,
                 burst: int, window: int, count: int, shadow: bool,
                 table: RateTable | None, remote: Any, const_of: str) -> None:
        self.name = name
        self.kind = kind
        self.header = header
        self.seed = seed
        # Nanoseconds (the shared table's unit).
        self.interval, self.span = limit_ns(per_second, burst)
        self.shadow = shadow
        self.table = table
        self.remote = remote
        # For CONSTANT keys: "route" or "cluster" (which name is the key).
        self.const_of = const_of
        self.policy = b'ratelimit-policy: "%s";q=%d;w=%d\r\n' % (name.encode(), count, window)

    def denial(self, wait: float) -> RateLimited:
        """The 429 for a request that may retry in ``wait`` seconds."""
        seconds = max(1, ceil(wait))
        return RateLimited(self.policy + b'ratelimit: "%s";r=0;t=%d\r\nretry-after: %d\r\n'
                           % (self.name.encode(), seconds, seconds))

    def __repr__(self) -> str:
        where = "global" if self.remote is not None else "local"
        return (f"<Rule {self.name} {where} {1e9 / self.interval:g}/s "
                f"burst={self.span // self.interval}{' shadow' if self.shadow else ''}>")


class RouteLimits:
    """The rules one route applies, with its constant keys precomputed, and what they
    denied (``denied``) or would have (``shadowed``) on this route."""

    __slots__ = ("rules", "keys", "hashes", "listener", "label", "denied", "shadowed",
                 "trust")

    def __init__(self, rules: list[Rule], listener: str, label: str, cluster: str,
                 trust: Any) -> None:
        self.rules = rules
        self.listener = listener
        self.label = label
        # Per rule: its constant key (b"" when the key comes from the request) and hash.
        self.keys: list[bytes] = []
        self.hashes: list[int] = []
        for rule in rules:
            key = b""
            if rule.kind == CONSTANT:
                key = (label if rule.const_of == "route" else cluster).encode()
            self.keys.append(key)
            self.hashes.append(_hash(key, rule.seed) if key else 0)
        self.denied = 0
        self.shadowed = 0
        # A TrustedProxies (poise.proxy.trust) or None: the TCP peer is the client.
        self.trust = trust

    def check(self, ex: Exchange, first: int, now: float) -> bool:
        """Apply rules ``first``.. to ``ex`` at ``now`` (``time.monotonic()``): True
        when every one admits it; raises RateLimited when one denies; False when a
        global rule parked it (``resume`` is called later)."""
        rules = self.rules
        now_ns = int(now * 1e9)
        for i in range(first, len(rules)):
            rule = rules[i]
            key = self.keys[i]
            if rule.kind != CONSTANT:
                key = self._request_key(ex, rule)
            remote = rule.remote
            if remote is None:
                table = rule.table
                assert table is not None
                h = self.hashes[i] if rule.kind == CONSTANT else \
                    xxh3_64_intdigest(key, rule.seed) >> _SHIFT
                wait = table.take(h, now_ns, rule.interval, rule.span) / 1e9
            else:
                verdict = remote.take(key, now)
                if verdict is None:
                    remote.park(key, _Resumption(self, ex, i))
                    return False
                wait = verdict
            if wait > 0.0:
                if not rule.shadow:
                    self.denied += 1
                    raise rule.denial(wait)
                self.shadowed += 1
        return True

    def resume(self, ex: Exchange, index: int, wait: float) -> None:
        """Rule ``index`` answered ``wait`` for parked ``ex``: go on with the others,
        then with the request (unless its client left meanwhile)."""
        if ex.finished:
            return
        try:
            if wait > 0.0:
                rule = self.rules[index]
                if not rule.shadow:
                    self.denied += 1
                    raise rule.denial(wait)
                self.shadowed += 1
            if not self.check(ex, index + 1, monotonic()):
                return
        except PoiseError as e:
            ex.respond_error(e)
            return
        ex.proceed()
        # Outside data_received, whose end would write what proceed() queued (the
        # head, on an idle pooled connection).
        ex.flush_upstream()

    def _request_key(self, ex: Exchange, rule: Rule) -> bytes:
        if rule.kind == CLIENT_IP:
            trust = self.trust
            if trust is None or ex.xff is None:
                return ex.client.peer_ip
            return trust.client_ip(ex.client.peer_ip, ex.xff)
        name = rule.header
        f = ex.fields
        for i in range(0, len(f), 4):
            if len(f[i]) == len(name) and f[i].lower() == name:
                return f[i + 2]
        return b""      # without the header: one key for all such requests

    def __repr__(self) -> str:
        return (f"<RouteLimits {self.listener}/{self.label} rules={len(self.rules)} "
                f"denied={self.denied} shadowed={self.shadowed}>")


def _hash(key: bytes, seed: int) -> int:
    """A key's hash in the shared table (KEY_BITS bits)."""
    return xxh3_64_intdigest(key, seed) >> _SHIFT


class _Resumption:
    """The callback a parked request leaves with a global rule."""

    __slots__ = ("limits", "ex", "index")

    def __init__(self, limits: RouteLimits, ex: Exchange, index: int) -> None:
        self.limits = limits
        self.ex = ex
        self.index = index

    def __call__(self, wait: float) -> None:
        self.limits.resume(self.ex, self.index, wait)
