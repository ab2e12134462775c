"""Run poise in the foreground: the control plane, its admin API and the data plane.

- ``workers: 1``: one process, one event loop holding both planes (the control
  plane's messages go through an in-process channel).
- ``workers: N``: this process is the supervisor and control plane; it serves no
  traffic.  It starts N worker processes (:mod:`poise.control.workers`) that bind
  the listeners with SO_REUSEPORT.

Signals (to the process started): SIGTERM/SIGINT stop gracefully (workers drain up to
``drain_timeout``), SIGHUP reloads the config file, SIGUSR1 reopens the access log
files (logrotate).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

import uvloop

from poise.config.model import Config
from poise.config.units import parse_address
from poise.control.agent import WorkerAgent
from poise.control.binding import bind_error
from poise.control.limits import apply as apply_file_limits
from poise.control.local import LocalFleet
from poise.control.memory import tune_malloc
from poise.control.plane import ControlPlane
from poise.control.workers import EXIT_GRACE, WorkerSet
from poise.proxy.server import ProxyServer

if TYPE_CHECKING:
    from poise.admin.http import AdminServer

log = logging.getLogger("poise")


def run(config: Config, path: str | None = None,
        on_ready: Callable[[ProxyServer], None] | None = None) -> int:
    """Serve ``config`` (read from ``path``, re-read on reload) until SIGTERM/SIGINT;
    return the process exit code."""
    busy = busy_listeners(config)
    if busy:
        for bind, reason in busy:
            print(f"poise: cannot bind {bind}: {reason}", file=sys.stderr)
        return 1
    tune_malloc()
    apply_file_limits(config)
    if config.workers == 1:
        return uvloop.run(serve_here(config, path, on_ready))
    return uvloop.run(_supervise(config, path))


def busy_listeners(config: Config) -> list[tuple[str, str]]:
    """Listeners (and the admin API) whose address cannot be bound exclusively now.

    Workers bind with SO_REUSEPORT, which would silently share a port with another
    process doing the same (a second poise, say); a plain bind first turns that into
    a clear error."""
    binds = [listener.bind for listener in config.listeners]
    if config.admin is not None:
        binds.append(config.admin.bind)
    return [(bind, reason) for bind in binds if (reason := bind_error(bind)) is not None]


async def serve_here(config: Config, path: str | None,
                     on_ready: Callable[[ProxyServer], None] | None = None) -> int:
    """Both planes in this process, on the running loop, until SIGTERM/SIGINT;
    ``on_ready`` is called once the listeners are bound."""
    loop = asyncio.get_running_loop()
    plane = ControlPlane(config, path, loop)
    agent = WorkerAgent(loop)
    server = agent.build(plane.state_message())
    plane.attach(LocalFleet(agent))
    # Before binding: a client that sees the port open may signal us at once.
    stop = _stop_signals(loop, plane)
    try:
        await server.start(reuse_port=True)
    except OSError as e:
        print(f"poise: cannot bind: {e.strerror or e}", file=sys.stderr)
        return 1
    admin = await _start_admin(plane, config)
    if admin is False:
        await server.shutdown(0)
        return 1
    plane.start()
    loop.add_signal_handler(signal.SIGUSR1, _reopen_on_signal, server.access_logs.reopen)
    if on_ready is not None:
        on_ready(server)
    await stop.wait()
    plane.stop()
    if admin is not None:
        admin.close()
    clean = await server.shutdown(plane.config.drain_timeout)
    if not clean:
        log.warning("drain timeout: some connections were closed with requests in flight")
    return 0


async def _supervise(config: Config, path: str | None) -> int:
    """This process is the control plane; ``config.workers`` processes serve."""
    loop = asyncio.get_running_loop()
    plane = ControlPlane(config, path, loop)
    workers = WorkerSet(plane, loop)
    plane.attach(workers)
    admin = await _start_admin(plane, config)
    if admin is False:
        return 1
    stop = _stop_signals(loop, plane)
    loop.add_signal_handler(signal.SIGUSR1, _reopen_on_signal, workers.reopen_logs)
    plane.start()
    started = loop.create_task(workers.start(config.workers))
    stopped = loop.create_task(stop.wait())
    await asyncio.wait([started, stopped], return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if started.done() and not started.result():
        log.error("workers failed to start; stopping")
        code = 1
    else:
        log.info("supervisor (pid %d): %d workers serving", os.getpid(), config.workers)
        await stopped
    stopped.cancel()
    plane.stop()
    if admin is not None:
        admin.close()
    await workers.stop(plane.config.drain_timeout + EXIT_GRACE)
    return code


async def _start_admin(plane: ControlPlane, config: Config) -> AdminServer | None | bool:
    """The admin API, if configured (False: it could not be bound)."""
    if config.admin is None:
        return None
    from poise.admin.api import AdminApi
    from poise.admin.http import AdminServer
    api = AdminApi(plane, config.admin.token)
    plane.on_config.append(lambda c: setattr(api, "token", c.admin.token if c.admin else None))
    server = AdminServer(api, asyncio.get_running_loop())
    host, port = parse_address(config.admin.bind)
    try:
        await server.start(host, port)
    except OSError as e:
        print(f"poise: cannot bind the admin API on {config.admin.bind}: {e.strerror or e}",
              file=sys.stderr)
        return False
    log.info("admin API on http://%s/", config.admin.bind)
    return server


def _stop_signals(loop: asyncio.AbstractEventLoop, plane: ControlPlane) -> asyncio.Event:
    """SIGTERM/SIGINT set the returned event; SIGHUP reloads."""
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, _reload_on_signal, plane)
    return stop


def _reopen_on_signal(reopen: Callable[[], None]) -> None:
    log.info("SIGUSR1: reopening access log files")
    reopen()


def _reload_on_signal(plane: ControlPlane) -> None:
    log.info("SIGHUP: reloading %s", plane.path)
    plane.reload()
