"""WebSockets through poise, over real loopback sockets, a real poise process and the
real ``websockets`` library at both ends (:mod:`tests.support.ws`), raw sockets where
the library cannot do what a test needs.

What is proved: messages (text, binary, fragmented either way, 16 MiB) arrive intact
both ways; pings, close codes and reasons, subprotocols and permessage-deflate work end
to end, poise parsing no frame; a thousand WebSockets at once each get their own
messages and none is left counted after they close; a backend that goes away (no close
frame, a reset, its process killed) or a client that does (before or after the 101) is
seen by the other side, resets are passed on as resets and half-closes as half-closes,
and the relay is no longer counted; a relay counts as in flight at its backend for its
whole life (``least_conn`` sends new ones to the backend holding fewer) and holds its
cluster's ``max_requests`` slot; a refused handshake (403) and one on a route with
``websocket: {enabled: false}`` reach the client as failed handshakes after which the
connection closes; the route's ``idle_timeout`` and ``max_lifetime`` close relays (and
only them); a graceful stop lets a WebSocket carry on until ``drain_timeout`` and poise
still exits 0, a reload leaves it working; wss in front and TLS towards the backend;
bytes sent before the ``101`` (megabytes, to a backend slow to answer) and frames sent
with it are relayed after the switch, and a handshake may follow other requests on a
connection; the access log line (status 101) is written when the WebSocket closes, and
the relayed bytes and the 101 are counted in the metrics.

Waits are bounded (a proxy that hangs fails a test); timings are benchmarks' business.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import os
import resource
import signal
import socket
import ssl
import struct
import threading
import time

import pytest
import websockets.asyncio.client
from websockets.exceptions import ConnectionClosed, ConnectionClosedError, InvalidStatus

from tests.support.certs import Pki, needs_openssl
from tests.support.client import read_until_close
from tests.support.tcp import TcpBackend, metric, server_context
from tests.support.waiting import wait_for
from tests.support.ws import (
    AsyncEchoBackend,
    RawStream,
    WsBackendProcess,
    accept_key,
    client,
    close_frame,
    closed_within,
    command,
    frame,
    handshake_request,
    new_key,
    raw_answer_after_fin,
    raw_fin_first,
    raw_greeting_echo,
    raw_reset_after_first_frame,
    wait_in_flight,
    ws_backends,
)

MiB = 1 << 20


def sha(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def raw_connect(px, timeout: float = 10.0) -> socket.socket:
    return socket.create_connection(px.addr, timeout=timeout)


@pytest.fixture(scope="module")
def site(module_stack):
    """One echo backend behind poise, with its admin API."""
    with ws_backends("echo") as (b,):
        px = module_stack.poise([b.address], admin={})
        yield px, b


@pytest.fixture
def echo_site(site):
    """``site``, with nothing left open or counted by an earlier test."""
    px, b = site
    b.wait_idle()
    wait_in_flight(px, {b.address: 0})
    b.reset()
    return px, b


# -- messages ---------------------------------------------------------------------------------

@pytest.mark.parametrize("message", [
    "", "hello", "é✓ \u2028 \U0001f600" * 100, "x" * 126, "y" * 65_536,
    b"", b"\x00\xff" * 62, bytes(range(256)) * 257, os.urandom(MiB + 3),
], ids=["text-empty", "text", "text-utf8", "text-126", "text-64KiB",
        "binary-empty", "binary-124", "binary-65792", "binary-1MiB"])
def test_messages_echo_intact_as_text_or_binary(echo_site, message):
    px, b = echo_site
    with client(px, compression=None) as ws:
        ws.send(message)
        got = ws.recv(timeout=10)
    assert type(got) is type(message)
    assert got == message
    (session,) = b.wait_sessions(1)
    assert session.messages[0] == message


def test_many_messages_on_one_websocket_arrive_in_order(echo_site):
    px, b = echo_site
    with client(px) as ws:
        for i in range(200):
            ws.send(f"m{i}")
        assert [ws.recv(timeout=10) for _ in range(200)] == [f"m{i}" for i in range(200)]


def test_fragmented_message_arrives_reassembled(echo_site):
    px, b = echo_site
    fragments = [b"frag-%d-" % i * 1000 for i in range(20)]
    whole = b"".join(fragments)
    with client(px, compression=None) as ws:
        ws.send(iter(fragments))            # one message in 20 frames
        assert ws.recv(timeout=10) == whole
        ws.send(iter(["ab", "cd", "é"]))   # text, split between frames too
        assert ws.recv(timeout=10) == "abcdé"
        ws.send(command("fragments from the backend"))     # 3 frames the other way
        assert ws.recv(timeout=10) == "fromthebackend"
    (session,) = b.wait_sessions(1)
    assert session.messages[:2] == [whole, "abcdé"]


def test_16MiB_messages_both_ways_intact(echo_site):
    px, b = echo_site
    payload = os.urandom(16 * MiB)
    with client(px, compression=None) as ws:
        ws.send(payload)
        got = ws.recv(timeout=60)
        ws.send(payload[::-1])
        got_reversed = ws.recv(timeout=60)
    assert (len(got), sha(got)) == (len(payload), sha(payload))
    assert sha(got_reversed) == sha(payload[::-1])
    (session,) = b.wait_sessions(1)
    assert [sha(m) for m in session.messages] == [sha(payload), sha(payload[::-1])]


def test_pings_are_answered_both_ways(echo_site):
    px, b = echo_site
    with client(px) as ws:
        assert ws.ping(b"from the client").wait(10), "the backend's pong"
        ws.send(command("ping"))            # the backend pings the client
        assert ws.recv(timeout=10) == "pong True"
        ws.send("still there")
        assert ws.recv(timeout=10) == "still there"


def test_client_close_code_and_reason_reach_the_backend(echo_site):
    px, b = echo_site
    ws = client(px)
    ws.send("hi")
    assert ws.recv(timeout=10) == "hi"
    ws.close(4001, "bye")
    (session,) = b.wait_sessions(1)
    session.wait_closed()
    assert (session.close_code, session.close_reason) == (4001, "bye")
    assert ws.close_code == 4001, "the backend's echo of the close frame"


def test_backend_close_code_and_reason_reach_the_client(echo_site):
    px, b = echo_site
    with client(px) as ws:
        ws.send(command("close 1011 backend broke"))
        closed = closed_within(ws, 10)
    assert closed.rcvd is not None, closed
    assert (closed.rcvd.code, closed.rcvd.reason) == (1011, "backend broke")
    (session,) = b.wait_sessions(1)
    assert session.wait_closed().close_code == 1011, "the client's echo of the close frame"


def test_the_handshake_reaches_the_backend_with_its_path_and_headers(echo_site):
    px, b = echo_site
    with client(px, "/chat/room?id=7", additional_headers={"X-Token": "t0k"},
                origin="https://example.test") as ws:
        ws.send("x")
        ws.recv(timeout=10)
    (request,) = b.handshakes
    assert request.path == "/chat/room?id=7"
    headers = request.headers
    assert headers["Upgrade"].lower() == "websocket"
    assert "upgrade" in headers["Connection"].lower()
    assert headers["X-Token"] == "t0k"
    assert headers["Origin"] == "https://example.test"
    assert headers["Sec-WebSocket-Version"] == "13"
    assert headers["X-Forwarded-For"] == "127.0.0.1"


# -- subprotocols and extensions (poise parses no frame) -----------------------------------------

def test_subprotocol_is_negotiated_end_to_end(module_stack):
    with ws_backends("sub", subprotocols=["chat.v2", "chat.v1"]) as (b,):
        px = module_stack.poise([b.address])
        with client(px, subprotocols=["chat.v1", "chat.v3"]) as ws:
            assert ws.subprotocol == "chat.v1"
            ws.send("over chat.v1")
            assert ws.recv(timeout=10) == "over chat.v1"
        (session,) = b.wait_sessions(1)
        assert session.subprotocol == "chat.v1"
        offered = b.handshakes[0].headers.get_all("Sec-WebSocket-Protocol")
        assert ", ".join(offered) == "chat.v1, chat.v3"
        # Only protocols the backend does not speak: it refuses (websockets: 400).
        with pytest.raises(InvalidStatus) as refused:
            client(px, subprotocols=["chat.v9"])
        assert refused.value.response.status_code == 400


def test_permessage_deflate_works_end_to_end(stack):
    with ws_backends("deflate") as (b,):
        px = stack.poise([b.address], admin={})
        text = "the same words again and again, " * (4 * MiB // 32)
        with client(px) as ws:           # compression="deflate", as by default
            extensions = ws.response.headers["Sec-WebSocket-Extensions"]
            assert extensions.startswith("permessage-deflate"), extensions
            ws.send(text)
            assert ws.recv(timeout=30) == text
        (session,) = b.wait_sessions(1)
        assert session.messages == [text]
        # What poise relayed is the compressed frames, not 4 MiB each way.
        wait_for(lambda: metric(px, "poise_sent_bytes_total", listener="web") > 0, 10,
                 "the relay's bytes counted")
        received = metric(px, "poise_received_bytes_total", listener="web")
        sent = metric(px, "poise_sent_bytes_total", listener="web")
        assert 0 < received < 256 * 1024 and 0 < sent < 256 * 1024, (received, sent)


# -- many at once ---------------------------------------------------------------------------------

def _raise_fd_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.skip(f"needs {wanted} open files, the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def test_a_thousand_websockets_at_once_each_echo_their_own(stack):
    n = 1000
    # This process holds both ends of each (2n), poise (started after this, inheriting
    # the limit) another 2n.
    _raise_fd_limit(4 * n + 512)
    with AsyncEchoBackend("many") as b:
        px = stack.poise([b.address], admin={})

        async def one(i: int, gate: asyncio.Semaphore, opened: list, release: asyncio.Event):
            async with gate:
                ws = await websockets.asyncio.client.connect(
                    f"ws://127.0.0.1:{px.port}/ws/{i}", proxy=None, compression=None,
                    ping_interval=None, open_timeout=30, close_timeout=10)
            opened.append(ws)
            try:
                got = []
                for k in range(3):
                    await ws.send(f"{i}:{k}")
                    got.append(await asyncio.wait_for(ws.recv(), 30))
                await ws.send(b"%d" % i * 100)
                got.append(await asyncio.wait_for(ws.recv(), 30))
                await release.wait()
                return got
            finally:
                await ws.close()

        async def main() -> tuple[list, float]:
            gate = asyncio.Semaphore(100)       # handshakes under way at once
            opened: list = []
            release = asyncio.Event()
            tasks = [asyncio.create_task(one(i, gate, opened, release)) for i in range(n)]
            try:
                # All open at once: counted as such by poise and the backend.
                await asyncio.to_thread(
                    wait_for, lambda: len(opened) == n and b.open == n, 30,
                    lambda: f"{n} WebSockets open (client {len(opened)}, backend {b.open})")
                await asyncio.to_thread(wait_in_flight, px, {b.address: n}, "app", 15)
                active = await asyncio.to_thread(metric, px, "poise_connections_active",
                                                 listener="web")
            finally:
                release.set()               # (a failure above still closes them all)
            results = await asyncio.wait_for(asyncio.gather(*tasks), 30)
            return results, active

        results, active = asyncio.run(main())
        assert results == [[f"{i}:0", f"{i}:1", f"{i}:2", b"%d" % i * 100] for i in range(n)]
        assert active == n
        assert b.opened == n
        wait_for(lambda: b.open == 0, 10, lambda: f"backend closed all ({b.open} open)")
        wait_in_flight(px, {b.address: 0})
        wait_for(lambda: metric(px, "poise_connections_active", listener="web") == 0
                 and metric(px, "poise_upstream_connections_active", cluster="app") == 0,
                 10, "no client or upstream connection left open", step=0.1)
        wait_for(lambda: metric(px, "poise_requests_total", code="101") == n, 10,
                 lambda: f"{n} exchanges counted with 101 (now "
                         f"{metric(px, 'poise_requests_total', code='101')})", step=0.1)


# -- one side goes away ---------------------------------------------------------------------------

def test_backend_that_closes_without_a_close_frame_closes_the_client(echo_site):
    px, b = echo_site
    with client(px) as ws:
        ws.send("hi")
        assert ws.recv(timeout=10) == "hi"
        ws.send(command("fin"))
        closed = closed_within(ws, 10)
    assert isinstance(closed, ConnectionClosedError) and closed.rcvd is None, closed
    wait_in_flight(px, {b.address: 0})


def test_backend_reset_closes_the_client(stack):
    b = TcpBackend("rst", handler=raw_reset_after_first_frame)
    try:
        px = stack.poise([b.address], admin={})
        with client(px) as ws:
            ws.send("trigger")
            closed = closed_within(ws, 10)
        assert isinstance(closed, ConnectionClosedError) and closed.rcvd is None, closed
        wait_in_flight(px, {b.address: 0})
    finally:
        b.stop()


def test_backend_process_killed_mid_stream_closes_the_client(stack):
    with WsBackendProcess("doomed") as b:
        px = stack.poise([b.address], admin={})
        with client(px) as ws:
            ws.send("before")
            assert ws.recv(timeout=10) == "before"
            wait_in_flight(px, {b.address: 1})
            b.kill()
            closed = closed_within(ws, 10)
        assert isinstance(closed, ConnectionClosedError) and closed.rcvd is None, closed
        wait_in_flight(px, {b.address: 0})


@pytest.mark.parametrize("how", ["fin", "reset"])
def test_client_gone_mid_stream_closes_the_backend_side(echo_site, how):
    px, b = echo_site
    key = new_key()
    sock = raw_connect(px)
    sock.sendall(handshake_request(key, "/gone"))
    stream = RawStream(sock.recv)
    start, headers = stream.head()
    assert start.startswith("HTTP/1.1 101"), start
    sock.sendall(frame(b"hello"))
    assert stream.frame() == (0x1, b"hello")
    (session,) = b.wait_sessions(1)
    wait_in_flight(px, {b.address: 1})
    if how == "reset":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()                            # no close frame
    session.wait_closed()
    assert session.close_code == 1006 and session.error is None, session
    wait_in_flight(px, {b.address: 0})
    wait_for(lambda: metric(px, "poise_connections_active", listener="web") == 0, 10,
             "the client connection no longer counted", step=0.1)


@pytest.mark.parametrize("how", ["fin", "reset"])
def test_client_reset_is_passed_on_as_a_reset_and_a_fin_as_a_fin(stack, how):
    b = TcpBackend("sees", handler=raw_answer_after_fin)
    try:
        px = stack.poise([b.address], admin={})
        with raw_connect(px) as sock:
            sock.sendall(handshake_request(new_key()) + frame(b"one"))
            start, _ = RawStream(sock.recv).head()
            assert start.startswith("HTTP/1.1 101"), start
            (conn,) = b.wait_accepted(1)
            wait_for(lambda: getattr(conn, "frames", None), 10, "the frame at the backend")
            if how == "reset":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        wait_for(conn.closed.is_set, 10, "the backend's handler done")
        assert conn.frames == [(0x1, b"one")]
        assert conn.reset is (how == "reset")
        wait_in_flight(px, {b.address: 0})
    finally:
        b.stop()


def test_backend_reset_is_passed_on_to_the_client_as_a_reset(stack):
    b = TcpBackend("resets", handler=raw_reset_after_first_frame)
    try:
        px = stack.poise([b.address], admin={})
        with raw_connect(px) as sock:
            sock.sendall(handshake_request(new_key()))
            stream = RawStream(sock.recv)
            start, _ = stream.head()
            assert start.startswith("HTTP/1.1 101"), start
            sock.sendall(frame(b"trigger"))
            with pytest.raises(ConnectionResetError):
                stream.frame()
        wait_in_flight(px, {b.address: 0})
    finally:
        b.stop()


def test_client_gone_before_the_101_closes_the_backend_side(stack):
    def slow(connection, request):
        time.sleep(1.0)                     # the 101 comes after the client has gone
    with ws_backends("slow", refuse=slow) as (b,):
        px = stack.poise([b.address], admin={})
        with raw_connect(px) as sock:
            sock.sendall(handshake_request(new_key(), "/impatient") + frame(b"early"))
            wait_for(lambda: b.handshakes, 10, "the handshake at the backend")
        (session,) = b.wait_sessions(1)
        session.wait_closed()
        assert session.close_code == 1006 and session.error is None, session
        wait_in_flight(px, {b.address: 0})


def test_client_half_close_reaches_the_backend_which_still_answers(stack):
    b = TcpBackend("half", handler=raw_answer_after_fin)
    try:
        px = stack.poise([b.address], admin={})
        with raw_connect(px) as sock:
            # Frames and the FIN right behind the handshake, before the 101.
            sock.sendall(handshake_request(new_key()) + frame(b"one") + frame(b"two"))
            sock.shutdown(socket.SHUT_WR)
            stream = RawStream(sock.recv)
            start, _ = stream.head()
            assert start.startswith("HTTP/1.1 101"), start
            assert stream.frame() == (0x1, b"got 2 frames")
            assert stream.rest() == b""         # the backend's FIN
        (conn,) = b.wait_accepted(1)
        assert conn.frames == [(0x1, b"one"), (0x1, b"two")]
        wait_in_flight(px, {b.address: 0})
    finally:
        b.stop()


def test_backend_half_close_reaches_the_client_which_still_sends(stack):
    b = TcpBackend("fin-first", handler=raw_fin_first)
    try:
        px = stack.poise([b.address], admin={})
        with raw_connect(px) as sock:
            sock.sendall(handshake_request(new_key()))
            stream = RawStream(sock.recv)
            start, _ = stream.head()
            assert start.startswith("HTTP/1.1 101"), start
            assert stream.frame() == (0x1, b"bye")
            assert stream.rest() == b""         # the backend's FIN, passed on
            sock.sendall(frame(b"after your fin") + frame(b"\x00" * 100_000, 0x2))
            sock.shutdown(socket.SHUT_WR)
            (conn,) = b.wait_accepted(1)
            wait_for(conn.closed.is_set, 10, "the backend's handler done")
        assert conn.frames == [(0x1, b"after your fin"), (0x2, b"\x00" * 100_000)]
        wait_in_flight(px, {b.address: 0})
    finally:
        b.stop()


# -- in flight for its whole life ------------------------------------------------------------------

def test_least_conn_counts_open_websockets_as_in_flight(stack):
    with ws_backends("a", "b") as (a, b):
        px = stack.poise([a.address, b.address], admin={}, cluster={"policy": "least_conn"})
        held: dict[str, list] = {"a": [], "b": []}

        def open_one():
            ws = client(px)
            ws.send(command("name"))
            name = ws.recv(timeout=10)
            held[name].append(ws)
            return name

        try:
            for _ in range(8):
                open_one()
            assert {k: len(v) for k, v in held.items()} == {"a": 4, "b": 4}
            wait_in_flight(px, {a.address: 4, b.address: 4})
            wait_for(lambda: metric(px, "poise_backend_in_flight", backend=a.address) == 4,
                     10, "poise_backend_in_flight of a", step=0.1)
            # b's WebSockets close: b then holds none, so every new one goes to b.
            for ws in held["b"]:
                ws.close()
            held["b"] = []
            b.wait_idle()
            wait_in_flight(px, {a.address: 4, b.address: 0})
            assert [open_one() for _ in range(4)] == ["b"] * 4
            wait_in_flight(px, {a.address: 4, b.address: 4})
        finally:
            for ws in held["a"] + held["b"]:
                ws.close()
        a.wait_idle()
        b.wait_idle()
        wait_in_flight(px, {a.address: 0, b.address: 0})


def test_an_open_websocket_holds_its_cluster_max_requests_slot(stack):
    with ws_backends("limited") as (b,):
        px = stack.poise([b.address], admin={}, cluster={"max_requests": 1})
        with client(px) as first:
            first.send("x")
            assert first.recv(timeout=10) == "x"
            with pytest.raises(InvalidStatus) as refused:
                client(px)
            assert refused.value.response.status_code == 503
            assert refused.value.response.headers["x-poise-limit"] == "max_requests"
        b.wait_idle()
        wait_in_flight(px, {b.address: 0})
        with client(px) as second:          # the slot was given back at the close
            second.send("y")
            assert second.recv(timeout=10) == "y"


# -- refused handshakes ------------------------------------------------------------------------------

def test_backend_refusing_the_handshake_gives_the_client_its_answer(stack):
    refuse = lambda connection, request: connection.respond(403, "no websockets here\n")  # noqa: E731
    with ws_backends("refuser", refuse=refuse) as (b,):
        px = stack.poise([b.address], admin={})
        with pytest.raises(InvalidStatus) as failed:
            client(px)
        response = failed.value.response
        assert response.status_code == 403
        assert response.body == b"no websockets here\n"
        # Raw: the 403 comes with connection: close, and what the client sent after the
        # handshake is never parsed as a request: the connection just closes.
        with raw_connect(px) as sock:
            sock.sendall(handshake_request(new_key(), "/first") +
                         b"GET /second HTTP/1.1\r\nHost: x\r\n\r\n")
            raw = read_until_close(sock)
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 403"), raw
        assert b"\r\nconnection: close" in head.lower(), raw
        assert body == b"no websockets here\n", raw
        assert [r.path for r in b.handshakes] == ["/", "/first"]
        assert b.sessions == []
        wait_in_flight(px, {b.address: 0})


def test_route_with_websocket_disabled_forwards_a_plain_get(stack):
    with ws_backends("nows") as (b,):
        px = stack.poise([b.address], listener={
            "routes": [{"cluster": "app", "websocket": {"enabled": False}}]})
        with pytest.raises(InvalidStatus) as failed:
            client(px, "/nope")
        assert failed.value.response.status_code == 426     # websockets: Upgrade Required
        (request,) = b.handshakes
        assert request.path == "/nope"
        assert "Upgrade" not in request.headers
        assert "upgrade" not in request.headers.get("Connection", "").lower()
        assert b.sessions == []
        # The connection closes after the answer (nothing after the handshake parsed).
        with raw_connect(px) as sock:
            sock.sendall(handshake_request(new_key()) + b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
            raw = read_until_close(sock)
        assert raw.startswith(b"HTTP/1.1 426") and raw.count(b"HTTP/1.1 ") == 1, raw
        assert len(b.handshakes) == 2


# -- idle_timeout and max_lifetime --------------------------------------------------------------------

@pytest.fixture(scope="module")
def timed(module_stack):
    with ws_backends("timed") as (b,):
        px = module_stack.poise([b.address], admin={}, listener={"routes": [
            {"match": {"path_prefix": "/idle"}, "cluster": "app",
             "websocket": {"idle_timeout": "500ms"}},
            {"match": {"path_prefix": "/life"}, "cluster": "app",
             "websocket": {"max_lifetime": "1s"}},
        ]})
        yield px, b


def _keep_busy(ws, seconds: float, step: float = 0.05) -> int:
    """Send a message every ``step`` for ``seconds`` and read its echo; how many."""
    n = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        ws.send(f"tick {n}")
        assert ws.recv(timeout=10) == f"tick {n}"
        n += 1
        time.sleep(step)
    return n


def test_idle_timeout_closes_an_idle_websocket_not_a_busy_one(timed):
    px, b = timed
    with client(px, "/idle/quiet") as quiet, client(px, "/idle/busy") as busy, \
            client(px, "/idle/listening") as listening:
        quiet.send("once")
        assert quiet.recv(timeout=10) == "once"
        # Traffic from the backend alone keeps a relay open too.
        listening.send(command("ticks 60 0.05"))
        # Busy for 3 s, six idle timeouts: still open.
        assert _keep_busy(busy, 3.0) >= 20
        closed = closed_within(quiet, 10)
        assert closed.rcvd is None, closed         # cut by poise: no close frame
        assert [listening.recv(timeout=10) for _ in range(60)] == [f"tick {i}" for i in range(60)]
        busy.send("after")
        assert busy.recv(timeout=10) == "after"
        listening.send("after")
        assert listening.recv(timeout=10) == "after"
    quiet_session = next(s for s in b.sessions if s.path == "/idle/quiet")
    assert quiet_session.wait_closed().close_code == 1006


def test_max_lifetime_closes_even_a_busy_websocket(timed):
    px, b = timed
    with client(px, "/life") as ws:
        n = 0
        with pytest.raises(ConnectionClosed) as closed:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                ws.send(f"tick {n}")
                assert ws.recv(timeout=10) == f"tick {n}"
                n += 1
                time.sleep(0.05)
        assert n >= 3, "it was busy before its max_lifetime"
        assert closed.value.rcvd is None, closed.value
    wait_in_flight(px, {b.address: 0})


# -- graceful stop and reload ---------------------------------------------------------------------------

def test_graceful_stop_lets_a_websocket_carry_on_until_drain_timeout(stack):
    with ws_backends("draining") as (b,):
        px = stack.poise([b.address], drain_timeout="2s")
        with client(px) as ws:
            ws.send("before")
            assert ws.recv(timeout=10) == "before"
            px.signal(signal.SIGTERM)
            # The listener stops accepting; the open WebSocket works on while draining.
            wait_for(lambda: _refused(px), 10, "the listener closed")
            for i in range(5):
                ws.send(f"draining {i}")
                assert ws.recv(timeout=10) == f"draining {i}"
            assert px.alive()
            closed = closed_within(ws, 15)
            assert closed.rcvd is None, closed      # cut at drain_timeout
        assert px.proc.wait(15) == 0
        px.returncode = 0
        (session,) = b.wait_sessions(1)
        assert session.wait_closed().close_code == 1006
        assert [m for m in session.messages if m.startswith("draining")] == \
            [f"draining {i}" for i in range(5)]


def _refused(px) -> bool:
    try:
        socket.create_connection(px.addr, timeout=1).close()
    except OSError:
        return True
    return False


def test_reload_keeping_the_listener_leaves_a_websocket_working(stack):
    with ws_backends("before", "after") as (b1, b2):
        px = stack.poise([b1.address], admin={})
        with client(px, "/kept") as ws:
            ws.send("one")
            assert ws.recv(timeout=10) == "one"
            config = copy.deepcopy(px.config)
            config["clusters"][0]["backends"] = [{"address": b2.address}]
            config["listeners"][0]["routes"][0]["websocket"] = {"idle_timeout": "10m"}
            r = px.reload(config)
            assert r.status == 200 and r.json()["applied"] is True, r
            px.wait_workers(config_version=r.json()["version"])
            for i in range(3):
                ws.send(f"after reload {i}")
                assert ws.recv(timeout=10) == f"after reload {i}"
            # New WebSockets go to the new backend.
            with client(px, "/new") as fresh:
                fresh.send(command("name"))
                assert fresh.recv(timeout=10) == "after"
            ws.close(4000, "done")
        (session,) = b1.wait_sessions(1)
        assert session.wait_closed().close_code == 4000
        assert session.messages == ["one", *(f"after reload {i}" for i in range(3))]


# -- TLS ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    p = Pki(tmp_path_factory.mktemp("wspki"))
    p.front = p.leaf("front", "poise.test", ["poise.test"], ips=["127.0.0.1"])
    p.backend = p.leaf("backend", "backend.test", ["backend.test"], ips=["127.0.0.1"])
    return p


@needs_openssl
@pytest.mark.parametrize("front,back", [(True, False), (False, True), (True, True)],
                         ids=["wss-front", "tls-backend", "tls-both"])
def test_websocket_over_tls(stack, pki, front, back):
    with ws_backends("tls", ssl=server_context(pki.backend) if back else None) as (b,):
        listener = ({"tls": {"certificates": [pki.front.model_dump()]}} if front else {})
        cluster = {"tls": {"ca": str(pki.ca), "sni": "backend.test"}} if back else {}
        px = stack.poise([b.address], admin={}, listener=listener, cluster=cluster)
        options = {}
        if front:
            ctx = ssl.create_default_context(cafile=str(pki.ca))
            options = {"ssl": ctx, "server_hostname": "poise.test", "scheme": "wss"}
        payload = os.urandom(3 * MiB + 1)
        with client(px, "/secure", compression=None, **options) as ws:
            ws.send("hello over tls")
            assert ws.recv(timeout=10) == "hello over tls"
            ws.send(payload)
            assert sha(ws.recv(timeout=30)) == sha(payload)
            ws.close(4001, "bye")
        (session,) = b.wait_sessions(1)
        assert (session.wait_closed().close_code, session.close_reason) == (4001, "bye")
        if front:
            assert b.handshakes[0].headers["X-Forwarded-Proto"] == "https"
        wait_in_flight(px, {b.address: 0})


# -- bytes around the switch ------------------------------------------------------------------------------

def test_frames_sent_before_the_101_reach_the_backend_after_it(echo_site):
    px, b = echo_site
    key = new_key()
    with raw_connect(px) as sock:
        # The handshake and two frames in one write: poise must keep the frames (not
        # parse them as HTTP) and send them on once the backend has switched.
        sock.sendall(handshake_request(key, "/early") + frame(b"early bird") +
                     frame(b"\x00\x01\x02", 0x2))
        stream = RawStream(sock.recv)
        start, headers = stream.head()
        assert start.startswith("HTTP/1.1 101"), start
        assert headers["upgrade"].lower() == "websocket"
        assert headers["connection"].lower() == "upgrade"
        assert headers["sec-websocket-accept"] == accept_key(key)
        assert stream.frame() == (0x1, b"early bird")
        assert stream.frame() == (0x2, b"\x00\x01\x02")
        sock.sendall(close_frame(1000, "done"))
        assert stream.frame() == (0x8, struct.pack("!H", 1000) + b"done")
        assert stream.rest() == b""             # then the connection closes
    (session,) = b.wait_sessions(1)
    assert session.messages == ["early bird", b"\x00\x01\x02"]
    assert session.wait_closed().close_code == 1000


@needs_openssl
@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_megabytes_sent_before_a_slow_101_arrive_intact(stack, pki, tls):
    payload = os.urandom(3 * MiB)

    def slow(connection, request):
        time.sleep(0.5)                     # poise holds what follows the handshake
    with ws_backends("slow101", refuse=slow, compression=None) as (b,):
        listener = {"tls": {"certificates": [pki.front.model_dump()]}} if tls else {}
        px = stack.poise([b.address], admin={}, listener=listener)
        sock = raw_connect(px)
        if tls:
            ctx = ssl.create_default_context(cafile=str(pki.ca))
            sock = ctx.wrap_socket(sock, server_hostname="poise.test")
        with sock:
            data = (handshake_request(new_key()) + frame(b"first") + frame(payload, 0x2) +
                    frame(b"last"))
            sender = threading.Thread(target=sock.sendall, args=(data,), daemon=True)
            sender.start()                  # (blocks until poise reads on after the 101)
            stream = RawStream(sock.recv)
            start, _ = stream.head()
            assert start.startswith("HTTP/1.1 101"), start
            assert stream.frame() == (0x1, b"first")
            opcode, echoed = stream.frame()
            assert (opcode, sha(echoed)) == (0x2, sha(payload))
            assert stream.frame() == (0x1, b"last")
            sender.join(10)
            sock.sendall(close_frame(1000))
            assert stream.frame() == (0x8, struct.pack("!H", 1000))
        (session,) = b.wait_sessions(1)
        assert [sha(m) for m in session.messages] == [sha("first"), sha(payload), sha("last")]
        wait_in_flight(px, {b.address: 0})


@pytest.mark.parametrize("pipelined", [True, False], ids=["pipelined", "keep-alive"])
def test_handshake_after_other_requests_on_the_same_connection(echo_site, pipelined):
    # The websockets backend answers a plain GET with 426; poise keeps the client's
    # connection open for the next request, the handshake.
    px, b = echo_site
    key = new_key()
    plain = b"GET /plain HTTP/1.1\r\nHost: x\r\n\r\n"
    upgrade = handshake_request(key, "/later") + frame(b"after a plain GET")
    with raw_connect(px) as sock:
        stream = RawStream(sock.recv)
        if pipelined:
            sock.sendall(plain + upgrade)
        else:
            sock.sendall(plain)
        start, headers = stream.head()
        assert start.startswith("HTTP/1.1 426"), start
        stream._take(int(headers["content-length"]))
        if not pipelined:
            sock.sendall(upgrade)
        start, headers = stream.head()
        assert start.startswith("HTTP/1.1 101"), start
        assert headers["sec-websocket-accept"] == accept_key(key)
        assert stream.frame() == (0x1, b"after a plain GET")
        sock.sendall(close_frame(1000))
        assert stream.frame() == (0x8, struct.pack("!H", 1000))
    (session,) = b.wait_sessions(1)
    assert session.path == "/later"
    assert session.messages == ["after a plain GET"]


def test_frames_sent_with_the_101_reach_the_client(stack):
    b = TcpBackend("greeter", handler=raw_greeting_echo)
    try:
        px = stack.poise([b.address])
        with client(px, compression=None) as ws:
            assert ws.recv(timeout=10) == "hello from greeter"
            ws.send("and back")
            assert ws.recv(timeout=10) == "and back"
    finally:
        b.stop()


# -- access log and metrics -------------------------------------------------------------------------------

def test_access_log_line_has_status_101_and_is_written_when_the_websocket_closes(stack, tmp_path):
    log_path = tmp_path / "access.log"
    with ws_backends("logged") as (b,):
        px = stack.poise([b.address], admin={},
                         access_log={"format": "json", "path": str(log_path)})

        def lines() -> list[dict]:
            try:
                return [json.loads(x) for x in log_path.read_text().splitlines()]
            except FileNotFoundError:
                return []

        with client(px, "/chat?room=1", compression=None) as ws:
            ws.send(b"z" * 10_000)
            assert ws.recv(timeout=10) == b"z" * 10_000
            # A plain GET (the backend answers 426) is logged while the WebSocket is
            # still open: the log is flushed, and has no line for the WebSocket yet.
            with raw_connect(px) as sock:
                sock.sendall(b"GET /plain HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                assert read_until_close(sock).startswith(b"HTTP/1.1 426")
            wait_for(lambda: any(x["path"] == "/plain" for x in lines()), 10,
                     lambda: f"the plain GET logged: {lines()}")
            assert [x for x in lines() if x["status"] == 101] == []
            ws.send(b"y" * 5_000)
            assert ws.recv(timeout=10) == b"y" * 5_000
        wait_for(lambda: any(x["status"] == 101 for x in lines()), 10,
                 lambda: f"the WebSocket logged: {lines()}")
        (line,) = [x for x in lines() if x["status"] == 101]
        assert (line["method"], line["path"], line["cluster"], line["upstream"]) == \
            ("GET", "/chat?room=1", "app", b.address)
        assert line["bytes_sent"] >= 15_000, line        # what was relayed to the client
        wait_for(lambda: metric(px, "poise_requests_total", code="101") == 1, 10,
                 "the WebSocket counted as a 101", step=0.1)
        assert metric(px, "poise_upstream_requests_total", code="101",
                      backend=b.address) == 1


# Regression: the access logs were closed before the relays cut at drain_timeout had
# ended (ProxyServer._finish), so their lines were lost.
def test_websocket_cut_at_drain_timeout_is_still_access_logged(stack, tmp_path):
    log_path = tmp_path / "access.log"
    with ws_backends("cut") as (b,):
        px = stack.poise([b.address], drain_timeout="500ms",
                         access_log={"format": "json", "path": str(log_path)})
        with client(px, "/cut") as ws:
            ws.send("x")
            assert ws.recv(timeout=10) == "x"
            px.signal(signal.SIGTERM)
            closed_within(ws, 10)
        assert px.proc.wait(15) == 0
        px.returncode = 0
        lines = [json.loads(x) for x in log_path.read_text().splitlines()]
        assert [(x["path"], x["status"]) for x in lines] == [("/cut", 101)]
