"""TCP checks: a completed connect is up; refused or hanging connects are down."""

from __future__ import annotations

import asyncio

from poise.checks import CheckSettings
from poise.core.backend import Backend
from tests.checks.servers import Changes, wait_for

TCP = dict(type="tcp", interval=0.03, timeout=2.0, rise=2, fall=3)


async def test_listening_backend_stays_up_and_each_probe_closes(server, make_checker):
    changes = Changes()
    checker = make_checker(CheckSettings(**TCP), [server.backend], changes)
    tasks: set[int] = set()

    def connects_and_no_tasks() -> bool:
        tasks.add(len(asyncio.all_tasks()))
        return server.accepted >= 4

    await wait_for(connects_and_no_tasks, what="four connects")
    assert tasks == {1}, "a TCP probe of an IP literal creates no Task (1 = this test)"
    assert changes.calls == []
    assert checker.healthy(server.backend)
    assert checker.last_result(server.backend) == "ok"
    assert server.requests == 0, "a TCP check sends nothing"
    checker.stop()
    await wait_for(lambda: server.open == 0, what="probe connections closed")


async def test_refused_goes_down_and_comes_back(server, make_checker):
    changes = Changes()
    b = server.backend
    checker = make_checker(CheckSettings(**TCP), [b], changes)
    await wait_for(lambda: server.accepted >= 1)
    await server.close()            # the backend goes away; its port now refuses
    await wait_for(lambda: changes.states == [False], what="flip down")
    assert checker.last_result(b) == "connect refused"

    await server.start_on(b.port)
    await wait_for(lambda: changes.states == [False, True], what="flip up")
    assert checker.last_result(b) == "ok"


async def test_connect_that_never_completes_times_out(blackhole, make_checker):
    b = Backend("127.0.0.1", blackhole)
    changes = Changes()
    checker = make_checker(CheckSettings(**{**TCP, "timeout": 0.1, "fall": 2}), [b], changes)
    await wait_for(lambda: changes.states == [False])
    assert checker.last_result(b) == "connect timeout"


async def test_host_names_are_resolved(server, make_checker):
    b = Backend("localhost", server.port)
    changes = Changes()
    checker = make_checker(CheckSettings(**TCP), [b], changes)
    await wait_for(lambda: checker.last_result(b) != "pending")
    # localhost may resolve to ::1 first, where nothing listens: either answer is a
    # clean result, never an exception.
    assert checker.last_result(b) in ("ok", "connect refused")


async def test_unresolvable_host_fails_cleanly(make_checker):
    b = Backend("no-such-host.invalid", 80)
    changes = Changes()
    checker = make_checker(CheckSettings(**{**TCP, "fall": 1}), [b], changes)
    await wait_for(lambda: changes.states == [False], timeout=10)
    assert checker.last_result(b) in ("dns error", "dns timeout")
