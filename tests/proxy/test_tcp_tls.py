"""TLS on tcp listeners and clusters, over real loopback handshakes with certificates
minted per run (:mod:`tests.support.certs`):

- termination: the client speaks TLS to poise, the backend gets plaintext; routes by
  the handshake's server name; a name no route takes is closed (``no_route``);
- passthrough: poise reads the ClientHello's server name, picks the backend by it and
  relays the TLS bytes untouched (the client sees the backend's own certificate);
  anything but a ClientHello is closed (``bad_client_hello``), and so is a connection
  that sends none within ``client_header_timeout`` (``client_hello_timeout``);
- origination: poise speaks TLS to the backends, verifying them with the cluster's CA
  and server name (a failed verification is a failed connect: the next backend is
  tried), or not at all (``verify: false``), with a client certificate if given.
"""

from __future__ import annotations

import hashlib
import socket
import ssl
import time

import pytest

from tests.support.certs import Pki, needs_openssl
from tests.support.procs import refused_address
from tests.support.tcp import (
    BioTls,
    Payload,
    backends,
    closed_within,
    connect,
    connect_errors,
    echo,
    greeting,
    hello,
    listener_tls,
    peer_names,
    read_to_close,
    recv_exactly,
    recv_line,
    rejected,
    round_trip,
    self_signed,
    server_context,
    tcp,
    tls_client,
    tls_connect,
    wait_metric,
)
from tests.support.waiting import wait_for

pytestmark = needs_openssl
MiB = 1 << 20


class Certs:
    pass


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    root = tmp_path_factory.mktemp("pki")
    p = Pki(root)
    c = Certs()
    c.ca = p.ca
    c.a = p.leaf("a", "a.example", ["a.example"])
    c.b = p.leaf("b", "b.example", ["b.example"])
    c.wild = p.leaf("wild", "wild", ["*.b.example"])
    c.ip = p.leaf("ip", "127.0.0.1", [], ips=["127.0.0.1"])
    c.client = p.leaf("client", "client.example", ["client.example"])
    other = Pki(tmp_path_factory.mktemp("other"), name="another CA")
    c.other_ca = other.ca
    c.foreign_ip = other.leaf("ip", "127.0.0.1", [], ips=["127.0.0.1"])
    c.self_signed = self_signed(root, "self", "self.example")
    return c


def routes(*pairs: tuple[str, str]) -> list[dict]:
    return [{"match": {"sni": sni}, "cluster": cluster} for sni, cluster in pairs]


def cluster_of(name: str, *backends_) -> dict:
    return {"name": name, "backends": [{"address": b.address} for b in backends_]}


# -- termination --------------------------------------------------------------------------

def test_terminated_tls_reaches_a_plain_backend_as_plaintext(stack, pki):
    payload = Payload(2 * MiB + 3, seed=21).bytes()
    with backends("plain", handler=echo) as (b,):
        px = stack.poise([b.address], listener=tcp(tls=listener_tls(pki.a)))
        with tls_connect(px.addr, tls_client(pki.ca), "a.example") as s:
            assert peer_names(s) == ["a.example"]
            s.sendall(payload)
            assert recv_exactly(s, len(payload)) == payload
        (conn,) = b.connections      # (the start-up check never finished a handshake)
        assert conn.closed.wait(5)
        assert bytes(conn.received) == payload


def test_terminated_tls_routes_by_server_name(stack, pki):
    with backends("A", "B", handler=hello) as (a, b):
        px = stack.poise(
            [a.address], admin={}, extra_clusters=[cluster_of("b", b)],
            listener=tcp(tls=listener_tls(pki.a, pki.wild),
                         routes=routes(("a.example", "app"), ("*.b.example", "b"))))
        client = tls_client(pki.ca, check_hostname=False)
        for name, expected in (("a.example", b"A\n"), ("x.b.example", b"B\n"),
                               ("y.b.example", b"B\n"), ("a.example", b"A\n")):
            with tls_connect(px.addr, client, name) as s:
                assert recv_line(s) == expected, name
                assert round_trip(s, b"hi" * 1000) == b"hi" * 1000
        for name in ("c.example", "b.example", None):       # no route takes them
            with tls_connect(px.addr, client, name) as s:
                closed_within(s, 5)
        wait_metric(px, "poise_connections_rejected_total", 3, listener="web",
                    reason="no_route")
        assert a.accepted + b.accepted == 4


def test_terminated_tls_gets_everything_before_the_backend_close(stack, pki):
    """TLS has no half-close: a backend's FIN closes the client's connection once what
    is queued for it has been sent (all of it); a client's close_notify ends the
    backend's connection after everything it sent."""
    payload = Payload(3 * MiB + 7, seed=24)

    def handler(conn) -> None:
        if conn.recv_line() == b"send\n":
            for chunk in payload.chunks():
                conn.sendall(chunk)
            conn.shutdown_write()
        conn.drain()

    with backends("plain", handler=handler) as (b,):
        px = stack.poise([b.address], listener=tcp(tls=listener_tls(pki.a)))
        with tls_connect(px.addr, tls_client(pki.ca), "a.example") as s:
            s.sendall(b"send\n")
            got = read_to_close(s, 20)
        assert (len(got), hashlib.sha256(got).hexdigest()) == (payload.size, payload.digest)

        with tls_connect(px.addr, tls_client(pki.ca), "a.example") as s:
            s.sendall(b"keep\n" + payload.bytes())
            s.settimeout(10)
            s.unwrap()                  # close_notify
        conn = b.connections[-1]
        assert conn.closed.wait(10)
        assert conn.count == 5 + payload.size


def test_tls_handshake_must_finish_within_client_header_timeout(stack, pki):
    with backends("plain", handler=hello) as (b,):
        px = stack.poise([b.address], listener=tcp(tls=listener_tls(pki.a),
                                                  client_header_timeout="1s"))
        with connect(px.addr) as silent, connect(px.addr) as partial:
            partial.sendall(b"\x16\x03\x01\x00")
            start = time.monotonic()
            closed_within(silent, 4)
            closed_within(partial, 1)
            assert time.monotonic() - start >= 0.7
        assert b.accepted == 0


# -- passthrough ---------------------------------------------------------------------------

HEADER_TIMEOUT = 1.5


@pytest.fixture(scope="module")
def passthrough(module_stack, pki):
    """a.example → a TLS backend serving a.example's certificate, b.example and
    *.w.example → b's (b.example)."""
    with backends("a", handler=hello, tls=server_context(pki.a)) as (a,), \
            backends("b", handler=hello, tls=server_context(pki.b)) as (b,):
        px = module_stack.poise(
            [a.address], admin={}, extra_clusters=[cluster_of("b", b)],
            listener=tcp(tls_passthrough=True, client_header_timeout=f"{HEADER_TIMEOUT}s",
                         routes=routes(("a.example", "app"), ("b.example", "b"),
                                       ("*.w.example", "b"))))
        # poise's start-up check connected and closed: let it be over (and counted).
        time.sleep(HEADER_TIMEOUT + 0.5)
        yield px, a, b


@pytest.mark.parametrize("name", ["a.example", "b.example"])
def test_passthrough_routes_by_sni_and_the_client_sees_the_backends_certificate(
        passthrough, pki, name):
    px, a, b = passthrough
    payload = Payload(MiB + 5, seed=22).bytes()
    with tls_connect(px.addr, tls_client(pki.ca), name) as s:
        assert peer_names(s) == [name]          # (the name was verified, too)
        assert recv_line(s) == name[0].encode() + b"\n"
        s.sendall(payload)
        assert recv_exactly(s, len(payload)) == payload
    backend = a if name == "a.example" else b
    conn = backend.connections[-1]           # (TLS ended there: it read the plaintext)
    assert conn.closed.wait(5)
    assert bytes(conn.received) == payload


def test_passthrough_reads_a_client_hello_sent_in_pieces(passthrough, pki):
    px, _, _ = passthrough
    with connect(px.addr) as sock:
        tls = BioTls(sock, tls_client(pki.ca), "b.example", piece=7)
        assert peer_names(tls) == ["b.example"]
        assert recv_line(tls) == b"b\n"
        assert round_trip(tls, b"pieces" * 100) == b"pieces" * 100


def test_passthrough_closes_what_is_not_a_client_hello(passthrough):
    px, a, b = passthrough
    before = rejected(px, "bad_client_hello")
    accepted = a.accepted + b.accepted
    for garbage in (b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n", b"\x16\x03\x01\x00\x05\x02",
                    b"\x80\x2e\x01\x03\x01"):
        with connect(px.addr) as s:
            s.sendall(garbage)
            closed_within(s, 3)
    wait_metric(px, "poise_connections_rejected_total", before + 3, listener="web",
                reason="bad_client_hello")
    assert a.accepted + b.accepted == accepted


def test_passthrough_closes_a_connection_without_client_hello_in_time(passthrough):
    px, a, b = passthrough
    before = rejected(px, "client_hello_timeout")
    accepted = a.accepted + b.accepted
    with connect(px.addr) as s:
        s.sendall(b"\x16\x03")          # the start of one, then nothing
        waited = closed_within(s, HEADER_TIMEOUT + 3)
    assert waited >= HEADER_TIMEOUT - 0.3, waited
    wait_metric(px, "poise_connections_rejected_total", before + 1, listener="web",
                reason="client_hello_timeout")
    assert a.accepted + b.accepted == accepted


def test_passthrough_closes_a_client_that_closes_before_its_client_hello(passthrough):
    """A FIN before a whole ClientHello: it can never be routed, so it is closed at
    once, not held for client_header_timeout and then counted as a timeout."""
    px, _, _ = passthrough
    before = rejected(px, "client_hello_timeout")
    with connect(px.addr) as s:
        s.sendall(b"\x16\x03\x01")
        s.shutdown(socket.SHUT_WR)
        closed_within(s, HEADER_TIMEOUT / 2)
    time.sleep(HEADER_TIMEOUT / 2 + 1.2)
    assert rejected(px, "client_hello_timeout") == before


@pytest.mark.parametrize("name", ["x.w.example", "a.b.w.example"])
def test_passthrough_wildcards_take_one_or_more_labels(passthrough, pki, name):
    px, _, b = passthrough
    with tls_connect(px.addr, tls_client(pki.ca, check_hostname=False), name) as s:
        assert peer_names(s) == ["b.example"]
        assert recv_line(s) == b"b\n"


@pytest.mark.parametrize("name", ["c.example", "w.example", None])
def test_passthrough_closes_a_name_no_route_takes(passthrough, pki, name):
    px, a, b = passthrough
    before = rejected(px, "no_route")
    accepted = a.accepted + b.accepted
    with pytest.raises((ssl.SSLError, ConnectionError, EOFError)):
        with tls_connect(px.addr, tls_client(pki.ca, check_hostname=False), name) as s:
            s.recv(1)
    wait_metric(px, "poise_connections_rejected_total", before + 1, listener="web",
                reason="no_route")
    assert a.accepted + b.accepted == accepted


# -- origination ---------------------------------------------------------------------------

def test_origination_verifies_the_backend_with_the_clusters_ca(stack, pki):
    payload = Payload(3 * MiB, seed=23).bytes()
    with backends("t", handler=echo, tls=server_context(pki.ip)) as (t,):
        px = stack.poise([t.address], listener=tcp(), cluster={"tls": {"ca": str(pki.ca)}})
        with connect(px.addr) as s:
            s.sendall(payload)
            assert recv_exactly(s, len(payload)) == payload
            s.shutdown(socket.SHUT_WR)
            assert read_to_close(s) == b""


def test_origination_sends_and_verifies_the_configured_server_name(stack, pki):
    seen = []
    ctx = server_context(pki.a)
    ctx.sni_callback = lambda _obj, name, _ctx: seen.append(name)
    with backends("t", handler=hello, tls=ctx) as (t,):
        px = stack.poise([t.address], listener=tcp(),
                         cluster={"tls": {"ca": str(pki.ca), "sni": "a.example"}})
        assert greeting(px.addr) == "t"
        assert set(seen) == {"a.example"}


@pytest.mark.parametrize("problem", ["unknown CA", "wrong name"])
def test_a_backend_failing_verification_is_a_connect_failure(stack, pki, problem):
    """The next backend is tried; with none left the client is closed."""
    bad_cert = pki.foreign_ip if problem == "unknown CA" else pki.a
    with backends("bad", handler=hello, tls=server_context(bad_cert)) as (bad,), \
            backends("good", handler=hello, tls=server_context(pki.ip)) as (good,):
        px = stack.poise([bad.address, good.address], listener=tcp(), admin={},
                         cluster={"tls": {"ca": str(pki.ca)}},
                         extra_clusters=[{"name": "only_bad", "tls": {"ca": str(pki.ca)},
                                          "backends": [{"address": bad.address}]}])
        assert {greeting(px.addr) for _ in range(6)} == {"good"}
        wait_for(lambda: connect_errors(px, bad.address) >= 1, 5, "failed connects counted")
        assert all(c.count == 0 for c in bad.connections)

        only_bad = {**px.config, "listeners": [{**px.config["listeners"][0],
                                                "routes": [{"cluster": "only_bad"}]}]}
        assert px.reload(only_bad).status == 200
        px.wait_workers(config_version=2)
        before = rejected(px, "connect_failed")
        with connect(px.addr) as s:
            closed_within(s, 5)
        wait_metric(px, "poise_connections_rejected_total", before + 1, listener="web",
                    reason="connect_failed")


def test_wrong_configured_server_name_fails_verification(stack, pki):
    with backends("t", handler=hello, tls=server_context(pki.a)) as (t,):
        px = stack.poise([t.address], listener=tcp(), admin={},
                         cluster={"tls": {"ca": str(pki.ca), "sni": "b.example"}})
        with connect(px.addr) as s:
            closed_within(s, 5)
        wait_for(lambda: connect_errors(px, t.address) >= 1, 5, "a failed connect counted")
        assert all(c.count == 0 for c in t.connections)


def test_verify_false_accepts_a_self_signed_backend(stack, pki):
    with backends("self", handler=hello, tls=server_context(pki.self_signed)) as (t,):
        px = stack.poise([t.address], listener=tcp(), cluster={"tls": {"verify": False}})
        with connect(px.addr) as s:
            assert recv_line(s) == b"self\n"
            assert round_trip(s, b"s" * 50_000) == b"s" * 50_000
        # Verifying (with the system store) refuses the same backend.
        strict = stack.poise([t.address], listener=tcp(), cluster={"tls": {}})
        with connect(strict.addr) as s:
            closed_within(s, 5)


def test_mutual_tls_presents_the_client_certificate(stack, pki):
    demanding = server_context(pki.ip, client_ca=pki.ca)
    with backends("m", handler=hello, tls=demanding) as (m,):
        px = stack.poise([m.address], listener=tcp(), cluster={"tls": {
            "ca": str(pki.ca), "client_cert": pki.client.cert, "client_key": pki.client.key}})
        with connect(px.addr) as s:
            assert recv_line(s) == b"m\n"
            assert round_trip(s, b"mutual" * 100) == b"mutual" * 100
        subject = dict(pair[0] for pair in m.connections[-1].peer_cert["subject"])
        assert subject["commonName"] == "client.example"

        anonymous = stack.poise([m.address], listener=tcp(), cluster={"tls": {"ca": str(pki.ca)}})
        with connect(anonymous.addr) as s:
            assert read_to_close(s, 5) == b""
        wait_for(lambda: any(isinstance(c.error, ssl.SSLError) for c in m.connections), 5,
                 "the backend refusing a handshake without client certificate")


def test_warm_spares_are_handshaken_ahead(stack, pki):
    with backends("t", handler=hello, tls=server_context(pki.ip)) as (t,):
        px = stack.poise([t.address], listener=tcp(),
                         cluster={"tls": {"ca": str(pki.ca)}, "warm_connections": 1})
        wait_for(lambda: t.accepted >= 1 and t.connections[0].closed.is_set(), 5,
                 "the start-up check done")
        # A spare: handshaken (its greeting went out) before any client came.
        wait_for(lambda: [c for c in t.open() if c.sent], 5, "a spare with TLS established")
        (spare,) = t.open()
        with connect(px.addr) as s:
            assert recv_line(s) == b"t\n"
            assert round_trip(s, b"warm" * 100) == b"warm" * 100
        assert spare.count == 400


def test_tls_backends_are_failed_over_like_plain_ones(stack, pki):
    with backends("t", handler=hello, tls=server_context(pki.ip)) as (t,):
        px = stack.poise([refused_address(), t.address], listener=tcp(),
                         cluster={"tls": {"ca": str(pki.ca)}})
        assert {greeting(px.addr) for _ in range(4)} == {"t"}
