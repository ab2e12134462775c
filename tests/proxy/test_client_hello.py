"""The ClientHello peeker (poise.proxy.tcp.client_hello): pure, so no sockets here.

Real ClientHellos come from Python's own ssl module writing into a MemoryBIO; the
malformed ones are built field by field with :func:`hello_body` so that exactly one
thing is wrong in each.
"""

from __future__ import annotations

import random
import ssl

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from poise.errors import DownstreamError
from poise.proxy.tcp.client_hello import ClientHello, ClientHelloError, peek


def real_hello(server_hostname: str | None = "api.example.com", alpn: list[str] | None = None,
               maximum: ssl.TLSVersion | None = None) -> bytes:
    """The first flight of a real ssl client: its ClientHello, as records."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    if maximum is not None:
        ctx.maximum_version = maximum
    outgoing = ssl.MemoryBIO()
    tls = ctx.wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def payload_of(records: bytes) -> bytes:
    """The handshake bytes carried by a run of records."""
    out, pos = b"", 0
    while pos < len(records):
        length = int.from_bytes(records[pos + 3:pos + 5], "big")
        out += records[pos + 5:pos + 5 + length]
        pos += 5 + length
    return out


def refragment(payload: bytes, sizes: list[int], version: bytes = b"\x03\x01") -> bytes:
    """``payload`` as handshake records of the given sizes (the last one takes the rest)."""
    out, pos = b"", 0
    for size in sizes:
        if pos >= len(payload):
            break
        chunk = payload[pos:pos + size]
        out += b"\x16" + version + len(chunk).to_bytes(2, "big") + chunk
        pos += size
    if pos < len(payload):
        out += b"\x16" + version + (len(payload) - pos).to_bytes(2, "big") + payload[pos:]
    return out


def record(body: bytes, msg_type: int = 1) -> bytes:
    """A handshake message of ``body`` in a single record."""
    message = bytes([msg_type]) + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + len(message).to_bytes(2, "big") + message


def ext(kind: int, data: bytes) -> bytes:
    return kind.to_bytes(2, "big") + len(data).to_bytes(2, "big") + data


def sni(*names: bytes, name_type: int = 0) -> bytes:
    entries = b"".join(bytes([name_type]) + len(n).to_bytes(2, "big") + n for n in names)
    return ext(0, len(entries).to_bytes(2, "big") + entries)


def alpn_ext(*names: bytes) -> bytes:
    entries = b"".join(bytes([len(n)]) + n for n in names)
    return ext(16, len(entries).to_bytes(2, "big") + entries)


def hello_body(extensions: bytes | None = b"", session_id: bytes = b"\x11" * 32,
               suites: bytes = b"\x13\x01\x13\x02", compression: bytes = b"\x00",
               version: bytes = b"\x03\x03") -> bytes:
    out = version + b"\x22" * 32
    out += bytes([len(session_id)]) + session_id
    out += len(suites).to_bytes(2, "big") + suites
    out += bytes([len(compression)]) + compression
    if extensions is not None:
        out += len(extensions).to_bytes(2, "big") + extensions
    return out


def outcome(data: bytes, **kw: int) -> tuple[ClientHello | None, int] | ClientHelloError:
    try:
        return peek(data, **kw)
    except ClientHelloError as exc:
        return exc


def assert_incremental(data: bytes) -> ClientHello:
    """Every proper prefix asks for more (a sound lower bound); the whole parses."""
    for n in range(len(data)):
        hello, needed = peek(data[:n])
        assert hello is None
        assert n < needed <= len(data), (n, needed)
    hello, needed = peek(data)
    assert hello is not None and needed == 0
    return hello


REAL = real_hello()
REAL_H2 = real_hello(alpn=["h2"])
H13 = ClientHello("api.example.com", (), 0x0303)


# -- real ClientHellos --------------------------------------------------------------------

def test_real_hello_server_name():
    assert peek(REAL) == (H13, 0)


def test_real_hello_alpn():
    hello, _ = peek(real_hello(alpn=["h2", "http/1.1"]))
    assert hello == ClientHello("api.example.com", ("h2", "http/1.1"), 0x0303)


def test_real_hello_without_sni():
    assert peek(real_hello(server_hostname=None)) == (ClientHello(None, (), 0x0303), 0)


@pytest.mark.parametrize("maximum", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_real_hello_tls12_and_tls13(maximum):
    hello, _ = peek(real_hello("Backend.Example.ORG", ["http/1.1"], maximum))
    assert hello == ClientHello("backend.example.org", ("http/1.1",), 0x0303)


def test_every_prefix_of_a_real_hello_asks_for_more():
    assert assert_incremental(REAL_H2).alpn == ("h2",)


def test_feeding_exactly_what_is_asked_for_converges():
    data, have, rounds = REAL, 0, 0
    while True:
        hello, needed = peek(data[:have])
        if hello is not None:
            break
        have, rounds = needed, rounds + 1
    assert hello == H13 and have == len(data) and rounds <= 3


def test_one_byte_records():
    assert assert_incremental(refragment(payload_of(REAL), [1] * 10_000)) == H13


@pytest.mark.parametrize("seed", range(8))
def test_random_fragmentation(seed):
    rng = random.Random(seed)
    sizes = [rng.randint(1, 300) for _ in range(40)]
    data = refragment(payload_of(real_hello(alpn=["h2", "http/1.1"])), sizes, b"\x03\x03")
    assert assert_incremental(data).server_name == "api.example.com"


@given(st.lists(st.integers(1, 600), max_size=20))
def test_any_fragmentation_parses(sizes):
    assert peek(refragment(payload_of(REAL), sizes)) == (H13, 0)


@pytest.mark.parametrize("tail", [b"", b"\x17\x03\x03\x00\x05hello", b"\x00" * 50, b"GET /"])
def test_trailing_bytes_are_ignored(tail):
    assert peek(REAL + tail) == (H13, 0)
    split = refragment(payload_of(REAL), [100, 7])
    assert peek(split + tail) == (H13, 0)


def test_record_longer_than_the_message_is_fine():
    message = payload_of(REAL) + b"\x14\x00\x00\x00"
    assert peek(b"\x16\x03\x01" + len(message).to_bytes(2, "big") + message) == (H13, 0)
    # ...and the rest of that record need not have arrived.
    assert peek(b"\x16\x03\x01\x40\x00" + payload_of(REAL)) == (H13, 0)


# -- built ClientHellos ---------------------------------------------------------------------

def test_built_hello_fields():
    body = hello_body(sni(b"WWW.Example.Com.") + alpn_ext(b"h2", b"\xff\x0a"),
                      version=b"\x03\x01")
    hello = assert_incremental(record(body))
    assert hello == ClientHello("www.example.com", ("h2", "\xff\x0a"), 0x0301)
    assert hello.alpn[1].encode("latin-1") == b"\xff\x0a"


def test_without_extension_block():
    assert peek(record(hello_body(None))) == (ClientHello(None, (), 0x0303), 0)


def test_empty_extension_block_and_unknown_extensions():
    assert peek(record(hello_body())) == (ClientHello(None, (), 0x0303), 0)
    grease = ext(0x0A0A, b"") + ext(0xFAFA, b"\x00") + ext(0x0A0A, b"")
    assert peek(record(hello_body(grease + sni(b"a.b"))))[0] == ClientHello("a.b", (), 0x0303)


def test_other_name_types_are_skipped():
    entries = b"\x07\x00\x03xyz" + b"\x00\x00\x03a.b"
    body = hello_body(ext(0, len(entries).to_bytes(2, "big") + entries))
    assert peek(record(body))[0] == ClientHello("a.b", (), 0x0303)
    assert peek(record(hello_body(sni(b"x", name_type=9))))[0] == ClientHello(None, (), 0x0303)


def test_max_size():
    data = record(hello_body(sni(b"a" * 200)))
    size = len(data) - 5
    assert peek(data, max_size=size)[0] is not None
    with pytest.raises(ClientHelloError, match="exceeds"):
        peek(data[:9], max_size=size - 1)       # judged as soon as the length is in
    with pytest.raises(ClientHelloError, match="exceeds"):
        peek(b"\x16\x03\x01\x40\x00\x01\x00\x40\x02")   # 16390 > 16389, the default


def test_too_many_tiny_records():
    data = refragment(payload_of(REAL), [1] * 10_000)
    with pytest.raises(ClientHelloError, match="too many records"):
        peek(data, max_size=len(payload_of(REAL)) + 10)


def test_error_is_a_downstream_error():
    with pytest.raises(DownstreamError):
        peek(b"GET / HTTP/1.1\r\n")
    assert ClientHelloError.status == 400 and ClientHelloError.source == "downstream"


# -- malformed: each raises, and as early as stated ---------------------------------------

SSLV2 = bytes.fromhex("802e0100020015000000100700c0050080030080") + bytes(16)
ALERT = b"\x15\x03\x03\x00\x02\x02\x28"


@pytest.mark.parametrize("data, early, reason", [
    (b"GET / HTTP/1.1\r\n", 1, "not a TLS handshake"),
    (b"\x00\x00", 1, "not a TLS handshake"),
    (SSLV2, 1, "SSLv2"),
    (b"\x16\x02\x00\x00\x10", 2, "major 2"),
    (b"\x16\x03\x01\x00\x00", 5, "length 0"),
    (b"\x16\x03\x01\x40\x01", 5, "length 16385"),
    (record(hello_body(), msg_type=2), 6, "type 2"),
    (refragment(payload_of(REAL), [100])[:105] + ALERT, 106, "alert record"),
    (refragment(payload_of(REAL), [2])[:7] + b"\x14\x03\x03\x00\x01\x01", 8, "change_cipher"),
    (refragment(payload_of(REAL), [300])[:305] + b"\x99", 306, "content type 153"),
])
def test_framing_errors(data, early, reason):
    for n in range(early):
        assert isinstance(outcome(data[:n]), tuple)
    with pytest.raises(ClientHelloError, match=reason):
        peek(data[:early])


def _truncated_sni():
    entries = b"\x00\x00\x05a.b"
    return ext(0, len(entries).to_bytes(2, "big") + entries)


@pytest.mark.parametrize("body, reason", [
    (b"\x03\x03" + bytes(20), "before its session id"),
    (hello_body(session_id=bytes(33)), "session id of 33"),
    (hello_body(suites=b""), "cipher suites length 0"),
    (hello_body(suites=b"\x13\x01\x13"), "cipher suites length 3"),
    (hello_body(compression=b""), "no compression"),
    (hello_body()[:35 + 32 + 2 + 1], "cipher suites length overruns"),
    (hello_body()[:-1], "extensions length"),
    (hello_body(b"\x00\x00\x00\x05ab"), "extension data length overruns"),
    (hello_body(b"\x00"), "inside a type"),
    (hello_body(b"") + b"\x00", "bytes after its extensions"),
    (hello_body(sni(b"a.b") + sni(b"c.d")), "repeats extension 0"),
    (hello_body(alpn_ext(b"h2") + alpn_ext(b"h2")), "repeats extension 16"),
    (hello_body(sni(b"a.b", b"c.d")), "two SNI host names"),
    (hello_body(ext(0, b"")), "server name list length"),
    (hello_body(ext(0, b"\x00\x00")), "server name list is malformed"),
    (hello_body(ext(0, b"\x00\x04\x00\x00\x01a\x00")), "server name list is malformed"),
    (hello_body(_truncated_sni()), "server name length overruns"),
    (hello_body(sni(b"")), "0 bytes"),
    (hello_body(sni(b".")), "0 bytes"),
    (hello_body(sni(b"a" * 256)), "256 bytes"),
    (hello_body(sni("bücher.example".encode())), "byte 0xc3"),
    (hello_body(sni(b"a b")), "byte 0x20"),
    (hello_body(sni(b"a\x00b")), "byte 0x00"),
    (hello_body(ext(16, b"\x00\x00")), "ALPN list is malformed"),
    (hello_body(alpn_ext(b"h2", b"")), "empty ALPN"),
    (hello_body(ext(16, b"\x00\x03\x05h2")), "ALPN protocol length overruns"),
])
def test_body_errors(body, reason):
    data = record(body)
    for n in range(len(data)):                   # undecided until the message is complete
        result = outcome(data[:n])
        assert isinstance(result, tuple) and result[0] is None
    with pytest.raises(ClientHelloError, match=reason):
        peek(data)


# -- fuzz: a result or ClientHelloError, nothing else ---------------------------------------

def _check(data: bytes, max_size: int = 16389) -> None:
    try:
        hello, needed = peek(data, max_size=max_size)
    except ClientHelloError as exc:
        assert str(exc)
        return
    if hello is None:
        assert len(data) < needed <= 2 * max_size + 9
    else:
        assert needed == 0
        assert hello.server_name is None or hello.server_name.isascii()


@settings(max_examples=500)
@given(st.one_of(st.binary(max_size=300),
                 st.binary(max_size=300).map(lambda b: b"\x16\x03\x01" + b),
                 st.binary(max_size=300).map(lambda b: REAL[:50] + b)),
       st.integers(0, 600))
def test_fuzz_random_bytes(data, max_size):
    _check(data, max_size)


@settings(max_examples=500)
@given(st.lists(st.tuples(st.integers(0, len(REAL) - 1), st.integers(0, 255)), max_size=6),
       st.integers(0, len(REAL)), st.binary(max_size=8))
def test_fuzz_mutated_real_hello(flips, cut, insert):
    data = bytearray(REAL)
    for index, value in flips:
        data[index] = value
    _check(bytes(data[:cut]) + insert + bytes(data[cut:]))
    _check(bytes(data[:cut]))
    _check(bytes(data))


@settings(max_examples=300)
@given(st.lists(st.integers(1, 200), max_size=10),
       st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)), max_size=4))
def test_fuzz_mutated_fragmented_hello(sizes, flips):
    data = bytearray(refragment(payload_of(REAL_H2), sizes))
    for index, value in flips:
        data[index % len(data)] = value
    _check(bytes(data))
