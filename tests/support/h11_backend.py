"""An independent HTTP/1.1 backend for proxy tests, built on h11 (no poise code).

Run as a process::

    python -m tests.support.h11_backend --name NAME [--port 0]
        [--close-after-response] [--idle-timeout SECONDS] [--drop-reused]

It prints ``READY <port>`` once listening.  One thread per connection; keep-alive as
h11 decides.  Behaviour is chosen by path (query options after ``?``):

``/echo`` (and any unknown path)  JSON: method, target, version, headers (raw case,
    in order), body length, sha256 and (when short) the body itself, backend name;
    ``?close=1`` answers with ``Connection: close`` and closes.
``/bytes/N?te=cl|chunked|close&piece=K``  N bytes of :mod:`tests.support.pattern`,
    written in pieces of K bytes; ``close`` sends no framing and closes after the body.
``/sink``  consume the request body, verify it against the pattern; JSON result.
``/status/N?cl=X``  status N (``cl`` adds a Content-Length header to a 304).
``/slow?delay=S``  echo after S seconds.   ``/early``  103 Early Hints, then echo.        ``/never``  read, never answer.
``/stall?delay=S``  neither read the body nor answer for S seconds (back-pressure).
``/close``  close without answering.           ``/reset``  RST without answering.
``/malformed?kind=K``  a malformed response (see ``MALFORMED``), then wait for close.
``/hop``  a response carrying hop-by-hop headers.
``/_stats``, ``/_reset``  counters (requests to these two are not counted).

Process options: ``--close-after-response`` closes every connection silently (no
``Connection: close``) right after each response; ``--idle-timeout`` closes a
keep-alive connection silently after that long without a request; ``--drop-reused``
closes the connection without answering the second request on each connection.

Resilience options: ``--fail-ratio R`` answers a share R of the requests (drawn from a
``random.Random(--fail-seed)``, so the sequence is reproducible) with 500 instead;
``--health-status N`` answers ``/health`` with status N (it is an echo otherwise);
``--hang`` reads every request and never answers (as ``/never``).  ``/_stats`` also
counts ``peer_closed``: requests left waiting (``/never``, ``--hang``) whose peer
closed the connection; each request record has ``at``, its ``time.monotonic()`` on
arrival (system-wide on Linux, so comparable with the test process's clock).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import socket
import struct
import sys
import threading
import time
from urllib.parse import parse_qs, urlsplit

import h11

from tests.support import pattern

RECV = 1 << 20
MALFORMED = {
    "status": b"HTTP/1.1 2OO OK\r\nContent-Length: 2\r\n\r\nok",
    "garbage": b"\x00\x01\x02 this is not http\r\n\r\n",
    "duplicate-cl": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    "bad-header": b"HTTP/1.1 200 OK\r\nBad Header Line\r\nContent-Length: 2\r\n\r\nok",
    "cl-te": (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
              b"5\r\nhello\r\n0\r\n\r\n"),
    # we never forward Upgrade, so a 101 is a protocol error
    "101": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n",
    # the head is fine, the body framing breaks: at once, or after a pause (by then the
    # proxy has forwarded the head)
    "chunk": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n",
    "chunk-late": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
                   b"zz\r\n"),
}
INTERNAL = ("/_stats", "/_reset")


class Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.requests: list[dict] = []
        self.connections: set[int] = set()
        self.dropped = 0
        self.peer_closed = 0

    def snapshot(self) -> dict:
        with self.lock:
            return {"requests": list(self.requests), "connections": len(self.connections),
                    "dropped": self.dropped, "peer_closed": self.peer_closed}


class Server:
    def __init__(self, args: argparse.Namespace) -> None:
        self.name = args.name
        self.close_after_response = args.close_after_response
        self.idle_timeout = args.idle_timeout
        self.drop_reused = args.drop_reused
        self.fail_ratio = args.fail_ratio
        self.fail_rng = random.Random(args.fail_seed)
        self.health_status = args.health_status
        self.hang = args.hang
        self.stats = Stats()
        self.listener = socket.create_server(("127.0.0.1", args.port), backlog=1024)
        self._ids = 0

    def serve_forever(self) -> None:
        print(f"READY {self.listener.getsockname()[1]}", flush=True)
        while True:
            sock, _ = self.listener.accept()
            self._ids += 1
            threading.Thread(target=Connection(self, sock, self._ids).run, daemon=True).start()


class Closed(Exception):
    """The peer went away, or we decided to drop the connection."""


class Connection:
    def __init__(self, server: Server, sock: socket.socket, cid: int) -> None:
        self.server = server
        self.sock = sock
        self.cid = cid
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=1 << 20)
        self.index = 0
        self.head = False       # the current request is HEAD

    # -- plumbing ----------------------------------------------------------------------

    def run(self) -> None:
        try:
            while True:
                self.one_exchange()
                if self.h11.our_state is h11.MUST_CLOSE or self.server.close_after_response:
                    break
                self.h11.start_next_cycle()
        except (Closed, OSError, h11.ProtocolError):
            pass
        finally:
            self.sock.close()

    def next_event(self, timeout: float | None = None):
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            self.sock.settimeout(timeout)
            try:
                data = self.sock.recv(RECV)
            except TimeoutError:
                raise Closed() from None
            if not data:
                raise Closed()
            self.h11.receive_data(data)

    def send(self, *events) -> None:
        out = b"".join(self.h11.send(e) or b"" for e in events)
        if out:
            self.sock.sendall(out)

    def read_body(self, req: h11.Request) -> bytes:
        if self.h11.they_are_waiting_for_100_continue:
            self.send(h11.InformationalResponse(status_code=100, headers=[]))
        body = bytearray()
        while True:
            event = self.next_event()
            if isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return bytes(body)
            else:
                raise Closed()

    def respond(self, status: int, headers: list, body: bytes = b"") -> None:
        """A complete response; its body is left out when answering HEAD."""
        events = [h11.Response(status_code=status, headers=headers)]
        if body and not self.head:
            events.append(h11.Data(data=body))
        self.send(*events, h11.EndOfMessage())

    def wait_for_close(self, limit: float = 10.0) -> None:
        self.sock.settimeout(limit)
        try:
            while self.sock.recv(RECV):
                pass
        except OSError:
            pass
        raise Closed()

    # -- one request ---------------------------------------------------------------------

    def one_exchange(self) -> None:
        idle = self.server.idle_timeout if self.index else None
        req = self.next_event(timeout=idle)
        if not isinstance(req, h11.Request):
            raise Closed()
        self.sock.settimeout(None)
        self.head = req.method == b"HEAD"
        target = req.target.decode("latin-1")
        url = urlsplit(target)
        path = url.path
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        stats = self.server.stats
        if path in INTERNAL:
            self.read_body(req)
            if path == "/_reset":
                with stats.lock:
                    stats.reset()
            self.respond_json(stats.snapshot())
            return
        self.index += 1
        with stats.lock:
            stats.connections.add(self.cid)
            stats.requests.append({"method": req.method.decode(), "target": target,
                                   "conn": self.cid, "index": self.index,
                                   "at": time.monotonic()})
            if self.server.drop_reused and self.index == 2:
                stats.dropped += 1
                raise Closed()
            fail = (self.server.fail_ratio > 0
                    and self.server.fail_rng.random() < self.server.fail_ratio)
        if self.server.hang:
            self.do_never(req, path, query)
        if fail:
            self.read_body(req)
            self.respond(500, [("X-Backend", self.server.name), ("Content-Length", "5")],
                         b"fail\n")
            return
        if path == "/health" and self.server.health_status is not None:
            self.read_body(req)
            self.respond(self.server.health_status,
                         [("X-Backend", self.server.name), ("Content-Length", "0")])
            return
        handler = getattr(self, "do_" + path.strip("/").split("/")[0], self.do_echo)
        handler(req, path, query)

    def respond_json(self, obj: object, status: int = 200, extra: list | None = None) -> None:
        body = json.dumps(obj).encode()
        self.respond(status, [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body))), *(extra or [])], body)

    # -- behaviours ------------------------------------------------------------------------

    def do_echo(self, req: h11.Request, path: str, query: dict) -> None:
        body = self.read_body(req)
        self.respond_json({
            "name": self.server.name,
            "method": req.method.decode(),
            "target": req.target.decode("latin-1"),
            "version": req.http_version.decode(),
            "headers": [[n.decode("latin-1"), v.decode("latin-1")]
                        for n, v in req.headers.raw_items()],
            "body_len": len(body),
            "body_sha256": hashlib.sha256(body).hexdigest(),
            "body": body.decode("latin-1") if len(body) <= 4096 else None,
            "conn": self.cid,
        }, extra=[("X-Backend", self.server.name)]
            + ([("Connection", "close")] if "close" in query else []))

    def do_early(self, req: h11.Request, path: str, query: dict) -> None:
        self.send(h11.InformationalResponse(status_code=103, headers=[
            ("Link", "</style.css>; rel=preload; as=style")]))
        self.do_echo(req, path, query)

    def do_slow(self, req: h11.Request, path: str, query: dict) -> None:
        time.sleep(float(query.get("delay", "1")))
        self.do_echo(req, path, query)

    def do_bytes(self, req: h11.Request, path: str, query: dict) -> None:
        self.read_body(req)
        total = int(path.rsplit("/", 1)[1])
        te = query.get("te", "cl")
        size = int(query.get("piece", 65536))
        if te == "close":
            self.sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                              b"X-Backend: " + self.server.name.encode() + b"\r\n\r\n")
            if not self.head:
                for part in pattern.chunks(total, size):
                    self.sock.sendall(part)
            self.sock.shutdown(socket.SHUT_WR)
            raise Closed()
        framing = ("Content-Length", str(total)) if te == "cl" else ("Transfer-Encoding", "chunked")
        self.send(h11.Response(status_code=200, headers=[
            ("Content-Type", "application/octet-stream"), framing,
            ("X-Backend", self.server.name)]))
        if not self.head:
            for part in pattern.chunks(total, size):
                self.sock.sendall(self.h11.send(h11.Data(data=part)))
        self.send(h11.EndOfMessage())

    def do_sink(self, req: h11.Request, path: str, query: dict) -> None:
        if self.h11.they_are_waiting_for_100_continue:
            self.send(h11.InformationalResponse(status_code=100, headers=[]))
        received, ok = 0, True
        while True:
            event = self.next_event()
            if isinstance(event, h11.Data):
                ok = ok and pattern.matches(received, event.data)
                received += len(event.data)
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                raise Closed()
        self.respond_json({"received": received, "pattern_ok": ok})

    def do_status(self, req: h11.Request, path: str, query: dict) -> None:
        self.read_body(req)
        status = int(path.rsplit("/", 1)[1])
        headers = [("X-Backend", self.server.name)]
        if status in (204, 304):
            if "cl" in query:
                headers.append(("Content-Length", query["cl"]))
            self.respond(status, headers)
            return
        body = b"status %d\n" % status
        self.respond(status, headers + [("Content-Length", str(len(body)))],
                     b"" if self.head else body)

    def do_hop(self, req: h11.Request, path: str, query: dict) -> None:
        self.read_body(req)
        body = b"hop\n"
        self.respond(200, [
            ("Connection", "X-Resp-Hop, Content-Length"),
            ("X-Resp-Hop", "must be removed"),
            ("Keep-Alive", "timeout=5"),
            ("Proxy-Connection", "keep-alive"),
            ("Trailer", "X-Checksum"),
            ("Upgrade", "websocket"),
            ("TE", "trailers"),
            ("X-Resp-End", "kept"),
            ("Content-Length", str(len(body))),
        ], body)

    def do_never(self, req: h11.Request, path: str, query: dict) -> None:
        self.sock.settimeout(120)
        try:
            while self.sock.recv(RECV):
                pass
        except TimeoutError:
            raise Closed() from None
        except OSError:
            pass
        with self.server.stats.lock:
            self.server.stats.peer_closed += 1
        raise Closed()

    def do_stall(self, req: h11.Request, path: str, query: dict) -> None:
        time.sleep(float(query.get("delay", "60")))
        raise Closed()

    def do_close(self, req: h11.Request, path: str, query: dict) -> None:
        self.read_body(req)
        raise Closed()

    def do_reset(self, req: h11.Request, path: str, query: dict) -> None:
        self.read_body(req)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        raise Closed()

    def do_malformed(self, req: h11.Request, path: str, query: dict) -> None:
        self.read_body(req)
        parts = MALFORMED[query.get("kind", "garbage")]
        for i, part in enumerate((parts,) if isinstance(parts, bytes) else parts):
            if i:
                time.sleep(0.3)
            self.sock.sendall(part)
        self.wait_for_close()


# -- controls for the resilience and health-check tests --------------------------------
# Added behaviours (new paths only; everything above is unchanged):
# ``/_health/fail`` and ``/_health/ok`` make ``/health`` answer 503 / 200 from then on
#     (``/health`` echoes before either is called);
# ``/_mode?status=N`` makes ``/mode`` answer status N; ``/_mode?kind=reset|close|never``
#     makes it behave as that path; ``/_mode?early=N`` makes it answer status N (and
#     ``Connection: close``) before reading the request body;
#     ``/_mode?kind=drop-reused&delay=S`` makes it close, S seconds after reading it, a
#     request that is not the first on its connection (and echo the first); ``/_mode``
#     alone makes it echo again;
# ``/partial?send=N&total=M&delay=S``  a head announcing M body bytes, N of them, a
#     pause of S seconds, then a reset.
# Requests to these paths are counted in ``/_stats`` like any other.

def _do_health_control(self: Connection, req: h11.Request, path: str, query: dict) -> None:
    self.read_body(req)
    self.server.test_health = 503 if path.endswith("/fail") else 200
    self.respond_json({"health": self.server.test_health})


def _do_health(self: Connection, req: h11.Request, path: str, query: dict) -> None:
    status = getattr(self.server, "test_health", None)
    if status is None:
        self.do_echo(req, path, query)
    else:
        self.do_status(req, f"/status/{status}", query)


def _do_mode_control(self: Connection, req: h11.Request, path: str, query: dict) -> None:
    self.read_body(req)
    self.server.test_mode = dict(query)
    self.respond_json({"mode": self.server.test_mode})


def _do_mode(self: Connection, req: h11.Request, path: str, query: dict) -> None:
    mode = getattr(self.server, "test_mode", {})
    if "early" in mode:         # answer at once, without reading the body, and close
        body = b"early %s\n" % mode["early"].encode()
        self.sock.sendall(b"HTTP/1.1 %s Early\r\nContent-Length: %d\r\nConnection: close\r\n"
                          b"X-Backend: %s\r\n\r\n%s" % (mode["early"].encode(), len(body),
                                                         self.server.name.encode(), body))
        self.wait_for_close()
    if "status" in mode:
        self.do_status(req, f"/status/{mode['status']}", query)
    elif mode.get("kind") == "drop-reused" and self.index > 1:
        self.read_body(req)
        time.sleep(float(mode.get("delay", "0.3")))
        raise Closed()
    elif mode.get("kind") in ("reset", "close", "never"):
        getattr(self, "do_" + mode["kind"])(req, path, query)
    else:
        self.do_echo(req, path, query)


def _do_partial(self: Connection, req: h11.Request, path: str, query: dict) -> None:
    self.read_body(req)
    total, send = int(query.get("total", "1000")), int(query.get("send", "100"))
    self.sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-Backend: %b\r\n\r\n%b"
                      % (total, self.server.name.encode(), b"p" * send))
    time.sleep(float(query.get("delay", "0.2")))
    self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    raise Closed()


Connection.do__health = _do_health_control
Connection.do_health = _do_health
Connection.do__mode = _do_mode_control
Connection.do_mode = _do_mode
Connection.do_partial = _do_partial


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--name", default="backend")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--close-after-response", action="store_true")
    p.add_argument("--idle-timeout", type=float, default=None)
    p.add_argument("--drop-reused", action="store_true")
    p.add_argument("--fail-ratio", type=float, default=0.0)
    p.add_argument("--fail-seed", type=int, default=0)
    p.add_argument("--health-status", type=int, default=None)
    p.add_argument("--hang", action="store_true")
    args = p.parse_args(argv)
    try:
        Server(args).serve_forever()
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
