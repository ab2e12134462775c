"""HTTP checks against real loopback servers: keep-alive reuse, status and body
expectations, timeouts, refused connects, and what the probe sends."""

from __future__ import annotations

import asyncio
import socket

import pytest

from poise.checks import CheckSettings
from poise.core.backend import Backend
from tests.checks.servers import Changes, ok_response, wait_for

# Short intervals keep the suite fast; timeouts stay generous so a loaded box does not
# turn a slow answer into a failed probe (except in the tests about timeouts).
FAST = dict(interval=0.03, timeout=2.0, jitter=0.1, rise=2, fall=3)


async def test_healthy_backend_stays_up_on_one_kept_alive_connection(server, make_checker):
    changes = Changes()
    checker = make_checker(CheckSettings(**FAST), [server.backend], changes)
    await wait_for(lambda: server.requests >= 1, what="first probe")
    tasks: set[int] = set()

    def probes_and_no_tasks() -> bool:
        tasks.add(len(asyncio.all_tasks()))
        return server.requests >= 6

    await wait_for(probes_and_no_tasks, what="six probes")
    assert tasks == {1}, "a reused keep-alive probe creates no Task (1 = this test)"
    assert server.accepted == 1, "keep-alive probes must reuse the connection"
    assert changes.calls == []
    assert checker.healthy(server.backend)
    assert checker.last_result(server.backend) == "ok 200"


async def test_request_line_and_headers(server, make_checker):
    make_checker(CheckSettings(**FAST), [server.backend])
    await wait_for(lambda: server.requests >= 1)
    lines = server.heads[0].split(b"\r\n")
    assert lines[0] == b"GET /health HTTP/1.1"
    assert b"Host: 127.0.0.1:%d" % server.port in lines
    assert b"User-Agent: poise-health-check" in lines


async def test_custom_method_path_and_host(server, make_checker):
    settings = CheckSettings(**FAST, method="OPTIONS", path="/ready?deep=1", host="svc.local")
    make_checker(settings, [server.backend])
    await wait_for(lambda: server.requests >= 1)
    lines = server.heads[0].split(b"\r\n")
    assert lines[0] == b"OPTIONS /ready?deep=1 HTTP/1.1"
    assert b"Host: svc.local" in lines


async def test_bad_status_takes_it_down_after_fall_and_back_up_after_rise(server, make_checker):
    server.status = 503
    changes = Changes(snapshot=lambda: list(server.statuses))
    checker = make_checker(CheckSettings(**FAST), [server.backend], changes)
    b = server.backend

    await wait_for(lambda: changes.states == [False], what="flip down")
    assert changes.at[0] == [503, 503, 503], "down after exactly `fall` failed probes"
    assert not checker.healthy(b)
    assert checker.last_result(b) == "status 503"

    server.status = 200
    await wait_for(lambda: changes.states == [False, True], what="flip up")
    assert changes.at[1][3:] == [200, 200], "up after exactly `rise` passing probes"
    assert checker.healthy(b)
    assert checker.last_result(b) == "ok 200"
    assert server.accepted == 1, "a failed status is still a reusable connection"


async def test_expect_status_ranges(server, make_checker):
    server.status = 418
    settings = CheckSettings(**{**FAST, "fall": 1}, expect_status=((200, 200), (418, 418)))
    changes = Changes()
    checker = make_checker(settings, [server.backend], changes)
    await wait_for(lambda: server.requests >= 3)
    assert changes.calls == [] and checker.last_result(server.backend) == "ok 418"
    server.status = 500
    await wait_for(lambda: changes.states == [False])
    assert checker.last_result(server.backend) == "status 500"


async def test_expected_body_found_and_missing(server, make_checker):
    server.body = b'{"status": "serving"}'
    settings = CheckSettings(**FAST, expect_body='"serving"')
    changes = Changes()
    checker = make_checker(settings, [server.backend], changes)
    await wait_for(lambda: server.requests >= 3)
    assert changes.calls == [] and checker.last_result(server.backend) == "ok 200"

    server.body = b'{"status": "not_serving"}'
    await wait_for(lambda: changes.states == [False])
    assert checker.last_result(server.backend) == "body mismatch"
    assert server.accepted == 1


async def test_expected_body_split_across_reads_and_chunked(server, make_checker):
    def respond(srv, conn, head):
        # The substring straddles two writes and two chunks.
        conn.transport.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                             b"5\r\nall g\r\n")
        srv.loop_call(lambda: conn.transport.write(b"5\r\nood!!\r\n0\r\n\r\n"))
        return None

    server.respond = respond
    settings = CheckSettings(**{**FAST, "fall": 1}, expect_body="all good")
    changes = Changes()
    checker = make_checker(settings, [server.backend], changes)
    await wait_for(lambda: checker.last_result(server.backend) != "pending")
    await wait_for(lambda: server.requests >= 3)
    assert changes.calls == [] and checker.last_result(server.backend) == "ok 200"
    assert server.accepted == 1


async def test_body_too_large_without_the_substring(server, make_checker):
    server.body = b"x" * (100 * 1024)
    settings = CheckSettings(**{**FAST, "fall": 1}, expect_body="ready")
    changes = Changes()
    checker = make_checker(settings, [server.backend], changes)
    await wait_for(lambda: changes.states == [False])
    assert checker.last_result(server.backend) == "body too large"


async def test_large_body_is_fine_when_the_substring_comes_early(server, make_checker):
    server.body = b"ready" + b"x" * (1024 * 1024)
    settings = CheckSettings(**{**FAST, "fall": 1}, expect_body="ready")
    changes = Changes()
    checker = make_checker(settings, [server.backend], changes)
    await wait_for(lambda: server.requests >= 3)
    assert changes.calls == [] and checker.last_result(server.backend) == "ok 200"
    # The rest of the body was not read: the connection was closed instead.
    assert server.accepted == server.requests


async def test_large_body_without_expectation_passes(server, make_checker):
    server.body = b"x" * (200 * 1024)
    changes = Changes()
    checker = make_checker(CheckSettings(**{**FAST, "fall": 1}), [server.backend], changes)
    await wait_for(lambda: server.requests >= 3)
    assert changes.calls == [] and checker.last_result(server.backend) == "ok 200"


async def test_silent_server_times_out_and_goes_down(server, make_checker):
    server.respond = lambda srv, conn, head: None
    settings = CheckSettings(**{**FAST, "timeout": 0.1})
    changes = Changes()
    checker = make_checker(settings, [server.backend], changes)
    await wait_for(lambda: changes.states == [False])
    assert checker.last_result(server.backend) == "timeout"
    assert server.accepted >= 3, "a probe that times out closes its connection"
    checker.stop()
    await wait_for(lambda: server.open == 0, what="connections closed")


async def test_connect_refused_goes_down(refused_port, make_checker):
    b = Backend("127.0.0.1", refused_port)
    changes = Changes()
    checker = make_checker(CheckSettings(**FAST), [b], changes)
    await wait_for(lambda: changes.states == [False])
    assert checker.last_result(b) == "connect refused"


async def test_connect_timeout(blackhole, make_checker):
    b = Backend("127.0.0.1", blackhole)
    changes = Changes()
    checker = make_checker(CheckSettings(**{**FAST, "timeout": 0.1, "fall": 1}), [b], changes)
    await wait_for(lambda: changes.states == [False])
    assert checker.last_result(b) == "connect timeout"


async def test_backend_restart_is_noticed_and_recovered(server, make_checker):
    changes = Changes()
    settings = CheckSettings(**{**FAST, "fall": 1, "rise": 1})
    checker = make_checker(settings, [server.backend], changes)
    await wait_for(lambda: server.requests >= 2)
    for conn in list(server.conns):     # the backend drops its keep-alive connection
        conn.transport.close()
    before = server.requests
    await wait_for(lambda: server.requests >= before + 3)
    assert changes.calls == [], "a closed idle connection is reopened, not a failure"
    assert server.accepted == 2
    assert checker.healthy(server.backend)


async def test_reused_connection_closed_before_answering_is_retried_once(server, make_checker):
    def respond(srv, conn, head):
        if conn.requests > 1:           # the backend's idle timeout races the probe
            conn.transport.close()
            return None
        return ok_response()

    server.respond = respond
    changes = Changes()
    checker = make_checker(CheckSettings(**{**FAST, "fall": 1}), [server.backend], changes)
    await wait_for(lambda: server.accepted >= 4)
    assert changes.calls == []
    assert checker.last_result(server.backend) == "ok 200"


async def test_connection_closed_without_answer_fails(server, make_checker):
    def respond(srv, conn, head):
        conn.transport.close()

    server.respond = respond
    changes = Changes()
    checker = make_checker(CheckSettings(**{**FAST, "fall": 1}), [server.backend], changes)
    await wait_for(lambda: changes.states == [False])
    assert checker.last_result(server.backend) == "connection closed"


async def test_connection_close_responses_open_a_connection_per_probe(server, make_checker):
    def respond(srv, conn, head):
        srv.loop_call(conn.transport.close)
        return ok_response(extra=b"Connection: close\r\n")

    server.respond = respond
    changes = Changes()
    checker = make_checker(CheckSettings(**{**FAST, "fall": 1}), [server.backend], changes)
    await wait_for(lambda: server.requests >= 4)
    assert changes.calls == [] and checker.last_result(server.backend) == "ok 200"
    assert server.accepted >= server.requests - 1


async def test_http10_body_delimited_by_close(server, make_checker):
    def respond(srv, conn, head):
        srv.loop_call(conn.transport.close)
        return b"HTTP/1.0 200 OK\r\n\r\nstatus: ready"

    server.respond = respond
    settings = CheckSettings(**{**FAST, "fall": 1}, expect_body="ready")
    changes = Changes()
    checker = make_checker(settings, [server.backend], changes)
    await wait_for(lambda: server.requests >= 3)
    assert changes.calls == [] and checker.last_result(server.backend) == "ok 200"


async def test_head_request_ignores_content_length_and_keeps_alive(server, make_checker):
    server.respond = lambda srv, conn, head: b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n"
    changes = Changes()
    checker = make_checker(CheckSettings(**{**FAST, "fall": 1}, method="HEAD"),
                           [server.backend], changes)
    await wait_for(lambda: server.requests >= 4)
    assert changes.calls == [] and checker.last_result(server.backend) == "ok 200"
    assert server.accepted == 1


async def test_informational_response_is_skipped(server, make_checker):
    server.respond = lambda srv, conn, head: b"HTTP/1.1 100 Continue\r\n\r\n" + ok_response()
    changes = Changes()
    checker = make_checker(CheckSettings(**{**FAST, "fall": 1}), [server.backend], changes)
    await wait_for(lambda: server.requests >= 3)
    assert changes.calls == [] and checker.last_result(server.backend) == "ok 200"
    assert server.accepted == 1


async def test_malformed_and_non_http1_responses_fail(server, make_checker):
    server.respond = lambda srv, conn, head: b"SSH-2.0-OpenSSH_9.6\r\n\r\n"
    changes = Changes()
    checker = make_checker(CheckSettings(**{**FAST, "fall": 1, "rise": 1}),
                           [server.backend], changes)
    await wait_for(lambda: changes.states == [False])
    assert checker.last_result(server.backend) == "bad response"

    server.respond = lambda srv, conn, head: ok_response()
    await wait_for(lambda: changes.states == [False, True])
    server.respond = lambda srv, conn, head: b"HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n"
    await wait_for(lambda: changes.states == [False, True, False])
    assert checker.last_result(server.backend) == "not HTTP/1.x"


async def test_unsolicited_bytes_make_the_connection_unusable(server, make_checker):
    def respond(srv, conn, head):
        # A second response nobody asked for, after the first.
        return ok_response() + ok_response(503)

    server.respond = respond
    changes = Changes()
    checker = make_checker(CheckSettings(**{**FAST, "fall": 1}), [server.backend], changes)
    await wait_for(lambda: server.requests >= 3)
    assert changes.calls == [] and checker.last_result(server.backend) == "ok 200"
    assert server.accepted == server.requests, "an out-of-sync connection is not reused"


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback")
@pytest.mark.parametrize("kind", ["http", "tcp"])
async def test_ipv6_backend(kind, make_checker):
    heads = []

    class Answer(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport

        def data_received(self, data):
            heads.append(data)
            self.transport.write(ok_response())

    srv = await asyncio.get_running_loop().create_server(Answer, "::1", 0)
    try:
        b = Backend("::1", srv.sockets[0].getsockname()[1])
        changes = Changes()
        checker = make_checker(CheckSettings(**FAST, type=kind), [b], changes)
        await wait_for(lambda: checker.last_result(b) != "pending")
        assert checker.last_result(b) == ("ok 200" if kind == "http" else "ok")
        if kind == "http":
            assert b"Host: [::1]:%d\r\n" % b.port in heads[0]
        checker.stop()
    finally:
        srv.close()
        await srv.wait_closed()
