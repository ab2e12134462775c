"""gRPC backends for the proxy tests: grpcio servers in their own processes, no protoc.

Messages are raw bytes (grpcio's generic handlers with identity (de)serializers), so a
test says what a call carries and the server says which backend answered.  Run as
``python -m tests.support.grpc_backend --name b1 [--port N] [--tls CERT KEY]``; it
prints ``READY <port>`` once it serves (``--max-streams N``: its
SETTINGS_MAX_CONCURRENT_STREAMS).  :class:`GrpcBackend` starts one and controls it
over its own port (never through poise); :func:`grpc_backend` ties it to a test's
``Stack``, :func:`channel` opens a grpcio channel (to poise).

``test.Echo`` (what the tests call through poise):

- ``Unary``: ``b"<name>:" + request``; the request ``fail`` aborts with
  INVALID_ARGUMENT ``bad input``.
- ``Echo``: the request as it came (the 4 MiB test).
- ``Whoami``: the backend's name.
- ``Meta``: the invocation metadata as JSON (``[[key, value], ...]``); sends initial
  metadata ``x-initial: <name>`` and trailing metadata ``x-trailing: done`` plus the
  binary ``x-bin-bin: \\x00\\x01\\xff``.
- ``ServerStream``: ``int(request)`` messages ``b"0"``, ``b"1"``, ...
- ``StreamAbort``: ``int(request)`` messages, then aborts with RESOURCE_EXHAUSTED
  ``gave up after N``.
- ``ClientStream``: ``b"<count>:" + b"|".join(messages)``.
- ``Bidi``: each message back in upper case, as it arrives.
- ``Sleep``: sleeps ``float(request)`` seconds unless cancelled first, then
  ``b"slept"`` (cancellations are counted).
- ``Hold``: a server stream that sends the backend's name, then holds the call open
  until it is cancelled (or 30 s pass).

``grpc.health.v1.Health``: the standard health servicer; ``""`` and ``test.Echo``
start SERVING, :meth:`GrpcBackend.set_health` changes either.

``test.Control`` (JSON bytes): ``Stats`` (calls per method, cancellations, calls
active now, health checks seen), ``Reset``, ``SetHealth`` (``{"service", "status"}``).

:class:`H2Backend` is a plain HTTP/2 server (the ``h2`` library, in the test's own
threads) for HTTP/1.1 clients of an ``h2`` cluster and for stream-limit tests.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

ROOT = Path(__file__).resolve().parents[2]
LOOPBACK = "127.0.0.1"
MiB = 1 << 20
# Messages of up to this size both ways (grpcio's default receive limit is 4 MiB).
MAX_MESSAGE = 16 * MiB
# Options of every channel the tests open: large messages, never an HTTP proxy from
# the environment.
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.enable_http_proxy", 0),
]
# grpcio's own logging and fork handlers stay quiet in tests and in the servers.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

# (After the environment above: tests import grpc and grpc_health from here.)
import grpc  # noqa: E402
from grpc_health.v1 import health, health_pb2, health_pb2_grpc  # noqa: E402

# -- the server (this module run as a script) -----------------------------------------------

class _State:
    def __init__(self, name: str) -> None:
        self.name = name
        self.lock = threading.Lock()
        self.calls: dict[str, int] = {}
        self.cancelled = 0
        self.active = 0
        self.health_checks = 0

    def count(self, method: str) -> None:
        with self.lock:
            self.calls[method] = self.calls.get(method, 0) + 1

    def enter(self) -> None:
        with self.lock:
            self.active += 1

    def leave(self) -> None:
        with self.lock:
            self.active -= 1

    def stats(self) -> dict:
        with self.lock:
            return {"name": self.name, "calls": dict(self.calls), "cancelled": self.cancelled,
                    "active": self.active, "health_checks": self.health_checks}

    def reset(self) -> None:
        with self.lock:
            self.calls.clear()
            self.cancelled = 0
            self.health_checks = 0


def _serve(name: str, port: int, tls: tuple[str, str] | None,
           max_streams: int | None = None) -> None:
    state = _State(name)
    tag = name.encode()

    def tracked(method: str, fn):
        """Count the call and, while it runs, keep it in ``active``; a cancellation
        (the client, or poise, reset the stream) is counted once."""
        def unary(request, ctx):
            state.count(method)
            state.enter()
            try:
                return fn(request, ctx)
            finally:
                state.leave()

        def streaming(request, ctx):
            state.count(method)
            state.enter()
            try:
                yield from fn(request, ctx)
            finally:
                state.leave()
        return streaming if _is_generator(fn) else unary

    def wait_out(ctx, seconds: float) -> None:
        """Until ``seconds`` pass or the call is cancelled (counted)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if not ctx.is_active():
                with state.lock:
                    state.cancelled += 1
                return
            time.sleep(0.01)

    def unary(request, ctx):
        if request == b"fail":
            ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad input")
        return tag + b":" + request

    def echo(request, ctx):
        return request

    def whoami(request, ctx):
        return tag

    def meta(request, ctx):
        ctx.send_initial_metadata((("x-initial", name),))
        ctx.set_trailing_metadata((("x-trailing", "done"), ("x-bin-bin", b"\x00\x01\xff")))
        pairs = [[k, v if isinstance(v, str) else v.hex()] for k, v in ctx.invocation_metadata()]
        return json.dumps(pairs).encode()

    def server_stream(request, ctx):
        for i in range(int(request)):
            yield b"%d" % i

    def stream_abort(request, ctx):
        n = int(request)
        for i in range(n):
            yield b"%d" % i
        ctx.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"gave up after {n}")

    def client_stream(requests, ctx):
        got = list(requests)
        return b"%d:" % len(got) + b"|".join(got)

    def bidi(requests, ctx):
        for m in requests:
            yield m.upper()

    def sleep(request, ctx):
        wait_out(ctx, float(request))
        return b"slept"

    def hold(request, ctx):
        yield tag
        wait_out(ctx, 30)

    echo_service = grpc.method_handlers_generic_handler("test.Echo", {
        "Unary": grpc.unary_unary_rpc_method_handler(tracked("Unary", unary)),
        "Echo": grpc.unary_unary_rpc_method_handler(tracked("Echo", echo)),
        "Whoami": grpc.unary_unary_rpc_method_handler(tracked("Whoami", whoami)),
        "Meta": grpc.unary_unary_rpc_method_handler(tracked("Meta", meta)),
        "ServerStream": grpc.unary_stream_rpc_method_handler(
            tracked("ServerStream", server_stream)),
        "StreamAbort": grpc.unary_stream_rpc_method_handler(
            tracked("StreamAbort", stream_abort)),
        "ClientStream": grpc.stream_unary_rpc_method_handler(
            tracked("ClientStream", client_stream)),
        "Bidi": grpc.stream_stream_rpc_method_handler(tracked("Bidi", bidi)),
        "Sleep": grpc.unary_unary_rpc_method_handler(tracked("Sleep", sleep)),
        "Hold": grpc.unary_stream_rpc_method_handler(tracked("Hold", hold)),
    })

    statuses = health_pb2.HealthCheckResponse.ServingStatus

    class CountingHealth(health.HealthServicer):
        def Check(self, request, context):
            with state.lock:
                state.health_checks += 1
            return super().Check(request, context)

    health_servicer = CountingHealth()
    health_servicer.set("", statuses.Value("SERVING"))
    health_servicer.set("test.Echo", statuses.Value("SERVING"))

    def set_health(request, ctx):
        spec = json.loads(request)
        health_servicer.set(spec["service"], statuses.Value(spec["status"]))
        return b"{}"

    def stats(request, ctx):
        return json.dumps(state.stats()).encode()

    def reset(request, ctx):
        state.reset()
        return b"{}"

    control = grpc.method_handlers_generic_handler("test.Control", {
        "Stats": grpc.unary_unary_rpc_method_handler(stats),
        "Reset": grpc.unary_unary_rpc_method_handler(reset),
        "SetHealth": grpc.unary_unary_rpc_method_handler(set_health),
    })

    server = grpc.server(futures.ThreadPoolExecutor(64), options=[
        ("grpc.max_receive_message_length", MAX_MESSAGE),
        ("grpc.max_send_message_length", MAX_MESSAGE),
        ("grpc.so_reuseport", 0),
        *([("grpc.max_concurrent_streams", max_streams)] if max_streams else []),
    ])
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    server.add_generic_rpc_handlers((echo_service, control))
    address = f"{LOOPBACK}:{port}"
    if tls is None:
        bound = server.add_insecure_port(address)
    else:
        cert, key = (Path(p).read_bytes() for p in tls)
        bound = server.add_secure_port(address, grpc.ssl_server_credentials([(key, cert)]))
    if not bound:
        print("FAILED bind", flush=True)
        sys.exit(1)
    server.start()
    print("READY", bound, flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    server.stop(0).wait(5)


def _is_generator(fn) -> bool:
    return inspect.isgeneratorfunction(fn)


# -- the handle the tests hold ---------------------------------------------------------------

class GrpcBackend:
    """A gRPC backend process (see the module docstring); ``address`` is where it serves.

    Duck-types :class:`tests.support.procs.Backend` far enough for ``Stack``: a stack
    that holds it stops it at teardown."""

    def __init__(self, name: str = "g1", *, port: int = 0,
                 tls: tuple[str, str] | None = None, max_streams: int | None = None) -> None:
        self.name = name
        self.tls = tls
        args = [sys.executable, "-m", "tests.support.grpc_backend", "--name", name,
                "--port", str(port)]
        if tls is not None:
            args += ["--tls", *map(str, tls)]
        if max_streams is not None:
            args += ["--max-streams", str(max_streams)]
        self.proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("READY "):
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(f"gRPC backend {name} did not start: {line!r}")
        self.port = int(line.split()[1])
        self.address = f"{LOOPBACK}:{self.port}"
        self._channel = None

    # -- control, straight to the backend --------------------------------------------------

    def _control(self, method: str, body: bytes = b"") -> dict:
        if self.tls is not None:
            raise RuntimeError("a TLS backend takes no control calls (no CA here)")
        if self._channel is None:
            self._channel = grpc.insecure_channel(self.address, options=CHANNEL_OPTIONS)
        call = self._channel.unary_unary(f"/test.Control/{method}")
        return json.loads(call(body, timeout=10))

    def stats(self) -> dict:
        """``{"name", "calls": {method: n}, "cancelled", "active", "health_checks"}``."""
        return self._control("Stats")

    def calls(self, method: str) -> int:
        return self.stats()["calls"].get(method, 0)

    def reset(self) -> None:
        self._control("Reset")

    def set_health(self, status: str, service: str = "") -> None:
        """``status``: SERVING, NOT_SERVING, UNKNOWN or SERVICE_UNKNOWN."""
        self._control("SetHealth", json.dumps({"service": service, "status": status}).encode())

    # -- lifecycle ---------------------------------------------------------------------------

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: the process dies at once; the kernel closes its sockets."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()

    def __repr__(self) -> str:
        return f"<GrpcBackend {self.name} {self.address}>"


def grpc_backend(stack, name: str, **options) -> GrpcBackend:
    """A :class:`GrpcBackend` that ``stack`` stops at teardown."""
    b = GrpcBackend(name, **options)
    stack.backends.append(b)
    return b


def channel(addr: tuple[str, int] | str, *, credentials=None, authority: str | None = None):
    """A grpcio channel to ``addr`` (poise, usually): h2c prior knowledge, or TLS with
    ``credentials``."""
    target = addr if isinstance(addr, str) else f"{addr[0]}:{addr[1]}"
    options = list(CHANNEL_OPTIONS)
    if authority is not None:
        options.append(("grpc.ssl_target_name_override", authority))
    if credentials is None:
        return grpc.insecure_channel(target, options=options)
    return grpc.secure_channel(target, credentials, options=options)


class H2Backend:
    """A plain HTTP/2 (h2c) server on the ``h2`` library, in threads of the test
    process: the backend of an ``h2`` cluster for HTTP/1.1 clients.

    Every request is answered 200 with ``x-backend: <name>`` and, as its body (no
    content-length: an HTTP/1.1 client sees it chunked), JSON ``{"method", "path",
    "size", "sha256", "body" (its first 1,000 bytes), "headers"}``.  A path starting
    ``/trailers`` also gets trailers ``x-checksum`` (the body's length) and ``x-done:
    yes``.  ``requests`` records ``(method, path, body, headers)`` of each request;
    ``errors`` the protocol errors that ended a connection.

    - ``delay``: each answer waits that long;
    - ``batch``: answers wait until that many are due (or one is a second late), then
      go out in one write, as a busy server's do;
    - ``max_streams``: the SETTINGS_MAX_CONCURRENT_STREAMS it announces; until the
      client acknowledges it, streams beyond it are refused with REFUSED_STREAM
      (``refused`` counts them), as Go's server does.
    """

    def __init__(self, name: str = "h2", *, max_streams: int | None = None,
                 delay: float = 0.0, batch: int = 1) -> None:
        self.name = name
        self.max_streams = max_streams
        self.delay = delay
        self.batch = batch
        self.refused = 0
        self.requests: list[tuple[str, str, bytes, list[tuple[str, str]]]] = []
        self.errors: list[str] = []
        self._listener = socket.socket()
        self._listener.bind((LOOPBACK, 0))
        self._listener.listen(16)
        self.port = self._listener.getsockname()[1]
        self.address = f"{LOOPBACK}:{self.port}"
        self._closing = False
        self._conns: list = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closing:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            self._conns.append(sock)
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=False, header_encoding="utf-8"))
        conn.initiate_connection()
        if self.max_streams is not None:
            # (In force once acknowledged; until then the check below refuses.)
            conn.update_settings({
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self.max_streams})
        streams: dict[int, list] = {}       # requests being received
        due: dict[int, tuple[float, list]] = {}     # complete, answered at a time
        try:
            sock.sendall(conn.data_to_send())
            while True:
                now = time.monotonic()
                ready = [sid for sid, (at, _) in due.items() if at <= now]
                if len(ready) >= self.batch or any(
                        at + 1 <= now for at, _ in due.values()):
                    for sid in ready:
                        self._respond(conn, sid, *due.pop(sid)[1])
                sock.sendall(conn.data_to_send())
                # (polled while a batch fills up)
                waits = [at - now for at, _ in due.values()]
                sock.settimeout(max(0.005, min(waits)) if waits else None)
                try:
                    data = sock.recv(65536)
                except TimeoutError:
                    continue
                if not data:
                    return
                try:
                    received = conn.receive_data(data)
                except h2.exceptions.ProtocolError as e:
                    states = {k: v.state_machine.state.name for k, v in conn.streams.items()}
                    self.errors.append(f"protocol error: {e} (streams: {states})")
                    sock.sendall(conn.data_to_send())
                    return
                for ev in received:
                    if isinstance(ev, h2.events.RequestReceived):
                        if self.max_streams is not None and \
                                len(streams) + len(due) >= self.max_streams:
                            # As Go's server does with streams beyond its limit before
                            # the client acknowledged it: REFUSED_STREAM.
                            self.refused += 1
                            conn.reset_stream(ev.stream_id,
                                              h2.errors.ErrorCodes.REFUSED_STREAM)
                            continue
                        streams[ev.stream_id] = [dict(ev.headers), b"", list(ev.headers)]
                    elif isinstance(ev, h2.events.DataReceived):
                        conn.acknowledge_received_data(ev.flow_controlled_length,
                                                       ev.stream_id)
                        if ev.stream_id in streams:
                            streams[ev.stream_id][1] += ev.data
                    elif isinstance(ev, h2.events.StreamEnded):
                        if ev.stream_id in streams:
                            due[ev.stream_id] = (time.monotonic() + self.delay,
                                                 streams.pop(ev.stream_id))
                    elif isinstance(ev, h2.events.StreamReset):
                        streams.pop(ev.stream_id, None)
                        due.pop(ev.stream_id, None)
        except OSError:
            return
        finally:
            sock.close()

    def _respond(self, conn, sid: int, pseudo: dict, body: bytes, headers: list) -> None:
        method, path = pseudo[":method"], pseudo[":path"]
        plain = [(k, v) for k, v in headers if not k.startswith(":")]
        self.requests.append((method, path, body, plain))
        out = json.dumps({"method": method, "path": path, "size": len(body),
                          "sha256": hashlib.sha256(body).hexdigest(),
                          "body": body[:1000].decode("latin-1"), "headers": plain}).encode()
        conn.send_headers(sid, [(":status", "200"), ("content-type", "application/json"),
                                ("x-backend", self.name)])
        trailers = path.startswith("/trailers")
        conn.send_data(sid, out, end_stream=not trailers)
        if trailers:
            conn.send_headers(sid, [("x-checksum", str(len(body))), ("x-done", "yes")],
                              end_stream=True)

    def stop(self) -> None:
        self._closing = True
        self._listener.close()
        for sock in self._conns:
            try:
                sock.close()
            except OSError:
                pass

    def __repr__(self) -> str:
        return f"<H2Backend {self.name} {self.address}>"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", default="g1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"))
    parser.add_argument("--max-streams", type=int)
    args = parser.parse_args()
    _serve(args.name, args.port, tuple(args.tls) if args.tls else None, args.max_streams)


if __name__ == "__main__":
    main()
