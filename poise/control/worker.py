"""A worker process: ``python -m poise.control.worker FD SLOT`` (started by the
supervisor, never by hand).

It reads the control plane's whole state from the channel on file descriptor FD,
builds and binds its data plane, says ``ready``, then applies what the control plane
sends and reports its counts every second.  SIGTERM, or the channel closing (the
supervisor is gone), stops it gracefully; a ``retire`` message (a reload lowered
``workers``) makes it leave as a removed listener does, telling each client to
reconnect; SIGINT and SIGHUP are the supervisor's.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys

import uvloop

from poise.control.agent import Message, WorkerAgent
from poise.control.channel import Channel
from poise.control.memory import tune_malloc

log = logging.getLogger("poise")
REPORT_INTERVAL = 1.0


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    fd, slot = int(args[0]), int(args[1])
    shared = args[2] if len(args) > 2 else None
    logging.basicConfig(level=logging.INFO,
                        format=f"poise[worker {slot}] %(levelname)s %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)      # Ctrl-C reaches the supervisor
    signal.signal(signal.SIGHUP, signal.SIG_IGN)      # reload is the supervisor's
    # (Until the access logs exist to reopen: SIGUSR1 would otherwise kill us.)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    tune_malloc()
    sys.exit(uvloop.run(_serve(socket.socket(fileno=fd), slot, shared)))


async def _serve(sock: socket.socket, slot: int = 0, shared: str | None = None) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    first: asyncio.Future[Message] = loop.create_future()
    channel: Channel | None = None

    def send(message: Message) -> None:
        if channel is not None:
            channel.send(message)

    agent = WorkerAgent(loop, on_applied=lambda status: send({"type": "applied", **status}),
                        slot=slot, shared=shared)

    retiring = False

    def received(message: Message) -> None:
        nonlocal retiring
        if not first.done():
            first.set_result(message)
        elif message.get("type") == "retire":
            retiring = True
            stop.set()
        else:
            agent.receive(message)

    def lost() -> None:
        stop.set()
        if not first.done():
            first.cancel()

    channel = await Channel.open(sock, received, lost)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    try:
        state = await first
    except asyncio.CancelledError:
        log.error("the supervisor went away before sending the configuration")
        return 1
    server = agent.build(state)
    try:
        await server.start(reuse_port=True)
    except OSError as e:
        log.error("cannot bind: %s", e.strerror or e)
        return 1
    loop.add_signal_handler(signal.SIGUSR1, server.access_logs.reopen)   # logrotate
    send({"type": "ready", "pid": os.getpid(), **agent.status()})
    reporter = _Reporter(loop, agent, send)
    await stop.wait()
    reporter.stop()
    if retiring:
        log.info("retiring: no longer needed (fewer workers)")
        clean = await server.retire(server.config.drain_timeout)
    else:
        clean = await server.shutdown(server.config.drain_timeout)
    if not clean:
        log.warning("drain timeout: some connections were closed with requests in flight")
    send(_stats(agent))     # the last counts
    await channel.aclose()
    return 0


def _stats(agent: WorkerAgent) -> Message:
    return {"type": "stats", "counters": agent.counters(), **agent.metrics_report()}


class _Reporter:
    """Sends the worker's counts every REPORT_INTERVAL seconds."""

    def __init__(self, loop: asyncio.AbstractEventLoop, agent: WorkerAgent, send) -> None:
        self._loop = loop
        self._agent = agent
        self._send = send
        self._timer = loop.call_later(REPORT_INTERVAL, self._tick)

    def _tick(self) -> None:
        self._send(_stats(self._agent))
        self._timer = self._loop.call_later(REPORT_INTERVAL, self._tick)

    def stop(self) -> None:
        self._timer.cancel()


if __name__ == "__main__":
    main()
