"""The PROXY protocol codec (poise.proxy.proxy_protocol): pure, so no sockets here.

Every malformed case states the length of the shortest prefix that must already be
rejected: shorter prefixes are still undecided ``(None, 0)``, that one raises.
"""

from __future__ import annotations

import struct
from ipaddress import ip_address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from poise.errors import DownstreamError
from poise.proxy.proxy_protocol import (
    V2_SIGNATURE,
    ProxyHeader,
    ProxyProtocolError,
    encode_v1,
    encode_v2,
    parse,
)

SIG = V2_SIGNATURE
V4 = (("192.0.2.1", 56324), ("198.51.100.7", 443))
V6 = (("2001:db8::1", 1), ("2001:db8::ff", 65535))


def v2(ver_cmd: int, family: int, body: bytes, length: int | None = None) -> bytes:
    return SIG + struct.pack("!BBH", ver_cmd, family, len(body) if length is None else length) + body


def inet_block(src="192.0.2.1", dst="198.51.100.7", sport=1234, dport=80) -> bytes:
    return ip_address(src).packed + ip_address(dst).packed + struct.pack("!HH", sport, dport)


def feed(data: bytes, **kw) -> list:
    """parse() over every prefix of data: the outcome per length (exception or result)."""
    out = []
    for n in range(1, len(data) + 1):
        try:
            out.append(parse(data[:n], **kw))
        except ProxyProtocolError as exc:
            out.append(exc)
    return out


def assert_complete_only_at_end(data: bytes, **kw) -> tuple[ProxyHeader, int]:
    outcomes = feed(data, **kw)
    assert outcomes[:-1] == [(None, 0)] * (len(data) - 1)
    header, consumed = outcomes[-1]
    assert consumed == len(data)
    return header, consumed


# -- valid headers ------------------------------------------------------------------------

def test_v1_spec_example_tcp4():
    line = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
    assert parse(line + b"GET / HTTP/1.1\r\n") == (
        ProxyHeader(1, "PROXY", "TCP4", ("192.168.0.1", 56324), ("192.168.0.11", 443)),
        len(line))


def test_v1_tcp6_is_canonicalised():
    line = b"PROXY TCP6 2001:DB8:0:0:0:0:0:1 ::ffff:192.0.2.1 0 65535\r\n"
    header, _ = parse(line)
    assert header.family == "TCP6"
    assert header.source == ("2001:db8::1", 0)
    assert header.destination == ("::ffff:c000:201", 65535)


@pytest.mark.parametrize("line", [
    b"PROXY UNKNOWN\r\n",
    b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n",
    b"PROXY UNKNOWN anything at all, it is ignored\r\n",
])
def test_v1_unknown_ignores_the_rest_of_the_line(line):
    assert parse(line + b"payload") == (
        ProxyHeader(1, "PROXY", "UNKNOWN", None, None, "UNSPEC"), len(line))


def test_v1_longest_line_is_accepted():
    line = b"PROXY UNKNOWN " + b"x" * 91 + b"\r\n"
    assert len(line) == 107
    assert parse(line)[1] == 107


@pytest.mark.parametrize("src,dst", [V4, V6], ids=["ipv4", "ipv6"])
def test_round_trip_v1(src, dst):
    data = encode_v1(src, dst)
    header, _ = assert_complete_only_at_end(data)
    family = "TCP4" if "." in src[0] else "TCP6"
    assert header == ProxyHeader(1, "PROXY", family, src, dst)


@pytest.mark.parametrize("src,dst", [V4, V6], ids=["ipv4", "ipv6"])
def test_round_trip_v2(src, dst):
    data = encode_v2(src, dst)
    header, _ = assert_complete_only_at_end(data)
    family = "TCP4" if "." in src[0] else "TCP6"
    assert header == ProxyHeader(2, "PROXY", family, src, dst, "STREAM", ())
    assert data[12:14] == (b"\x21\x11" if family == "TCP4" else b"\x21\x21")


def test_v2_exact_bytes():
    assert encode_v2(("192.0.2.1", 1234), ("198.51.100.7", 80)) == (
        SIG + b"\x21\x11\x00\x0c" + bytes([192, 0, 2, 1, 198, 51, 100, 7]) + b"\x04\xd2\x00\x50")


def test_trailing_payload_is_not_consumed():
    for data in (encode_v1(*V4), encode_v2(*V6, tlvs=((0x04, b"x"),))):
        header, consumed = parse(data + b"\x16\x03\x01 TLS hello, or anything else")
        assert header is not None and consumed == len(data)


def test_v2_local_has_no_addresses():
    data = encode_v2(None, None, command="LOCAL")
    assert data == SIG + b"\x20\x00\x00\x00"
    assert assert_complete_only_at_end(data)[0] == ProxyHeader(
        2, "LOCAL", "UNKNOWN", None, None, "UNSPEC")


def test_v2_local_skips_its_block_whatever_the_family_byte():
    # Spec: the receiver must accept LOCAL and discard the whole block, family included.
    data = v2(0x20, 0xFF, b"\x01" * 40)
    header, consumed = parse(data + b"rest")
    assert (header.command, header.source, header.tlvs, consumed) == ("LOCAL", None, (), len(data))


def test_v2_unspec_family_is_unknown():
    data = v2(0x21, 0x00, b"opaque")
    assert parse(data) == (ProxyHeader(2, "PROXY", "UNKNOWN", None, None, "UNSPEC"), len(data))


def test_v2_datagram_and_unix():
    header, _ = parse(v2(0x21, 0x12, inet_block()))
    assert (header.family, header.transport, header.source) == ("TCP4", "DGRAM", ("192.0.2.1", 1234))
    paths = b"/run/src.sock".ljust(108, b"\0") + b"/run/dst\0garbage".ljust(108, b"\0")
    header, _ = parse(v2(0x21, 0x31, paths))
    assert (header.family, header.source, header.destination) == (
        "UNIX", ("/run/src.sock", 0), ("/run/dst", 0))


def test_v2_tlvs_round_trip_raw_and_in_order():
    tlvs = ((0x01, b"h2"), (0x02, b"example.com"), (0x20, b"\x05" + b"\0" * 4), (0xEE, b""))
    header, _ = parse(encode_v2(*V4, tlvs=tlvs))
    assert header.tlvs == tlvs


def test_v2_length_limit():
    body = inet_block() + struct.pack("!BH", 0xEE, 100 - 15) + b"z" * 85
    assert len(body) == 100
    assert parse(v2(0x21, 0x11, body), max_v2=100)[1] == 116
    with pytest.raises(ProxyProtocolError, match="exceeds 99"):
        parse(v2(0x21, 0x11, body)[:16], max_v2=99)
    # The default refuses a header longer than 4096 as soon as its length arrives.
    with pytest.raises(ProxyProtocolError, match="4097"):
        parse(v2(0x21, 0x11, b"", length=4097))
    big = encode_v2(*V4, tlvs=((0xEE, b"q" * (65535 - 12 - 3)),))
    assert parse(big, max_v2=65535)[1] == len(big) == 16 + 65535


def test_error_is_a_downstream_error():
    with pytest.raises(DownstreamError):
        parse(b"GET / HTTP/1.1\r\n")


# -- malformed: (bytes, length of the shortest prefix that is already rejected) ----------

MALFORMED_V1 = {
    "http": (b"GET / HTTP/1.1\r\n", 1),
    "tls": (b"\x16\x03\x01\x02\x00", 1),
    "lowercase": (b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n", 1),
    "no-space": (b"PROXYTCP4", 6),
    "cr-after-proxy": (b"PROXY\r\n", 6),
    "empty-protocol": (b"PROXY \r\n", 7),
    "double-space": (b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n", 7),
    "tcp5": (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", 10),
    "udp4": (b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", 8),    # "U" may become UNKNOWN
    "unknownx": (b"PROXY UNKNOWNX\r\n", 14),
    "protocol-only": (b"PROXY TCP4\r\n", 11),
    "too-few-fields": (b"PROXY TCP4 1.2.3.4 5.6.7.8 80\r\n", 30),
    "too-many-fields": (b"PROXY TCP4 1.2.3.4 5.6.7.8 80 443 9\r\n", 34),
    "trailing-space": (b"PROXY TCP4 1.2.3.4 5.6.7.8 80 443 \r\n", 34),
    "ipv6-in-tcp4": (b"PROXY TCP4 ::1 ::2 1 2\r\n", 12),
    "ipv4-in-tcp6": (b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n", 19),
    "octet-256": (b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n", 21),
    "leading-zero-octet": (b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", 20),
    "three-octets": (b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", 17),
    "long-address": (b"PROXY TCP4 1111111111111111", 27),
    "scope-id": (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", 19),
    "hostname": (b"PROXY TCP4 localhost 5.6.7.8 1 2\r\n", 12),
    "non-ascii": ("PROXY TCP4 １.2.3.4 5.6.7.8 1 2\r\n".encode(), 12),
    "port-plus": (b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n", 28),
    "port-minus": (b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", 28),
    "port-leading-zero": (b"PROXY TCP4 1.2.3.4 5.6.7.8 080 2\r\n", 29),
    "port-00": (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 00\r\n", 31),
    "port-65536": (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n", 34),
    "port-six-digits": (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 123456\r\n", 35),
    "port-hex": (b"PROXY TCP4 1.2.3.4 5.6.7.8 0x50 2\r\n", 29),
    "bare-lf": (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", 31),
    "bare-cr": (b"PROXY UNKNOWN a\rb\r\n", 17),
    "no-crlf-in-107": (b"PROXY UNKNOWN " + b"x" * 200, 106),
    "tcp4-too-long": (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2" + b"3" * 80, 35),
}

MALFORMED_V2 = {
    "bad-signature": (SIG[:4] + b"X" + SIG[5:] + b"\x21\x11\x00\x00", 5),
    "signature-then-junk": (SIG[:11] + b"\r", 12),
    "version-1": (SIG + b"\x11\x11\x00\x0c" + inet_block(), 13),
    "version-3": (SIG + b"\x31\x11\x00\x0c" + inet_block(), 13),
    "command-2": (SIG + b"\x22\x11\x00\x0c" + inet_block(), 13),
    "command-f": (SIG + b"\x2f\x11\x00\x0c" + inet_block(), 13),
    "family-4": (SIG + b"\x21\x41\x00\x0c" + inet_block(), 14),
    "transport-3": (SIG + b"\x21\x13\x00\x0c" + inet_block(), 14),
    "inet-unspec-transport": (SIG + b"\x21\x10\x00\x0c" + inet_block(), 14),
    "unspec-family-stream": (SIG + b"\x21\x01\x00\x00", 14),
    "too-long": (v2(0x21, 0x11, b"", length=65535), 16),
    "inet-truncated": (v2(0x21, 0x11, inet_block()[:11]), 16),
    "inet6-truncated": (v2(0x21, 0x21, b"\0" * 35), 16),
    "unix-truncated": (v2(0x21, 0x31, b"\0" * 215), 16),
    "tlv-header-truncated": (v2(0x21, 0x11, inet_block() + b"\x01\x00"), 30),
    "tlv-value-truncated": (v2(0x21, 0x11, inet_block() + b"\x01\x00\x05ab"), 33),
    "second-tlv-truncated": (v2(0x21, 0x11, inet_block() + b"\x01\x00\x01a\x02\x00\x09"), 35),
}


@pytest.mark.parametrize("data,fails_at", list({**MALFORMED_V1, **MALFORMED_V2}.values()),
                         ids=list({**MALFORMED_V1, **MALFORMED_V2}))
def test_malformed_is_rejected_as_soon_as_certain(data, fails_at):
    outcomes = feed(data)
    assert outcomes[: fails_at - 1] == [(None, 0)] * (fails_at - 1)
    # Once rejected, more bytes never make it acceptable.
    assert all(isinstance(o, ProxyProtocolError) for o in outcomes[fails_at - 1:])
    assert str(outcomes[-1])   # a message, for the log


# -- encoders -----------------------------------------------------------------------------

def test_encode_unknown_and_unspec():
    assert encode_v1(None, None) == b"PROXY UNKNOWN\r\n"
    assert encode_v2(None, None) == SIG + b"\x21\x00\x00\x00"


def test_encode_ipv4_mapped_goes_out_as_ipv4():
    src, dst = ("::ffff:192.0.2.1", 5), ("::ffff:198.51.100.7", 6)
    assert encode_v1(src, dst) == b"PROXY TCP4 192.0.2.1 198.51.100.7 5 6\r\n"
    assert parse(encode_v2(src, dst))[0].source == ("192.0.2.1", 5)


def test_encode_mixed_families_go_out_as_ipv6():
    assert encode_v1(("192.0.2.1", 5), ("2001:db8::1", 6)) == (
        b"PROXY TCP6 ::ffff:c000:201 2001:db8::1 5 6\r\n")
    header, _ = parse(encode_v2(("2001:db8::1", 6), ("192.0.2.1", 5)))
    assert (header.family, header.destination) == ("TCP6", ("::ffff:c000:201", 5))


def test_encode_drops_ipv6_scope_id():
    assert encode_v1(("fe80::1%eth0", 1), ("fe80::2", 2)) == b"PROXY TCP6 fe80::1 fe80::2 1 2\r\n"


@pytest.mark.parametrize("call", [
    lambda: encode_v1(("example.com", 80), ("192.0.2.1", 80)),
    lambda: encode_v1(("192.0.2.1", 65536), ("192.0.2.1", 80)),
    lambda: encode_v1(("192.0.2.1", -1), ("192.0.2.1", 80)),
    lambda: encode_v1(("192.0.2.1", True), ("192.0.2.1", 80)),
    lambda: encode_v1(("192.0.2.1", 80), None),
    lambda: encode_v2(None, ("192.0.2.1", 80)),
    lambda: encode_v2(*V4, command="LOCAL"),
    lambda: encode_v2(*V4, command="HEALTH"),
    lambda: encode_v2(*V4, tlvs=((1, b"x" * 65535),)),
])
def test_encode_rejects_bad_arguments(call):
    with pytest.raises(ValueError):
        call()


# -- properties ---------------------------------------------------------------------------

ports = st.integers(0, 65535)
endpoints = st.one_of(
    st.tuples(st.ip_addresses(v=4).map(str), ports, st.ip_addresses(v=4).map(str), ports),
    st.tuples(st.ip_addresses(v=6).map(str), ports, st.ip_addresses(v=6).map(str), ports),
)
tlv_lists = st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=20)), max_size=4)


@given(endpoints, tlv_lists, st.binary(max_size=8))
def test_round_trips_byte_by_byte(ends, tlvs, payload):
    sh, sp, dh, dp = ends
    for data in (encode_v1((sh, sp), (dh, dp)), encode_v2((sh, sp), (dh, dp), tlvs=tuple(tlvs))):
        header, consumed = assert_complete_only_at_end(data)
        assert parse(data + payload) == (header, consumed)
        # IPv4-mapped sources are sent as IPv4, so compare through the encoder.
        assert encode_v1(header.source, header.destination) == encode_v1((sh, sp), (dh, dp))
        if header.version == 2:
            assert header.tlvs == tuple(tlvs)


# Random tails after prefixes that steer into each branch of the parser.
PREFIXES = [b"", b"PROXY ", b"PROXY TCP4 ", b"PROXY TCP6 ", b"PROXY UNKNOWN", SIG,
            SIG + b"\x21", SIG + b"\x21\x11", SIG + b"\x20", SIG + b"\x21\x31\x00"]
fuzz_data = st.builds(lambda p, t: p + t, st.sampled_from(PREFIXES), st.binary(max_size=120))


@settings(max_examples=500)
@given(st.one_of(st.binary(max_size=200), fuzz_data), st.integers(0, 300))
def test_fuzz_only_proxy_protocol_errors(data, max_v2):
    try:
        header, consumed = parse(data, max_v2=max_v2)
    except ProxyProtocolError:
        return
    assert 0 <= consumed <= len(data)
    assert (header is None) == (consumed == 0)


@settings(max_examples=300)
@given(fuzz_data)
def test_fuzz_outcome_is_monotonic_in_the_bytes_received(data):
    """Undecided, then either rejected for good or decided for good at one length."""
    outcomes = feed(data, max_v2=128)
    decided = next((i for i, o in enumerate(outcomes) if o != (None, 0)), None)
    if decided is None:
        return
    first = outcomes[decided]
    if isinstance(first, ProxyProtocolError):
        assert all(isinstance(o, ProxyProtocolError) for o in outcomes[decided:])
    else:
        assert first[1] == decided + 1
        assert all(o == first for o in outcomes[decided:])
