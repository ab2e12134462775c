"""Backends: a frozen identity and value (:class:`Backend`) plus mutable live stats."""

from __future__ import annotations

from dataclasses import dataclass, field

# (Compiled with the HTTP hot path, which counts in it per request: kept apart from
# Backend, a frozen dataclass, which stays interpreted.)
from poise.core.backend_stats import BackendStats

__all__ = ["Backend", "BackendStats"]


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
