"""gRPC through poise: grpcio clients over HTTP/2 (h2c prior knowledge, or TLS with ALPN
h2) to a listener with ``http2: true``, and grpcio servers behind a cluster with
``protocol: h2`` — real processes over loopback.

- Calls: unary, server-streaming (1,000 messages), client-streaming, bidi ping-pong
  (each message answered before the next is sent), 4 MiB both ways, many calls at once
  on one channel; errors keep their code and details (INVALID_ARGUMENT as a
  trailers-only response, RESOURCE_EXHAUSTED after some messages); request metadata
  (text and binary, repeated keys) reaches the server, initial and trailing metadata
  the client.
- Balancing per call: round_robin spreads 300 calls of one channel (one HTTP/2
  connection to poise) evenly over three backends; least_conn sends new calls to the
  backend with the fewest open streams.
- Cancelling a call reaches the backend (its call ends cancelled).
- ``grpc-timeout``: a 300 ms deadline on a 3 s call ends the call (grpcio's own
  deadline: DEADLINE_EXCEEDED, or poise's 504 first: UNAVAILABLE), the backend's call
  ends cancelled and poise's in-flight count returns to 0; without a client-side
  deadline the call still ends with an answer (a 504, or grpc-status 4).
- Backends gone: calls fail over from a killed backend (connect refused); a backend
  dying mid-stream ends the call with an error, not a hang.
- ``health_check: {type: grpc}``: NOT_SERVING for the configured service takes a backend
  out (admin API: ``down`` with a reason) until SERVING again; ``service: ""`` asks
  about the server as a whole.
- TLS: to grpcio servers with ``ssl_server_credentials`` (``verify: false``, a CA
  with a grpc health check over TLS, and a CA that does not match: refused), and
  grpcio's ``ssl_channel_credentials`` to a TLS listener (ALPN h2 by default).
- An HTTP/1.1 client to an h2 cluster (a plain HTTP/2 server on the ``h2`` library):
  GET, POST with a length or chunked, response trailers as chunked trailers.
- A backend's SETTINGS_MAX_CONCURRENT_STREAMS: requests beyond it wait for a stream
  instead of failing.
- ``poise check``: ``protocol: h2`` with ``send_proxy_protocol`` is refused.

Backends are :mod:`tests.support.grpc_backend` processes (raw-bytes messages, no
protoc): the answer says which backend served a call.  Waits are bounded (every call
has a deadline far above what it needs), never timed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import queue
import random
import socket
import subprocess
import sys
import time
from collections import Counter
from concurrent import futures
from dataclasses import dataclass, field

import h11
import pytest
import yaml
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
)
from h2.settings import SettingCodes

from tests.support.certs import Pki, needs_openssl
from tests.support.grpc_backend import H2Backend, channel, grpc, grpc_backend
from tests.support.procs import POISE_SRC, Stack
from tests.support.tcp import metric
from tests.support.waiting import wait_for

MiB = 1 << 20
H2C = {"http2": True}
# Generous: a call that needs them has hung.
CALL = 20.0


def grpc_cluster(**fields) -> dict:
    return {"protocol": "h2", **fields}


def fast_grpc_check(service: str = "test.Echo", **fields) -> dict:
    return {"health_check": {"type": "grpc", "service": service, "interval": "200ms",
                             "timeout": "200ms", "jitter": 0, "rise": 1, "fall": 2,
                             **fields}}


def backends_of(px) -> dict[str, dict]:
    """The admin API's view of cluster ``app``'s backends, by address."""
    r = px.admin.get("/clusters/app")
    assert r.status == 200, r
    return {b["address"]: b for b in r.json()["backends"]}


def wait_state(px, backend, state: str, timeout: float = 10.0) -> dict:
    return wait_for(lambda: (e := backends_of(px)[backend.address])["state"] == state and e,
                    timeout, lambda: f"{backend} {state} (now {backends_of(px)})", step=0.05)


def wait_idle(px, timeout: float = 5.0) -> None:
    """Until no backend has a request in flight (the admin counts lag about 1 s)."""
    wait_for(lambda: all(b["in_flight"] == 0 for b in backends_of(px).values()), timeout,
             lambda: f"in_flight back to 0 (now {backends_of(px)})", step=0.05)


def code_of(call) -> tuple[grpc.StatusCode, str]:
    """Run ``call()``; the RpcError's code and details it must raise."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


@contextlib.contextmanager
def own_stack(tmp_path):
    """A Stack whose teardown checks (poise exited 0, no traceback) are part of the
    test itself, so that a test marked xfail for a poise bug fails there too."""
    s = Stack(tmp_path)
    failed = True
    try:
        yield s
        failed = False
    finally:
        problems = s.close()
        if not failed:
            assert problems == [], "\n\n".join(problems)


# -- a raw HTTP/2 client: what grpcio does not show ---------------------------------------------

@dataclass
class Reply:
    """One stream's answer as frames: the response head (``head_ended``: it carried
    END_STREAM, a trailers-only response), DATA, trailers, a reset code."""

    headers: dict[str, str] = field(default_factory=dict)
    head_ended: bool = False
    data: bytes = b""
    data_frames: int = 0
    trailers: dict[str, str] | None = None
    reset: int | None = None
    ended: bool = False
    closed: bool = False

    @property
    def status(self) -> int | None:
        return int(self.headers[":status"]) if ":status" in self.headers else None

    @property
    def grpc_status(self) -> str | None:
        where = self.trailers if self.trailers is not None else self.headers
        return where.get("grpc-status")


def grpc_message(payload: bytes) -> bytes:
    return b"\x00" + len(payload).to_bytes(4, "big") + payload


def raw_grpc(addr, path: str, payload: bytes = b"", headers=(), wait: float = 5.0) -> Reply:
    """One gRPC call on a fresh h2c connection, without a client-side deadline: the
    reply as it stands when the stream ends, is reset, or ``wait`` seconds pass."""
    conn = H2Connection(H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    conn.send_headers(1, [(":method", "POST"), (":scheme", "http"),
                          (":authority", "grpc.test"), (":path", path),
                          ("content-type", "application/grpc"), ("te", "trailers"),
                          *headers])
    conn.send_data(1, grpc_message(payload), end_stream=True)
    reply = Reply()
    deadline = time.monotonic() + wait
    with socket.create_connection(addr, timeout=wait) as sock:
        sock.sendall(conn.data_to_send())
        while not (reply.ended or reply.reset is not None or reply.closed):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            sock.settimeout(left)
            try:
                data = sock.recv(65536)
            except TimeoutError:
                break
            if not data:
                reply.closed = True
                break
            for ev in conn.receive_data(data):
                if isinstance(ev, ResponseReceived):
                    reply.headers = dict(ev.headers)
                    reply.head_ended = ev.stream_ended is not None
                elif isinstance(ev, DataReceived):
                    reply.data += ev.data
                    reply.data_frames += 1
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, TrailersReceived):
                    reply.trailers = dict(ev.headers)
                elif isinstance(ev, StreamEnded):
                    reply.ended = True
                elif isinstance(ev, StreamReset):
                    reply.reset = ev.error_code
                elif isinstance(ev, ConnectionTerminated):
                    reply.closed = True
            sock.sendall(conn.data_to_send())
    return reply


def burst(addr, n: int, wait: float = 10.0) -> Counter:
    """``n`` GET requests on one fresh h2c connection, all sent in one write: how their
    streams ended (a status, ``"reset"``, or ``"unanswered"`` after ``wait`` seconds)."""
    conn = H2Connection(H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    conn.update_settings({SettingCodes.MAX_CONCURRENT_STREAMS: 1000})
    sids = []
    for i in range(n):
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, [(":method", "GET"), (":scheme", "http"),
                                (":authority", "burst.test"), (":path", f"/burst/{i}")],
                          end_stream=True)
        sids.append(sid)
    status: dict[int, int] = {}
    outcome: dict[int, object] = {}
    deadline = time.monotonic() + wait
    with socket.create_connection(addr, timeout=wait) as sock:
        sock.sendall(conn.data_to_send())
        while len(outcome) < n and (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                data = sock.recv(65536)
            except TimeoutError:
                break
            if not data:
                break
            for ev in conn.receive_data(data):
                if isinstance(ev, ResponseReceived):
                    status[ev.stream_id] = int(dict(ev.headers)[":status"])
                elif isinstance(ev, DataReceived):
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, StreamEnded):
                    outcome[ev.stream_id] = status.get(ev.stream_id)
                elif isinstance(ev, StreamReset):
                    outcome[ev.stream_id] = "reset"
            sock.sendall(conn.data_to_send())
    return Counter(outcome.get(sid, "unanswered") for sid in sids)


# -- three grpcio backends behind one poise (round robin) ---------------------------------------

@pytest.fixture(scope="module")
def trio(module_stack):
    backends = [grpc_backend(module_stack, f"g{i}") for i in (1, 2, 3)]
    px = module_stack.poise([b.address for b in backends], listener=H2C,
                            cluster=grpc_cluster(), admin={})
    return px, backends


@pytest.fixture
def chan(trio):
    ch = channel(trio[0].addr)
    yield ch
    ch.close()


def test_unary(chan):
    assert chan.unary_unary("/test.Echo/Unary")(b"hello", timeout=CALL) in (
        b"g1:hello", b"g2:hello", b"g3:hello")


def test_error_keeps_code_and_details(chan):
    unary = chan.unary_unary("/test.Echo/Unary")
    assert code_of(lambda: unary(b"fail", timeout=CALL)) == (
        grpc.StatusCode.INVALID_ARGUMENT, "bad input")
    assert unary(b"ok", timeout=CALL).endswith(b":ok"), "the channel still works"


def test_error_is_relayed_as_a_trailers_only_response(trio):
    px, _ = trio
    reply = raw_grpc(px.addr, "/test.Echo/Unary", b"fail")
    assert reply.ended and reply.reset is None
    assert reply.head_ended, "one HEADERS frame with END_STREAM"
    assert reply.data_frames == 0 and reply.trailers is None
    assert reply.status == 200
    assert reply.headers["grpc-status"] == "3"
    assert reply.headers["grpc-message"] == "bad input"


def test_success_ends_with_trailers(trio):
    px, _ = trio
    reply = raw_grpc(px.addr, "/test.Echo/Unary", b"x")
    assert reply.ended and not reply.head_ended
    assert reply.status == 200 and reply.headers["content-type"] == "application/grpc"
    assert reply.data[5:].endswith(b":x")
    assert reply.trailers is not None and reply.trailers["grpc-status"] == "0"


def test_server_streaming_1000_messages(chan):
    stream = chan.unary_stream("/test.Echo/ServerStream")(b"1000", timeout=CALL)
    assert list(stream) == [b"%d" % i for i in range(1000)]


def test_client_streaming(chan):
    parts = [b"m%d" % i for i in range(500)]
    assert chan.stream_unary("/test.Echo/ClientStream")(iter(parts), timeout=CALL) == \
        b"500:" + b"|".join(parts)


def test_bidi_ping_pong_on_one_call(chan):
    """Each ping goes out only after the previous pong came back: a proxy that waited
    for the request's end (or held messages back) would hang this call."""
    pings: queue.Queue = queue.Queue()

    def requests():
        while (m := pings.get()) is not None:
            yield m

    responses = chan.stream_stream("/test.Echo/Bidi")(requests(), timeout=CALL)
    try:
        for i in range(100):
            pings.put(b"ping %d" % i)
            assert next(responses) == b"PING %d" % i
    finally:
        pings.put(None)
    assert list(responses) == []
    assert responses.code() == grpc.StatusCode.OK


def test_4mib_message_both_ways(chan):
    payload = random.Random(4).randbytes(4 * MiB)
    assert chan.unary_unary("/test.Echo/Echo")(payload, timeout=CALL) == payload


def test_large_messages_in_both_streams(chan):
    chunks = [random.Random(i).randbytes(MiB + i) for i in range(4)]
    got = list(chan.stream_stream("/test.Echo/Bidi")(iter(chunks), timeout=CALL))
    assert got == [c.upper() for c in chunks]


def test_abort_after_some_messages(chan):
    stream = chan.unary_stream("/test.Echo/StreamAbort")(b"50", timeout=CALL)
    got = []
    with pytest.raises(grpc.RpcError) as info:
        for m in stream:
            got.append(m)
    assert got == [b"%d" % i for i in range(50)]
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert info.value.details() == "gave up after 50"


def test_metadata_both_ways(chan):
    sent = [("x-request-id", "abc-123"), ("x-multi", "one"), ("x-multi", "two"),
            ("x-blob-bin", b"\x00\xff\x10")]
    body, call = chan.unary_unary("/test.Echo/Meta").with_call(b"", metadata=sent,
                                                               timeout=CALL)
    seen = [tuple(p) for p in json.loads(body)]
    assert ("x-request-id", "abc-123") in seen
    assert [v for k, v in seen if k == "x-multi"] == ["one", "two"]
    assert ("x-blob-bin", "00ff10") in seen, "binary metadata arrives intact"
    assert ("x-forwarded-for", "127.0.0.1") in seen
    initial = dict(call.initial_metadata())
    assert initial["x-initial"] in ("g1", "g2", "g3")
    trailing = dict(call.trailing_metadata())
    assert trailing["x-trailing"] == "done"
    assert trailing["x-bin-bin"] == b"\x00\x01\xff"


def test_many_calls_at_once_on_one_channel(chan):
    stream = chan.unary_stream("/test.Echo/ServerStream")

    def call(n: int) -> list[bytes]:
        return list(stream(b"%d" % n, timeout=CALL))

    with futures.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(call, range(100, 164)))
    assert results == [[b"%d" % i for i in range(n)] for n in range(100, 164)]


def test_client_cancel_reaches_the_backend(trio, chan):
    px, backends = trio
    before = {b.name: b.stats()["cancelled"] for b in backends}
    call = chan.unary_stream("/test.Echo/Hold")(b"", timeout=CALL)
    name = next(call).decode()
    call.cancel()
    b = next(b for b in backends if b.name == name)
    wait_for(lambda: b.stats()["cancelled"] == before[name] + 1, 5,
             "the backend's call cancelled")
    wait_idle(px)


# -- balancing per call -------------------------------------------------------------------------

def test_round_robin_spreads_the_calls_of_one_channel(stack, trio):
    """An L4 balancer pins a gRPC channel (one connection) to one backend; poise
    balances its calls, over one multiplexed connection per backend."""
    _, backends = trio
    px = stack.poise([b.address for b in backends], listener=H2C, cluster=grpc_cluster(),
                     admin={})
    # (Poise.start's readiness connect is one connection already.)
    wait_for(lambda: metric(px, "poise_connections_total") >= 1, 5, "the first connection",
             step=0.1)
    before = metric(px, "poise_connections_total")
    ch = channel(px.addr)
    try:
        whoami = ch.unary_unary("/test.Echo/Whoami")
        served = Counter(whoami(b"", timeout=CALL) for _ in range(300))
    finally:
        ch.close()
    assert set(served) == {b"g1", b"g2", b"g3"}
    assert all(90 <= n <= 110 for n in served.values()), served
    wait_for(lambda: metric(px, "poise_connections_total") > before, 5,
             "the channel's connection counted", step=0.1)
    assert metric(px, "poise_connections_total") == before + 1, \
        "all 300 calls came on one connection"
    for b in backends:
        wait_for(lambda b=b: metric(px, "poise_upstream_connections_active",
                                    backend=b.address) >= 1, 5, step=0.1)
        assert metric(px, "poise_upstream_connections_active", backend=b.address) == 1, \
            f"{b}: its calls share one HTTP/2 connection"


def test_least_conn_sends_new_calls_to_the_less_loaded_backend(stack, trio):
    _, backends = trio
    px = stack.poise([b.address for b in backends], listener=H2C,
                     cluster=grpc_cluster(policy="least_conn"), admin={})
    ch = channel(px.addr)
    held = []
    try:
        hold = ch.unary_stream("/test.Echo/Hold")
        for _ in range(6):
            call = hold(b"", timeout=CALL)
            held.append((next(call), call))
        assert Counter(name for name, _ in held) == {b"g1": 2, b"g2": 2, b"g3": 2}
        # End one of g2's streams: g2 has 1 open, the others 2.
        name, call = next((n, c) for n, c in held if n == b"g2")
        call.cancel()
        g2 = backends[1]
        wait_for(lambda: backends_of(px)[g2.address]["in_flight"] == 1, 5,
                 lambda: f"g2 with one stream (now {backends_of(px)})", step=0.05)
        whoami = ch.unary_unary("/test.Echo/Whoami")
        assert [whoami(b"", timeout=CALL) for _ in range(20)] == [b"g2"] * 20
    finally:
        for _, call in held:
            call.cancel()
        ch.close()
    wait_idle(px)


# -- grpc-timeout ---------------------------------------------------------------------------

def test_grpc_deadline_ends_the_call_and_frees_the_stream(stack, trio):
    """grpcio sends ``grpc-timeout``: its own deadline and poise's (a 504, which grpcio
    reads as UNAVAILABLE) race; either ends the call, and the backend's call ends
    cancelled (by RST_STREAM, or its own copy of the deadline).

    (``request_timeout`` is set, far longer: see the test below for the default.)"""
    _, backends = trio
    px = stack.poise([backends[0].address], listener=H2C,
                     cluster=grpc_cluster(request_timeout="30s"), admin={})
    before = backends[0].stats()["cancelled"]
    ch = channel(px.addr)
    try:
        code, details = code_of(
            lambda: ch.unary_unary("/test.Echo/Sleep")(b"3", timeout=0.3))
    finally:
        ch.close()
    assert code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE), \
        (code, details)
    wait_for(lambda: backends[0].stats()["cancelled"] == before + 1, 5,
             "the backend's call cancelled")
    wait_idle(px)


@pytest.mark.parametrize("request_timeout", [
    "30s",
    None,   # (regression: deadline_error formatted a None request_timeout)
])
def test_grpc_timeout_alone_is_poises_deadline(tmp_path, request_timeout):
    """No client-side deadline: ``grpc-timeout: 300m`` alone must end the call long
    before the backend's 10 s are up — poise's 504, or the backend's own grpc-status 4
    (grpcio servers read the header too) relayed — and free poise's stream."""
    extra = {} if request_timeout is None else {"request_timeout": request_timeout}
    with own_stack(tmp_path) as s:
        b = grpc_backend(s, "slow")
        px = s.poise([b.address], listener=H2C, cluster=grpc_cluster(**extra), admin={})
        reply = raw_grpc(px.addr, "/test.Echo/Sleep", b"10",
                         headers=[("grpc-timeout", "300m")], wait=5)
        assert reply.ended or reply.reset is not None, f"no answer within 5s: {reply}"
        assert reply.status == 504 or reply.grpc_status == "4", reply
        wait_for(lambda: b.stats()["cancelled"] == 1, 5, "the backend's call cancelled")
        wait_idle(px)
        # A deadline long enough does not get in the way.
        reply = raw_grpc(px.addr, "/test.Echo/Unary", b"x", headers=[("grpc-timeout", "5S")])
        assert reply.trailers is not None and reply.trailers["grpc-status"] == "0", reply


# -- backends gone ----------------------------------------------------------------------------

def test_calls_fail_over_from_a_killed_backend(stack):
    backends = [grpc_backend(stack, f"k{i}") for i in (1, 2, 3)]
    px = stack.poise([b.address for b in backends], listener=H2C, cluster=grpc_cluster(),
                     admin={})
    ch = channel(px.addr)
    try:
        whoami = ch.unary_unary("/test.Echo/Whoami")
        assert set(whoami(b"", timeout=CALL) for _ in range(30)) == {b"k1", b"k2", b"k3"}
        backends[1].kill()
        served = Counter(whoami(b"", timeout=CALL) for _ in range(60))
    finally:
        ch.close()
    assert set(served) == {b"k1", b"k3"}, served
    assert sum(served.values()) == 60, "every call succeeded"
    wait_for(lambda: backends_of(px)[backends[1].address]["errors"] >= 1, 5,
             "connect failures counted against the killed backend", step=0.1)


@pytest.mark.parametrize("method", ["Hold", "ServerStream"])
def test_backend_dying_mid_stream_is_an_error_not_a_hang(stack, method):
    backends = [grpc_backend(stack, f"d{i}") for i in (1, 2)]
    px = stack.poise([b.address for b in backends], listener=H2C, cluster=grpc_cluster(),
                     admin={})
    ch = channel(px.addr)
    try:
        if method == "Hold":
            call = ch.unary_stream("/test.Echo/Hold")(b"", timeout=CALL)
            name = next(call)
            victim = next(b for b in backends if b.name.encode() == name)
        else:
            # 2 million messages: far more than can be in flight when the kill lands.
            call = ch.unary_stream("/test.Echo/ServerStream")(b"2000000", timeout=CALL)
            assert next(call) == b"0"
            victim = next(b for b in backends if b.stats()["active"] == 1)
        victim.kill()
        with pytest.raises(grpc.RpcError) as info:
            for _ in call:
                pass
        assert info.value.code() in (grpc.StatusCode.UNAVAILABLE,
                                     grpc.StatusCode.INTERNAL), info.value
        survivor = next(b for b in backends if b is not victim)
        whoami = ch.unary_unary("/test.Echo/Whoami")
        assert {whoami(b"", timeout=CALL) for _ in range(4)} == {survivor.name.encode()}
    finally:
        ch.close()
    wait_idle(px)


# -- health checks of type grpc -----------------------------------------------------------------

def test_not_serving_backend_is_taken_out_and_brought_back(stack):
    backends = [grpc_backend(stack, f"h{i}") for i in (1, 2, 3)]
    h3 = backends[2]
    px = stack.poise([b.address for b in backends], listener=H2C,
                     cluster=grpc_cluster(**fast_grpc_check("test.Echo")), admin={})
    wait_for(lambda: all(b.stats()["health_checks"] >= 2 for b in backends), 10,
             "health checks of every backend")
    for b in backends:
        wait_state(px, b, "up")

    h3.set_health("NOT_SERVING", "test.Echo")
    entry = wait_state(px, h3, "down")
    assert entry["reason"] and "not serving" in entry["reason"], entry
    h3.reset()
    ch = channel(px.addr)
    try:
        whoami = ch.unary_unary("/test.Echo/Whoami")
        assert set(whoami(b"", timeout=CALL) for _ in range(30)) == {b"h1", b"h2"}
        assert h3.calls("Whoami") == 0, "a call reached a backend marked down"

        h3.set_health("SERVING", "test.Echo")
        wait_state(px, h3, "up")
        served = Counter(whoami(b"", timeout=CALL) for _ in range(30))
    finally:
        ch.close()
    assert served[b"h3"] >= 5, served


def test_empty_service_checks_the_server_as_a_whole(stack):
    b = grpc_backend(stack, "whole")
    px = stack.poise([b.address], listener=H2C, cluster=grpc_cluster(**fast_grpc_check("")),
                     admin={})
    wait_state(px, b, "up")
    # A service of the server says NOT_SERVING: the server as a whole still serves.
    b.set_health("NOT_SERVING", "test.Echo")
    seen = b.stats()["health_checks"]
    # Enough checks for `fall` (2) and for the admin API's view to catch up (~1 s).
    wait_for(lambda: b.stats()["health_checks"] >= seen + 8, 10, "eight more checks")
    assert backends_of(px)[b.address]["state"] == "up"
    ch = channel(px.addr)
    try:    # (its only backend down, poise would answer 503: UNAVAILABLE)
        assert ch.unary_unary("/test.Echo/Unary")(b"up", timeout=CALL) == b"whole:up"
    finally:
        ch.close()

    b.set_health("NOT_SERVING", "")
    entry = wait_state(px, b, "down")
    assert "not serving" in entry["reason"], entry
    b.set_health("SERVING", "")
    wait_state(px, b, "up")


def test_unknown_service_is_down_with_the_grpc_status(stack):
    b = grpc_backend(stack, "nosvc")
    px = stack.poise([b.address], listener=H2C,
                     cluster=grpc_cluster(**fast_grpc_check("no.such.Service")), admin={})
    entry = wait_state(px, b, "down")
    assert "grpc-status 5" in entry["reason"], entry


# -- TLS ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    p = Pki(tmp_path_factory.mktemp("pki"))
    p.backend = p.leaf("backend", "backend.example", ["backend.example"], ips=["127.0.0.1"])
    p.front = p.leaf("front", "poise.example", ["poise.example"], ips=["127.0.0.1"])
    p.stranger = Pki(tmp_path_factory.mktemp("stranger"), "stranger CA")
    return p


@needs_openssl
def test_tls_to_grpc_backends(stack, pki):
    b = grpc_backend(stack, "secure", tls=(pki.backend.cert, pki.backend.key))
    unverified = stack.poise([b.address], listener=H2C,
                             cluster=grpc_cluster(tls={"verify": False}))
    verified = stack.poise([b.address], listener=H2C, admin={}, cluster=grpc_cluster(
        tls={"ca": str(pki.ca), "sni": "backend.example"}, **fast_grpc_check()))
    wrong_ca = stack.poise([b.address], listener=H2C,
                           cluster=grpc_cluster(tls={"ca": str(pki.stranger.ca)}))
    for px in (unverified, verified):
        ch = channel(px.addr)
        try:
            assert ch.unary_unary("/test.Echo/Unary")(b"tls", timeout=CALL) == b"secure:tls"
            assert list(ch.unary_stream("/test.Echo/ServerStream")(b"100", timeout=CALL)) \
                == [b"%d" % i for i in range(100)]
        finally:
            ch.close()
    # The grpc health check goes over TLS (ALPN h2) too.
    wait_state(verified, b, "up")
    ch = channel(wrong_ca.addr)
    try:
        code, _ = code_of(lambda: ch.unary_unary("/test.Echo/Unary")(b"x", timeout=CALL))
    finally:
        ch.close()
    assert code == grpc.StatusCode.UNAVAILABLE, "a backend certificate of another CA"
    wrong_ca.wait_log(r"certificate verify failed")


@needs_openssl
def test_grpc_client_over_tls_to_an_http2_listener(stack, pki, trio):
    _, backends = trio
    # (ALPN offers h2 by default on a listener with http2)
    listener = {"http2": True, "tls": {"certificates": [pki.front.model_dump()]}}
    px = stack.poise([b.address for b in backends], listener=listener,
                     cluster=grpc_cluster())
    creds = grpc.ssl_channel_credentials(root_certificates=pki.ca.read_bytes())
    for authority in (None, "poise.example"):
        ch = channel(px.addr, credentials=creds, authority=authority)
        try:
            assert ch.unary_unary("/test.Echo/Unary")(b"s", timeout=CALL).endswith(b":s")
            assert ch.stream_unary("/test.Echo/ClientStream")(
                iter([b"a", b"b"]), timeout=CALL) == b"2:a|b"
        finally:
            ch.close()
    untrusted = grpc.ssl_channel_credentials(root_certificates=pki.stranger.ca.read_bytes())
    ch = channel(px.addr, credentials=untrusted)
    try:
        code, _ = code_of(lambda: ch.unary_unary("/test.Echo/Unary")(b"s", timeout=5))
    finally:
        ch.close()
    assert code == grpc.StatusCode.UNAVAILABLE, "the client did check poise's certificate"


# -- an HTTP/1.1 client to an HTTP/2 backend ----------------------------------------------------

def h1_exchange(addr, method: str, target: str, *, body: bytes | None = None,
                chunks: list[bytes] | None = None) -> tuple[h11.Response, bytes, list]:
    """One HTTP/1.1 request: the response head, body and trailer fields."""
    conn = h11.Connection(h11.CLIENT)
    headers = [("Host", "h1.example"), ("TE", "trailers")]
    if body is not None:
        headers.append(("Content-Length", str(len(body))))
    if chunks is not None:
        headers.append(("Transfer-Encoding", "chunked"))
    out = conn.send(h11.Request(method=method, target=target, headers=headers))
    for part in ([body] if body else []) + (chunks or []):
        out += conn.send(h11.Data(data=part))
    out += conn.send(h11.EndOfMessage())
    with socket.create_connection(addr, timeout=CALL) as sock:
        sock.sendall(out)
        head, data = None, b""
        while True:
            ev = conn.next_event()
            if ev is h11.NEED_DATA:
                received = sock.recv(65536)
                assert received, "poise closed the connection mid-response"
                conn.receive_data(received)
            elif isinstance(ev, h11.Response):
                head = ev
            elif isinstance(ev, h11.Data):
                data += ev.data
            elif isinstance(ev, h11.EndOfMessage):
                return head, data, [(k.decode(), v.decode()) for k, v in ev.headers]


@pytest.fixture(scope="module")
def h2_site(module_stack):
    b = H2Backend("plain-h2")
    module_stack.backends.append(b)
    px = module_stack.poise([b.address], cluster=grpc_cluster())
    return px, b


def test_http1_get_to_an_h2_backend(h2_site):
    px, b = h2_site
    head, body, trailers = h1_exchange(px.addr, "GET", "/a/b?c=d")
    assert head.status_code == 200
    assert dict(head.headers)[b"x-backend"] == b"plain-h2"
    seen = json.loads(body)
    assert (seen["method"], seen["path"], seen["body"]) == ("GET", "/a/b?c=d", "")
    assert trailers == []
    assert not b.errors


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_http1_post_to_an_h2_backend(h2_site, framing):
    px, b = h2_site
    payload = random.Random(7).randbytes(300_000).hex().encode()[:300_000]
    if framing == "length":
        head, body, _ = h1_exchange(px.addr, "POST", "/upload", body=payload)
    else:
        parts = [payload[i:i + 70_000] for i in range(0, len(payload), 70_000)]
        head, body, _ = h1_exchange(px.addr, "POST", "/upload", chunks=parts)
    assert head.status_code == 200
    assert dict(head.headers).get(b"transfer-encoding") == b"chunked"
    seen = json.loads(body)
    assert seen["method"] == "POST" and seen["size"] == len(payload)
    assert seen["sha256"] == hashlib.sha256(payload).hexdigest()
    names = {k for k, _ in seen["headers"]}
    assert "transfer-encoding" not in names and "te" not in names
    assert not b.errors


def test_http1_client_gets_response_trailers_as_chunked_trailers(h2_site):
    px, b = h2_site
    head, body, trailers = h1_exchange(px.addr, "POST", "/trailers", chunks=[b"ab", b"cde"])
    assert head.status_code == 200
    assert json.loads(body)["body"] == "abcde"
    assert trailers == [("x-checksum", "5"), ("x-done", "yes")]


# Regression: streams opened beyond the backend's limit before its SETTINGS came back
# were refused (REFUSED_STREAM → 502), and jh2 raised KeyError in StreamWriter.on_data
# for a stream it had dropped.
def test_backend_stream_limit_holds_requests_back(tmp_path):
    """A backend allowing 2 streams at once (answering them in pairs, as a busy server
    does): 12 requests arriving together on one client connection all get answers, at
    first contact and on warm connections."""
    with own_stack(tmp_path) as s:
        b = H2Backend("two-at-a-time", max_streams=2, batch=2, delay=0.01)
        s.backends.append(b)
        px = s.poise([b.address], listener=H2C, cluster=grpc_cluster())
        assert burst(px.addr, 12) == {200: 12}, f"refused by the backend: {b.refused}"
        for _ in range(3):
            assert burst(px.addr, 12) == {200: 12}
        assert b.errors == []


# -- poise check ----------------------------------------------------------------------------

def check(tmp_path, listener: dict | None = None, **cluster) -> subprocess.CompletedProcess:
    config = {"listeners": [{"name": "web", "bind": "127.0.0.1:8080", "protocol": "http",
                             **(listener or {}), "routes": [{"cluster": "app"}]}],
              "clusters": [{"name": "app", "backends": [{"address": "127.0.0.1:9001"}],
                            **cluster}]}
    path = tmp_path / "poise.yaml"
    path.write_text(yaml.safe_dump(config))
    return subprocess.run([sys.executable, "-m", "poise", "check", str(path)],
                          capture_output=True, text=True, timeout=60, cwd=POISE_SRC)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_check_refuses_h2_with_send_proxy_protocol(tmp_path, version):
    done = check(tmp_path, protocol="h2", send_proxy_protocol=version)
    assert done.returncode == 2, done
    assert "protocol h2 and send_proxy_protocol exclude each other" in done.stderr
    assert "Traceback" not in done.stderr


def test_check_accepts_an_h2_cluster_with_a_grpc_check(tmp_path):
    done = check(tmp_path, listener={"http2": True}, protocol="h2",
                 health_check={"type": "grpc", "service": "test.Echo"})
    assert done.returncode == 0, done.stderr
    assert check(tmp_path, protocol="h3").returncode == 2
