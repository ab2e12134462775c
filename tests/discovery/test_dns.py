"""The dns source against a real DNS server (Debian's dnsmasq on a loopback port)."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import dns.asyncresolver
import dns.message
import pytest

from poise.config.discovery import DnsDiscovery
from poise.config.model import MAX_WEIGHT
from poise.discovery.base import Instance
from poise.discovery.dns import (
    DnsError,
    DnsSource,
    clamp_ttl,
    join,
    negative_ttl,
    parse_resolver,
    tidy,
)
from tests.support import dnsmasq as dnsmasq_support
from tests.support.dnsmasq import DOMAIN, Dnsmasq

dnsmasq_server = dnsmasq_support.dnsmasq_server     # (the session's dnsmasq)
WAIT = 10.0     # generous: an answer normally arrives in milliseconds


def fresh(label: str) -> str:
    """A name no other test uses (the server is shared by the session)."""
    return f"{label}-{uuid.uuid4().hex[:8]}.{DOMAIN}"


def source(server: Dnsmasq, name: str, **options) -> DnsSource:
    return DnsSource(DnsDiscovery(type="dns", name=name, resolver=server.address, **options))


async def first_set(src: DnsSource) -> list[Instance]:
    watch = src.watch()
    try:
        return await asyncio.wait_for(anext(watch), WAIT)
    finally:
        await watch.aclose()


async def until(watch, wanted: list[Instance]) -> list[Instance]:
    """Sets from ``watch`` until one equals ``wanted`` (fails after WAIT seconds)."""
    deadline = time.monotonic() + WAIT
    seen = None
    while time.monotonic() < deadline:
        seen = await asyncio.wait_for(anext(watch), WAIT)
        if seen == wanted:
            return seen
    raise AssertionError(f"never got {wanted}; last {seen}")


# -- units -------------------------------------------------------------------------------

def test_clamp_ttl():
    assert clamp_ttl(30, 1, 300) == 30
    assert clamp_ttl(0, 1, 300) == 1            # a TTL of 0 does not spin
    assert clamp_ttl(86400, 1, 300) == 300
    assert clamp_ttl(5, 10, 2) == 10            # crossed bounds: min_ttl wins


def test_parse_resolver():
    assert parse_resolver("127.0.0.1:5353") == ("127.0.0.1", 5353)
    assert parse_resolver("127.0.0.1") == ("127.0.0.1", 53)
    assert parse_resolver("[::1]:5353") == ("::1", 5353)
    assert parse_resolver("::1") == ("::1", 53)
    for bad in ("dns.example:53", "127.0.0.1:0", "127.0.0.1:x", "[::1]x", ""):
        with pytest.raises(ValueError, match="resolver"):
            parse_resolver(bad)


def test_invalid_specs_are_refused_clearly():
    with pytest.raises(ValueError, match="`port` is required"):
        DnsSource(DnsDiscovery(type="dns", name="app.internal", record="AAAA"))
    with pytest.raises(ValueError, match="resolver"):
        DnsSource(DnsDiscovery(type="dns", name="app.internal", port=80, resolver="dns:53"))
    # SRV records carry their port: none needed.
    DnsSource(DnsDiscovery(type="dns", name="_http._tcp.app.internal", record="SRV"))


def test_join_and_tidy():
    assert join("10.0.0.1", 80) == "10.0.0.1:80"
    assert join("fd00::1", 80) == "[fd00::1]:80"
    found = tidy([Instance("b:1", 2, backup=True), Instance("b:1", 3), Instance("a:1", 2),
                  Instance("a:1", MAX_WEIGHT), Instance("c:1", 1, backup=True)])
    # Primaries first; a primary beats a backup; repeats in one tier add up (clamped).
    assert found == [Instance("a:1", MAX_WEIGHT), Instance("b:1", 3),
                     Instance("c:1", 1, backup=True)]


def test_negative_ttl_comes_from_the_soa():
    response = dns.message.from_text(
        "id 1\nopcode QUERY\nrcode NXDOMAIN\nflags QR AA\n;QUESTION\nx.example. IN A\n"
        ";ANSWER\n;AUTHORITY\nexample. 3600 IN SOA ns.example. h.example. 1 2 3 4 60\n")
    assert negative_ttl(response) == 60
    assert negative_ttl(dns.message.make_response(dns.message.make_query("x.", "A"))) == 0
    assert negative_ttl(None) == 0


# -- against dnsmasq ---------------------------------------------------------------------

async def test_a_records(dnsmasq_server):
    name = fresh("a")
    dnsmasq_server.set_host(name, "127.0.0.12", "127.0.0.11")
    src = source(dnsmasq_server, name, port=8080)
    assert await first_set(src) == [Instance("127.0.0.11:8080"), Instance("127.0.0.12:8080")]
    _, ttl = await src.resolve(src._resolver())
    assert ttl == 1.0       # dnsmasq's --local-ttl


async def test_aaaa_records(dnsmasq_server):
    name = fresh("aaaa")
    dnsmasq_server.set_host(name, "fd00::2", "127.0.0.13", "fd00::1")
    assert await first_set(source(dnsmasq_server, name, port=81, record="AAAA")) == [
        Instance("[fd00::1]:81"), Instance("[fd00::2]:81")]
    v4_only = fresh("v4")
    dnsmasq_server.set_host(v4_only, "127.0.0.14")
    # The name exists but has no AAAA record: no backends (not a failure).
    assert await first_set(source(dnsmasq_server, v4_only, port=81, record="AAAA")) == []


def srv_fixture(server: Dnsmasq) -> tuple[str, list[Instance]]:
    """An SRV name with two-address, weight-0, huge-weight and three-priority records,
    and the instances it stands for."""
    web1, web2, web3, web4 = (fresh(f"web{i}") for i in range(1, 5))
    server.set_host(web1, "127.0.0.21", "127.0.0.22")
    server.set_host(web2, "fd00::23")
    server.set_host(web3, "127.0.0.24")
    server.set_host(web4, "127.0.0.25")
    name = "_http._tcp." + fresh("svc")
    server.set_srv(name, [(web1, 9001, 10, 5), (web2, 9002, 10, 0),
                          (web3, 9003, 20, 65000), (web4, 9004, 30, 3)])
    return name, [
        Instance("127.0.0.21:9001", 5, metadata={"target": web1}),
        Instance("127.0.0.22:9001", 5, metadata={"target": web1}),
        Instance("[fd00::23]:9002", 1, metadata={"target": web2}),     # weight 0 → 1
        Instance("127.0.0.24:9003", MAX_WEIGHT, True, metadata={"target": web3}),
        Instance("127.0.0.25:9004", 3, True, metadata={"target": web4}),  # 3rd priority
    ]


def record_queries(monkeypatch, *, strip_additional: bool) -> list[str]:
    """The types the resolver is asked for, in a list that grows; with
    ``strip_additional``, SRV answers lose their additional section."""
    asked = []
    resolve = dns.asyncresolver.Resolver.resolve

    async def recording(self, qname, rdtype, *args, **kwargs):
        answer = await resolve(self, qname, rdtype, *args, **kwargs)
        asked.append(str(rdtype))
        if rdtype == "SRV" and strip_additional:
            assert answer.response.additional, "dnsmasq sent no additional section"
            answer.response.additional = []
        return answer

    monkeypatch.setattr(dns.asyncresolver.Resolver, "resolve", recording)
    return asked


async def test_srv_weights_and_priorities(dnsmasq_server, monkeypatch):
    name, wanted = srv_fixture(dnsmasq_server)
    asked = record_queries(monkeypatch, strip_additional=False)
    assert await first_set(source(dnsmasq_server, name, record="SRV")) == wanted
    assert asked == ["SRV"]     # the targets' addresses came in the additional section


async def test_srv_without_an_additional_section(dnsmasq_server, monkeypatch):
    """Servers need not send the targets' addresses: the source then asks for them."""
    name, wanted = srv_fixture(dnsmasq_server)
    asked = record_queries(monkeypatch, strip_additional=True)
    assert await first_set(source(dnsmasq_server, name, record="SRV")) == wanted
    assert sorted(asked) == ["A"] * 4 + ["AAAA"] * 4 + ["SRV"]


async def test_srv_target_without_addresses_is_skipped(dnsmasq_server, caplog):
    web = fresh("web")
    dnsmasq_server.set_host(web, "127.0.0.31")
    ghost = fresh("ghost")
    name = "_http._tcp." + fresh("svc")
    dnsmasq_server.set_srv(name, [(web, 9001, 0, 1), (ghost, 9002, 0, 1)])
    with caplog.at_level(logging.WARNING, logger="poise"):
        assert await first_set(source(dnsmasq_server, name, record="SRV")) == [
            Instance("127.0.0.31:9001", metadata={"target": web})]
    assert ghost in caplog.text


async def test_changes_are_picked_up_after_the_ttl(dnsmasq_server):
    name = fresh("change")
    dnsmasq_server.set_host(name, "127.0.0.41")
    watch = source(dnsmasq_server, name, port=80, min_ttl=0.05, max_ttl=0.2).watch()
    try:
        assert await anext(watch) == [Instance("127.0.0.41:80")]
        dnsmasq_server.set_host(name, "127.0.0.41", "127.0.0.42")
        await until(watch, [Instance("127.0.0.41:80"), Instance("127.0.0.42:80")])
        dnsmasq_server.set_host(name)                  # gone: NXDOMAIN
        await until(watch, [])
        dnsmasq_server.set_host(name, "127.0.0.43")    # back
        await until(watch, [Instance("127.0.0.43:80")])
    finally:
        await watch.aclose()


async def test_nxdomain_is_an_empty_set(dnsmasq_server):
    assert await first_set(source(dnsmasq_server, fresh("nothing"), port=80)) == []
    assert await first_set(source(dnsmasq_server, "_http._tcp." + fresh("nothing"),
                                  record="SRV")) == []


async def test_refused_raises(dnsmasq_server):
    # dnsmasq refuses names outside its local domain (it has no upstream servers).
    with pytest.raises(DnsError, match="REFUSED"):
        await first_set(source(dnsmasq_server, "app.example.com", port=80))


async def test_server_stopped_the_watch_raises(tmp_path):
    if not dnsmasq_support.Path(dnsmasq_support.DNSMASQ).exists():
        pytest.skip("dnsmasq is not installed")
    server = Dnsmasq(tmp_path / "dnsmasq")
    try:
        name = fresh("stop")
        server.set_host(name, "127.0.0.51")
        watch = source(server, name, port=80, timeout=0.3, min_ttl=0.05, max_ttl=0.05).watch()
        try:
            assert await anext(watch) == [Instance("127.0.0.51:80")]
            server.stop()
            with pytest.raises(DnsError, match="timed out|failed|refused"):
                async with asyncio.timeout(WAIT):
                    while True:     # (a resolution may have been answered just before)
                        await anext(watch)
        finally:
            await watch.aclose()
    finally:
        server.stop()
