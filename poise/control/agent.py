"""The worker's side of the control plane: apply what it sends, in order.

The control plane sends one kind of message, ``apply``::

    {"type": "apply", "config_version": int,
     "config": {...} | null,            # the whole config, when it changed
     "views": [ClusterView wire, ...]}  # whole snapshots of clusters

A worker's first message is always a full one (config and every view).  Views not
newer than the version this worker has are skipped, so a message may repeat them.
Applying is a slow path: a snapshot is swapped in between requests; only binding a
new listener awaits.  Messages are applied one at a time, in the order sent.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

from poise.config.model import Config
from poise.control.state import ClusterView
from poise.observability.shipper import Shipper
from poise.proxy.server import ProxyServer
from poise.ratelimit.shared import SharedState

log = logging.getLogger("poise")
Message = dict[str, Any]


def apply_message(config_version: int, config: Config | None,
                  views: list[ClusterView]) -> Message:
    """The ``apply`` message for a new config (None: unchanged) and/or new views."""
    return {"type": "apply", "config_version": config_version,
            "config": None if config is None else config.model_dump(mode="json"),
            "views": [v.to_wire() for v in views]}


class WorkerAgent:
    """Owns this worker's :class:`ProxyServer` and applies messages to it.

    ``on_applied(status)`` is called after each message with :meth:`status` (a worker
    process sends it back to the control plane)."""

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 on_applied: Callable[[Message], None] | None = None,
                 slot: int = 0, shared: str | None = None) -> None:
        self.loop = loop
        # This worker's slot, and the shared memory's argument (SharedState.describe:
        # None for a single process, which keeps its own).
        self.slot = slot
        self._shared = shared
        self.server: ProxyServer | None = None
        self.config_version = 0
        self.versions: dict[str, int] = {}
        self._on_applied = on_applied
        self._queue: deque[Message] = deque()
        self._shipper: Shipper | None = None
        self._busy = False

    def build(self, message: Message) -> ProxyServer:
        """The data plane for a first, full ``apply`` message (not yet bound)."""
        config = Config.model_validate(message["config"])
        views = _views(message)
        shared = None if self._shared is None else SharedState.from_argument(
            self._shared, self.slot, config.workers)
        self.server = ProxyServer(config, self.loop, {v.name: v.members for v in views},
                                  shared)
        self._shipper = Shipper(self.server)
        self.config_version = int(message["config_version"])
        self.versions = {v.name: v.version for v in views}
        return self.server

    def receive(self, message: Message) -> None:
        """Queue a message; it is applied after those before it."""
        if message.get("type") != "apply":
            log.warning("control channel: ignoring a %r message", message.get("type"))
            return
        self._queue.append(message)
        if not self._busy:
            self._busy = True
            self.loop.create_task(self._drain())

    def status(self) -> Message:
        """What this worker runs: config version and snapshot version per cluster."""
        return {"config_version": self.config_version, "snapshot_versions": dict(self.versions)}

    def counters(self) -> dict[str, Any]:
        return self.server.counters() if self.server is not None else {}

    def metrics_report(self) -> Message:
        """``{"deltas": [...], "gauges": [...]}`` since the last call (see
        :mod:`poise.observability.shipper`)."""
        if self._shipper is None:
            return {"deltas": [], "gauges": []}
        return {"deltas": self._shipper.deltas(), "gauges": self._shipper.gauges()}

    async def _drain(self) -> None:
        try:
            while self._queue:
                message = self._queue.popleft()
                try:
                    await self._apply(message)
                except Exception:       # a bug: keep serving what we have
                    log.exception("worker: applying a control plane message failed")
                if self._on_applied is not None:
                    self._on_applied(self.status())
        finally:
            self._busy = False

    async def _apply(self, message: Message) -> None:
        server = self.server
        if server is None:
            return
        views = _views(message)
        version = int(message["config_version"])
        if message.get("config") is not None and version != self.config_version:
            config = Config.model_validate(message["config"])
            names = {c.name for c in config.clusters}
            # A cluster removed by an earlier reload and added again starts over at 1.
            self.versions = {n: v for n, v in self.versions.items() if n in names}
            await server.apply_config(config, {v.name: v.members for v in views
                                               if self._newer(v)})
            self.config_version = version
        for view in views:
            if self._newer(view) and view.name in server.clusters:
                server.apply_members(view.name, view.members)
                self.versions[view.name] = view.version

    def _newer(self, view: ClusterView) -> bool:
        return view.version > self.versions.get(view.name, 0)


def _views(message: Message) -> list[ClusterView]:
    return [ClusterView.from_wire(v) for v in message.get("views") or ()]
