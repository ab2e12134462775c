"""Balancing policies: one small protocol and one registry.

A :class:`Policy` is built from its config options; ``policy.build(snapshot)`` returns
a :class:`Picker` bound to that snapshot.  A picker never judges health: it proposes
backends and the caller skips those that are not ready or were already tried.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

from poise.core.backend import Backend
from poise.core.cluster import ClusterSnapshot


class Picker(Protocol):
    def pick(self, ctx: Any = None) -> Backend:
        """The preferred backend for this request (the fast path)."""
        ...

    def candidates(self, ctx: Any = None) -> Iterator[Backend]:
        """Every backend in preference order, starting with what ``pick`` would return."""
        ...


class Policy(Protocol):
    def build(self, snapshot: ClusterSnapshot) -> Picker: ...


def _registry() -> dict[str, type]:
    from poise.core.policies.round_robin import RoundRobin

    return {"round_robin": RoundRobin}


POLICIES: dict[str, type] = _registry()


def create_policy(name: str, options: dict[str, Any] | None = None) -> Policy:
    """Instantiate the policy registered as ``name`` with its options.

    Raises ``KeyError`` for an unknown name and ``TypeError``/``ValueError`` for bad options.
    """
    return POLICIES[name](**(options or {}))
