"""Backends: a frozen identity and value (:class:`Backend`) plus mutable live stats."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Backend:
    """One upstream endpoint. Equality and hashing are by value, so a backend that
    survives a config reload or discovery refresh is "the same" backend."""

    host: str
    port: int
    weight: int = 1
    zone: str = ""
    meta: tuple[tuple[str, str], ...] = field(default=())
    # Receives traffic only when no primary backend of its cluster is ready.
    backup: bool = False
    # Cached: backends are dict keys on the request path, and their address is in
    # every access log line and trace.
    _hash: int = field(init=False, repr=False, compare=False, default=0)
    _address: str = field(init=False, repr=False, compare=False, default="")

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash",
                           hash((self.host, self.port, self.weight, self.zone, self.meta,
                                    self.backup)))
        host = f"[{self.host}]" if ":" in self.host else self.host
        object.__setattr__(self, "_address", f"{host}:{self.port}")

    def __hash__(self) -> int:
        return self._hash

    @property
    def address(self) -> str:
        """``host:port`` (IPv6 hosts in brackets)."""
        return self._address

    def __repr__(self) -> str:
        return f"<Backend {self.address} w={self.weight}>"


class BackendStats:
    """Live, per-worker counters for one backend; survive snapshot rebuilds.

    Plain attributes, mutated by the data plane on the event loop thread only.
    """

    __slots__ = ("in_flight", "active_connections", "last_error_at", "ewma_rtt", "ewma_at")

    def __init__(self) -> None:
        self.in_flight = 0
        self.active_connections = 0
        self.last_error_at = 0.0
        # Latency estimate kept by latency-aware policies (peak_ewma); 0.0 = no data.
        self.ewma_rtt = 0.0
        self.ewma_at = 0.0

    def __repr__(self) -> str:
        return f"<BackendStats in_flight={self.in_flight} conns={self.active_connections}>"
