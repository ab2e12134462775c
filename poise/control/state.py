"""What the control plane knows of each cluster's backends, and the versioned snapshots
(:class:`ClusterView`) it pushes to workers.  Pure: no I/O, no clock, no loop.

Three sources set a backend's state, each only its own part:

* the **membership** (config file today, discovery sources next): address, weight,
  backup role, connection cap;
* the **active health checks**: ``down`` after ``fall`` failed probes;
* the **operator** (admin API): ``drained`` and a weight override.

Operator changes survive a membership change (a reload, a discovery update) for as
long as the backend stays, as HAProxy's server-state file keeps them across reloads:
a drain stays until ``enable``; a weight override stays unless the new membership
changes that backend's weight itself (an edited file wins over an older runtime
change).  A removed backend is forgotten with everything set on it.

Every change that alters the view makes a new :class:`ClusterView` with the next
version; a change that alters nothing keeps the same view and version.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from poise.core.units import parse_address

if TYPE_CHECKING:
    from poise.config.model import Cluster

Key = tuple[str, int]


@dataclass(frozen=True, slots=True)
class Member:
    """One backend as workers must see it."""

    host: str
    port: int
    weight: int = 1
    backup: bool = False
    # Connections open to it at once, per worker; None = unlimited.
    max_connections: int | None = None
    # Failed its active health checks.
    down: bool = False
    # Drained by an operator: takes no new requests.
    drained: bool = False

    @property
    def key(self) -> Key:
        return (self.host, self.port)

    @property
    def address(self) -> str:
        """``host:port`` (IPv6 hosts in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def to_wire(self) -> list[Any]:
        return [self.host, self.port, self.weight, self.backup, self.max_connections,
                self.down, self.drained]

    @classmethod
    def from_wire(cls, data: list[Any]) -> Member:
        host, port, weight, backup, max_connections, down, drained = data
        return cls(str(host), int(port), int(weight), bool(backup),
                   None if max_connections is None else int(max_connections),
                   bool(down), bool(drained))


@dataclass(frozen=True, slots=True)
class ClusterView:
    """A whole, versioned snapshot of one cluster's backends (config order)."""

    name: str
    version: int
    members: tuple[Member, ...]

    def to_wire(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version,
                "members": [m.to_wire() for m in self.members]}

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> ClusterView:
        return cls(str(data["name"]), int(data["version"]),
                   tuple(Member.from_wire(m) for m in data["members"]))


def members_of(spec: Cluster) -> list[Member]:
    """The backends listed in a cluster's config, as members that are all up."""
    return [Member(*parse_address(b.address), weight=b.weight, backup=b.backup,
                   max_connections=b.max_connections) for b in spec.backends]


class ClusterState:
    """One cluster's backends and what each source has set on them.

    ``members`` are the configured backends (their ``down``/``drained`` fields are
    ignored: those come from :meth:`set_down` and :meth:`set_drained`)."""

    def __init__(self, name: str, members: Iterable[Member]) -> None:
        self.name = name
        self._members: tuple[Member, ...] = ()
        self._down: set[Key] = set()
        self._drained: set[Key] = set()
        # key → (weight set by the operator, configured weight it replaced)
        self._weights: dict[Key, tuple[int, int]] = {}
        self.view = ClusterView(name, 0, ())
        self.set_members(members)

    # -- the sources ----------------------------------------------------------------------

    def set_members(self, members: Iterable[Member]) -> bool:
        """New membership; True when the view changed.  Raises ValueError when two
        members share an address."""
        fresh = tuple(replace(m, down=False, drained=False) for m in members)
        keys = {m.key for m in fresh}
        if len(keys) != len(fresh):
            raise ValueError(f"cluster {self.name}: two backends share an address")
        self._members = fresh
        self._down &= keys
        self._drained &= keys
        configured = {m.key: m.weight for m in fresh}
        self._weights = {k: (w, base) for k, (w, base) in self._weights.items()
                         if configured.get(k) == base}
        return self._rebuild()

    def set_down(self, key: Key, down: bool) -> bool:
        """The active checks' verdict on one backend; True when the view changed."""
        return self._toggle(self._down, key, down)

    def set_drained(self, key: Key, drained: bool) -> bool:
        """An operator's drain (True) or enable (False); True when the view changed.
        KeyError for a backend that is not a member."""
        self._require(key)
        return self._toggle(self._drained, key, drained)

    def set_weight(self, key: Key, weight: int) -> bool:
        """An operator's weight; True when the view changed.  KeyError for a backend
        that is not a member."""
        member = self._require(key)
        if weight == member.weight:
            self._weights.pop(key, None)
        else:
            self._weights[key] = (weight, member.weight)
        return self._rebuild()

    # -- reading ---------------------------------------------------------------------------

    @property
    def version(self) -> int:
        return self.view.version

    def member(self, key: Key) -> Member:
        """The backend as in the current view; KeyError when not a member."""
        for m in self.view.members:
            if m.key == key:
                return m
        raise KeyError(key)

    def weight_overridden(self, key: Key) -> bool:
        return key in self._weights

    def __repr__(self) -> str:
        return (f"<ClusterState {self.name} v{self.version} members={len(self._members)} "
                f"down={len(self._down)} drained={len(self._drained)}>")

    # -- internals -------------------------------------------------------------------------

    def _require(self, key: Key) -> Member:
        for m in self._members:
            if m.key == key:
                return m
        raise KeyError(key)

    def _toggle(self, keys: set[Key], key: Key, on: bool) -> bool:
        if on == (key in keys):
            return False
        if on:
            if key not in {m.key for m in self._members}:
                return False        # (a probe that reports after its backend left)
            keys.add(key)
        else:
            keys.discard(key)
        return self._rebuild()

    def _rebuild(self) -> bool:
        members = tuple(
            replace(m, weight=self._weights.get(m.key, (m.weight, 0))[0],
                    down=m.key in self._down, drained=m.key in self._drained)
            for m in self._members)
        if members == self.view.members:
            return False
        self.view = ClusterView(self.name, self.view.version + 1, members)
        return True
