"""The PROXY protocol on tcp listeners and clusters, over real loopback sockets and a
real poise process.

Accepting (``proxy_protocol: true``): every connection starts with a v1 or v2 header,
whose client address replaces the socket's (it drives ip_hash and is what a backend
is told with ``send_proxy_protocol``); a missing or malformed header closes the
connection before anything reaches a backend, counted as reason ``proxy_protocol``;
a header cut into many segments still works, and so does a header followed by TLS.

Sending (``send_proxy_protocol: v1|v2``): each backend connection starts with a header
naming the client's real address and port and the listener's address.

Headers sent by the tests are built by hand here (not with poise's encoder); what
backends receive is parsed with :func:`poise.proxy.proxy_protocol.parse`.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import time
from collections import defaultdict

import pytest

from tests.support.certs import Pki, needs_openssl
from tests.support.tcp import (
    Conn,
    backends,
    closed_within,
    connect,
    hello,
    listener_tls,
    metric,
    recv_exactly,
    recv_line,
    rejected,
    round_trip,
    tcp,
    tls_client,
    wait_metric,
)
from tests.support.waiting import wait_for

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
DESTINATION = ("192.0.2.1", 443)


def v1(source: tuple[str, int], destination: tuple[str, int] = DESTINATION) -> bytes:
    family = "TCP6" if ":" in source[0] else "TCP4"
    return (f"PROXY {family} {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n"
            .encode())


def v2(source: tuple[str, int] | None, destination: tuple[str, int] = DESTINATION,
       tlvs: bytes = b"") -> bytes:
    """A v2 PROXY (or, without ``source``, LOCAL) header over TCP."""
    if source is None:
        return SIGNATURE + bytes([0x20, 0x00]) + struct.pack("!H", len(tlvs)) + tlvs
    src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
    family = 0x11 if src.version == 4 else 0x21
    body = src.packed + dst.packed + struct.pack("!HH", source[1], destination[1]) + tlvs
    return SIGNATURE + bytes([0x21, family]) + struct.pack("!H", len(body)) + body


def conn_from(bs, source: tuple[str, int], timeout: float = 5.0) -> Conn:
    """The backend connection whose PROXY header names client ``source``."""
    def find():
        for b in bs:
            for c in list(b.connections):
                if c.header is not None and c.header.source == source:
                    return c
        return None
    return wait_for(find, timeout, f"a backend connection for {source}")


@pytest.fixture(scope="module")
def chain(module_stack):
    """A tcp listener accepting PROXY headers, in front of three ``hello`` backends
    that are sent v2 headers, balanced by ip_hash."""
    with backends("p1", "p2", "p3", handler=hello, proxy_header=True) as bs:
        px = module_stack.poise(
            [b.address for b in bs], admin={},
            listener=tcp(proxy_protocol=True, client_header_timeout="1s"),
            cluster={"policy": "ip_hash", "send_proxy_protocol": "v2"})
        yield px, bs


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_carried_address_is_sent_on_and_drives_ip_hash(chain, version):
    px, bs = chain
    make = v1 if version == "v1" else v2
    landed: dict[str, set[str]] = defaultdict(set)
    for round_ in range(2):
        for k in (range(1, 26) if round_ == 0 else range(25, 0, -1)):
            client = (f"203.0.113.{k}", 30000 + 100 * round_ + k + (50 if version == "v2" else 0))
            with connect(px.addr) as s:
                s.sendall(make(client))
                name = recv_line(s).decode().strip()
                assert round_trip(s, b"after the header" * 10) == b"after the header" * 10
            landed[client[0]].add(name)
            conn = conn_from(bs, client)
            assert conn.backend.name == name
            assert (conn.header.version, conn.header.source, conn.header.destination) == \
                (2, client, DESTINATION)
    assert all(len(names) == 1 for names in landed.values()), dict(landed)
    assert len({n for names in landed.values() for n in names}) == 3, dict(landed)


def test_v1_and_v2_carry_the_same_client_to_the_same_backend(chain):
    px, _ = chain
    for k in range(1, 8):
        names = set()
        for header in (v1((f"198.51.100.{k}", 1000 + k)), v2((f"198.51.100.{k}", 2000 + k))):
            with connect(px.addr) as s:
                s.sendall(header)
                names.add(recv_line(s))
        assert len(names) == 1, (k, names)


def test_ipv6_client_and_tlvs_are_carried(chain):
    px, bs = chain
    client = ("2001:db8::17", 4711)
    with connect(px.addr) as s:
        s.sendall(v2(client, ("2001:db8::1", 443), tlvs=b"\x01\x00\x02h2"))   # (ALPN TLV)
        recv_line(s)
    conn = conn_from(bs, client)
    assert (conn.header.family, conn.header.destination) == ("TCP6", ("2001:db8::1", 443))


def test_local_header_leaves_the_socket_addresses(chain):
    px, bs = chain
    with connect(px.addr) as s:
        s.sendall(v2(None))
        recv_line(s)
        me = s.getsockname()
    conn = conn_from(bs, me)
    assert conn.header.destination == px.addr


@pytest.mark.parametrize("pieces", [1, 5])
def test_header_in_many_segments_and_payload_in_its_last(chain, pieces):
    px, bs = chain
    client = ("203.0.113.200", 60000 + pieces)
    header = v1(client) if pieces == 1 else v2(client)
    with connect(px.addr) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(0, len(header) - 1, pieces):
            s.sendall(header[i:min(i + pieces, len(header) - 1)])
            time.sleep(0.003)
        s.sendall(header[-1:] + b"payload right behind")
        name = recv_line(s)
        assert recv_exactly(s, 20) == b"payload right behind"
        assert round_trip(s, b"more") == b"more"
    conn = conn_from(bs, client)
    assert name == f"{conn.backend.name}\n".encode()
    assert bytes(conn.received) == b"payload right behindmore"


BAD = {
    "http": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "v1 short": b"PROXY TCP4 203.0.113.1\r\n",
    "v1 bad address": b"PROXY TCP4 203.0.113.256 192.0.2.1 1 2\r\n",
    "v1 bad port": b"PROXY TCP4 203.0.113.1 192.0.2.1 1 65536\r\n",
    "v1 no CRLF": b"PROXY TCP4 203.0.113.1 192.0.2.1 1 2" + b" " * 100,
    "v2 version": SIGNATURE + b"\x11\x11\x00\x0c" + bytes(12),
    "v2 family": SIGNATURE + b"\x21\x41\x00\x0c" + bytes(12),
    "v2 too short": SIGNATURE + b"\x21\x11\x00\x04" + bytes(4),
    "v2 signature": b"\r\n\r\n\x00\r\nQUIX\n\x21\x11\x00\x0c" + bytes(12),
    "tls": b"\x16\x03\x01\x00\xc8\x01\x00\x00\xc4\x03\x03",
}


def test_malformed_headers_are_closed_before_any_backend(chain):
    px, bs = chain
    before = rejected(px, "proxy_protocol")
    accepted = sum(b.accepted for b in bs)
    for name, data in BAD.items():
        with connect(px.addr) as s:
            s.sendall(data)
            try:
                closed_within(s, 3)
            except AssertionError as e:
                raise AssertionError(f"{name}: {e}") from None
    wait_metric(px, "poise_connections_rejected_total", before + len(BAD), listener="web",
                reason="proxy_protocol")
    assert sum(b.accepted for b in bs) == accepted


def test_missing_header_is_closed_after_client_header_timeout(chain):
    px, bs = chain
    before = rejected(px, "proxy_protocol")
    accepted = sum(b.accepted for b in bs)
    with connect(px.addr) as s, connect(px.addr) as partial:
        partial.sendall(b"PROXY TCP4 ")
        start = time.monotonic()
        closed_within(s, 4)
        closed_within(partial, 1)
        assert time.monotonic() - start >= 0.7
    wait_metric(px, "poise_connections_rejected_total", before + 2, listener="web",
                reason="proxy_protocol")
    assert sum(b.accepted for b in bs) == accepted


def test_header_bytes_are_not_counted_as_received(chain):
    px, _ = chain
    before_in = metric(px, "poise_received_bytes_total", listener="web")
    before_out = metric(px, "poise_sent_bytes_total", listener="web")
    with connect(px.addr) as s:
        s.sendall(v2(("203.0.113.99", 9999)) + b"0123456789")
        name = recv_line(s)
        assert recv_exactly(s, 10) == b"0123456789"
    wait_metric(px, "poise_received_bytes_total", before_in + 10, listener="web")
    wait_metric(px, "poise_sent_bytes_total", before_out + len(name) + 10, listener="web")


def test_connection_limit_per_ip_counts_the_carried_address(stack):
    with backends("b", handler=hello) as (b,):
        px = stack.poise([b.address], admin={},
                         listener=tcp(proxy_protocol=True, max_connections_per_ip=1))
        with connect(px.addr) as first:
            first.sendall(v1(("203.0.113.5", 5000)))
            assert recv_line(first) == b"b\n"
            with connect(px.addr) as same:
                same.sendall(v2(("203.0.113.5", 5001)))
                closed_within(same, 3)
            with connect(px.addr) as other:         # (from the same real address)
                other.sendall(v2(("203.0.113.6", 5002)))
                assert recv_line(other) == b"b\n"
        wait_metric(px, "poise_connections_rejected_total", 1, listener="web",
                    reason="max_connections_per_ip")
        assert b.accepted == 2


# -- PROXY header + TLS termination -----------------------------------------------------------

@needs_openssl
def test_header_then_tls_handshake(stack, tmp_path):
    pki = Pki(tmp_path)
    cert = pki.leaf("a", "a.example", ["a.example"])
    with backends("t", handler=hello, proxy_header=True) as (t,):
        px = stack.poise([t.address], listener=tcp(proxy_protocol=True, tls=listener_tls(cert)),
                         cluster={"send_proxy_protocol": "v1"})
        client = ("203.0.113.77", 7777)
        sock = connect(px.addr)
        sock.sendall(v2(client))
        with tls_client(pki.ca).wrap_socket(sock, server_hostname="a.example") as s:
            assert recv_line(s) == b"t\n"
            assert round_trip(s, b"secret" * 1000) == b"secret" * 1000
        conn = conn_from([t], client)
        assert (conn.header.version, conn.header.destination) == (1, DESTINATION)
        assert bytes(conn.received) == b"secret" * 1000


# -- sending without accepting --------------------------------------------------------------

@pytest.mark.parametrize("version", ["v1", "v2"])
def test_backend_is_told_the_real_client_and_listener_address(stack, version):
    with backends("s", handler=hello, proxy_header=True) as (b,):
        px = stack.poise([b.address], listener=tcp(), cluster={"send_proxy_protocol": version})
        with connect(px.addr, source="127.0.0.5") as s:
            assert recv_line(s) == b"s\n"
            assert round_trip(s, b"x" * 5000) == b"x" * 5000
            me = s.getsockname()
        conn = conn_from([b], me)
        header = conn.header
        assert (header.version, header.command, header.family) == \
            (int(version[1]), "PROXY", "TCP4")
        assert header.source == ("127.0.0.5", me[1])
        assert header.destination == px.addr
        assert bytes(conn.received) == b"x" * 5000
