"""gRPC check: the standard health protocol (``grpc.health.v1.Health/Check``).

One probe opens an HTTP/2 connection (h2c, or TLS with ALPN ``h2`` as the cluster's
traffic does), sends one ``HealthCheckRequest`` for ``service`` (``""``: the server as
a whole) and passes when the answer has ``grpc-status: 0`` and ``status: SERVING``;
then it closes the connection.  The protobuf messages are one field each, so they are
encoded and read here by hand (no generated code, no grpcio).
"""

from __future__ import annotations

import asyncio
from typing import Any

from poise.checks.probe import ResultCallback, connect_failure
from poise.checks.settings import CheckSettings
from poise.core.backend import Backend
from poise.proxy.dial import dial
from poise.proxy.http2.codec import (
    H2Configuration,
    H2Connection,
    ProtocolError,
    SettingCodes,
    Settings,
    events,
)

PATH = b"/grpc.health.v1.Health/Check"
# HealthCheckResponse.ServingStatus
_STATUS_NAMES = {0: "unknown", 1: "serving", 2: "not serving", 3: "service unknown"}


def health_request(service: str) -> bytes:
    """A length-prefixed gRPC message: HealthCheckRequest{service} (field 1, string)."""
    name = service.encode()
    message = (b"\x0a" + _varint(len(name)) + name) if name else b""
    return b"\x00" + len(message).to_bytes(4, "big") + message


def serving_status(body: bytes) -> int | None:
    """HealthCheckResponse.status (field 1, varint) from a length-prefixed gRPC
    message; 0 (UNKNOWN) when absent; None when the body is not such a message."""
    if len(body) < 5 or body[0] != 0:
        return None
    size = int.from_bytes(body[1:5], "big")
    message = body[5:5 + size]
    if len(message) != size:
        return None
    pos = 0
    status = 0
    while pos < len(message):
        key, pos = _read_varint(message, pos)
        if key is None:
            return None
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(message, pos)
            if value is None:
                return None
            if field == 1:
                status = value
        elif wire == 2:
            length, pos = _read_varint(message, pos)
            if length is None or pos + length > len(message):
                return None
            pos += length
        elif wire == 1 or wire == 5:         # fixed64, fixed32: skipped
            pos += 8 if wire == 1 else 4
            if pos > len(message):
                return None
        else:
            return None
    return status


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int | None, int]:
    value = shift = 0
    while pos < len(data) and shift < 64:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    return None, pos


class _HealthCall(asyncio.Protocol):
    """One Check call on a fresh connection; ``done`` resolves to ``(ok, reason)``."""

    def __init__(self, authority: bytes, scheme: bytes, service: str,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.authority = authority
        self.scheme = scheme
        self.service = service
        self.done: asyncio.Future[tuple[bool, str]] = loop.create_future()
        self.h2 = H2Connection(config=H2Configuration(client_side=True, header_encoding=None))
        self.transport: Any = None
        self.body = b""
        self.grpc_status: bytes | None = None
        self.grpc_message = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        h2 = self.h2
        h2.local_settings = Settings(client=True, initial_values={SettingCodes.ENABLE_PUSH: 0})
        h2.initiate_connection()
        sid = h2.get_next_available_stream_id()
        h2.send_headers(sid, [
            (b":method", b"POST"), (b":scheme", self.scheme), (b":authority", self.authority),
            (b":path", PATH), (b"content-type", b"application/grpc"), (b"te", b"trailers"),
            (b"user-agent", b"poise-health-check"),
        ])
        h2.send_data(sid, health_request(self.service), end_stream=True)
        transport.write(h2.data_to_send())

    def data_received(self, data: bytes) -> None:
        try:
            received = self.h2.receive_data(data)
        except ProtocolError as e:
            self._finish(False, f"http2 error: {e}")
            return
        for event in received:
            if isinstance(event, events.ResponseReceived | events.TrailersReceived):
                self._headers(event.headers)
            elif isinstance(event, events.DataReceived):
                self.body += event.data
                self.h2.acknowledge_received_data(event.flow_controlled_length,
                                                  event.stream_id)
                if len(self.body) > 65_536:
                    self._finish(False, "response too large")
                    return
            elif isinstance(event, events.StreamEnded):
                self._ended()
                return
            elif isinstance(event, events.StreamReset | events.ConnectionTerminated):
                self._finish(False, "reset by backend")
                return
        data = self.h2.data_to_send()
        if data:
            self.transport.write(data)

    def _headers(self, headers: Any) -> None:
        for name, value in headers:
            if name == b":status" and value != b"200":
                self._finish(False, f"status {value.decode(errors='replace')}")
            elif name == b"grpc-status":
                self.grpc_status = value
            elif name == b"grpc-message":
                self.grpc_message = value

    def _ended(self) -> None:
        code = self.grpc_status
        if code != b"0":
            detail = self.grpc_message.decode(errors="replace")[:80]
            text = "no grpc-status" if code is None else f"grpc-status {code.decode()}"
            self._finish(False, f"{text} {detail}".strip())
            return
        status = serving_status(self.body)
        if status is None:
            self._finish(False, "malformed response")
        else:
            self._finish(status == 1, _STATUS_NAMES.get(status, f"status {status}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish(False, "connection closed")

    def _finish(self, ok: bool, reason: str) -> None:
        if not self.done.done():
            self.done.set_result((ok, reason))


class GrpcProbe:
    """gRPC health-protocol probe of one backend (see the module docstring)."""

    __slots__ = ("_loop", "_backend", "_settings", "_on_result", "_task")

    def __init__(self, backend: Backend, settings: CheckSettings, on_result: ResultCallback,
                 *, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._backend = backend
        self._settings = settings
        self._on_result = on_result
        self._task: asyncio.Task | None = None

    def run(self) -> None:
        self._task = self._loop.create_task(self._probe())

    async def _probe(self) -> None:
        settings = self._settings
        backend = self._backend
        host = settings.host or backend.address
        call = _HealthCall(host.encode(), b"https" if settings.tls else b"http",
                           settings.service, self._loop)
        transport = None
        try:
            async with asyncio.timeout(settings.timeout):
                try:
                    transport, _ = await dial(
                        self._loop, lambda: call, backend.host, backend.port,
                        tls=settings.tls, server_name=settings.server_name,
                        preamble=settings.preamble, handshake_timeout=settings.timeout)
                except Exception as e:
                    result = (False, connect_failure(e))
                else:
                    result = await call.done
        except TimeoutError:
            result = (False, "timeout")
        finally:
            if transport is not None:
                transport.abort()
        self._task = None
        self._on_result(*result)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def __repr__(self) -> str:
        return f"<GrpcProbe {self._backend.address} {self._settings.service!r}>"
