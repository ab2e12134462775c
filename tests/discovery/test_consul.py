"""The consul source and registrar, against a fake Consul agent
(tests/support/consul_fake.py: no Consul server can be installed here)."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import pytest

from poise.config.discovery import ConsulDiscovery
from poise.discovery import register
from poise.discovery.base import Instance
from poise.discovery.consul import ConsulError, ConsulSource, go_duration, parse_agent
from poise.discovery.register_consul import ConsulRegistrar
from tests.support import consul_fake as fake_support
from tests.support.consul_fake import ConsulFake
from tests.support.procs import refused_address
from tests.support.waiting import wait_for

consul_fake = fake_support.consul_fake      # (the session's fake agent)
WAIT = 10.0     # generous: an update normally arrives in milliseconds


def fresh_name() -> str:
    return f"app-{uuid.uuid4().hex[:8]}"


def source(fake: ConsulFake, service: str, **options) -> ConsulSource:
    return ConsulSource(ConsulDiscovery(type="consul", address=fake.url, service=service,
                                        **options))


class Follow:
    """A source's watch run by a task, as the runner does (so that its next blocking
    query goes out while the test looks at the fake); ``async with`` stops it."""

    def __init__(self, src: ConsulSource) -> None:
        self.queue: asyncio.Queue[list[Instance] | Exception] = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._run(src))

    async def _run(self, src: ConsulSource) -> None:
        try:
            async for instances in src.watch():
                self.queue.put_nowait(instances)
        except Exception as e:  # noqa: BLE001 (handed to the test)
            self.queue.put_nowait(e)

    async def next(self, timeout: float = WAIT) -> list[Instance]:
        item = await asyncio.wait_for(self.queue.get(), timeout)
        if isinstance(item, Exception):
            raise item
        return item

    async def nothing_for(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        assert self.queue.empty(), f"unexpected: {self.queue.get_nowait()}"

    async def __aenter__(self) -> Follow:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def first(src: ConsulSource) -> list[Instance]:
    """The first set of a watch (or what it raises)."""
    async with Follow(src) as follow:
        return await follow.next()


async def blocked(fake: ConsulFake, service: str, count: int = 1) -> None:
    """Wait until ``count`` blocking queries on ``service`` are held by the fake."""
    deadline = time.monotonic() + WAIT
    while fake.blocking_by_service.get(service, 0) != count:
        assert time.monotonic() < deadline, \
            f"{fake.blocking_by_service.get(service, 0)} blocking queries, not {count}"
        await asyncio.sleep(0.01)


def ttl_check(ttl: str, status: str = "passing", after: str | None = None) -> dict:
    check = {"TTL": ttl, "Status": status}
    if after:
        check["DeregisterCriticalServiceAfter"] = after
    return check


def test_helpers():
    assert parse_agent("http://10.0.0.1:8501") == ("10.0.0.1", 8501, False)
    assert parse_agent("https://consul.internal") == ("consul.internal", 8500, True)
    assert parse_agent("127.0.0.1:8500") == ("127.0.0.1", 8500, False)
    with pytest.raises(ValueError):
        parse_agent("ftp://x")
    assert go_duration(30.0) == "30s"
    assert go_duration(0.25) == "250ms"
    assert fake_support.go_duration("1m30s") == 90.0


async def test_initial_set_then_registrations_and_deregistrations(consul_fake):
    name = fresh_name()
    consul_fake.register("b", "127.0.0.2", 9002, name, Tags=["v2"],
                         Meta={"zone": "z1", "version": "2"},
                         Weights={"Passing": 5, "Warning": 1})
    consul_fake.register("a", "", 9001, name)   # no address: the node's
    consul_fake.register("x", "127.0.0.9", 9009, "other-" + name)
    try:
        async with Follow(source(consul_fake, name)) as follow:
            a = Instance("127.0.0.1:9001", metadata={"id": "a", "node": "fake", "tags": [],
                                                      "meta": {}})
            b = Instance("127.0.0.2:9002", 5, zone="z1",
                         metadata={"id": "b", "node": "fake", "tags": ["v2"],
                                   "meta": {"zone": "z1", "version": "2"}})
            assert await follow.next() == [a, b]
            # One blocking query (wait: 30 s) held: a change answers it at once.
            await blocked(consul_fake, name)
            consul_fake.register("c", "::1", 9003, name)
            c = Instance("[::1]:9003", metadata={"id": "c", "node": "fake", "tags": [],
                                                 "meta": {}})
            assert await follow.next(5) == [a, b, c]
            consul_fake.deregister("a")
            assert await follow.next(5) == [b, c]
            consul_fake.deregister("b")
            consul_fake.deregister("c")
            assert await follow.next(5) == []       # an empty set is a set
            await blocked(consul_fake, name)
            await asyncio.sleep(0.2)
            assert consul_fake.blocking_by_service[name] == 1    # one watch, one query
    finally:
        for service_id in ("a", "b", "c", "x"):
            consul_fake.deregister(service_id)
    # The watch hung up: the fake no longer holds its query.
    await blocked(consul_fake, name, 0)


async def test_an_unchanged_index_yields_nothing(consul_fake):
    name = fresh_name()
    consul_fake.register(f"{name}-1", "127.0.0.1", 9001, name)
    try:
        async with Follow(source(consul_fake, name, wait="200ms")) as follow:
            assert len(await follow.next()) == 1
            before = consul_fake.queries
            await follow.nothing_for(1.0)       # queries time out at the same index
            assert consul_fake.queries >= before + 3
            consul_fake.register(f"{name}-2", "127.0.0.1", 9002, name)
            assert len(await follow.next()) == 2
    finally:
        consul_fake.deregister(f"{name}-1")
        consul_fake.deregister(f"{name}-2")


async def test_ttl_expiry_drops_the_instance_from_passing(consul_fake):
    name = fresh_name()
    ok, expiring = f"{name}-ok", f"{name}-exp"
    consul_fake.register(ok, "127.0.0.1", 9001, name)
    consul_fake.register(expiring, "127.0.0.1", 9002, name, Check=ttl_check("500ms"))
    try:
        async with Follow(source(consul_fake, name)) as follow, \
                Follow(source(consul_fake, name, passing=False)) as follow_all:
            assert [i.address for i in await follow.next()] == ["127.0.0.1:9001",
                                                                "127.0.0.1:9002"]
            assert len(await follow_all.next()) == 2
            # Not passed within its TTL: critical, no longer among the passing.
            assert [i.address for i in await follow.next()] == ["127.0.0.1:9001"]
            assert consul_fake.check_status(f"service:{expiring}") == "critical"
            # passing: false still lists it (poise's own health checks decide).
            assert len(await follow_all.next()) == 2
            consul_fake.pass_check(f"service:{expiring}")
            assert len(await follow.next()) == 2
    finally:
        consul_fake.deregister(ok)
        consul_fake.deregister(expiring)


def test_critical_for_too_long_is_deregistered(consul_fake):
    name = fresh_name()
    consul_fake.register(f"{name}-1", "127.0.0.1", 9001, name,
                         Check=ttl_check("200ms", after="300ms"))
    assert consul_fake.service_ids(name) == {f"{name}-1"}
    wait_for(lambda: not consul_fake.service_ids(name), WAIT, "deregistered when critical")


async def test_invalid_entries_are_skipped_with_a_warning(consul_fake, caplog):
    name = fresh_name()
    consul_fake.register(f"{name}-ok", "127.0.0.1", 9001, name)
    consul_fake.register(f"{name}-bad", "127.0.0.1", 9002, name,
                         Weights={"Passing": 0, "Warning": 1})
    consul_fake.register(f"{name}-noport", "127.0.0.1", 0, name)
    try:
        with caplog.at_level(logging.WARNING, logger="poise"):
            assert [i.address for i in await first(source(consul_fake, name))] \
                == ["127.0.0.1:9001"]
        assert f"{name}/{name}-bad: weight must be" in caplog.text
        assert f"{name}/{name}-noport: no address or port" in caplog.text
    finally:
        for suffix in ("ok", "bad", "noport"):
            consul_fake.deregister(f"{name}-{suffix}")


async def test_token_is_sent_and_a_wrong_one_raises():
    fake = ConsulFake(token="s3cret").start()
    try:
        fake.register("t1", "127.0.0.1", 9001, "app")
        assert [i.address for i in await first(source(fake, "app", token="s3cret"))] \
            == ["127.0.0.1:9001"]
        assert fake.tokens and set(fake.tokens) == {"s3cret"}
        with pytest.raises(ConsulError, match="403") as raised:
            await first(source(fake, "app", token="wrong"))
        assert raised.value.status == 403
        with pytest.raises(ConsulError, match="ACL not found"):
            await first(source(fake, "app"))
    finally:
        fake.stop()


async def test_agent_stopped_raises_and_restarted_works():
    fake = ConsulFake().start()
    try:
        fake.register("r1", "127.0.0.1", 9001, "app")
        async with Follow(source(fake, "app")) as follow:
            assert len(await follow.next()) == 1
            await blocked(fake, "app")
            await asyncio.to_thread(fake.stop)
            with pytest.raises(ConnectionError):
                await follow.next()
        # Refused while it is down: the runner's next watch() raises too.
        with pytest.raises(ConnectionError):
            await first(source(fake, "app"))
        fake.start()        # (same port, same state)
        async with Follow(source(fake, "app")) as follow:
            assert [i.address for i in await follow.next()] == ["127.0.0.1:9001"]
            await blocked(fake, "app")
            fake.register("r2", "127.0.0.1", 9002, "app")
            assert len(await follow.next()) == 2
    finally:
        fake.stop()


async def test_unreachable_agent_raises():
    spec = ConsulDiscovery(type="consul", address=f"http://{refused_address()}",
                           service="app")
    with pytest.raises(ConnectionError):
        await first(ConsulSource(spec))


async def test_index_going_backwards_resets_to_zero(monkeypatch):
    """As Consul documents: a lower index (snapshot restore...) → query again from 0."""
    src = ConsulSource(ConsulDiscovery(type="consul", service="app"))
    entry = {"Node": {"Node": "n", "Address": "127.0.0.1"},
             "Service": {"ID": "s", "Port": 9001}}
    answers = [(10, [entry]), (10, [entry]), (5, []), (6, [entry]), (0, [entry]),
               (0, [entry])]
    asked = []

    async def query(index):
        asked.append(index)
        if not answers:
            raise ConnectionError("done")
        return answers.pop(0)

    monkeypatch.setattr(src, "query", query)
    monkeypatch.setattr("poise.discovery.consul.MIN_INTERVAL", 0)
    sets = []
    with pytest.raises(ConnectionError):
        async for instances in src.watch():
            sets.append(len(instances))
    # Yielded when the index changed (10, 5, 6, 0), not on the repeated 10 or 0.
    assert sets == [1, 0, 1, 1]
    # 10 → blocks at 10; 5 < 10 → reset to 0; 6 → 6; 0 < 6 → 0; 0 → 1 (never block at 0).
    assert asked == [0, 10, 10, 0, 6, 0, 1]


# -- the registrar --------------------------------------------------------------------

def test_registrar_registers_heartbeats_and_deregisters(consul_fake):
    name = fresh_name()
    registrar = ConsulRegistrar(address="127.0.0.1:9101", weight=3, ttl=0.6,
                                consul=consul_fake.url, service=name)
    registrar.start()
    try:
        service_id = f"{name}-127.0.0.1-9101"
        assert consul_fake.service_ids(name) == {service_id}
        service = consul_fake.state.services[service_id]
        assert service["Weights"]["Passing"] == 3 and service["Port"] == 9101
        check = f"service:{service_id}"
        assert consul_fake.check_status(check) == "passing"
        # Several TTLs later, still passing: the heartbeats pass it.
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            assert consul_fake.check_status(check) == "passing"
            time.sleep(0.05)
    finally:
        registrar.stop()
    # Deregistered before stop() returned.
    assert consul_fake.service_ids(name) == set()


async def test_registered_instance_is_seen_and_expires_when_abandoned(consul_fake):
    name = fresh_name()
    registrar = ConsulRegistrar(address="127.0.0.1:9102", ttl=0.5, consul=consul_fake.url,
                                service=name, deregister_after=0.5)
    try:
        async with Follow(source(consul_fake, name)) as follow:
            assert await follow.next() == []
            await asyncio.to_thread(registrar.start)
            [instance] = await follow.next()
            assert (instance.address, instance.weight) == ("127.0.0.1:9102", 1)
            registrar.abandon()         # as if killed: no more heartbeats
            assert await follow.next() == []      # critical within the TTL
            await asyncio.to_thread(wait_for, lambda: not consul_fake.service_ids(name),
                                    WAIT, "deregistered after being critical")
    finally:
        registrar.stop()


def test_registrar_registers_again_when_the_agent_forgot(caplog):
    fake = ConsulFake().start()
    registrar = ConsulRegistrar(address="127.0.0.1:9103", ttl=0.3, consul=fake.url,
                                service="app", token="t")
    try:
        registrar.start()
        fake.stop()
        fake.start(fresh=True)      # an agent restarted without its state
        with caplog.at_level(logging.WARNING, logger="poise"):
            wait_for(lambda: fake.service_ids("app"), WAIT, "registered again")
        assert "registering again" in caplog.text
        assert set(fake.tokens) == {"t"}
    finally:
        registrar.stop()
        fake.stop()
    assert fake.service_ids() == set()


def test_registrar_start_fails_when_unreachable():
    registrar = ConsulRegistrar(address="127.0.0.1:9104", consul=f"http://{refused_address()}",
                                service="app")
    with pytest.raises(ConnectionError):
        registrar.start()


def test_register_context_manager(consul_fake):
    name = fresh_name()
    with register("consul", address="127.0.0.1:9105", ttl=5, consul=consul_fake.url,
                  service=name, service_id="mine"):
        assert consul_fake.service_ids(name) == {"mine"}
    assert consul_fake.service_ids(name) == set()
