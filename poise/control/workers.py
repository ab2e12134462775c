"""The supervisor's worker processes: start them, feed them, restart them.

Each worker is ``python -m poise.control.worker FD SLOT SHARED``, holding one end of
a socketpair (the channel, :mod:`poise.control.channel`) and the memory all workers
share (rate-limit table, connection counts: :mod:`poise.ratelimit.shared`).  The first message it gets
is the control plane's whole state; it binds its listeners (SO_REUSEPORT) only after
applying it, then says ``ready``.  A worker that dies is restarted after a capped,
growing backoff (it grows while workers die within ``STABLE_AFTER`` seconds of
starting); the supervisor itself never goes down with it.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any

from poise.control.agent import Message
from poise.control.channel import Channel
from poise.control.stats import StatsBook
from poise.observability.book import MetricsBook
from poise.ratelimit.shared import SharedState

if TYPE_CHECKING:
    from poise.control.plane import ControlPlane

log = logging.getLogger("poise")

START_TIMEOUT = 30.0        # seconds for the workers to apply the state and bind
START_ATTEMPTS = 3          # quick deaths in a row of one worker that fail the start
STABLE_AFTER = 10.0         # a worker that lived this long resets the backoff
BACKOFF_BASE = 0.1
BACKOFF_MAX = 10.0
EXIT_GRACE = 10.0           # beyond drain_timeout, before a draining worker is killed


class Worker:
    """One worker process and what the supervisor knows of it."""

    def __init__(self, slot: int) -> None:
        self.slot = slot
        self.pid: int | None = None
        self.process: asyncio.subprocess.Process | None = None
        self.channel: Channel | None = None
        self.state = "starting"
        self.started_at = 0.0
        self.restarts = 0
        self.status: dict[str, Any] = {"config_version": 0, "snapshot_versions": {}}

    def describe(self) -> dict[str, Any]:
        return {"slot": self.slot, "pid": self.pid, "state": self.state,
                "restarts": self.restarts, **self.status}

    def __repr__(self) -> str:
        return f"<Worker {self.slot} pid={self.pid} {self.state}>"


class WorkerSet:
    """The worker processes of one supervisor (a :class:`~poise.control.plane.Fleet`)."""

    def __init__(self, plane: ControlPlane, loop: asyncio.AbstractEventLoop) -> None:
        self.plane = plane
        self.loop = loop
        self.slots: dict[int, Worker] = {}
        self.book = StatsBook()
        # Its size is read from the config at start (a reload cannot resize it).
        self.shared = SharedState.create(plane.config.rate_limit_table_slots)
        self.stopping = False
        self.restarts = 0
        self._quick_deaths: dict[int, int] = {}
        # Set whenever a worker becomes ready or dies (start() waits on it).
        self._event = asyncio.Event()

    # -- Fleet ---------------------------------------------------------------------------

    def publish(self, message: Message) -> None:
        for worker in self.slots.values():
            if worker.channel is not None:
                worker.channel.send(message)

    def stats(self) -> StatsBook:
        return self.book

    def refresh_metrics(self, book: MetricsBook) -> None:
        """Nothing to ask: workers report every second."""

    def workers(self) -> list[dict[str, Any]]:
        return [{**w.describe(), "requests": self.book.requests_of(w.pid)}
                for _, w in sorted(self.slots.items())]

    def resize(self, count: int) -> None:
        """Start or stop workers so that ``count`` run (stopped ones drain first)."""
        if count == len(self.slots) or self.stopping:
            return
        log.info("workers: %d → %d", len(self.slots), count)
        for slot in range(count):
            if slot not in self.slots:
                self.loop.create_task(self._spawn(Worker(slot)))
        grace = self.plane.config.drain_timeout
        for slot in [s for s in self.slots if s >= count]:
            worker = self.slots.pop(slot)
            worker.state = "stopping"
            # Not SIGTERM: a shutdown closes idle connections at once, and a request
            # already on its way on one would fail while the other workers serve on.
            if worker.channel is None or not worker.channel.send({"type": "retire"}):
                _terminate(worker)
            self.loop.call_later(grace + EXIT_GRACE, _kill, worker)

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self, count: int) -> bool:
        """Start ``count`` workers; True once all are ready.  A worker that dies first
        is restarted as any other; False when one died ``START_ATTEMPTS`` times in a
        row (it cannot bind, say) or they are not all ready within START_TIMEOUT."""
        for slot in range(count):
            await self._spawn(Worker(slot))
        try:
            async with asyncio.timeout(START_TIMEOUT):
                while True:
                    if all(w.state == "running" for w in self.slots.values()):
                        return True
                    if max(self._quick_deaths.values(), default=0) >= START_ATTEMPTS:
                        return False
                    self._event.clear()
                    await self._event.wait()
        except TimeoutError:
            log.error("workers did not become ready within %gs", START_TIMEOUT)
            return False

    def reopen_logs(self) -> None:
        """SIGUSR1 (logrotate): every worker reopens its access log files."""
        for worker in self.slots.values():
            _signal(worker, signal.SIGUSR1)

    async def stop(self, timeout: float) -> None:
        """SIGTERM every worker (each drains up to drain_timeout) and wait for them;
        SIGKILL those still running ``timeout`` seconds later."""
        self.stopping = True
        workers = list(self.slots.values())
        for worker in workers:
            worker.state = "stopping"
            _terminate(worker)
        waits = [w.process.wait() for w in workers if w.process is not None]
        try:
            async with asyncio.timeout(timeout):
                await asyncio.gather(*waits)
        except TimeoutError:
            for worker in workers:
                if worker.process is not None and worker.process.returncode is None:
                    log.error("worker %d (pid %s) did not stop in time: killed",
                              worker.slot, worker.pid)
                    worker.process.kill()

    # -- one worker's life ---------------------------------------------------------------

    async def _spawn(self, worker: Worker) -> None:
        self.slots[worker.slot] = worker
        parent, child = socket.socketpair()
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "poise.control.worker", str(child.fileno()),
                str(worker.slot), self.shared.describe(),
                pass_fds=(child.fileno(), self.shared.fd), stdin=subprocess.DEVNULL)
        except OSError as e:
            parent.close()
            log.error("worker %d: cannot start: %s", worker.slot, e)
            self.loop.create_task(self._restart_later(worker, quick=True))
            return
        finally:
            child.close()
        worker.process = process
        worker.pid = process.pid
        worker.started_at = time.monotonic()
        worker.state = "starting"
        worker.channel = await Channel.open(
            parent, lambda m: self._received(worker, m), lambda: None)
        worker.channel.send(self.plane.state_message())
        self.loop.create_task(self._watch(worker))

    def _received(self, worker: Worker, message: Message) -> None:
        kind = message.get("type")
        if kind == "stats":
            self.book.update(worker.pid, message.get("counters") or {})
            self.plane.metrics.add(worker.pid, message.get("deltas") or (),
                                   message.get("gauges"))
        elif kind == "applied":
            worker.status = {"config_version": message.get("config_version", 0),
                             "snapshot_versions": message.get("snapshot_versions", {})}
        elif kind == "ready":
            worker.status = {"config_version": message.get("config_version", 0),
                             "snapshot_versions": message.get("snapshot_versions", {})}
            if worker.state == "starting":
                worker.state = "running"
            log.info("worker %d (pid %s) ready", worker.slot, worker.pid)
            self._event.set()

    async def _watch(self, worker: Worker) -> None:
        assert worker.process is not None
        code = await worker.process.wait()
        if worker.channel is not None:
            worker.channel.close()
        self.book.retire(worker.pid)
        self.plane.metrics.retire(worker.pid)
        if self.slots.get(worker.slot) in (worker, None):
            # Its connections are closed: forget their counts (unless a successor
            # already serves in its slot, a resize back up while it drained).
            self.shared.worker_gone(worker.slot)
        if self.stopping or self.slots.get(worker.slot) is not worker:
            return                      # stopping, or removed by a resize
        lived = time.monotonic() - worker.started_at
        log.error("worker %d (pid %s) exited with %s after %.1fs; restarting", worker.slot,
                  worker.pid, _exit_reason(code), lived)
        await self._restart_later(worker, quick=lived < STABLE_AFTER)

    async def _restart_later(self, worker: Worker, quick: bool) -> None:
        deaths = self._quick_deaths[worker.slot] = (
            self._quick_deaths.get(worker.slot, 0) + 1 if quick else 0)
        worker.state = "restarting"
        self._event.set()
        delay = min(BACKOFF_MAX, BACKOFF_BASE * 2 ** (deaths - 1)) if deaths else 0.0
        if delay:
            log.warning("worker %d: restarting in %.1fs (%d quick exit(s) in a row)",
                        worker.slot, delay, deaths)
            await asyncio.sleep(delay)
        if self.stopping or self.slots.get(worker.slot) is not worker:
            return
        successor = Worker(worker.slot)
        successor.restarts = worker.restarts + 1
        self.restarts += 1
        await self._spawn(successor)


def _kill(worker: Worker) -> None:
    """A retired worker still running long after its drain: kill it."""
    if worker.process is not None and worker.process.returncode is None:
        log.error("worker %d (pid %s) did not stop in time: killed", worker.slot, worker.pid)
        worker.process.kill()


def _terminate(worker: Worker) -> None:
    _signal(worker, signal.SIGTERM)


def _signal(worker: Worker, sig: int) -> None:
    if worker.process is not None and worker.process.returncode is None:
        try:
            worker.process.send_signal(sig)
        except ProcessLookupError:
            pass


def _exit_reason(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"code {code}"

