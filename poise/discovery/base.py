"""What every discovery source shares: the instances it yields, how an entry is read,
and the runner that keeps a source going through failures.

A source is an object with one method, ``watch()``: an async iterator that yields the
**full** set of instances of a cluster, first as soon as it has it, then each time it
changes.  It raises when the registry cannot be reached or answers nonsense; the
:class:`Runner` then keeps the last set, logs once per change of state, waits a capped,
jittered backoff and calls ``watch()`` again (which starts over: list, then watch).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from poise.config.units import parse_address

log = logging.getLogger("poise")
BACKOFF_BASE = 0.5      # seconds
BACKOFF_MAX = 30.0


@dataclass(frozen=True, slots=True)
class Instance:
    """One backend as a registry describes it."""

    address: str                    # "host:port" (IPv6 hosts in brackets)
    weight: int = 1
    backup: bool = False
    zone: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)


class Source(Protocol):
    def watch(self) -> AsyncIterator[list[Instance]]:
        """Yield the full set now and after every change; raise on failure."""
        ...


def parse_entry(data: object, name: str, default_port: int | None = None) -> Instance | None:
    """An instance from a registry entry ``{"address": "host:port", "weight": 1, "zone":
    ..., "metadata": {...}, "backup": false}`` (``name`` says where it came from, for the
    warning); None, with a warning naming it, when it is invalid."""
    from poise.config.model import MAX_WEIGHT

    problem = None
    if not isinstance(data, Mapping):
        problem = "not a mapping"
    else:
        address = data.get("address")
        weight = data.get("weight", 1)
        try:
            if not isinstance(address, str):
                raise ValueError("no address")
            if default_port is not None and ":" not in address:
                address = f"{address}:{default_port}"
            parse_address(address)
            if isinstance(weight, bool) or not isinstance(weight, int) \
                    or not 1 <= weight <= MAX_WEIGHT:
                raise ValueError(f"weight must be an integer from 1 to {MAX_WEIGHT}")
            zone = data.get("zone")
            metadata = data.get("metadata") or {}
            if not isinstance(metadata, Mapping):
                raise ValueError("metadata must be a mapping")
            return Instance(address, weight, bool(data.get("backup", False)),
                            str(zone) if zone is not None else None, dict(metadata))
        except ValueError as e:
            problem = str(e)
    log.warning("discovery: skipping invalid entry %s: %s", name, problem)
    return None


@dataclass
class SourceStatus:
    """What ``GET /clusters`` shows of a cluster's source."""

    type: str
    state: str = "starting"         # "starting" | "up" | "down"
    last_update: float | None = None    # unix time of the last set received
    error: str | None = None
    updates: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type, "state": self.state, "last_update": self.last_update,
                "error": self.error}


class Runner:
    """Runs one cluster's source in the control plane: ``on_update(instances)`` for each
    set (only when it differs from the last), the last set kept while the source fails.

    ``rng`` jitters the backoff (tests pass a seeded one); ``sleep`` is injectable."""

    def __init__(self, cluster: str, kind: str, source: Source,
                 on_update: Callable[[list[Instance]], None], *,
                 rng: random.Random | None = None,
                 sleep: Callable[[float], Any] = asyncio.sleep) -> None:
        self.cluster = cluster
        self.source = source
        self.status = SourceStatus(kind)
        self._on_update = on_update
        self._rng = rng or random.Random()
        self._sleep = sleep
        self._last: list[Instance] | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._task = loop.create_task(self._run(), name=f"discovery:{self.cluster}")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _run(self) -> None:
        failures = 0
        while True:
            try:
                async for instances in self.source.watch():
                    failures = 0
                    self._received(instances)
                raise ConnectionError("the watch ended")
            except asyncio.CancelledError:
                raise
            except Exception as e:      # any failure of a source: retried, never fatal
                failures += 1
                self._failed(e)
            delay = min(BACKOFF_MAX, BACKOFF_BASE * 2 ** min(failures - 1, 10))
            await self._sleep(delay * (0.5 + self._rng.random() / 2))

    def _received(self, instances: list[Instance]) -> None:
        status = self.status
        if status.state != "up":
            log.info("discovery: cluster %s: %s source is up (%d backends)", self.cluster,
                     status.type, len(instances))
        status.state, status.error = "up", None
        status.last_update = time.time()
        if instances != self._last:
            self._last = list(instances)
            status.updates += 1
            self._on_update(list(instances))

    def _failed(self, error: Exception) -> None:
        status = self.status
        text = str(error) or type(error).__name__
        if status.state != "down":
            log.warning("discovery: cluster %s: %s source failed (%s); keeping the last "
                        "%s", self.cluster, status.type, text,
                        "set" if self._last is not None else "static backends")
        status.state, status.error = "down", text
