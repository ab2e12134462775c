"""The zookeeper source and registrar against a real ZooKeeper (Debian's zookeeper)."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import subprocess
import sys
import time
import uuid

import pytest

pytest.importorskip("kazoo")

from kazoo.client import KazooClient  # noqa: E402
from kazoo.protocol.states import KazooState  # noqa: E402

from poise.config.discovery import ZookeeperDiscovery  # noqa: E402
from poise.discovery.base import Instance  # noqa: E402
from poise.discovery.register_zookeeper import ZookeeperRegistrar  # noqa: E402
from poise.discovery.zookeeper import ZookeeperSource  # noqa: E402
from tests.support import zookeeper as zk_support  # noqa: E402
from tests.support.procs import ROOT  # noqa: E402
from tests.support.waiting import wait_for  # noqa: E402
from tests.support.zookeeper import ZooKeeper, watching_sessions  # noqa: E402

zookeeper_server = zk_support.zookeeper_server      # (the session's ZooKeeper)
WAIT = 10.0     # generous: an update normally arrives in milliseconds


def fresh_path() -> str:
    return f"/services/{uuid.uuid4().hex[:8]}"


def entry(address: str, weight: int = 1) -> bytes:
    return json.dumps({"address": address, "weight": weight}).encode()


def source(zk: ZooKeeper, path: str, timeout: float = 5.0) -> ZookeeperSource:
    return ZookeeperSource(ZookeeperDiscovery(type="zookeeper", hosts=zk.hosts, path=path,
                                              timeout=timeout))


async def next_set(watch, timeout: float = WAIT) -> list[Instance]:
    return await asyncio.wait_for(anext(watch), timeout)


@pytest.fixture
def client(zookeeper_server):
    """A plain kazoo client, to change the registry behind the source's back."""
    # (reconnecting at least every second, as the source's client does: kazoo's default
    # backoff grows towards an hour, so after a long restart it would come back late)
    c = KazooClient(hosts=zookeeper_server.hosts, timeout=5.0,
                    connection_retry={"max_tries": -1, "delay": 0.1, "max_delay": 1.0})
    c.start(timeout=10)
    yield c
    c.stop()
    c.close()


async def test_full_set_at_start_then_after_every_change(zookeeper_server, client, caplog):
    path = fresh_path()
    client.create(f"{path}/a", entry("127.0.0.1:9001"), makepath=True)
    client.create(f"{path}/b", entry("127.0.0.1:9002", 3))
    watch = source(zookeeper_server, path).watch()
    try:
        assert await next_set(watch) == [Instance("127.0.0.1:9001"),
                                         Instance("127.0.0.1:9002", 3)]
        client.create(f"{path}/c", entry("127.0.0.1:9003"))
        assert [i.address for i in await next_set(watch)] == \
            ["127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003"]
        client.delete(f"{path}/a")
        assert [i.address for i in await next_set(watch)] == \
            ["127.0.0.1:9002", "127.0.0.1:9003"]
        client.set(f"{path}/b", entry("127.0.0.1:9002", 7))        # a data change
        assert await next_set(watch) == [Instance("127.0.0.1:9002", 7),
                                         Instance("127.0.0.1:9003")]
        with caplog.at_level(logging.WARNING, logger="poise"):
            client.create(f"{path}/junk", b"{not json")
            client.create(f"{path}/noaddr", b'{"weight": 2}')
            client.create(f"{path}/d", entry("127.0.0.1:9004"))
            got = await next_set(watch)
            while len(got) < 3:         # the three creations may come as 1 to 3 sets
                got = await next_set(watch)
        assert [i.address for i in got] == ["127.0.0.1:9002", "127.0.0.1:9003",
                                            "127.0.0.1:9004"]
        assert f"{path}/junk: not JSON" in caplog.text
        assert f"{path}/noaddr: no address" in caplog.text
        # Everything removed: an explicitly empty set, honoured.
        for child in client.get_children(path):
            client.delete(f"{path}/{child}")
        got = await next_set(watch)
        while got:
            got = await next_set(watch)
        assert got == []
    finally:
        await watch.aclose()


async def test_a_missing_path_yields_empty_and_is_waited_for(zookeeper_server, client):
    path = fresh_path()
    watch = source(zookeeper_server, path).watch()
    try:
        assert await next_set(watch) == []
        client.create(f"{path}/a", entry("127.0.0.1:9001"), makepath=True)
        assert await next_set(watch) == [Instance("127.0.0.1:9001")]
        client.delete(path, recursive=True)
        got = await next_set(watch)
        assert got == []
        client.create(f"{path}/b", entry("127.0.0.1:9002"), makepath=True)
        assert await next_set(watch) == [Instance("127.0.0.1:9002")]
    finally:
        await watch.aclose()


async def test_one_session_watches_per_source_and_none_after_it_ends(zookeeper_server,
                                                                     client):
    path = fresh_path()
    client.create(f"{path}/a", entry("127.0.0.1:9001"), makepath=True)
    watch = source(zookeeper_server, path).watch()
    try:
        await next_set(watch)
        sessions = watching_sessions(zookeeper_server, path)
        assert len(sessions) == 1
        for _ in range(3):      # changes do not add sessions or watches
            client.set(f"{path}/a", entry("127.0.0.1:9001", 2))
            client.set(f"{path}/a", entry("127.0.0.1:9001", 1))
        assert watching_sessions(zookeeper_server, path) == sessions
    finally:
        await watch.aclose()
    # The source's session is closed when the watch ends, and its watches with it.
    wait_for(lambda: not watching_sessions(zookeeper_server, path), WAIT,
             "the source's watches removed")


async def test_an_expired_session_fails_the_watch_and_a_new_watch_starts_over(
        zookeeper_server, client):
    path = fresh_path()
    client.create(f"{path}/a", entry("127.0.0.1:9001"), makepath=True)
    src = source(zookeeper_server, path)
    watch = src.watch()
    try:
        await next_set(watch)
        (session,) = watching_sessions(zookeeper_server, path)
        assert int(session, 16) == src.client.client_id[0]
        expire(zookeeper_server, src.client)
        with pytest.raises(ConnectionError, match="session lost"):
            await next_set(watch)
    finally:
        await watch.aclose()
    watch = src.watch()
    try:
        assert await next_set(watch) == [Instance("127.0.0.1:9001")]
        assert watching_sessions(zookeeper_server, path) != {session}
    finally:
        await watch.aclose()


def expire(zk: ZooKeeper, client) -> None:
    """Expire the session of a live kazoo client the standard way: open the session from
    another client (same id and password) and close it there."""
    other = KazooClient(hosts=zk.hosts, client_id=client.client_id, timeout=5.0)
    other.start(timeout=10)
    other.stop()
    other.close()


def registrar(zk: ZooKeeper, path: str, address: str = "127.0.0.1:9100",
              **options) -> ZookeeperRegistrar:
    return ZookeeperRegistrar(address=address, hosts=zk.hosts, path=path, **options)


async def test_registrar_creates_an_ephemeral_node_and_stop_deletes_it(zookeeper_server,
                                                                      client):
    path = fresh_path()
    reg = registrar(zookeeper_server, path, weight=4, ttl=5.0)
    reg.start()
    try:
        data, stat = client.get(f"{path}/127.0.0.1:9100")
        assert json.loads(data) == {"address": "127.0.0.1:9100", "weight": 4}
        assert stat.ephemeralOwner == reg._client.client_id[0]
        watch = source(zookeeper_server, path).watch()
        try:
            assert await next_set(watch) == [Instance("127.0.0.1:9100", 4)]
        finally:
            await watch.aclose()
    finally:
        reg.stop()
    # Gone before stop() returned.
    assert client.exists(f"{path}/127.0.0.1:9100") is None
    assert client.get_children(path) == []


def test_registrar_replaces_a_stale_node_but_not_a_persistent_one(zookeeper_server, client):
    path = fresh_path()
    # A previous incarnation's node, its session still alive (it was killed hard).
    client.create(f"{path}/web-1", entry("127.0.0.1:9000"), ephemeral=True, makepath=True)
    reg = registrar(zookeeper_server, path, node="web-1")
    reg.start()
    try:
        data, stat = client.get(f"{path}/web-1")
        assert json.loads(data)["address"] == "127.0.0.1:9100"
        assert stat.ephemeralOwner == reg._client.client_id[0]
    finally:
        reg.stop()
    client.create(f"{path}/web-2", entry("127.0.0.1:9000"))
    with pytest.raises(RuntimeError, match="not ephemeral"):
        registrar(zookeeper_server, path, node="web-2").start()
    assert json.loads(client.get(f"{path}/web-2")[0])["address"] == "127.0.0.1:9000"
    with pytest.raises(ValueError, match="znode name"):
        registrar(zookeeper_server, path, node="a/b")


def test_registrar_registers_again_after_its_session_expired(zookeeper_server, client):
    path = fresh_path()
    node = f"{path}/127.0.0.1:9100"
    reg = registrar(zookeeper_server, path, ttl=5.0)
    reg.start()
    try:
        old = reg._client.client_id[0]
        expire(zookeeper_server, reg._client)

        def registered_again():
            stat = client.exists(node)
            return stat is not None and stat.ephemeralOwner not in (0, old)

        wait_for(registered_again, WAIT, "the node created again in a new session",
                 step=0.1)
        assert reg._client.client_id[0] != old
    finally:
        reg.stop()
    assert client.exists(node) is None


def register_cli(zk: ZooKeeper, path: str, ttl: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "poise", "register", "zookeeper", "--hosts", zk.hosts,
         "--path", path, "--address", "127.0.0.1:9200", "--weight", "2", "--ttl", ttl],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_poise_register_sigterm_deregisters_before_exiting(zookeeper_server, client):
    path = fresh_path()
    node = f"{path}/127.0.0.1:9200"
    proc = register_cli(zookeeper_server, path, "10s")
    try:
        wait_for(lambda: client.exists(node), WAIT, "the node registered", step=0.05)
        assert json.loads(client.get(node)[0]) == {"address": "127.0.0.1:9200", "weight": 2}
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=WAIT)[0].decode()
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, out
    assert "Traceback" not in out, out
    assert client.exists(node) is None     # gone when the process ended, not 10 s later


def test_a_registered_process_killed_hard_vanishes_when_its_session_expires(
        zookeeper_server, client):
    path = fresh_path()
    node = f"{path}/127.0.0.1:9200"
    ttl = 2.0
    proc = register_cli(zookeeper_server, path, f"{ttl}s")
    try:
        wait_for(lambda: client.exists(node), WAIT, "the node registered", step=0.05)
    finally:
        proc.kill()         # SIGKILL: no deregistration
        proc.wait()
    killed = time.monotonic()
    assert client.exists(node) is not None      # still there: only the session holds it
    # The server expires sessions by tick buckets: allow a tick and some slack.
    wait_for(lambda: client.exists(node) is None, 2 * ttl + 3, "the node expired",
             step=0.05)
    elapsed = time.monotonic() - killed
    print(f"node gone {elapsed:.2f}s after SIGKILL (ttl {ttl}s)")


# The outage ridden out below is a JVM stopped and started again: a second or two on an
# idle box, but long enough on a loaded one for a 20 s timeout to run out.  The source's
# timeout is set far above it, and the premise (an outage shorter than the timeout) is
# checked against the disconnection the source's client actually went through.
RIDE_OUT = 60.0


def disconnections(states: list[tuple[float, object]]) -> list[float]:
    """How long each disconnection lasted (inf: not over), from a kazoo client's state
    changes as (time.monotonic(), KazooState) pairs."""
    spans, down = [], None
    for at, state in states:
        if state != KazooState.CONNECTED:
            down = at if down is None else down
        elif down is not None:
            spans.append(at - down)
            down = None
    return spans + [float("inf")] * (down is not None)


# These last two stop the session's server (and start it again).
async def test_an_outage_shorter_than_the_timeout_is_ridden_out(zookeeper_server, client):
    path = fresh_path()
    client.create(f"{path}/a", entry("127.0.0.1:9001"), makepath=True)
    src = source(zookeeper_server, path, timeout=RIDE_OUT)
    watch = src.watch()
    try:
        assert await next_set(watch) == [Instance("127.0.0.1:9001")]
        states: list[tuple[float, object]] = []     # the source's session, as it saw it
        src.client.add_listener(lambda state: states.append((time.monotonic(), state)))
        next_one = asyncio.ensure_future(next_set(watch, timeout=RIDE_OUT + WAIT))
        # The restart runs in threads: the event loop, and the source's clock on the
        # outage with it, keep running as they would in poise.
        try:
            await asyncio.to_thread(zookeeper_server.stop)
            await asyncio.sleep(0.5)
        finally:
            await asyncio.to_thread(zookeeper_server.start)
        # Same watch: once reconnected, it reads again and its watches are set again.
        await asyncio.to_thread(wait_for, lambda: client.connected, RIDE_OUT,
                                "the test's client reconnected")
        await asyncio.to_thread(client.create, f"{path}/b", entry("127.0.0.1:9002"))
        try:
            got = await next_one
        except (ConnectionError, TimeoutError) as e:
            pytest.fail(f"not ridden out: {e!r}; the source's disconnections: "
                        f"{disconnections(states)} (timeout {RIDE_OUT:g}s)")
        assert [i.address for i in got] == ["127.0.0.1:9001", "127.0.0.1:9002"]
        # The premise: the source was cut off, and for less than its timeout.
        outages = disconnections(states)
        assert outages and max(outages) < RIDE_OUT, outages
        client.delete(f"{path}/a")
        assert await next_set(watch) == [Instance("127.0.0.1:9002")]
    finally:
        await watch.aclose()


async def test_server_down_fails_the_watch_then_a_new_watch_works(zookeeper_server, client):
    path = fresh_path()
    client.create(f"{path}/a", entry("127.0.0.1:9001"), makepath=True)
    reg = registrar(zookeeper_server, path, ttl=10.0)     # outlives a short outage
    reg.start()
    src = source(zookeeper_server, path, timeout=2.0)
    watch = src.watch()
    try:
        assert len(await next_set(watch)) == 2
        zookeeper_server.stop()
        down = time.monotonic()
        with pytest.raises(ConnectionError, match="zookeeper"):
            await next_set(watch)
        failed_after = time.monotonic() - down
        await watch.aclose()
        assert src.client is None
    finally:
        if zookeeper_server.proc is None:
            zookeeper_server.start()
    # Not before the timeout (a shorter outage is ridden out), not much after it.
    assert 1.5 <= failed_after <= 2.0 + 5, failed_after
    watch = src.watch()
    try:
        # The registrar's session survived the outage: its node is still listed.
        got = await next_set(watch)
        assert sorted(i.address for i in got) == ["127.0.0.1:9001", "127.0.0.1:9100"]
        assert len(watching_sessions(zookeeper_server, path)) == 1
        client.delete(f"{path}/a")
        assert [i.address for i in await next_set(watch)] == ["127.0.0.1:9100"]
    finally:
        await watch.aclose()
        reg.stop()
