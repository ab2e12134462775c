"""The PROXY protocol on HTTP listeners and towards HTTP clusters, over real loopback
sockets against real poise processes.

Accepting (``proxy_protocol: true``): the address a v1 or v2 header carries is the
client's everywhere — ``X-Forwarded-For``, ``ip_hash``, a ``client_ip`` rate limit,
the access log; a connection with a missing or malformed header is closed before
anything reaches a backend and counted in ``poise_connections_rejected_total``; a
header may precede a TLS handshake.

Sending (``send_proxy_protocol: v1|v2``): the backend (a :class:`StreamBackend` that
requires and parses the header) sees the real client's address; a backend connection
serves only the client connection it names; it works with TLS origination; health
checks send ``PROXY UNKNOWN`` / a v2 ``LOCAL`` header, as HAProxy's do.
"""

from __future__ import annotations

import copy
import json
import socket
import ssl

import pytest
from prometheus_client.parser import text_string_to_metric_families

from poise.proxy.proxy_protocol import encode_v1, encode_v2
from tests.support.certs import Pki, needs_openssl
from tests.support.client import H11Client, echo_headers, is_closed, read_until_close
from tests.support.control import TOKEN
from tests.support.stream_backend import StreamBackend, server_context
from tests.support.waiting import wait_for

LOCAL = ("192.0.2.1", 443)          # where the carried connections claim to arrive


def v1(ip: str, port: int = 40000) -> bytes:
    return encode_v1((ip, port), LOCAL)


def v2(ip: str, port: int = 40000) -> bytes:
    return encode_v2((ip, port), LOCAL)


def proxied(px, header: bytes) -> H11Client:
    """A client connection to ``px`` that starts with ``header``."""
    sock = socket.create_connection(px.addr, timeout=10)
    sock.sendall(header)
    return H11Client.over(sock)


def metric(px, name: str, **labels) -> float:
    r = px.admin.get("/metrics")
    assert r.status == 200, r
    return sum(s.value for family in text_string_to_metric_families(r.body.decode())
               for s in family.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def access_log(path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines()]
    except FileNotFoundError:
        return []


# -- accepting -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def accepting(module_stack, tmp_path_factory):
    """A ``proxy_protocol`` listener: /limited has a client_ip limit of 2 a minute,
    /hashed goes to four backends by ip_hash, the rest to one backend."""
    app = module_stack.backend("app")
    hashed = [module_stack.backend(f"h{i}") for i in range(4)]
    log = tmp_path_factory.mktemp("log") / "access.log"
    px = module_stack.poise(
        [app], admin={"token": TOKEN}, access_log={"format": "json", "path": str(log)},
        listener={"proxy_protocol": True, "client_header_timeout": "1s", "routes": [
            {"match": {"path_prefix": "/limited"}, "cluster": "app",
             "rate_limit": {"rate": "1/m", "burst": 2, "key": "client_ip"}},
            {"match": {"path_prefix": "/hashed"}, "cluster": "hashed"},
            {"cluster": "app"}]},
        extra_clusters=[{"name": "hashed", "policy": "ip_hash",
                         "backends": [{"address": b.address} for b in hashed]}])
    return px, app, log


@pytest.mark.parametrize("encode", [v1, v2], ids=["v1", "v2"])
@pytest.mark.parametrize("ip", ["203.0.113.7", "2001:db8::7"])
def test_carried_address_is_the_client(accepting, encode, ip):
    px = accepting[0]
    with proxied(px, encode(ip)) as c:
        for _ in range(2):                          # (the header is read once)
            r = c.get("/echo")
            assert r.status == 200, r
            assert echo_headers(r.json(), "x-forwarded-for") == [ip]


def test_access_log_names_the_carried_address(accepting):
    px, _, log = accepting
    for ip in ("203.0.113.8", "2001:db8::8"):
        with proxied(px, v2(ip)) as c:
            assert c.get(f"/echo?log-{ip}").status == 200
    wait_for(lambda: sum(e["path"].startswith("/echo?log-") for e in access_log(log)) == 2,
             5, "two access log lines")
    assert {e["path"]: e["client"] for e in access_log(log)
            if e["path"].startswith("/echo?log-")} == {
        "/echo?log-203.0.113.8": "203.0.113.8", "/echo?log-2001:db8::8": "2001:db8::8"}


def test_ip_hash_balances_on_the_carried_address(accepting):
    px = accepting[0]

    def backend_for(ip: str) -> str:
        with proxied(px, v2(ip, 1000 + len(ip))) as c:
            return c.get("/hashed").header("x-backend")
    assert len({backend_for("198.51.100.23") for _ in range(6)}) == 1
    # 30 addresses over 4 backends: all on one or two would be ~1e-9 likely.
    assert len({backend_for(f"198.51.100.{i}") for i in range(30)}) >= 3


def test_client_ip_rate_limit_keys_on_the_carried_address(accepting):
    px = accepting[0]

    def statuses(ip: str, n: int) -> list[int]:
        with proxied(px, v1(ip)) as c:
            return [c.get("/limited").status for _ in range(n)]
    assert statuses("203.0.113.50", 3) == [200, 200, 429]
    assert statuses("203.0.113.51", 1) == [200], "another carried address, another key"
    assert statuses("203.0.113.50", 1) == [429], "same carried address, same key"


@pytest.mark.parametrize("start", [
    b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n",               # no header at all
    b"PROXY TCP4 203.0.113.300 192.0.2.1 1 2\r\nGET /echo HTTP/1.1\r\nHost: x\r\n\r\n",
    b"PROXY TCP4 203.0.113.7\r\nGET /echo HTTP/1.1\r\nHost: x\r\n\r\n",
    encode_v2(("203.0.113.7", 1), LOCAL)[:12] + b"\x31" + b"\0" * 40,   # v2, version 3
    b"",                                                    # silence past the timeout
], ids=["none", "bad-address", "truncated", "bad-v2", "silent"])
def test_missing_or_malformed_header_closes_the_connection(accepting, start):
    px, app, _ = accepting
    before = metric(px, "poise_connections_rejected_total", reason="proxy_protocol")
    served = len(app.stats()["requests"])
    with socket.create_connection(px.addr, timeout=10) as s:
        s.sendall(start)
        if start:
            assert read_until_close(s, 5) == b""
        else:
            assert is_closed(s, 5)
    wait_for(lambda: metric(px, "poise_connections_rejected_total",
                            reason="proxy_protocol") == before + 1, 5,
             "the rejected connection counted")
    assert len(app.stats()["requests"]) == served, "a request reached the backend"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    p = Pki(tmp_path_factory.mktemp("pki"))
    p.site = p.leaf("site", "site.example", ["site.example"])
    p.backend = p.leaf("backend", "backend.example", ["backend.example"], ips=["127.0.0.1"])
    return p


@needs_openssl
def test_header_then_tls_handshake(stack, pki):
    b = stack.backend("b1")
    px = stack.poise([b], listener={"proxy_protocol": True,
                                    "tls": {"certificates": [pki.site.model_dump()]}})
    sock = socket.create_connection(px.addr, timeout=10)
    sock.sendall(v1("203.0.113.9"))
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    with H11Client.over(ctx.wrap_socket(sock, server_hostname="site.example")) as c:
        seen = c.get("/echo").json()
    assert echo_headers(seen, "x-forwarded-for") == ["203.0.113.9"]
    assert echo_headers(seen, "x-forwarded-proto") == ["https"]


# -- sending ---------------------------------------------------------------------------

@pytest.fixture
def header_backend():
    backends: list[StreamBackend] = []

    def start(name: str = "pp", **kw) -> StreamBackend:
        backends.append(StreamBackend(name, **{"proxy": True, **kw}))
        return backends[-1]
    yield start
    for b in backends:
        b.close()


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_backend_sees_the_client_and_connections_stay_private(stack, header_backend,
                                                              version):
    b = header_backend()
    px = stack.poise([b.address], cluster={"send_proxy_protocol": version})
    first, second = H11Client(px.addr), H11Client(px.addr)
    try:
        answers = [first.get("/1").json(), first.get("/2").json(), second.get("/3").json(),
                   first.get("/4").json()]
        for client, seen in zip((first, first, second, first), answers, strict=True):
            assert seen["proxy"] == {"version": int(version[1]), "command": "PROXY",
                                     "source": list(client.sock.getsockname()),
                                     "destination": list(px.addr)}
        # first's connection is reused for first only; second got its own.
        assert [a["conn"] for a in answers] == [1, 1, 2, 1]
        assert b.refused == 0
    finally:
        first.close()
        second.close()


def test_carried_address_is_passed_on(stack, header_backend):
    b = header_backend()
    px = stack.poise([b.address], listener={"proxy_protocol": True},
                     cluster={"send_proxy_protocol": "v2"})
    with proxied(px, v1("203.0.113.77", 5555)) as c:
        seen = c.get("/x").json()
    assert seen["proxy"]["source"] == ["203.0.113.77", 5555]
    assert seen["proxy"]["destination"] == list(LOCAL)


@needs_openssl
def test_header_is_sent_before_the_tls_handshake(stack, header_backend, pki):
    b = header_backend(tls=server_context(pki.backend))
    px = stack.poise([b.address], cluster={"send_proxy_protocol": "v1",
                                           "tls": {"ca": str(pki.ca), "sni": "backend.example"}})
    with H11Client(px.addr) as c:
        seen = c.get("/x").json()
        assert seen["proxy"]["source"] == list(c.sock.getsockname())
    assert seen["sni"] == "backend.example" and b.handshake_failures == 0


def test_no_connection_with_a_header_serves_after_a_reload_turns_headers_off(
        stack, header_backend):
    b = header_backend(proxy="optional")
    px = stack.poise([b.address], admin={"token": TOKEN},
                     cluster={"send_proxy_protocol": "v1"})
    with H11Client(px.addr) as first:
        assert first.get("/before").json()["proxy"]["source"] == list(first.sock.getsockname())
        config = copy.deepcopy(px.config)
        del config["clusters"][0]["send_proxy_protocol"]
        assert px.reload(config).status == 200
        px.wait_workers(config_version=2)
        with H11Client(px.addr) as second:
            for client in (second, first):
                seen = client.get("/after").json()
                assert seen["proxy"] is None and seen["conn"] != 1, seen


@pytest.mark.parametrize(("version", "command"), [("v1", "PROXY"), ("v2", "LOCAL")])
def test_health_checks_send_a_header_without_addresses(stack, header_backend, version,
                                                       command):
    http, tcp = header_backend("http"), header_backend("tcp")
    fast = {"interval": "100ms", "timeout": "100ms", "jitter": 0, "rise": 1, "fall": 1}
    px = stack.poise([http.address], admin={"token": TOKEN},
                     cluster={"send_proxy_protocol": version, "health_check": fast},
                     extra_clusters=[{"name": "tcp", "send_proxy_protocol": version,
                                      "health_check": {"type": "tcp", **fast},
                                      "backends": [{"address": tcp.address}]}])
    wait_for(lambda: any("/health" in c.targets for c in http.seen(probes=True)), 10,
             "an http probe")
    wait_for(lambda: tcp.accepted >= 3, 10, "tcp probes")
    probe = next(c for c in http.seen(probes=True) if "/health" in c.targets)
    # v1: "PROXY UNKNOWN"; v2: LOCAL (family UNSPEC). Neither carries an address.
    header = probe.proxy
    assert (header.version, header.command, header.family) == (int(version[1]), command,
                                                                "UNKNOWN")
    assert header.source is None
    assert http.refused == tcp.refused == 0, "a probe came without its header"
    for cluster in ("app", "tcp"):
        assert px.admin.get(f"/clusters/{cluster}").json()["backends"][0]["state"] == "up"
