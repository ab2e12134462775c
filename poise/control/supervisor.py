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
import socket
import sys
import time
from collections.abc import Callable

import uvloop

from poise.config.model import Config
from poise.config.units import parse_address
from poise.control.memory import tune_malloc
from poise.proxy.server import ProxyServer

log = logging.getLogger("poise")
_MAX_QUICK_FAILURES = 5


def run(config: Config, on_ready: Callable[[ProxyServer], None] | None = None) -> int:
    """Serve ``config`` until SIGTERM/SIGINT; return the process exit code."""
    busy = busy_listeners(config)
    if busy:
        for bind, reason in busy:
            print(f"poise: cannot bind {bind}: {reason}", file=sys.stderr)
        return 1
    if config.workers == 1:
        return run_worker(config, on_ready)
    return _supervise(config)


def busy_listeners(config: Config) -> list[tuple[str, str]]:
    """Listeners whose address cannot be bound exclusively right now.

    Workers bind with SO_REUSEPORT, which would silently share a port with another
    process doing the same (a second poise, say); a plain bind first turns that into
    a clear error."""
    busy = []
    for listener in config.listeners:
        host, port = parse_address(listener.bind)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as e:
                busy.append((listener.bind, e.strerror or str(e)))
    return busy


def run_worker(config: Config, on_ready: Callable[[ProxyServer], None] | None = None) -> int:
    """Serve in this process on a fresh uvloop until asked to stop."""
    tune_malloc()
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
    loop.add_signal_handler(signal.SIGHUP, _sighup)
    if on_ready is not None:
        on_ready(server)
    await stop.wait()
    clean = await server.shutdown(config.drain_timeout)
    if not clean:
        log.warning("drain timeout: some connections were closed with requests in flight")
    return 0


def _sighup(*_: object) -> None:
    log.warning("SIGHUP ignored: configuration reload is not implemented yet")


def _supervise(config: Config) -> int:
    """Fork ``config.workers`` workers; restart crashed ones; stop them on a signal."""
    workers: dict[int, tuple[int, float]] = {}    # pid → (slot, started at)
    stopping = False

    def spawn(slot: int) -> None:
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            code = 1
            try:
                code = run_worker(config)
            finally:
                os._exit(code)
        workers[pid] = (slot, time.monotonic())

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
    signal.signal(signal.SIGHUP, _sighup)
    for slot in range(config.workers):
        spawn(slot)
    quick_failures = 0
    exit_code = 0
    while workers:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        entry = workers.pop(pid, None)
        if entry is None or stopping:
            continue
        slot, started = entry
        code = os.waitstatus_to_exitcode(status)
        # A worker that dies right after starting (cannot bind, bad environment) would
        # die again: give up instead of spinning.
        quick_failures = quick_failures + 1 if time.monotonic() - started < 2.0 else 0
        if quick_failures >= _MAX_QUICK_FAILURES:
            log.error("workers keep exiting at start (last code %d); stopping", code)
            exit_code = 1
            on_signal(signal.SIGTERM, None)
            continue
        log.error("worker %d (pid %d) exited with %d; restarting", slot, pid, code)
        time.sleep(min(1.0, 0.1 * quick_failures))
        spawn(slot)
    return exit_code
