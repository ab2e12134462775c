"""A stand-in for the control plane: :class:`FakeOps` implements
:class:`poise.admin.ops.Operations` over plain data, in the shapes ops.py documents."""

from __future__ import annotations

import copy
from typing import Any

from poise.admin.ops import ReloadResult
from poise.errors import ControlError, UnknownBackend, UnknownCluster


def _backend(address: str, weight: int = 1, **extra: Any) -> dict[str, Any]:
    entry = {"address": address, "weight": weight, "backup": False, "state": "up",
             "reason": None, "in_flight": 0, "requests": 12, "errors": 1}
    entry.update(extra)
    return entry


CLUSTERS = [
    {"name": "app", "policy": "round_robin", "version": 3, "panic": False,
     "discovery": None, "backends": [
        _backend("127.0.0.1:9001", 2),
        _backend("[::1]:9002", state="down", reason="health check: 2 failures"),
    ]},
    {"name": "api", "policy": "least_conn", "version": 1, "panic": True,
     "discovery": None, "backends": [
        _backend("10.0.0.1:80", backup=True, state="ejected", reason="5 gateway errors"),
    ]},
]

WORKERS = [
    {"slot": 0, "pid": 4242, "state": "running", "restarts": 0, "config_version": 2,
     "snapshot_versions": {"app": 3, "api": 1}, "requests": 17},
    {"slot": 1, "pid": None, "state": "restarting", "restarts": 3, "config_version": 1,
     "snapshot_versions": {}, "requests": 0},
]


class FakeOps:
    """Operations over in-memory clusters.  ``raises[method] = exc`` makes that method
    raise; ``reload_result`` is what :meth:`reload` answers; ``calls`` records calls."""

    def __init__(self) -> None:
        self.data = copy.deepcopy(CLUSTERS)
        self.raises: dict[str, BaseException] = {}
        self.reload_result = ReloadResult(True, 2)
        self.calls: list[tuple[Any, ...]] = []

    def _enter(self, method: str, *args: Any) -> None:
        self.calls.append((method, *args))
        if method in self.raises:
            raise self.raises[method]

    def _backend(self, cluster: str, address: str) -> dict[str, Any]:
        for b in self.cluster(cluster)["backends"]:
            if b["address"] == address:
                return b
        raise UnknownBackend(f"cluster {cluster!r} has no backend {address}")

    def clusters(self) -> list[dict[str, Any]]:
        self._enter("clusters")
        return self.data

    def cluster(self, name: str) -> dict[str, Any]:
        self._enter("cluster", name)
        for c in self.data:
            if c["name"] == name:
                return c
        raise UnknownCluster(f"no cluster {name!r}")

    def set_drained(self, cluster: str, address: str, drained: bool) -> dict[str, Any]:
        self._enter("set_drained", cluster, address, drained)
        b = self._backend(cluster, address)
        b["state"] = "drained" if drained else "up"
        b["reason"] = "drained by the admin API" if drained else None
        return b

    def set_weight(self, cluster: str, address: str, weight: int) -> dict[str, Any]:
        self._enter("set_weight", cluster, address, weight)
        if not 1 <= weight <= 10_000:
            raise ControlError("weight must be 1..10000")
        b = self._backend(cluster, address)
        b["weight"] = weight
        return b

    def effective_config(self) -> dict[str, Any]:
        self._enter("config")
        return {"workers": 2, "admin": {"bind": "127.0.0.1:9901", "token": "<redacted>"},
                "clusters": [{"name": c["name"]} for c in self.data]}

    def reload(self) -> ReloadResult:
        self._enter("reload")
        return self.reload_result

    def workers(self) -> list[dict[str, Any]]:
        self._enter("workers")
        return copy.deepcopy(WORKERS)

    def metrics_text(self) -> bytes:
        self._enter("metrics")
        return b"# HELP poise_workers Worker processes running.\n# TYPE poise_workers gauge\n" \
               b"poise_workers 2.0\n"

    def dashboard(self) -> dict[str, Any]:
        self._enter("dashboard")
        series = {"t": [-1.0, 0.0], "rps": [10.0, 0.0], "error_rate": [0.1, None],
                  "p50_ms": [1.5, None], "p99_ms": [9.0, None]}
        clusters = copy.deepcopy(self.data)
        for c in clusters:
            for b in c["backends"]:
                b["series"] = series
        return {"now": 1700000000.0, "span": 300.0, "interval": 1.0,
                "quantile_window": 5.0, "version": 2, "clusters": clusters,
                "listeners": [{"name": "web", "bind": "127.0.0.1:8080", "protocol": "http",
                               "connections": None, "series": series}]}
