"""gRPC health checks (``type: grpc``): the probe's hand-made protobuf, and probes of a
real grpcio server running the standard ``grpc.health.v1`` servicer.

- ``health_request`` frames ``HealthCheckRequest{service}`` exactly as protobuf (the
  generated ``health_pb2``) encodes it, behind gRPC's 5-byte length prefix.
- ``serving_status`` reads ``HealthCheckResponse.status`` from a framed message: every
  status, the field absent (UNKNOWN), unknown fields of every wire type skipped, and
  None for what is not such a message (compressed flag, truncated prefix, message,
  varint or length-delimited field).
- :class:`GrpcProbe` against grpcio (h2c): SERVING passes ("serving"), NOT_SERVING and
  an unknown service fail with their reasons, ``""`` asks about the server as a whole;
  a refused connect, a connect that never completes, a server that never answers or
  closes at once, and HTTP/1.1 servers fail with short reasons; each probe opens a
  connection of its own and closes it.
- The checker flips a backend down on NOT_SERVING and up again on SERVING.
"""

from __future__ import annotations

import asyncio
from concurrent import futures

import pytest

from poise.checks import CheckSettings
from poise.checks.grpc_probe import GrpcProbe, health_request, serving_status
from poise.core.backend import Backend
from tests.checks.servers import Changes, ok_response, wait_for
from tests.support.grpc_backend import grpc, health, health_pb2, health_pb2_grpc

STATUS = health_pb2.HealthCheckResponse.ServingStatus
GRPC = dict(type="grpc", interval=0.03, timeout=2.0, jitter=0.1, rise=2, fall=2)


def framed(message: bytes, compressed: int = 0) -> bytes:
    """A gRPC length-prefixed message."""
    return bytes([compressed]) + len(message).to_bytes(4, "big") + message


def response(status: int) -> bytes:
    return framed(health_pb2.HealthCheckResponse(status=status).SerializeToString())


# -- health_request --------------------------------------------------------------------------

@pytest.mark.parametrize("service", ["", "test.Echo", "grpc.health.v1.Health", "x" * 200,
                                     "dienst.überall", "s" * 20_000])
def test_health_request_is_protobufs_encoding_framed(service):
    expected = health_pb2.HealthCheckRequest(service=service).SerializeToString()
    assert health_request(service) == framed(expected)


def test_health_request_examples():
    assert health_request("") == b"\x00\x00\x00\x00\x00"
    assert health_request("a.B") == b"\x00\x00\x00\x00\x05\x0a\x03a.B"
    # A 200-byte name: its length is a two-byte varint (0xc8 0x01).
    assert health_request("x" * 200)[5:8] == b"\x0a\xc8\x01"


# -- serving_status --------------------------------------------------------------------------

@pytest.mark.parametrize("status", [0, 1, 2, 3])
def test_serving_status_reads_every_status(status):
    assert serving_status(response(status)) == status


def test_serving_status_absent_field_is_unknown():
    assert serving_status(framed(b"")) == 0
    assert serving_status(b"\x00\x00\x00\x00\x00") == 0


def test_serving_status_of_an_unlisted_value():
    assert serving_status(framed(b"\x08\x07")) == 7
    assert serving_status(framed(b"\x08\xac\x02")) == 300


def test_serving_status_non_minimal_varint():
    assert serving_status(framed(b"\x08\x81\x80\x00")) == 1


def test_serving_status_last_of_repeated_field_wins():
    # protobuf: for a scalar field seen twice, the last value wins.
    assert serving_status(framed(b"\x08\x02\x08\x01")) == 1


@pytest.mark.parametrize("unknown", [
    b"\x10\x05",                        # field 2, varint
    b"\x10\xff\xff\xff\xff\x0f",        # field 2, a long varint
    b"\x1a\x03abc",                     # field 3, length-delimited
    b"\x1a\x00",                        # field 3, empty
    b"\xa2\x06\x02hi",                  # field 100, length-delimited
], ids=["varint", "long-varint", "bytes", "empty-bytes", "field-100"])
def test_serving_status_skips_unknown_fields(unknown):
    assert serving_status(framed(unknown + b"\x08\x01")) == 1
    assert serving_status(framed(b"\x08\x01" + unknown)) == 1
    assert serving_status(framed(b"\x08\x01" + unknown + b"\x08\x02")) == 2


@pytest.mark.parametrize("unknown", [
    b"\x11" + b"\x00" * 8,              # field 2, fixed64 (wire type 1)
    b"\x15" + b"\x00" * 4,              # field 2, fixed32 (wire type 5)
], ids=["fixed64", "fixed32"])
# (Regression: serving_status refused wire types 1 and 5 instead of skipping them.)
def test_serving_status_skips_unknown_fixed_width_fields(unknown):
    """A newer server may add fields of any type; protobuf parsers skip them all."""
    message = b"\x08\x01" + unknown
    assert health_pb2.HealthCheckResponse.FromString(message).status == 1
    assert serving_status(framed(message)) == 1


def test_serving_status_of_a_real_servers_encoding_with_unknown_fields():
    """What protobuf itself writes when it keeps unknown fields around."""
    message = health_pb2.HealthCheckResponse(status=STATUS.Value("NOT_SERVING"))
    raw = message.SerializeToString() + b"\x10\x09\x1a\x01z"
    assert serving_status(framed(raw)) == 2


@pytest.mark.parametrize("body", [
    b"",                                # nothing
    b"\x00\x00\x00",                    # a truncated prefix
    b"\x00\x00\x00\x00",
    framed(b"\x08\x01", compressed=1),  # compressed: not readable without the codec
    b"\x02\x00\x00\x00\x02\x08\x01",    # an invalid flag byte
    b"\x00\x00\x00\x00\x05\x08\x01",    # shorter than its prefix says
    framed(b"\x08"),                    # a key without its value
    framed(b"\x08\x81"),                # a truncated varint value
    framed(b"\x80"),                    # a truncated key
    framed(b"\x08" + b"\xff" * 10 + b"\x01"),   # a varint longer than 64 bits
    framed(b"\x1a"),                    # a length-delimited field without its length
    framed(b"\x0b\x08\x01\x0c"),        # groups (wire types 3 and 4) are not valid here
    framed(b"\x0e\x01"),                # wire type 6 does not exist
], ids=["empty", "prefix-3", "prefix-4", "compressed", "bad-flag", "short-message",
        "key-only", "truncated-varint", "truncated-key", "varint-too-long",
        "bytes-no-length", "group", "wire-type-6"])
def test_serving_status_malformed_is_none(body):
    assert serving_status(body) is None


@pytest.mark.parametrize("message", [
    b"\x08\x01\x1a\x05ab",              # a field 3 of 5 bytes with 2 present
    b"\x1a\x05ab",
    b"\x08\x01\x1a\xff\xff\xff\xff\x0f",    # a length far beyond the message
], ids=["after-status", "alone", "huge-length"])
# (Regression: serving_status did not check that a length-delimited field fits.)
def test_serving_status_truncated_length_delimited_field_is_none(message):
    """A length-delimited field running past the message's end is a broken message
    (protobuf refuses it), not a status."""
    with pytest.raises(Exception):  # noqa: B017 (protobuf's DecodeError)
        health_pb2.HealthCheckResponse.FromString(message)
    assert serving_status(framed(message)) is None


def test_serving_status_reads_only_the_first_message():
    assert serving_status(response(1) + response(2)) == 1


# -- probes of a real grpcio health server ---------------------------------------------------

class GrpcHealthServer:
    """A grpcio server (its own threads) with the standard health servicer: ``""`` and
    ``test.Echo`` SERVING until :meth:`set` says otherwise; counts Check calls."""

    def __init__(self) -> None:
        outer = self
        self.checks = 0
        self.services: list[str] = []
        self.peers: set[str] = set()

        class Counting(health.HealthServicer):
            def Check(self, request, context):
                outer.checks += 1
                outer.services.append(request.service)
                outer.peers.add(context.peer())
                return super().Check(request, context)

        self.servicer = Counting()
        self.server = grpc.server(futures.ThreadPoolExecutor(4))
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.set("", "SERVING")
        self.set("test.Echo", "SERVING")
        self.server.start()

    def set(self, service: str, status: str) -> None:
        self.servicer.set(service, STATUS.Value(status))

    @property
    def backend(self) -> Backend:
        return Backend("127.0.0.1", self.port)

    def stop(self) -> None:
        self.server.stop(0).wait(5)


@pytest.fixture(scope="module")
def grpc_server():
    s = GrpcHealthServer()
    yield s
    s.stop()


@pytest.fixture
def health_server(grpc_server):
    """The module's server, with both services SERVING again."""
    grpc_server.set("", "SERVING")
    grpc_server.set("test.Echo", "SERVING")
    return grpc_server


async def probe(backend: Backend, **settings) -> tuple[bool, str]:
    """One GrpcProbe run: its ``(ok, reason)``."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future = loop.create_future()
    options = {"type": "grpc", "timeout": 2.0, **settings}
    p = GrpcProbe(backend, CheckSettings(**options),
                  lambda ok, reason: done.set_result((ok, reason)), loop=loop)
    p.run()
    try:
        return await asyncio.wait_for(done, options["timeout"] + 5)
    finally:
        p.close()


async def test_serving_server_passes(health_server):
    before = health_server.checks
    assert await probe(health_server.backend) == (True, "serving")
    assert await probe(health_server.backend, service="test.Echo") == (True, "serving")
    assert health_server.checks == before + 2
    assert health_server.services[-2:] == ["", "test.Echo"]


async def test_not_serving_fails_with_its_reason(health_server):
    health_server.set("test.Echo", "NOT_SERVING")
    assert await probe(health_server.backend, service="test.Echo") == (False, "not serving")
    # The server as a whole ("") is still serving.
    assert await probe(health_server.backend) == (True, "serving")
    health_server.set("", "NOT_SERVING")
    assert await probe(health_server.backend) == (False, "not serving")


async def test_unknown_status_values_fail(health_server):
    health_server.set("test.Echo", "UNKNOWN")
    assert await probe(health_server.backend, service="test.Echo") == (False, "unknown")
    health_server.set("test.Echo", "SERVICE_UNKNOWN")
    assert await probe(health_server.backend, service="test.Echo") == \
        (False, "service unknown")


async def test_unregistered_service_fails_with_grpc_status(health_server):
    # grpcio's servicer answers NOT_FOUND (5) for a service it was never told about.
    ok, reason = await probe(health_server.backend, service="no.such.Service")
    assert not ok
    assert reason.startswith("grpc-status 5"), reason


async def test_authority_is_the_check_host(health_server):
    """``host`` is the :authority (grpcio accepts any); the probe still passes."""
    assert await probe(health_server.backend, host="svc.internal") == (True, "serving")


async def test_each_probe_uses_a_new_connection(health_server):
    before = len(health_server.peers)
    for _ in range(3):
        assert (await probe(health_server.backend))[0]
    assert len(health_server.peers) == before + 3, "one connection per probe"


async def test_refused_connect(refused_port):
    assert await probe(Backend("127.0.0.1", refused_port)) == (False, "connect refused")


async def test_connect_that_never_completes_times_out(blackhole):
    ok, reason = await probe(Backend("127.0.0.1", blackhole), timeout=0.2)
    assert not ok
    assert reason in ("timeout", "connect timeout"), reason


async def test_server_that_never_answers_times_out(server):
    server.respond = lambda server, conn, head: None     # accepts, reads, stays silent
    assert await probe(server.backend, timeout=0.2) == (False, "timeout")
    await wait_for(lambda: server.open == 0, what="the probe's connection closed")


async def test_http1_server_that_refuses_the_preface(server):
    """An HTTP/1.1 server answers the connection preface with 400 and closes."""
    def refuse(server, conn, head):
        conn.transport.write(ok_response(400, b"bad request"))
        conn.transport.close()
    server.respond = refuse
    ok, reason = await probe(server.backend)
    assert not ok
    assert reason == "connection closed" or reason.startswith("http2 error"), reason


async def test_http1_server_that_keeps_the_connection_fails(server):
    """An HTTP/1.1 answer on an open connection is no HTTP/2 server preface: the
    probe fails (the codec waits for the rest of a "frame" that never comes, so the
    reason is the timeout)."""
    server.respond = lambda server, conn, head: ok_response(200)
    ok, reason = await probe(server.backend, timeout=0.3)
    assert not ok
    assert reason == "timeout" or reason.startswith("http2 error"), reason


async def test_server_that_closes_at_once(server):
    server.respond = lambda server, conn, head: conn.transport.close()
    assert await probe(server.backend) == (False, "connection closed")


async def test_checker_flips_on_serving_status(health_server, make_checker):
    changes = Changes()
    b = health_server.backend
    checker = make_checker(CheckSettings(**GRPC, service="test.Echo"), [b], changes)
    start = health_server.checks
    await wait_for(lambda: health_server.checks >= start + 3, what="three probes")
    assert changes.calls == [] and checker.healthy(b)
    assert checker.last_result(b) == "serving"

    health_server.set("test.Echo", "NOT_SERVING")
    await wait_for(lambda: changes.states == [False], what="flip down")
    assert not checker.healthy(b)
    assert checker.last_result(b) == "not serving"

    health_server.set("test.Echo", "SERVING")
    await wait_for(lambda: changes.states == [False, True], what="flip up")
    assert checker.healthy(b)
    assert checker.last_result(b) == "serving"
