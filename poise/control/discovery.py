"""The control plane's discovery sources: one :class:`~poise.discovery.Runner` per
cluster that has ``discovery``, started, kept, or restarted as reloads change it.

What a source yields becomes the cluster's membership (``on_set(cluster, members)``);
the cluster's ``backends`` are the seed until then, and stay the membership while a
source has never answered.  A source that fails keeps its last set (the runner's rule).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from poise.config.model import Cluster, Config
from poise.config.units import parse_address
from poise.control.state import Member
from poise.discovery import Instance, Runner, make_source

log = logging.getLogger("poise")


class Discoveries:
    """The runners of one control plane, by cluster name."""

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 on_set: Callable[[str, list[Member]], None]) -> None:
        self.loop = loop
        self._on_set = on_set
        self._runners: dict[str, tuple[Any, Runner]] = {}    # name → (spec, runner)
        self._sets: dict[str, list[Member]] = {}

    def sync(self, config: Config) -> None:
        """Run the sources ``config`` names: a changed source starts over (its cluster
        goes back to its seed until the new one answers), a removed one stops."""
        wanted = {c.name: c.discovery for c in config.clusters if c.discovery is not None}
        for name, (spec, runner) in list(self._runners.items()):
            if wanted.get(name) != spec:
                runner.stop()
                del self._runners[name]
                self._sets.pop(name, None)
        for name, spec in wanted.items():
            if name not in self._runners:
                runner = Runner(name, spec.type, make_source(spec),
                                lambda found, name=name: self._found(name, found))
                self._runners[name] = (spec, runner)
                runner.start(self.loop)

    def stop(self) -> None:
        for _, runner in self._runners.values():
            runner.stop()
        self._runners.clear()

    def members(self, spec: Cluster) -> list[Member] | None:
        """The last set ``spec``'s source yielded (None: none yet, or no source)."""
        return self._sets.get(spec.name)

    def status(self, cluster: str) -> dict[str, Any] | None:
        """``{type, state, last_update, error}`` of the cluster's source, or None."""
        entry = self._runners.get(cluster)
        return entry[1].status.to_json() if entry is not None else None

    def statuses(self) -> dict[str, Any]:
        """Every source's status object (for metrics: ``state``, ``updates``)."""
        return {name: runner.status for name, (_, runner) in self._runners.items()}

    def _found(self, cluster: str, found: list[Instance]) -> None:
        members = members_of_instances(found)
        self._sets[cluster] = members
        self._on_set(cluster, members)


def members_of_instances(found: list[Instance]) -> list[Member]:
    """Members for the instances a source yielded (a repeated address: the first)."""
    members: dict[tuple[str, int], Member] = {}
    for instance in found:
        host, port = parse_address(instance.address)
        if (host, port) in members:
            log.warning("discovery: %s is listed twice; keeping the first", instance.address)
            continue
        members[(host, port)] = Member(host, port, weight=instance.weight,
                                       backup=instance.backup)
    return list(members.values())
