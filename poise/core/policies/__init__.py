"""Balancing policies: one small protocol and one registry.

A :class:`Policy` is built from its config options (plus an injected ``rng`` and
``clock``); ``policy.build(snapshot)`` returns a :class:`Picker` bound to that
snapshot.  A picker never judges health: it proposes backends in preference order and
the caller skips those that are not ready or were already tried (DESIGN.md §5).

Adding a policy = one module here + one line in ``_REGISTRY``.
"""

from __future__ import annotations

import importlib
import random
from collections.abc import Iterator
from typing import Any, Protocol

from poise.core.backend import Backend
from poise.core.clock import Clock, MonotonicClock
from poise.core.cluster import ClusterSnapshot
from poise.core.context import RequestContext


class Picker(Protocol):
    def pick(self, ctx: RequestContext | None = None) -> Backend:
        """The preferred backend for this request (the fast path).
        Only called on a picker built from a non-empty snapshot."""
        ...

    def candidates(self, ctx: RequestContext | None = None) -> Iterator[Backend]:
        """Every backend in preference order, starting with what ``pick`` would return."""
        ...


class Policy(Protocol):
    #: True when pickers read a RequestContext (else the caller may pass None).
    needs_context: bool

    def build(self, snapshot: ClusterSnapshot) -> Picker: ...


# Optional hooks a policy's pickers may offer; the proxy calls them only when the
# policy class defines the same method:
#   picker.observe(backend, rtt_seconds, ok)  after each attempt's response head or
#       failure (latency-aware policies);
#   picker.set_cookie(ctx, backend) -> bytes | None  for each response: a Set-Cookie
#       value to add (session-affinity policies);
#   picker.load_changed(backend)  after each change of a backend's in_flight count
#       (policies that index backends by load).


# config name → "module:Class" (imported on first use)
_REGISTRY: dict[str, str] = {
    "round_robin": "round_robin:RoundRobin",
    "random": "weighted_random:WeightedRandom",
    "least_conn": "least_conn:LeastConn",
    "p2c": "p2c:PowerOfTwo",
    "hash": "hashing:Hash",
    "ip_hash": "hashing:IpHash",
    "peak_ewma": "ewma:PeakEwma",
    "sticky": "sticky:Sticky",
}


class _Registry(dict):
    """Maps names to policy classes, importing each module on first use."""

    def __missing__(self, name: str) -> type:
        module, _, cls = _REGISTRY[name].partition(":")
        policy = getattr(importlib.import_module(f"poise.core.policies.{module}"), cls)
        self[name] = policy
        return policy

    def __contains__(self, name: object) -> bool:
        return name in _REGISTRY

    def __iter__(self) -> Iterator[str]:
        return iter(_REGISTRY)

    def __len__(self) -> int:
        return len(_REGISTRY)


POLICIES: dict[str, type] = _Registry()


def create_policy(name: str, options: dict[str, Any] | None = None, *,
                  rng: random.Random | None = None, clock: Clock | None = None) -> Policy:
    """Instantiate the policy registered as ``name`` with its options.

    ``rng`` and ``clock`` default to a fresh ``random.Random()`` and the monotonic clock;
    tests inject seeded and fake ones.  Raises ``KeyError`` for an unknown name and
    ``TypeError``/``ValueError`` for bad options.
    """
    return POLICIES[name](**(options or {}), rng=rng or random.Random(),
                          clock=clock or MonotonicClock())


def build_picker(policy: Policy, snapshot: ClusterSnapshot) -> Picker:
    """A picker for ``snapshot`` in which backup backends come after every primary."""
    backups = [b for b in snapshot.backends if b.backup]
    if not backups:
        return policy.build(snapshot)
    primaries = [b for b in snapshot.backends if not b.backup]
    if not primaries:
        return policy.build(snapshot)
    return PrimaryThenBackup(policy.build(snapshot.subset(primaries)),
                             policy.build(snapshot.subset(backups)), snapshot)


class PrimaryThenBackup:
    """Backups are proposed only after every primary (the caller skips unready ones)."""

    __slots__ = ("_primary", "_backup", "_snapshot")

    def __init__(self, primary: Picker, backup: Picker, snapshot: ClusterSnapshot) -> None:
        self._primary = primary
        self._backup = backup
        self._snapshot = snapshot

    def pick(self, ctx: RequestContext | None = None) -> Backend:
        return self._primary.pick(ctx)

    def candidates(self, ctx: RequestContext | None = None) -> Iterator[Backend]:
        yield from self._primary.candidates(ctx)
        yield from self._backup.candidates(ctx)

    # Optional picker hooks (see ClusterRuntime), passed to the side owning the backend.

    def observe(self, backend: Backend, rtt: float, ok: bool = True) -> None:
        observe = getattr(self._backup if backend.backup else self._primary, "observe", None)
        if observe is not None:
            observe(backend, rtt, ok)

    def set_cookie(self, ctx: RequestContext | None, backend: Backend) -> bytes | None:
        issue = getattr(self._backup if backend.backup else self._primary, "set_cookie", None)
        return issue(ctx, backend) if issue is not None else None

    def load_changed(self, backend: Backend) -> None:
        changed = getattr(self._backup if backend.backup else self._primary,
                          "load_changed", None)
        if changed is not None:
            changed(backend)

    def __repr__(self) -> str:
        return f"<PrimaryThenBackup {self._primary!r} then {self._backup!r}>"
