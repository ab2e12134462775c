"""Run poise in the foreground: one process per worker, SIGTERM/SIGINT → graceful stop.

With ``workers: 1`` everything runs in this process.  With more, the supervisor forks
workers that each bind the listeners with SO_REUSEPORT, forwards stop signals to them,
and restarts a worker that dies unexpectedly.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Callable

import uvloop

from poise.config.model import Config
from poise.proxy.server import ProxyServer

log = logging.getLogger("poise")


def run(config: Config, on_ready: Callable[[ProxyServer], None] | None = None) -> int:
    """Serve ``config`` until SIGTERM/SIGINT; return the process exit code."""
    if config.workers == 1:
        return run_worker(config, on_ready)
    return _supervise(config)


def run_worker(config: Config, on_ready: Callable[[ProxyServer], None] | None = None) -> int:
    """Serve in this process on a fresh uvloop until asked to stop."""
    return uvloop.run(_serve(config, on_ready))


async def _serve(config: Config, on_ready: Callable[[ProxyServer], None] | None) -> int:
    loop = asyncio.get_running_loop()
    server = ProxyServer(config, loop)
    try:
        await server.start(reuse_port=True)
    except OSError as e:
        print(f"poise: cannot bind: {e.strerror or e}", file=sys.stderr)
        return 1
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if on_ready is not None:
        on_ready(server)
    await stop.wait()
    clean = await server.shutdown(config.drain_timeout)
    if not clean:
        log.warning("drain timeout: some connections were closed with requests in flight")
    return 0


def _supervise(config: Config) -> int:
    """Fork ``config.workers`` workers; restart crashed ones; stop them on a signal."""
    workers: dict[int, int] = {}    # pid → slot
    stopping = False

    def spawn(slot: int) -> None:
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides
            code = 1
            try:
                code = run_worker(config)
            finally:
                os._exit(code)
        workers[pid] = slot

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in workers:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    for slot in range(config.workers):
        spawn(slot)
    failures = 0
    while workers:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        slot = workers.pop(pid, None)
        if slot is None or stopping:
            continue
        code = os.waitstatus_to_exitcode(status)
        log.error("worker %d (pid %d) exited with %d; restarting", slot, pid, code)
        failures += 1
        time.sleep(min(1.0, 0.05 * failures))
        spawn(slot)
    return 0
