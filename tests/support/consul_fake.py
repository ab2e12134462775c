"""A small fake Consul agent for tests: no Consul server can be installed on these
machines (it is not in Debian), so the consul source and registrar are tested against
this, written from Consul's documented HTTP API.  It implements only what they use:

* ``GET /v1/health/service/NAME[?passing][&index=N&wait=D]`` — entries ``{Node, Service,
  Checks}``, ``X-Consul-Index`` on every answer.  Blocking queries as documented: with
  ``index`` >= the current index of the result, the answer is held until it changes or
  ``wait`` passes (default 5m, at most 10m, plus up to wait/16 of jitter);
* ``PUT /v1/agent/service/register`` — ``ID`` (default ``Name``), ``Name``, ``Address``,
  ``Port``, ``Tags``, ``Meta``, ``Weights``, and one ``Check`` with ``TTL``, ``Status``
  (initial status; critical by default, as in Consul), ``CheckID`` (default
  ``service:ID``) and ``DeregisterCriticalServiceAfter``;
* ``PUT /v1/agent/check/pass/CHECK_ID`` (404 for an unknown check);
* ``PUT /v1/agent/service/deregister/ID`` (404 for an unknown service);
* ACLs reduced to one token: with ``token`` set, requests without it (``X-Consul-Token``
  header or ``?token=``) get 403 ``ACL not found``.

A TTL check not passed within its TTL goes critical (and out of ``passing`` answers); a
service whose check stays critical longer than its ``DeregisterCriticalServiceAfter`` is
removed.  Unlike Consul (which enforces at least one minute and reaps every 30 s), the
fake honours short values exactly, so tests stay short.

For tests: :attr:`ConsulFake.blocking` counts blocking queries in progress (one watch per
source shows as one; :attr:`~ConsulFake.blocking_by_service` per service name; a client
that hangs up ends its query), :attr:`ConsulFake.tokens` the tokens received, :meth:`stop` and
:meth:`start` (same port) cut and restore the agent — stopping also drops every open
connection, like a crash — and ``start(fresh=True)`` forgets the state, so indexes go
backwards.  ``python -m tests.support.consul_fake --port 8500`` runs one by hand.
"""

from __future__ import annotations

import json
import random
import re
import select
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

LOOPBACK = "127.0.0.1"
REAP_EVERY = 0.05       # seconds between looks at TTLs
_GO_DURATION = re.compile(r"(\d+(?:\.\d*)?)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def go_duration(text: str) -> float:
    """Seconds from a Go duration (``10s``, ``1m30s``, ``250ms``) or plain seconds."""
    if re.fullmatch(r"\d+(\.\d*)?", text):
        return float(text)
    pieces = _GO_DURATION.findall(text)
    if not pieces or "".join(n + u for n, u in pieces) != text:
        raise ValueError(f"invalid duration {text!r}")
    return sum(float(n) * _UNITS[u] for n, u in pieces)


class State:
    """Services and checks of the fake agent, one lock and one condition for all."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.index = 1                  # the "raft" index: bumped on every change
        self.services: dict[str, dict[str, Any]] = {}
        self.checks: dict[str, dict[str, Any]] = {}     # CheckID → check
        self.name_index: dict[str, int] = {}            # service name → its last change

    def changed(self, name: str) -> None:
        """Under the lock: a change to service ``name``'s entries."""
        self.index += 1
        self.name_index[name] = self.index
        self.cond.notify_all()

    def result_index(self, name: str) -> int:
        # Consul answers a service never seen with an index > 0 too (its table's).
        return self.name_index.get(name, self.index)

    def entries(self, name: str, passing: bool) -> list[dict[str, Any]]:
        out = []
        for service in self.services.values():
            if service["Service"] != name:
                continue
            checks = [c for c in self.checks.values() if c["ServiceID"] == service["ID"]]
            if passing and any(c["Status"] != "passing" for c in checks):
                continue
            out.append({
                "Node": {"ID": "00000000-0000-0000-0000-000000000001", "Node": "fake",
                         "Address": LOOPBACK, "Datacenter": "dc1", "TaggedAddresses": {},
                         "Meta": {}},
                "Service": dict(service),
                "Checks": [{"Node": "fake", "CheckID": "serfHealth", "Name": "Serf Health",
                            "Status": "passing", "ServiceID": "", "ServiceName": ""}]
                + [{k: v for k, v in c.items() if not k.startswith("_")} for c in checks],
            })
        return out

    def reap(self, now: float) -> None:
        """Under the lock: expire TTLs, deregister services critical for too long."""
        for check in list(self.checks.values()):
            if check["Status"] != "critical" and now >= check["_deadline"]:
                check["Status"] = "critical"
                check["Output"] = "TTL expired"
                check["_critical_since"] = now
                self.changed(check["ServiceName"])
            after = check["_deregister_after"]
            if check["Status"] == "critical" and after is not None \
                    and now - check["_critical_since"] >= after:
                self.remove(check["ServiceID"])

    def remove(self, service_id: str) -> bool:
        service = self.services.pop(service_id, None)
        if service is None:
            return False
        for check_id in [k for k, c in self.checks.items() if c["ServiceID"] == service_id]:
            del self.checks[check_id]
        self.changed(service["Service"])
        return True


class ConsulFake:
    """The fake agent on a free loopback port (see the module's docstring)."""

    def __init__(self, port: int = 0, token: str | None = None) -> None:
        self.token = token
        self.state = State()
        self.blocking = 0               # blocking queries in progress
        self.blocking_by_service: dict[str, int] = {}
        self.queries = 0                # health queries answered or held
        self.tokens: list[str | None] = []
        self.port = port
        self._server: ThreadingHTTPServer | None = None
        self._threads: list[threading.Thread] = []
        self._connections: set[socket.socket] = set()
        self._running = threading.Event()

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self, fresh: bool = False) -> ConsulFake:
        if fresh:
            self.state = State()
        handler = type("Handler", (_Handler,), {"fake": self})
        self._server = _Server((LOOPBACK, self.port), handler)
        self.port = self._server.server_address[1]
        self._running.set()
        self._threads = [threading.Thread(target=self._server.serve_forever, daemon=True,
                                          name="consul-fake"),
                         threading.Thread(target=self._reaper, daemon=True,
                                          name="consul-fake-reaper")]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        """Stop answering and drop every connection (held queries end without an answer),
        like an agent that died.  The state is kept for :meth:`start`."""
        if self._server is None:
            return
        self._running.clear()
        with self.state.cond:
            self.state.cond.notify_all()
        self._server.shutdown()
        self._server.server_close()
        for conn in list(self._connections):
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in self._threads:
            thread.join(5)
        self._server = None

    def _reaper(self) -> None:
        while self._running.is_set():
            with self.state.cond:
                self.state.reap(time.monotonic())
            time.sleep(REAP_EVERY)

    # -- helpers for tests -----------------------------------------------------------

    def register(self, service_id: str, address: str, port: int, name: str = "app",
                 **fields: Any) -> None:
        """Register directly (no HTTP), with no check unless ``Check`` is given."""
        self.apply_register({"ID": service_id, "Name": name, "Address": address,
                             "Port": port, **fields})

    def deregister(self, service_id: str) -> bool:
        with self.state.cond:
            return self.state.remove(service_id)

    def check_status(self, check_id: str) -> str | None:
        with self.state.cond:
            check = self.state.checks.get(check_id)
            return None if check is None else check["Status"]

    def service_ids(self, name: str | None = None) -> set[str]:
        with self.state.cond:
            return {s["ID"] for s in self.state.services.values()
                    if name is None or s["Service"] == name}

    def apply_register(self, body: dict[str, Any]) -> None:
        name = body.get("Name")
        if not isinstance(name, str) or not name:
            raise ValueError("Missing service name")
        service_id = body.get("ID") or name
        weights = body.get("Weights") or {"Passing": 1, "Warning": 1}
        service = {"ID": service_id, "Service": name, "Tags": list(body.get("Tags") or []),
                   "Address": body.get("Address") or "", "Meta": dict(body.get("Meta") or {}),
                   "Port": int(body.get("Port") or 0), "Weights": weights,
                   "EnableTagOverride": False}
        check = body.get("Check")
        if check and not check.get("TTL"):
            raise ValueError("the fake only implements TTL checks")
        ttl = go_duration(check["TTL"]) if check else 0.0
        after = (check or {}).get("DeregisterCriticalServiceAfter")
        after = go_duration(after) if after else None
        with self.state.cond:
            self.state.remove(service_id)      # (re-registering replaces)
            self.state.services[service_id] = service
            if check:
                now = time.monotonic()
                check_id = check.get("CheckID") or f"service:{service_id}"
                self.state.checks[check_id] = {
                    "Node": "fake", "CheckID": check_id,
                    "Name": check.get("Name") or f"Service '{name}' check",
                    # (a new check is critical until passed, unless told otherwise)
                    "Status": check.get("Status") or "critical", "Output": "",
                    "ServiceID": service_id, "ServiceName": name, "Type": "ttl",
                    "_ttl": ttl, "_deadline": now + ttl,
                    "_deregister_after": after,
                    "_critical_since": now}
            self.state.changed(name)

    def pass_check(self, check_id: str) -> bool:
        with self.state.cond:
            check = self.state.checks.get(check_id)
            if check is None:
                return False
            check["_deadline"] = time.monotonic() + check["_ttl"]
            if check["Status"] != "passing":
                check["Status"], check["Output"] = "passing", ""
                self.state.changed(check["ServiceName"])
            return True


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True      # (restarted on the same port)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    fake: ConsulFake

    def log_message(self, format: str, *args: Any) -> None:    # (quiet)
        pass

    def setup(self) -> None:
        super().setup()
        self.fake._connections.add(self.connection)

    def finish(self) -> None:
        self.fake._connections.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def _send(self, status: int, body: Any = None, index: int | None = None) -> None:
        if isinstance(body, str):
            data, ctype = body.encode(), "text/plain; charset=utf-8"
        else:
            data, ctype = (b"" if body is None else json.dumps(body).encode(),
                           "application/json")
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        if index is not None:
            self.send_header("X-Consul-Index", str(index))
            self.send_header("X-Consul-KnownLeader", "true")
            self.send_header("X-Consul-LastContact", "0")
        self.end_headers()
        self.wfile.write(data)

    def _authorized(self, query: dict[str, list[str]]) -> bool:
        token = self.headers.get("X-Consul-Token") or (query.get("token") or [None])[0]
        self.fake.tokens.append(token)
        if self.fake.token is not None and token != self.fake.token:
            self._send(403, "ACL not found")
            return False
        return True

    def _client_gone(self) -> bool:
        """Whether the client closed its end (readable with nothing to read)."""
        if not select.select([self.connection], [], [], 0)[0]:
            return False
        try:
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        query = parse_qs(url.query, keep_blank_values=True)
        if not url.path.startswith("/v1/health/service/"):
            self._send(404, "not implemented by the fake")
            return
        if not self._authorized(query):
            return
        name = unquote(url.path[len("/v1/health/service/"):])
        passing = "passing" in query and query["passing"][0].lower() not in ("false", "0")
        try:
            index = int(query.get("index", ["0"])[0])
            wait = min(600.0, go_duration(query["wait"][0])) if "wait" in query else 300.0
        except ValueError as e:
            self._send(400, str(e))
            return
        fake, state = self.fake, self.fake.state
        with state.cond:
            fake.queries += 1
            if index > 0 and state.result_index(name) <= index:
                deadline = time.monotonic() + wait + random.uniform(0, wait / 16)
                fake.blocking += 1
                fake.blocking_by_service[name] = fake.blocking_by_service.get(name, 0) + 1
                gone = False
                try:
                    while state.result_index(name) <= index and fake._running.is_set():
                        left = deadline - time.monotonic()
                        if left <= 0:
                            break
                        # (in slices: a client that hung up ends its query, as in Consul)
                        state.cond.wait(min(left, 0.1))
                        if gone := self._client_gone():
                            break
                finally:
                    fake.blocking -= 1
                    fake.blocking_by_service[name] -= 1
                if gone or not fake._running.is_set():
                    self.close_connection = True        # (no answer at all)
                    return
            result_index, entries = state.result_index(name), state.entries(name, passing)
        self._send(200, entries, result_index)

    def do_PUT(self) -> None:
        url = urlsplit(self.path)
        query = parse_qs(url.query, keep_blank_values=True)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if not self._authorized(query):
            return
        path = url.path
        if path == "/v1/agent/service/register":
            try:
                self.fake.apply_register(json.loads(raw or b"{}"))
            except (ValueError, TypeError) as e:
                self._send(400, f"Invalid service: {e}")
                return
            self._send(200)
        elif path.startswith("/v1/agent/check/pass/"):
            check_id = unquote(path[len("/v1/agent/check/pass/"):])
            if self.fake.pass_check(check_id):
                self._send(200)
            else:
                self._send(404, f'Unknown check ID "{check_id}"')
        elif path.startswith("/v1/agent/service/deregister/"):
            service_id = unquote(path[len("/v1/agent/service/deregister/"):])
            if self.fake.deregister(service_id):
                self._send(200)
            else:
                self._send(404, f'Unknown service ID "{service_id}"')
        else:
            self._send(404, "not implemented by the fake")


@pytest.fixture(scope="session")
def consul_fake():
    """One fake agent for the test session (tests use distinct service names)."""
    fake = ConsulFake().start()
    yield fake
    fake.stop()


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="A fake Consul agent (for tests).")
    parser.add_argument("--port", type=int, default=8500)
    parser.add_argument("--token")
    arguments = parser.parse_args()
    agent = ConsulFake(arguments.port, arguments.token).start()
    print(f"fake Consul agent on {agent.url}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        agent.stop()
