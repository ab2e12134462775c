"""The control plane's state as the admin API shows it (JSON-able data)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from poise.config.load import policy_spec
from poise.config.model import Cluster, Config
from poise.control.state import ClusterView, Member
from poise.control.stats import BackendTotals, StatsBook

REDACTED = "<redacted>"


def cluster_entry(spec: Cluster, view: ClusterView, book: StatsBook,
                  check_reason: Callable[[Member], str]) -> dict[str, Any]:
    """``{"name", "policy", "version", "panic", "backends": [...]}``."""
    totals = book.totals()
    return {
        "name": spec.name,
        "policy": policy_spec(spec.policy)[0],
        "version": view.version,
        "panic": book.panic(spec.name),
        "backends": [_entry(spec.name, m, totals, book.workers, check_reason)
                     for m in view.members],
    }


def backend_entry(cluster: str, member: Member, book: StatsBook,
                  check_reason: Callable[[Member], str]) -> dict[str, Any]:
    """One backend of :func:`cluster_entry`."""
    return _entry(cluster, member, book.totals(), book.workers, check_reason)


def _entry(cluster: str, member: Member, totals: dict[tuple[str, str], BackendTotals],
           workers: int, check_reason: Callable[[Member], str]) -> dict[str, Any]:
    counts = totals.get((cluster, member.address)) or BackendTotals()
    # The operator's order first, then the checks, then the workers' own ejections.
    if member.drained:
        state, reason = "drained", "drained by an operator"
    elif member.down:
        state, reason = "down", check_reason(member)
    elif counts.ejected_in:
        state = "ejected"
        reason = f"outlier detection ejected it in {counts.ejected_in} of {workers} worker(s)"
    else:
        state, reason = "up", None
    return {"address": member.address, "weight": member.weight, "backup": member.backup,
            "state": state, "reason": reason, "in_flight": counts.in_flight,
            "requests": counts.requests, "errors": counts.errors}


def redacted(config: Config) -> dict[str, Any]:
    """``config`` as JSON-able data with its secrets (the admin token, sticky
    session keys) replaced by ``"<redacted>"``."""
    data = config.model_dump(mode="json")
    admin = data.get("admin")
    if admin and admin.get("token") is not None:
        admin["token"] = REDACTED
    for cluster in data.get("clusters", ()):
        policy = cluster.get("policy")
        if isinstance(policy, dict) and "secret" in policy:
            policy["secret"] = REDACTED
    return data
