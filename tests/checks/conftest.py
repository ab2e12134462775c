"""Fixtures for the health-check tests: loopback servers in the test's own uvloop
(see ``servers.py``), a refused port and a port whose connects never complete."""

from __future__ import annotations

import asyncio
import gc
import random
import socket

import pytest
import uvloop

from poise.checks import CheckSettings, HealthChecker
from tests.checks.servers import Changes, HealthServer


def pytest_asyncio_loop_factories(config, item):
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture
async def server():
    s = await HealthServer().start()
    yield s
    await s.close()


@pytest.fixture
async def server2():
    s = await HealthServer().start()
    yield s
    await s.close()


@pytest.fixture
def refused_port() -> int:
    """A port that was bound and closed again: connecting to it is refused."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture
def blackhole():
    """A port whose connects never complete: a listener with backlog 0 and one
    connection filling its queue, so Linux drops further SYNs."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    filler = socket.create_connection(listener.getsockname(), timeout=2)
    yield listener.getsockname()[1]
    filler.close()
    listener.close()


@pytest.fixture
def make_checker():
    """``make_checker(settings, backends, on_change=None)``: a started checker on the
    running loop (seeded rng), stopped at teardown."""
    made: list[HealthChecker] = []
    errors: list[dict] = []

    def make(settings: CheckSettings, backends, on_change=None, *, start: bool = True):
        loop = asyncio.get_running_loop()
        # Nothing may escape into the event loop: record whatever reaches its handler.
        loop.set_exception_handler(lambda loop, context: errors.append(context))
        checker = HealthChecker(settings, backends, on_change or Changes(),
                                loop=loop, rng=random.Random(7))
        made.append(checker)
        if start:
            checker.start()
        return checker

    yield make
    for checker in made:
        checker.stop()
        assert checker.pending() == 0
    gc.collect()                # surfaces "Task exception was never retrieved"
    assert errors == [], "exceptions reached the event loop"
