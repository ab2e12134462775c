"""Parked upstream connections (``keepalive_park_after``, poise/proxy/http/parking.py).

Against real poise processes and h11 backends over loopback: an idle pooled connection
is parked (its socket kept, its transport dropped) and revived on the same backend-side
TCP connection, a backend closing a parked connection is noticed, parked connections
expire, count in the connection limits, close on reload and at shutdown, TLS clusters
and ``keepalive_park_after: 0`` never park, and a request that a revived connection
fails before any response byte is re-sent once as for any reused connection.

In process, on a uvloop loop with a real server socket: every descriptor is closed
exactly once (park, revive, close; park, the backend closes; close at shutdown), and the
cluster's rules (which pools park, which idle connection makes room first).

Parking is observed through the admin API's gauges (``poise_upstream_connections_parked``
and ``_idle``, shipped once a second) and /proc (the sockets poise holds to a backend).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time

import pytest
import uvloop
import yaml
from prometheus_client.parser import text_string_to_metric_families

from poise.config import parse_config
from poise.core.backend import Backend, BackendStats
from poise.errors import ConfigError
from poise.proxy.http import parking
from poise.proxy.http.cluster import ClusterRuntime
from poise.proxy.http.pool import UpstreamPool
from tests.support.certs import Pki, needs_openssl
from tests.support.client import H11Client
from tests.support.stream_backend import StreamBackend, server_context
from tests.support.waiting import wait_for

PARK = "300ms"      # parked at the first sweep (once a second) after 0.3 s idle
ESTABLISHED, CLOSE_WAIT = "01", "08"


# -- observing a running poise ------------------------------------------------------------


def metric(px, name: str) -> float:
    r = px.admin.get("/metrics")
    assert r.status == 200, r
    return sum(s.value for family in text_string_to_metric_families(r.body.decode())
               for s in family.samples if s.name == name)


def parked(px) -> float:
    return metric(px, "poise_upstream_connections_parked")


def idle(px) -> float:
    return metric(px, "poise_upstream_connections_idle")


def wait_gauges(px, *, parked_: int, idle_: int, timeout: float = 10.0) -> None:
    wait_for(lambda: parked(px) == parked_ and idle(px) == idle_, timeout,
             lambda: f"{parked_} parked and {idle_} idle (now {parked(px)} and {idle(px)})")


def held(px, backend) -> list[str]:
    """The TCP states of the sockets poise's processes hold (by a descriptor) to
    ``backend``'s port, read from /proc: "01" established, "08" close-wait (the
    backend closed it and poise has not)."""
    states = {}
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[2].endswith(f":{backend.port:04X}"):
                states[f"socket:[{fields[9]}]"] = fields[3]
    out = []
    for pid in [px.pid, *px.children()]:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link in states:
                out.append(states[link])
    return sorted(out)


def served(backend) -> list[tuple[str, int, int]]:
    """``(target, backend connection, request index on it)`` of each request."""
    return [(q["target"], q["conn"], q["index"]) for q in backend.stats()["requests"]]


def concurrently(px, targets: list[str]) -> list[int]:
    """GET each of ``targets`` at once, each on its own client connection: statuses."""
    statuses: list[int] = [0] * len(targets)

    def one(i: int) -> None:
        with H11Client(px.addr) as c:
            statuses[i] = c.get(targets[i]).status

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(targets))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return statuses


# -- 1. parked, then revived on the same backend connection ----------------------------------


def test_an_idle_connection_is_parked_and_revived_on_the_same_backend_connection(stack):
    b = stack.backend()
    px = stack.poise([b], cluster={"keepalive_park_after": PARK}, admin={})
    for i in range(3):
        with H11Client(px.addr) as c:
            r = c.get(f"/echo?{i}")
            assert r.status == 200 and r.json()["target"] == f"/echo?{i}"
        # Parked (still idle, still open: the backend saw neither FIN nor RST) ...
        # (Gauges are shipped once a second: past 1.2 s, none is older than the request,
        # before which a revived connection was warm, not parked.)
        time.sleep(1.2)
        wait_gauges(px, parked_=1, idle_=1)
        assert held(px, b) == [ESTABLISHED]
    # ... and each next request went over the same backend connection: no new connect.
    assert served(b) == [("/echo?0", 1, 1), ("/echo?1", 1, 2), ("/echo?2", 1, 3)]
    assert b.stats()["connections"] == 1


# -- 2. the backend closes a parked connection ----------------------------------------------


def test_a_parked_connection_the_backend_closes_is_closed_and_not_used(stack):
    # The backend closes a connection idle for 5 s: well after poise parked it.
    b = stack.backend(idle_timeout=5.0)
    px = stack.poise([b], cluster={"keepalive_park_after": PARK}, admin={})
    with H11Client(px.addr) as c:
        assert c.request("POST", "/echo?first", body=b"1").status == 200
    wait_gauges(px, parked_=1, idle_=1)
    assert held(px, b) == [ESTABLISHED]
    # Noticed: the descriptor is closed (no close-wait socket left) and out of the pool.
    wait_for(lambda: held(px, b) == [], 10, lambda: f"poise closing it (holds {held(px, b)})")
    wait_gauges(px, parked_=0, idle_=0)
    # A POST is not replayable: a dead connection used here would be a 502.
    with H11Client(px.addr) as c:
        r = c.request("POST", "/echo?second", body=b"2")
        assert r.status == 200 and r.json()["target"] == "/echo?second"
    assert served(b) == [("/echo?first", 1, 1), ("/echo?second", 2, 1)]


# -- 3. keepalive_idle_timeout closes parked connections ------------------------------------


def test_keepalive_idle_timeout_closes_parked_connections(stack):
    b = stack.backend()
    px = stack.poise([b], admin={}, cluster={"keepalive_park_after": PARK,
                                             "keepalive_idle_timeout": "3s"})
    with H11Client(px.addr) as c:
        assert c.get("/echo?first").status == 200
    wait_gauges(px, parked_=1, idle_=1)
    wait_for(lambda: held(px, b) == [], 10, lambda: f"expiry (poise holds {held(px, b)})")
    wait_gauges(px, parked_=0, idle_=0)
    with H11Client(px.addr) as c:
        assert c.get("/echo?second").status == 200
    assert b.stats()["connections"] == 2, "an expired parked connection must not be reused"


# -- 4. when nothing is parked -----------------------------------------------------------------


def test_keepalive_park_after_zero_never_parks(stack):
    b = stack.backend()
    px = stack.poise([b], cluster={"keepalive_park_after": 0}, admin={})
    with H11Client(px.addr) as c:
        assert c.get("/echo?first").status == 200
        wait_gauges(px, parked_=0, idle_=1)
        time.sleep(2.5)         # two sweeps at least
        assert parked(px) == 0 and idle(px) == 1
        assert c.get("/echo?second").status == 200
    assert served(b) == [("/echo?first", 1, 1), ("/echo?second", 1, 2)]


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    p = Pki(tmp_path_factory.mktemp("pki"))
    p.backend = p.leaf("backend", "backend.example", ["backend.example"], ips=["127.0.0.1"])
    return p


@needs_openssl
def test_tls_connections_are_never_parked(stack, pki):
    backend = StreamBackend("tls", tls=server_context(pki.backend))
    try:
        px = stack.poise([backend.address], admin={},
                         cluster={"tls": {"ca": str(pki.ca)}, "keepalive_park_after": PARK})
        with H11Client(px.addr) as c:
            assert c.get("/echo?first").status == 200
            wait_gauges(px, parked_=0, idle_=1)
            time.sleep(2.5)
            assert parked(px) == 0 and idle(px) == 1
            assert c.get("/echo?second").status == 200
        assert [s.requests for s in backend.seen()] == [2], "one kept-alive TLS connection"
    finally:
        backend.close()


# -- 5. connection limits ------------------------------------------------------------------------


def test_parked_connections_count_in_max_connections_and_are_revived_within_it(stack):
    b = stack.backend()
    px = stack.poise([b], admin={}, cluster={"keepalive_park_after": PARK, "max_connections": 2,
                                             "queue_timeout": "10s"})
    assert concurrently(px, ["/slow?delay=0.5"] * 2) == [200, 200]
    assert b.stats()["connections"] == 2
    wait_gauges(px, parked_=2, idle_=2)
    # At the cap with both parked: requests revive them (then queue for them) and no
    # third connection reaches the backend.
    assert concurrently(px, [f"/slow?delay=0.3&i={i}" for i in range(5)]) == [200] * 5
    assert b.stats()["connections"] == 2
    assert {conn for _, conn, _ in served(b)} == {1, 2}
    assert len(held(px, b)) == 2


# -- 6. reload and shutdown ----------------------------------------------------------------------


def test_removing_the_backend_on_reload_closes_its_parked_connections(stack):
    b1, b2 = stack.backend("b1"), stack.backend("b2")
    px = stack.poise([b1], cluster={"keepalive_park_after": PARK}, admin={})
    assert concurrently(px, ["/slow?delay=0.5"] * 3) == [200] * 3
    wait_gauges(px, parked_=3, idle_=3)
    assert held(px, b1) == [ESTABLISHED] * 3
    config = dict(px.config)
    config["clusters"] = [{**config["clusters"][0], "backends": [{"address": b2.address}]}]
    assert px.reload(config).status == 200
    # (A descriptor left open would keep its socket listed, established.)
    wait_for(lambda: held(px, b1) == [], 10, lambda: f"b1's connections closed ({held(px, b1)})")
    wait_gauges(px, parked_=0, idle_=0)
    with H11Client(px.addr) as c:
        assert c.get("/echo?after").json()["name"] == "b2"
    assert px.stop() == 0
    assert "Traceback" not in px.log()


def test_shutdown_with_parked_connections_is_clean(stack):
    b = stack.backend()
    px = stack.poise([b], cluster={"keepalive_park_after": PARK}, admin={})
    assert concurrently(px, ["/slow?delay=0.5"] * 2) == [200, 200]
    wait_gauges(px, parked_=2, idle_=2)
    assert px.stop() == 0
    assert "Traceback" not in px.log() and "ERROR" not in px.log()
    wait_for(lambda: held_by_anyone(b) == 0, 5, "the backend connections gone")


def held_by_anyone(backend) -> int:
    """Established connections to ``backend``'s port (either end), from /proc."""
    with open("/proc/net/tcp") as f:
        return sum(1 for line in f.readlines()[1:]
                   if line.split()[2].endswith(f":{backend.port:04X}")
                   and line.split()[3] == ESTABLISHED)


# -- 7. a revived connection that dies under its request ----------------------------------------


def test_an_idempotent_request_a_revived_connection_drops_is_resent_once(stack):
    # The backend closes, unanswered, the second request of every connection: the one
    # that arrives on the revived connection (it died "while parked", as far as poise
    # can tell: no response byte came back).
    b = stack.backend(drop_reused=True)
    px = stack.poise([b], cluster={"keepalive_park_after": PARK}, admin={})
    with H11Client(px.addr) as c:
        assert c.get("/echo?first").status == 200
    wait_gauges(px, parked_=1, idle_=1)
    with H11Client(px.addr) as c:
        r = c.get("/echo?second")
        assert r.status == 200, "the GET must be re-sent on a fresh connection"
        assert r.json()["target"] == "/echo?second"
    assert b.stats()["dropped"] == 1
    assert served(b) == [("/echo?first", 1, 1), ("/echo?second", 1, 2), ("/echo?second", 2, 1)]


def test_a_post_a_revived_connection_drops_is_not_replayed(stack):
    b = stack.backend(drop_reused=True)
    px = stack.poise([b], cluster={"keepalive_park_after": PARK}, admin={})
    with H11Client(px.addr) as c:
        assert c.request("POST", "/echo?first", body=b"1").status == 200
    wait_gauges(px, parked_=1, idle_=1)
    with H11Client(px.addr) as c:
        assert c.request("POST", "/echo?second", body=b"2").status == 502
    assert [t for t, _, _ in served(b)].count("/echo?second") == 1


# -- in process: descriptors and accounting ---------------------------------------------------


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class Quiet(asyncio.Protocol):
    """An in-process backend connection: keeps what it receives, answers nothing."""

    def __init__(self, seen: list) -> None:
        self.seen = seen
        self.received = b""

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.seen.append(self)
        self.lost = False

    def data_received(self, data: bytes) -> None:
        self.received += data

    def connection_lost(self, exc) -> None:
        self.lost = True


def run(coro_fn) -> None:
    """Run ``coro_fn(loop, server_port, backend_connections)`` on a fresh uvloop loop
    with an in-process backend; the loop's parking lot is closed afterwards."""
    async def main() -> None:
        loop = asyncio.get_running_loop()
        seen: list[Quiet] = []
        server = await loop.create_server(lambda: Quiet(seen), "127.0.0.1", 0)
        try:
            await coro_fn(loop, server.sockets[0].getsockname()[1], seen)
        finally:
            parking.close_lot(loop)
            server.close()
    uvloop.run(main())


def pool_for(loop, port: int, park_after: float = 0.1) -> UpstreamPool:
    pool = UpstreamPool(Backend("127.0.0.1", port), BackendStats(), None, max_idle=16,
                        idle_timeout=60.0, connect_timeout=2.0, response_timeout=5.0,
                        loop=loop)
    pool.park_after = park_after
    return pool


async def turns(n: int = 5) -> None:
    for _ in range(n):
        await asyncio.sleep(0.01)


async def park_all(pool: UpstreamPool, conns) -> None:
    for conn in conns:
        pool.release(conn)
    pool.expire(pool.loop.time() + 1.0)
    await turns()


def test_park_revive_close_closes_each_descriptor_once():
    async def body(loop, port, seen):
        pool = pool_for(loop, port)
        conn = await pool.connect()
        await turns()
        before = open_fds()         # (both ends of the connection: one is the backend's)
        await park_all(pool, [conn])
        assert list(pool.parked) and not pool.idle and pool.active == 1
        assert pool.stats.active_connections == 1
        # The transport's descriptor is gone, the parked one and the lot's epoll set came.
        assert open_fds() == before + 1
        revived = await pool.connect()
        assert revived.reused and not pool.parked and pool.active == 1
        assert pool.stats.active_connections == 1
        revived.transport.write(b"ping")
        await turns()
        assert len(seen) == 1 and seen[0].received == b"ping", "the same backend connection"
        assert not seen[0].lost
        assert open_fds() == before + 1
        revived.close()
        await turns()
        assert pool.active == 0 and pool.stats.active_connections == 0
        assert open_fds() == before - 1     # (its backend end closed too)
    run(body)


def test_a_parked_descriptor_the_backend_closes_is_closed_once():
    async def body(loop, port, seen):
        pool = pool_for(loop, port)
        conns = [await pool.connect() for _ in range(3)]
        await turns()
        before = open_fds()
        await park_all(pool, conns)
        assert len(pool.parked) == 3 and pool.active == 3
        seen[1].transport.close()           # the backend closes one
        await turns()
        assert len(pool.parked) == 2 and len(pool.parked_since) == 2
        assert pool.active == 2 and pool.stats.active_connections == 2
        assert open_fds() == before + 1 - 2     # (+ the lot's epoll set)
        seen[2].transport.write(b"unasked")     # bytes nobody asked for: closed too
        await turns()
        assert len(pool.parked) == 1 and pool.active == 1
        pool.close_idle()
        await turns()
        assert not pool.parked and pool.active == 0 and pool.stats.active_connections == 0
        assert all(s.lost for s in seen)
        assert open_fds() == before + 1 - 6
    run(body)


def test_closing_the_lot_closes_every_parked_descriptor():
    async def body(loop, port, seen):
        pool = pool_for(loop, port)
        conns = [await pool.connect() for _ in range(2)]
        await turns()
        before = open_fds()
        await park_all(pool, conns)
        parking.close_lot(loop)             # worker shutdown
        await turns()
        assert not pool.parked and pool.active == 0
        assert all(s.lost for s in seen)
        assert open_fds() == before - 4
    run(body)


def test_expire_closes_parked_connections_after_the_idle_timeout():
    async def body(loop, port, seen):
        pool = pool_for(loop, port)
        conns = [await pool.connect() for _ in range(2)]
        await turns()
        now = loop.time()
        await park_all(pool, conns)
        assert len(pool.parked) == 2
        pool.expire(now + 30.0)             # within idle_timeout (60 s): kept
        assert len(pool.parked) == 2
        pool.expire(now + 61.0)
        await turns()
        assert not pool.parked and pool.active == 0 and all(s.lost for s in seen)
    run(body)


def test_max_idle_counts_parked_connections():
    async def body(loop, port, seen):
        pool = pool_for(loop, port)
        pool.max_idle = 2
        conns = [await pool.connect() for _ in range(3)]
        await turns()
        await park_all(pool, conns[:2])
        pool.release(conns[2])              # 2 parked: no room for a third idle one
        await turns()
        assert len(pool.parked) == 2 and not pool.idle and pool.active == 2
    run(body)


# -- in process: the cluster's rules ---------------------------------------------------------


def spec(port: int, **fields):
    """Cluster ``app`` with one backend on ``port``, as parsed from a config."""
    data = {"listeners": [{"name": "web", "bind": "127.0.0.1:8080",
                           "routes": [{"cluster": "app"}]}],
            "clusters": [{"name": "app", "backends": [{"address": f"127.0.0.1:{port}"}],
                          **fields}]}
    return parse_config(yaml.safe_dump(data)).clusters[0]


def cluster(loop, port: int, **fields) -> ClusterRuntime:
    return ClusterRuntime(spec(port, **fields), loop)


def test_which_clusters_park():
    loop = asyncio.new_event_loop()
    try:
        def park_after(**fields) -> float:
            rt = cluster(loop, 9001, **fields)
            rt.stop()
            return next(iter(rt.pools.values())).park_after
        assert park_after() == 5.0
        assert park_after(keepalive_park_after="1s") == 1.0
        assert park_after(keepalive_park_after=0) == 0.0
        assert park_after(send_proxy_protocol="v1") == 0.0
        assert park_after(protocol="h2") == 0.0
        assert park_after(tls={}) == 0.0
    finally:
        loop.close()


def test_keepalive_park_after_must_not_be_negative():
    with pytest.raises(ConfigError, match="keepalive_park_after"):
        spec(9001, keepalive_park_after=-1)


@pytest.mark.parametrize(("value", "code"), [("250ms", 0), ("0", 0), ("-2s", 2)])
def test_poise_check_validates_keepalive_park_after(tmp_path, value, code):
    path = tmp_path / "poise.yaml"
    path.write_text("listeners:\n  - {name: web, bind: 127.0.0.1:8080, routes: [{cluster: app}]}\n"
                    "clusters:\n  - name: app\n    backends: [{address: 127.0.0.1:9001}]\n"
                    f"    keepalive_park_after: {value}\n")
    result = subprocess.run([sys.executable, "-m", "poise", "check", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == code, result.stderr
    if code:
        assert "clusters[0].keepalive_park_after" in result.stderr


def test_a_reload_to_tls_closes_parked_connections():
    async def body(loop, port, seen):
        rt = cluster(loop, port, keepalive_park_after="100ms")
        pool = next(iter(rt.pools.values()))
        conns = [await pool.connect() for _ in range(2)]
        await turns()
        await park_all(pool, conns)
        assert len(pool.parked) == 2
        rt.reconfigure(spec(port, keepalive_park_after="100ms", tls={}))
        await turns()
        assert not pool.parked and pool.park_after == 0.0 and all(s.lost for s in seen)
        rt.stop()
    run(body)


def test_free_idle_connection_closes_the_longest_parked_one_first():
    async def body(loop, port, seen):
        rt = cluster(loop, port, keepalive_park_after="100ms", max_connections=8)
        pool = next(iter(rt.pools.values()))
        conns = [await pool.connect() for _ in range(3)]
        await turns()
        pool.release(conns[0])
        pool.release(conns[1])
        for c in conns[:2]:
            c.idle_since -= 10.0            # released long ago: to be parked
        pool.expire(loop.time())
        pool.release(conns[2])              # warm
        await turns()
        assert len(pool.parked) == 2 and len(pool.idle) == 1
        oldest = pool.parked[0]
        rt.free_idle_connection()
        await turns()
        assert list(pool.parked) != [] and oldest not in pool.parked
        assert len(pool.idle) == 1 and pool.active == 2
        rt.free_idle_connection()
        rt.free_idle_connection()           # then the warm one
        await turns()
        assert not pool.parked and not pool.idle and pool.active == 0
        rt.stop()
    run(body)
