"""TLS on HTTP listeners and towards HTTP clusters, over real loopback sockets against
real poise processes, with certificates minted per run (tests/support/certs.py).

Termination: the certificate is chosen by SNI (exact, wildcard, default), ALPN says
http/1.1, the backend hears ``X-Forwarded-Proto: https``, routes match on ``sni``,
``min_version: 1.3`` refuses a TLS 1.2 client, certificate files are re-read on reload
(admin API and SIGHUP) without dropping a connection, and unusable files are an error
of ``poise check`` and of a reload.

Origination (backends are :class:`StreamBackend` threads speaking TLS): the backend is
verified against ``ca`` (else 502 with the reason logged), ``sni`` is sent, a client
certificate is presented for mutual TLS, upstream TLS connections are kept alive, and
health checks (http and tcp) go over TLS too.
"""

from __future__ import annotations

import shutil
import signal
import socket
import ssl
import subprocess
import sys

import pytest
import yaml

from tests.support.certs import Pki, needs_openssl
from tests.support.client import H11Client, echo_headers
from tests.support.control import TOKEN
from tests.support.procs import ROOT
from tests.support.stream_backend import StreamBackend, server_context
from tests.support.waiting import wait_for

pytestmark = needs_openssl


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    p = Pki(tmp_path_factory.mktemp("pki"))
    p.default = p.leaf("default", "default.example", ["default.example"])
    p.a = p.leaf("a", "a.example", ["a.example"])
    p.wild = p.leaf("wild", "wild", ["*.wild.example"])
    p.backend = p.leaf("backend", "backend.example", ["backend.example"], ips=["127.0.0.1"])
    p.client = p.leaf("client", "poise-client", [])
    # A CA poise is not told about: its certificates must fail verification.
    p.stranger = Pki(tmp_path_factory.mktemp("stranger"), "stranger CA")
    p.stranger.backend = p.stranger.leaf("backend", "backend.example", ["backend.example"],
                                         ips=["127.0.0.1"])
    return p


def certs(*certificates) -> list[dict]:
    return [c.model_dump() for c in certificates]


def trusting(pki, *, alpn: bool = True) -> ssl.SSLContext:
    """A client context that trusts the test CA and accepts any name (the tests look
    at which certificate came back)."""
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    ctx.check_hostname = False
    if alpn:
        ctx.set_alpn_protocols(["h2", "http/1.1"])
    return ctx


def tls_client(px, ctx: ssl.SSLContext, name: str | None) -> H11Client:
    sock = socket.create_connection(px.addr, timeout=10)
    return H11Client.over(ctx.wrap_socket(sock, server_hostname=name))


def served_names(tls: ssl.SSLSocket) -> list[str]:
    return [v for k, v in tls.getpeercert()["subjectAltName"] if k == "DNS"]


# -- termination -----------------------------------------------------------------------

SNI_ROUTES = [
    {"match": {"sni": "a.example"}, "cluster": "a"},
    {"match": {"sni": "*.wild.example"}, "cluster": "wild"},
    {"match": {"sni": "default.example"}, "cluster": "app"},
]


@pytest.fixture(scope="module")
def site(module_stack, pki):
    """Three certificates and a route per SNI name; backends named after clusters."""
    backends = {n: module_stack.backend(n) for n in ("app", "a", "wild")}
    px = module_stack.poise(
        [backends["app"]],
        listener={"tls": {"certificates": certs(pki.default, pki.a, pki.wild)},
                  "routes": SNI_ROUTES},
        extra_clusters=[{"name": n, "backends": [{"address": backends[n].address}]}
                        for n in ("a", "wild")])
    return px, backends


@pytest.mark.parametrize(("name", "expected"), [
    ("a.example", "a.example"),
    ("x.wild.example", "*.wild.example"),
    ("unknown.example", "default.example"),
    (None, "default.example"),
])
def test_certificate_is_chosen_by_sni(site, pki, name, expected):
    px, _ = site
    with tls_client(px, trusting(pki), name) as c:
        assert served_names(c.sock) == [expected]


def test_alpn_is_http11_and_the_backend_hears_https(site, pki):
    px, _ = site
    with tls_client(px, trusting(pki), "default.example") as c:
        assert c.sock.selected_alpn_protocol() == "http/1.1"
        r = c.get("/echo")
        assert r.status == 200 and r.header("x-backend") == "app"
        assert echo_headers(r.json(), "x-forwarded-proto") == ["https"]
        assert echo_headers(r.json(), "x-forwarded-for") == ["127.0.0.1"]
        assert c.get("/echo?again").status == 200       # keep-alive over TLS


@pytest.mark.parametrize(("name", "expected"), [
    ("a.example", "a"), ("x.wild.example", "wild"), ("default.example", "app"),
    ("unknown.example", 404), (None, 404),
])
def test_routes_match_on_sni(site, pki, name, expected):
    px, _ = site
    with tls_client(px, trusting(pki), name) as c:
        # The Host header says nothing: the TLS server name decides.
        r = c.get("/echo", [("Host", "default.example")])
        assert (r.header("x-backend") if r.status == 200 else r.status) == expected
        assert c.reusable


def test_min_version_13_refuses_a_tls12_client(stack, pki):
    b = stack.backend("b1")
    px = stack.poise([b], listener={"tls": {"certificates": certs(pki.default),
                                            "min_version": "1.3"}})
    with tls_client(px, trusting(pki), "default.example") as c:
        assert c.sock.version() == "TLSv1.3"
        assert c.get("/echo").status == 200
    old = trusting(pki)
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises((ssl.SSLError, ConnectionError)):
        tls_client(px, old, "default.example")


def test_certificate_files_are_reread_on_reload_without_dropping_connections(
        stack, pki, tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    cert, key = served / "cert.pem", served / "cert.key"

    def install(leaf) -> None:
        shutil.copy(leaf.cert, cert)
        shutil.copy(leaf.key, key)

    install(pki.default)
    b = stack.backend("b1")
    px = stack.poise([b], admin={"token": TOKEN},
                     listener={"tls": {"certificates": [{"cert": str(cert), "key": str(key)}]}})
    kept = tls_client(px, trusting(pki), "x")
    assert served_names(kept.sock) == ["default.example"] and kept.get("/echo").status == 200

    install(pki.a)
    assert px.reload().status == 200
    with tls_client(px, trusting(pki), "x") as c:
        assert served_names(c.sock) == ["a.example"]
    assert kept.get("/echo?after-reload").status == 200

    install(pki.wild)
    px.signal(signal.SIGHUP)

    def serves_wild() -> bool:
        with tls_client(px, trusting(pki), "x") as c:
            return served_names(c.sock) == ["*.wild.example"]
    wait_for(serves_wild, 10, "the new certificate after SIGHUP")
    assert kept.get("/echo?after-sighup").status == 200
    kept.close()


def test_unusable_certificate_files_fail_check_and_reload(stack, pki, tmp_path):
    b = stack.backend("b1")
    px = stack.poise([b], admin={"token": TOKEN},
                     listener={"tls": {"certificates": certs(pki.default)}})
    missing = tmp_path / "missing.key"
    for bad in ({"cert": pki.default.cert, "key": str(missing)},    # no such file
                {"cert": pki.default.cert, "key": pki.a.key}):      # not its key
        config = yaml.safe_load(yaml.safe_dump(px.config))
        config["listeners"][0]["tls"]["certificates"] = [bad]
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump(config))
        done = subprocess.run([sys.executable, "-m", "poise", "check", str(path)], cwd=ROOT,
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 2, done
        assert "Traceback" not in done.stderr + done.stdout
        assert "listeners[0].tls" in done.stdout + done.stderr
        assert bad["key"] in done.stdout + done.stderr

        r = px.reload(config)
        assert r.status == 400, r
        assert any(e["field"] == "listeners[0].tls" for e in r.json()["errors"]), r.json()
        with tls_client(px, trusting(pki), "default.example") as c:
            assert served_names(c.sock) == ["default.example"]
            assert c.get("/echo").status == 200


# -- origination -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def origin(module_stack, pki):
    """One poise, one cluster per way of originating TLS, routed by path prefix; each
    cluster has its own TLS backend."""
    good = server_context(pki.backend)
    backends = {
        "verify": StreamBackend("verify", tls=good),
        "sni": StreamBackend("sni", tls=server_context(pki.backend)),
        "stranger": StreamBackend("stranger", tls=server_context(pki.stranger.backend)),
        "wrongsni": StreamBackend("wrongsni", tls=server_context(pki.backend)),
        "mtls": StreamBackend("mtls", tls=server_context(pki.backend, client_ca=str(pki.ca))),
        "keep": StreamBackend("keep", tls=server_context(pki.backend)),
    }
    backends["nocert"] = backends["mtls"]
    ca = str(pki.ca)
    tls = {
        "verify": {"ca": ca},
        "sni": {"ca": ca, "sni": "backend.example"},
        "stranger": {"ca": ca},
        "wrongsni": {"ca": ca, "sni": "other.example"},
        "mtls": {"ca": ca, "client_cert": pki.client.cert, "client_key": pki.client.key},
        "nocert": {"ca": ca},
        "keep": {"ca": ca},
    }
    clusters = [{"name": n, "tls": tls[n], "connect_timeout": "2s",
                 "backends": [{"address": backends[n].address}]} for n in tls]
    routes = [{"match": {"path_prefix": f"/{n}"}, "cluster": n} for n in tls]
    px = module_stack.poise([backends["verify"].address],
                            listener={"routes": routes}, extra_clusters=clusters)
    yield px, backends
    for b in set(backends.values()):
        b.close()


def get(px, target: str):
    with H11Client(px.addr) as c:
        return c.get(target)


def test_backend_verified_against_the_configured_ca(origin):
    px, backends = origin
    r = get(px, "/verify/x")
    assert r.status == 200 and r.json()["backend"] == "verify"
    assert backends["verify"].handshake_failures == 0
    # No SNI for an IP address (the certificate's IP entry was verified instead).
    assert r.json()["sni"] is None


def test_sni_override_is_sent_and_verified(origin):
    px, backends = origin
    r = get(px, "/sni/x")
    assert r.status == 200, r
    assert r.json()["sni"] == "backend.example"


@pytest.mark.parametrize(("target", "reason"), [
    ("/stranger/x", "unable to get local issuer certificate"),
    ("/wrongsni/x", "Hostname mismatch"),
])
def test_verification_failure_is_502_with_the_reason_logged(origin, target, reason):
    px, backends = origin
    name = target.split("/")[1]
    before = backends[name].handshake_failures
    assert get(px, target).status == 502
    wait_for(lambda: backends[name].handshake_failures > before, 5, "the failed handshake")
    assert backends[name].seen() == [], "a request reached an unverified backend"
    px.wait_log(rf"TLS to backend {backends[name].address} failed: "
                rf"certificate verify failed: .*{reason}")


def test_mutual_tls_presents_the_client_certificate(origin):
    px, backends = origin
    r = get(px, "/mtls/x")
    assert r.status == 200 and r.json()["client_cn"] == "poise-client"
    # The same backend refuses a cluster that has no client certificate to show.
    assert get(px, "/nocert/x").status == 502


def test_tls_upstream_connections_are_kept_alive(origin):
    px, backends = origin
    b = backends["keep"]
    for _ in range(2):
        with H11Client(px.addr) as c:
            for i in range(5):
                assert c.get(f"/keep/{i}").status == 200
    assert [conn.requests for conn in b.seen()] == [10], "one TLS handshake for all"
    assert b.accepted == 1


def test_health_checks_go_over_tls(stack, pki):
    good = StreamBackend("good", tls=server_context(pki.backend))
    bad = StreamBackend("bad", tls=server_context(pki.stranger.backend))
    try:
        fast = {"interval": "200ms", "timeout": "200ms", "jitter": 0, "rise": 1, "fall": 1}
        tls = {"ca": str(pki.ca), "sni": "backend.example"}
        px = stack.poise(
            [good.address], admin={"token": TOKEN},
            cluster={"tls": tls, "health_check": {"type": "http", **fast}},
            extra_clusters=[
                {"name": "tcp", "tls": tls, "health_check": {"type": "tcp", **fast},
                 "backends": [{"address": good.address}]},
                {"name": "bad", "tls": tls, "health_check": {"type": "tcp", **fast},
                 "backends": [{"address": bad.address}]}])

        def state(cluster: str) -> str:
            return px.admin.get(f"/clusters/{cluster}").json()["backends"][0]["state"]
        wait_for(lambda: state("bad") == "down", 10, "the unverifiable backend down")
        wait_for(lambda: sum(c.targets.count("/health") for c in good.seen(probes=True)) >= 3,
                 10, "http probes over TLS")
        probes = [c for c in good.seen(probes=True) if "/health" in c.targets]
        assert all(c.sni == "backend.example" for c in probes)
        # tcp probes: a connection each (http probes keep theirs alive).
        wait_for(lambda: good.accepted >= 5, 10, "tcp probes")
        assert state("app") == state("tcp") == "up"
        assert get(px, "/x").status == 200
    finally:
        good.close()
        bad.close()


def test_a_rotated_ca_file_is_reread_on_reload_by_traffic_and_checks(stack, pki, tmp_path):
    backend = StreamBackend("b", tls=server_context(pki.backend))
    try:
        ca = tmp_path / "ca.pem"
        shutil.copy(pki.stranger.ca, ca)        # not the CA that signed the backend
        fast = {"type": "tcp", "interval": "200ms", "timeout": "200ms", "jitter": 0,
                "rise": 1, "fall": 1}
        px = stack.poise([backend.address], admin={"token": TOKEN},
                         cluster={"tls": {"ca": str(ca)}, "health_check": fast})

        def state() -> str:
            return px.admin.get("/clusters/app").json()["backends"][0]["state"]
        wait_for(lambda: state() == "down", 10, "the backend down (unknown CA)")

        shutil.copy(pki.ca, ca)                 # same config, new file contents
        assert px.reload().status == 200
        wait_for(lambda: state() == "up", 10, "the backend up with the new CA")
        wait_for(lambda: get(px, "/x").status == 200, 5, "traffic verifying with the new CA")
    finally:
        backend.close()
