"""Per-request Python cost of the HTTP data path, without sockets.

Drives a ClientConnection and an UpstreamConnection with in-memory transports:
one keep-alive GET in, one small response back, per iteration.  What it measures is
the interpreter work poise adds on top of the syscalls (which `make bench` covers).

    .venv/bin/python bench/micro_proxy.py [iterations] [--resilience]

``--resilience`` adds an (unstarted) health check and outlier detection to the cluster:
the per-request cost of having them configured.  ``--no-metrics`` turns per-request
counting off (``metrics: {enabled: false}``); ``--access-log`` writes a JSON access log
to a temporary file (through its writer thread, as poise does); ``--rate-limit`` puts
a local rate limit (client_ip, never reached) on the listener: its per-request cost.
"""

from __future__ import annotations

import collections
import sys
import tempfile
import time

import uvloop

from poise.config.load import parse_config
from poise.observability.access_log import AccessLogs
from poise.proxy.http.protocol import ClientConnection
from poise.proxy.http.site import ClusterRuntime, Site
from poise.proxy.http.upstream import UpstreamConnection
from poise.proxy.ratelimits import Limiters
from poise.ratelimit.shared import SharedState

CONFIG = """
listeners: [{name: web, bind: "127.0.0.1:1", routes: [{cluster: app}]}]
clusters: [{name: app, backends: [{address: "127.0.0.1:2"}, {address: "127.0.0.1:3"}]}]
"""
RESILIENCE = """
    health_check: {path: /health, interval: 1s}
    outlier_detection: {consecutive_failures: 5}
"""
REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:19500\r\n\r\n"
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Wed, 25 Nov 2026 12:00:00 GMT\r\n"
            b"Content-Type: text/plain\r\nContent-Length: 64\r\nConnection: keep-alive\r\n\r\n"
            + b"x" * 64)


class MemoryTransport(collections.deque):
    """Just enough of asyncio.Transport; remembers what was written last.  Its
    ``write`` is a C method (deque.append, keeping one item), as uvloop's is: a
    Python-level one would cost the harness about a thousand instructions a call."""

    __slots__ = ()
    write = collections.deque.append

    def __init__(self) -> None:
        super().__init__(maxlen=1)

    @property
    def last(self) -> bytes:
        return self[0] if self else b""

    def get_extra_info(self, name: str, default=None):
        return ("127.0.0.1", 40000) if name == "peername" else default

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...


def main(iterations: int, resilience: bool = False, counting: bool = True,
         access_log: bool = False, rate_limit: bool = False) -> None:
    loop = uvloop.new_event_loop()
    text = CONFIG
    if resilience:
        text = CONFIG.replace("clusters: [{name: app,", "clusters: [{name: app, "
                              + RESILIENCE.strip().replace("\n    ", ", ") + ",")
    if access_log:
        text += f"access_log: {{format: json, path: {tempfile.mkdtemp()}/access.log}}\n"
    if rate_limit:
        text = text.replace("routes: [{cluster: app}]",
                            "rate_limit: {rate: 1000000000/s}, routes: [{cluster: app}]")
    config = parse_config(text)
    limiters = Limiters(SharedState.create(config.rate_limit_table_slots, shareable=False))
    limiters.begin(["web"])
    clusters = {c.name: ClusterRuntime(c, loop) for c in config.clusters}
    logs = AccessLogs(loop)
    logs.configure(config)
    site = Site(config.listeners[0], clusters, loop, counting, logs.for_listener("web"),
                limiters=limiters)
    upstreams = {}
    for backend, pool in clusters["app"].pools.items():
        conn = UpstreamConnection(pool)
        conn.connection_made(MemoryTransport())
        pool.release(conn)
        upstreams[backend] = conn
    client = ClientConnection(site)
    client_transport = MemoryTransport()
    client.connection_made(client_transport)
    conns = list(upstreams.values())

    def one() -> None:
        client.data_received(REQUEST)
        ex = client.current
        ex.conn.data_received(RESPONSE)

    for _ in range(1000):
        one()
    assert client_transport.last.startswith(b"HTTP/1.1 200"), client_transport.last
    start = time.perf_counter()
    for _ in range(iterations):
        one()
    elapsed = time.perf_counter() - start
    assert all(c.transport.last.startswith(b"GET / HTTP/1.1\r\n") for c in conns)
    print(f"{elapsed / iterations * 1e6:.2f} µs per request (Python work only, {iterations} requests)")
    print(client_transport.last.decode(errors="replace").split("\r\n\r\n")[0])


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    main(int(args[0]) if args else 200_000, "--resilience" in sys.argv,
         "--no-metrics" not in sys.argv, "--access-log" in sys.argv, "--rate-limit" in sys.argv)
