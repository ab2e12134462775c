"""The etcd source and registrar against a real etcd (Debian's etcd-server, v3.4)."""

from __future__ import annotations

import asyncio
import logging
import shutil
import signal
import subprocess
import sys
import time
import uuid

import pytest

from poise.config.discovery import EtcdDiscovery
from poise.discovery.base import Instance
from poise.discovery.etcd import EtcdError, EtcdSource, prefix_end
from poise.discovery.register_etcd import EtcdRegistrar
from tests.support import etcd as etcd_support
from tests.support.etcd import Etcd
from tests.support.procs import ROOT, refused_address
from tests.support.waiting import wait_for

etcd_server = etcd_support.etcd_server      # (the session's etcd)
WAIT = 10.0     # generous: an update normally arrives in milliseconds


def fresh_prefix() -> str:
    return f"/services/{uuid.uuid4().hex[:8]}/"


def source(server: Etcd, prefix: str, **options) -> EtcdSource:
    return EtcdSource(EtcdDiscovery(type="etcd", endpoints=[server.url], prefix=prefix,
                                    **options))


async def next_set(watch) -> list[Instance]:
    return await asyncio.wait_for(anext(watch), WAIT)


def test_prefix_end():
    assert prefix_end(b"/a/") == b"/a0"
    assert prefix_end(b"a\xff") == b"b"
    assert prefix_end(b"\xff\xff") == b"\0"


async def test_lists_then_follows_adds_removals_and_changes(etcd_server, caplog):
    p = fresh_prefix()
    etcd_server.put(p + "a", {"address": "127.0.0.1:9001"})
    etcd_server.put(p + "b", {"address": "127.0.0.1:9002", "weight": 2, "zone": "z1"})
    etcd_server.put(p[:-1] + "x", {"address": "127.0.0.1:9999"})    # not under the prefix
    watch = source(etcd_server, p).watch()
    try:
        a, b = Instance("127.0.0.1:9001"), Instance("127.0.0.1:9002", 2, zone="z1")
        assert await next_set(watch) == [a, b]
        etcd_server.put(p + "c", {"address": "127.0.0.1:9003"})
        c = Instance("127.0.0.1:9003")
        assert await next_set(watch) == [a, b, c]
        etcd_server.delete(p + "a")
        assert await next_set(watch) == [b, c]
        etcd_server.put(p + "b", {"address": "127.0.0.1:9002", "weight": 5})
        assert await next_set(watch) == [Instance("127.0.0.1:9002", 5), c]
        with caplog.at_level(logging.WARNING, logger="poise"):
            etcd_server.put(p + "bad", "{not json")
            assert await next_set(watch) == [Instance("127.0.0.1:9002", 5), c]
            etcd_server.put(p + "bad", {"address": "127.0.0.1:9004", "weight": 0})
            assert await next_set(watch) == [Instance("127.0.0.1:9002", 5), c]
        warnings = [r.getMessage() for r in caplog.records]
        assert any(f"{p}bad: not JSON" in w for w in warnings), warnings
        assert any(f"{p}bad: weight" in w for w in warnings), warnings
        etcd_server.put(p + "bad", {"address": "127.0.0.1:9004"})     # fixed
        assert await next_set(watch) == [Instance("127.0.0.1:9002", 5),
                                         Instance("127.0.0.1:9004"), c]
    finally:
        await watch.aclose()


async def test_an_empty_prefix_is_an_empty_set(etcd_server):
    p = fresh_prefix()
    watch = source(etcd_server, p).watch()
    try:
        assert await next_set(watch) == []
        etcd_server.put(p + "a", {"address": "127.0.0.1:9001"})
        assert await next_set(watch) == [Instance("127.0.0.1:9001")]
        etcd_server.delete(p + "a")
        assert await next_set(watch) == []
    finally:
        await watch.aclose()


async def test_a_compacted_revision_fails_the_watch_and_the_next_one_lists_again(etcd_server):
    p = fresh_prefix()
    etcd_server.put(p + "a", {"address": "127.0.0.1:9001"})
    src = source(etcd_server, p)
    watch = src.watch()
    assert await next_set(watch) == [Instance("127.0.0.1:9001")]
    # While the listed set is being handed on (the watch not open yet), keys change and
    # etcd compacts past the list's revision: the watch cannot start there.
    for i in range(5):
        etcd_server.put(p + "b", {"address": "127.0.0.1:9002", "weight": i + 1})
    etcd_server.compact()
    with pytest.raises(EtcdError, match="compacted"):
        await next_set(watch)
    await watch.aclose()
    watch = src.watch()
    try:
        assert await next_set(watch) == [Instance("127.0.0.1:9001"),
                                         Instance("127.0.0.1:9002", 5)]
        etcd_server.delete(p + "a")
        assert await next_set(watch) == [Instance("127.0.0.1:9002", 5)]
    finally:
        await watch.aclose()


async def test_endpoints_are_tried_in_order(etcd_server):
    p = fresh_prefix()
    etcd_server.put(p + "a", {"address": "127.0.0.1:9001"})
    src = EtcdSource(EtcdDiscovery(type="etcd", prefix=p, timeout=2,
                                   endpoints=[f"http://{refused_address()}", etcd_server.url]))
    watch = src.watch()
    try:
        assert await next_set(watch) == [Instance("127.0.0.1:9001")]
        assert src._first == 1          # the working one is tried first from now on
    finally:
        await watch.aclose()
    only_refused = EtcdSource(EtcdDiscovery(type="etcd", prefix=p,
                                            endpoints=[f"http://{refused_address()}"]))
    with pytest.raises(ConnectionError):
        await next_set(only_refused.watch())


async def test_etcd_stopping_fails_the_watch_and_a_new_one_works_once_it_is_back(etcd_server):
    p = fresh_prefix()
    etcd_server.put(p + "a", {"address": "127.0.0.1:9001"})
    src = source(etcd_server, p, timeout=2)
    watch = src.watch()
    assert await next_set(watch) == [Instance("127.0.0.1:9001")]
    etcd_server.put(p + "b", {"address": "127.0.0.1:9002"})
    assert len(await next_set(watch)) == 2          # (the watch is open)
    etcd_server.stop()
    try:
        with pytest.raises((ConnectionError, EtcdError)):
            await next_set(watch)
        await watch.aclose()
        with pytest.raises(ConnectionError):        # refused while it is down
            await next_set(src.watch())
    finally:
        etcd_server.start()
    watch = src.watch()
    try:
        assert await next_set(watch) == [Instance("127.0.0.1:9001"),
                                         Instance("127.0.0.1:9002")]
        etcd_server.delete(p + "b")
        assert await next_set(watch) == [Instance("127.0.0.1:9001")]
    finally:
        await watch.aclose()


async def test_the_watch_socket_is_closed_when_the_consumer_stops(etcd_server):
    p = fresh_prefix()
    watch = source(etcd_server, p).watch()
    assert await next_set(watch) == []
    etcd_server.put(p + "a", {"address": "127.0.0.1:9001"})
    assert len(await next_set(watch)) == 1
    assert etcd_support.connections_to(etcd_server.client_port) == 1
    await watch.aclose()
    for _ in range(3):              # (a transport closes its socket at the next loop turn)
        await asyncio.sleep(0)
    assert etcd_support.connections_to(etcd_server.client_port) == 0


# -- registration ----------------------------------------------------------------------

def test_a_registrar_puts_a_leased_key_and_stop_removes_it_at_once(etcd_server):
    p = fresh_prefix()
    reg = EtcdRegistrar(address="127.0.0.1:9001", weight=3, ttl=2, prefix=p,
                        endpoints=[f"http://{refused_address()}", etcd_server.url])
    reg.start()
    try:
        kv = etcd_server.get(p + "127.0.0.1:9001")
        assert kv is not None and kv["lease"] == reg.lease != 0
        assert kv["value"] == '{"address": "127.0.0.1:9001", "weight": 3}'
        time.sleep(3.5)                 # longer than the TTL: the heartbeats keep it
        assert etcd_server.get(p + "127.0.0.1:9001") is not None
    finally:
        reg.stop()
    assert etcd_server.get(p + "127.0.0.1:9001") is None


def test_an_abandoned_registration_expires_within_its_ttl(etcd_server):
    p = fresh_prefix()
    reg = EtcdRegistrar(address="127.0.0.1:9002", ttl=2, prefix=p, key=p + "me",
                        endpoints=[etcd_server.url])
    reg.start()
    assert etcd_server.get(p + "me") is not None
    reg.abandon()                       # heartbeats stop, nothing revoked: a crash
    started = time.monotonic()
    wait_for(lambda: etcd_server.get(p + "me") is None, WAIT, "the key expiring", step=0.1)
    assert time.monotonic() - started < 2 + 1.5     # the TTL, and etcd's expiry sweep


def test_a_registrar_registers_again_when_its_lease_is_lost(etcd_server):
    p = fresh_prefix()
    reg = EtcdRegistrar(address="127.0.0.1:9003", ttl=3, prefix=p, endpoints=[etcd_server.url])
    reg.start()
    try:
        first = reg.lease
        etcd_server.post("/v3/lease/revoke", {"ID": str(first)})     # as if it expired
        assert etcd_server.get(p + "127.0.0.1:9003") is None
        kv = wait_for(lambda: etcd_server.get(p + "127.0.0.1:9003"), WAIT,
                      "the key put again", step=0.1)
        assert kv["lease"] == reg.lease != first
    finally:
        reg.stop()
    assert etcd_server.get(p + "127.0.0.1:9003") is None


async def test_the_source_sees_registrations_come_and_go(etcd_server):
    p = fresh_prefix()
    watch = source(etcd_server, p).watch()
    try:
        assert await next_set(watch) == []
        reg = await asyncio.to_thread(lambda: EtcdRegistrar(
            address="127.0.0.1:9005", weight=2, ttl=5, prefix=p, endpoints=[etcd_server.url]))
        await asyncio.to_thread(reg.start)
        assert await next_set(watch) == [Instance("127.0.0.1:9005", 2)]
        await asyncio.to_thread(reg.stop)
        assert await next_set(watch) == []
    finally:
        await watch.aclose()


def test_start_fails_when_etcd_cannot_be_reached():
    reg = EtcdRegistrar(address="127.0.0.1:9001", prefix="/x/", timeout=2,
                        endpoints=[f"http://{refused_address()}"])
    with pytest.raises(ConnectionError):
        reg.start()


# -- authentication (an etcd of its own: the session's stays without auth) --------------

async def test_auth_tokens_permissions_and_expiry(tmp_path):
    if shutil.which("etcd") is None:
        pytest.skip("etcd is not installed")
    # Tokens expire after 1 s unused: the source and the registrar must fetch new ones.
    server = Etcd(tmp_path / "data", "poise-auth", "--auth-token-ttl", "1")
    try:
        server.enable_auth("secret")
        root = server.token("root", "secret")
        p = fresh_prefix()
        server.put(p + "a", {"address": "127.0.0.1:9001"}, token=root)
        server.post("/v3/auth/user/add", {"name": "other", "password": "pw"}, root)
        server.post("/v3/auth/role/add", {"name": "elsewhere"}, root)
        server.post("/v3/auth/role/grant", {"name": "elsewhere", "perm": {
            "permType": "READ", "key": etcd_support.b64("/elsewhere/"),
            "range_end": etcd_support.b64("/elsewhere0")}}, root)
        server.post("/v3/auth/user/grant", {"user": "other", "role": "elsewhere"}, root)

        with pytest.raises(EtcdError, match="user name is empty|token|permission"):
            await next_set(source(server, p).watch())
        with pytest.raises(EtcdError, match="authentication failed"):
            await next_set(source(server, p, username="root", password="wrong").watch())
        with pytest.raises(EtcdError, match="permission denied"):
            await next_set(source(server, p, username="other", password="pw").watch())

        src = source(server, p, username="root", password="secret")
        watch = src.watch()
        try:
            assert await next_set(watch) == [Instance("127.0.0.1:9001")]
            # The token expires before the watch is opened: it gets another.
            await asyncio.sleep(2.5)
            server.put(p + "b", {"address": "127.0.0.1:9002"},
                       token=server.token("root", "secret"))
            assert len(await next_set(watch)) == 2
            await asyncio.sleep(2.5)        # expired again: the open watch goes on
            server.delete(p + "b", server.token("root", "secret"))
            assert len(await next_set(watch)) == 1
        finally:
            await watch.aclose()
        watch = src.watch()                 # a new call: a new token
        try:
            assert len(await next_set(watch)) == 1
        finally:
            await watch.aclose()

        reg = EtcdRegistrar(address="127.0.0.1:9003", ttl=3, prefix=p, username="root",
                            password="secret", endpoints=[server.url])
        reg.start()
        try:
            assert server.get(p + "127.0.0.1:9003", server.token("root", "secret"))
            # As if the token had expired (etcd 3.4 does not check it on lease keepalives,
            # but does on the revocation): stop() fetches another.
            reg._token = "not-a-token"
        finally:
            reg.stop()
        assert server.get(p + "127.0.0.1:9003", server.token("root", "secret")) is None
        assert reg._token != "not-a-token"
    finally:
        server.stop()


# -- `poise register etcd`, a real process -------------------------------------------

def _register_process(server: Etcd, prefix: str, address: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "poise", "register", "etcd", "--endpoints", server.url,
         "--prefix", prefix, "--address", address, "--ttl", "2s"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_poise_register_removes_its_key_on_sigterm_and_expires_on_sigkill(etcd_server):
    p = fresh_prefix()
    polite = _register_process(etcd_server, p, "127.0.0.1:9011")
    rude = _register_process(etcd_server, p, "127.0.0.1:9012")
    try:
        for proc, address in ((polite, "127.0.0.1:9011"), (rude, "127.0.0.1:9012")):
            wait_for(lambda a=address, pr=proc: etcd_server.get(p + a) or pr.poll() is not None,
                     WAIT, f"{address} registered", step=0.05)
            assert proc.poll() is None, proc.stdout.read()
        polite.send_signal(signal.SIGTERM)
        assert polite.wait(WAIT) == 0
        assert etcd_server.get(p + "127.0.0.1:9011") is None      # gone before it exited
        assert "Traceback" not in polite.stdout.read()
        rude.kill()
        rude.wait(WAIT)
        started = time.monotonic()
        wait_for(lambda: etcd_server.get(p + "127.0.0.1:9012") is None, WAIT,
                 "the killed registration expiring", step=0.1)
        assert time.monotonic() - started < 2 + 1.5
    finally:
        for proc in (polite, rude):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
