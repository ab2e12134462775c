"""Fixtures for the admin API tests: a fake control plane and a real admin server."""

from __future__ import annotations

import pytest
import uvloop

from poise.admin.api import AdminApi
from poise.admin.http import Limits
from tests.admin.fakes import FakeOps
from tests.admin.support import ServerThread, healthy

# Short deadlines so that timeouts can be tested quickly.
FAST = Limits(request_timeout=0.4, idle_timeout=0.6, linger=0.3, max_connections=8)


def pytest_asyncio_loop_factories(config, item):
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture
def ops() -> FakeOps:
    return FakeOps()


@pytest.fixture
def api(ops: FakeOps) -> AdminApi:
    return AdminApi(ops, None)


def serve(api: AdminApi, limits: Limits = FAST):
    """A server thread for ``api``; at the end it must still answer /healthz at once,
    hold no connection, and have let nothing reach its event loop."""
    s = ServerThread(api, limits)
    try:
        yield s
        healthy(s.addr)
        s.wait_connections(0)
        assert s.errors == [], "exceptions reached the event loop"
    finally:
        s.stop()


@pytest.fixture
def server(api: AdminApi):
    yield from serve(api)
