"""Sans-IO codec for the PROXY protocol, versions 1 (text) and 2 (binary).

A proxy in front of poise (or poise in front of a backend) prepends one PROXY header
to a TCP connection to say who the client really is. This module only turns bytes
into a :class:`ProxyHeader` and addresses into bytes; it never touches a socket.

Contract of :func:`parse` (fed the first bytes of a connection, as many as arrived):

- ``(header, consumed)`` once a complete v1 or v2 header is present; the bytes after
  ``consumed`` are the connection's payload and are never looked at.
- ``(None, 0)`` while the bytes so far are a valid prefix of some header. This is
  bounded: a v1 line is at most 107 bytes with its CRLF, a v2 header at most
  16 + ``max_v2`` bytes.
- :class:`ProxyProtocolError` as soon as the bytes cannot become a valid header: the
  first byte already decides between v1 (``P``), v2 (``\\r``) and garbage; v2 fixed
  fields are judged byte by byte and its length as soon as it arrives; a v1 field is
  judged by its characters and length while it grows and fully once it is complete.
  Nothing else is ever raised, whatever the input.

Decisions the spec leaves open:

- v1 ``TCP6`` addresses are returned in canonical (compressed) form; scope ids (``%``)
  are rejected. v1 ``UNKNOWN`` ignores the rest of its line, as the spec requires.
- v2 ``LOCAL`` (the proxy's own health checks) and the ``UNSPEC`` family carry no
  addresses: the whole block, TLVs included, is skipped and the caller uses the
  connection's own endpoints. The CRC32C TLV is kept but not verified.
- v2 UNIX addresses are returned as ``(path, 0)``, the path cut at its first NUL and
  decoded like :func:`os.fsdecode` (undecodable bytes become surrogates).
- The encoders send an IPv4-mapped IPv6 address (``::ffff:a.b.c.d``, as dual-stack
  sockets report IPv4 clients) as plain IPv4; if one side is then IPv4 and the other
  IPv6, both go out as IPv6, the IPv4 one mapped.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address

from poise.errors import DownstreamError

Address = tuple[str, int]

V1_MAX = 107                      # longest v1 line, CRLF included (spec, section 2.1)
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_MAX_LENGTH = 4096              # default cap on the v2 length field: TLVs are small

_V1_PREFIX = b"PROXY "
_V1_PROTOCOLS = (b"TCP4", b"TCP6", b"UNKNOWN")
# Per address family: characters a textual address may use and its longest form
# (45 = a full IPv6 address with an embedded IPv4 tail).
_V1_ADDRESS = {b"TCP4": (b"0123456789.", 15), b"TCP6": (b"0123456789abcdefABCDEF:.", 45)}
_COMMANDS = {0x0: "LOCAL", 0x1: "PROXY"}
# The only family/transport bytes the spec allows; any other must be rejected.
_FAMILIES = {
    0x00: ("UNKNOWN", "UNSPEC", 0),
    0x11: ("TCP4", "STREAM", 12), 0x12: ("TCP4", "DGRAM", 12),
    0x21: ("TCP6", "STREAM", 36), 0x22: ("TCP6", "DGRAM", 36),
    0x31: ("UNIX", "STREAM", 216), 0x32: ("UNIX", "DGRAM", 216),
}
_LOCAL = ("UNKNOWN", "UNSPEC", 0)    # LOCAL: whatever the family byte says


class ProxyProtocolError(DownstreamError):
    """The connection does not start with a valid PROXY protocol header."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """One decoded PROXY header.

    ``family`` names the address family with v1's words (``TCP4`` = IPv4, ``TCP6`` =
    IPv6, ``UNIX``, ``UNKNOWN``) and ``transport`` says ``STREAM``, ``DGRAM`` or
    ``UNSPEC``. ``source``/``destination`` are ``(host, port)`` or None when the
    header carries no addresses (LOCAL, UNKNOWN, UNSPEC): use the connection's own.
    ``tlvs`` are v2's ``(type, value)`` extensions, in order, undecoded.
    """

    version: int
    command: str
    family: str
    source: Address | None
    destination: Address | None
    transport: str = "STREAM"
    tlvs: tuple[tuple[int, bytes], ...] = ()


def addresses_of(header: ProxyHeader) -> tuple[Address, Address] | None:
    """``(client, local)`` when ``header`` carries IPv4 or IPv6 addresses to use instead
    of the connection's own (whatever its transport byte says); None for LOCAL, UNKNOWN
    and UNIX headers."""
    if header.command != "PROXY" or header.family not in ("TCP4", "TCP6") \
            or header.source is None or header.destination is None:
        return None
    return header.source, header.destination


def parse(data: bytes, max_v2: int = V2_MAX_LENGTH) -> tuple[ProxyHeader | None, int]:
    """Decode the PROXY header at the start of ``data`` (see the module docstring).

    ``max_v2`` caps the v2 length field (bytes after the 16-byte fixed part); a longer
    header is rejected as soon as its length field arrives.
    """
    if not data:
        return None, 0
    if data[0] == V2_SIGNATURE[0]:
        return _parse_v2(data, max_v2)
    return _parse_v1(data)


# -- v1 --------------------------------------------------------------------------------

def _parse_v1(data: bytes) -> tuple[ProxyHeader | None, int]:
    end = data.find(b"\r\n", 0, V1_MAX)
    if end >= 0:
        return _check_v1(data[:end], complete=True), end + 2
    # A trailing CR can only be the start of the CRLF, so the line before it is final.
    pending_cr = data.endswith(b"\r")
    if len(data) + (1 if pending_cr else 2) > V1_MAX:
        raise ProxyProtocolError(f"PROXY v1 line without CRLF within {V1_MAX} bytes")
    _check_v1(data[:-1] if pending_cr else data, complete=pending_cr)
    return None, 0


def _check_v1(line: bytes, complete: bool) -> ProxyHeader | None:
    """Judge a v1 line without its CRLF (``complete``) or a prefix of one: the header,
    or None for a valid prefix; raises when no continuation could make it valid."""
    if line[:6] != _V1_PREFIX[: len(line)] or (complete and len(line) < 6):
        raise ProxyProtocolError("not a PROXY protocol header")
    if b"\r" in line or b"\n" in line:
        raise ProxyProtocolError("PROXY v1 line contains a bare CR or LF")
    protocol, spaced, rest = line[6:].partition(b" ")
    if protocol == b"UNKNOWN":
        return ProxyHeader(1, "PROXY", "UNKNOWN", None, None, "UNSPEC") if complete else None
    if protocol not in _V1_ADDRESS:
        if complete or spaced or not any(p.startswith(protocol) for p in _V1_PROTOCOLS):
            raise ProxyProtocolError(f"PROXY v1 protocol {_show(protocol)} is unknown")
        return None
    fields = rest.split(b" ") if spaced else []
    if len(fields) > 4 or (complete and len(fields) != 4):
        raise ProxyProtocolError("PROXY v1 line needs exactly: protocol, 2 addresses, 2 ports")
    values = [_v1_field(protocol, i, f, complete or i < len(fields) - 1)
              for i, f in enumerate(fields)]
    if not complete:
        return None
    src, dst, sport, dport = values
    return ProxyHeader(1, "PROXY", protocol.decode(), (src, sport), (dst, dport))


def _v1_field(protocol: bytes, index: int, field: bytes, final: bool) -> str | int | None:
    """Field ``index`` (0-1 addresses, 2-3 ports) of a TCP line: parsed if ``final``,
    else (still growing) only checked for what more bytes cannot undo."""
    if not field:
        if final:
            raise ProxyProtocolError("PROXY v1 line has an empty field (double space?)")
        return None
    if index >= 2:
        # Digits only, no sign, no leading zero: one spelling per port.
        if (not field.isdigit() or len(field) > 5 or int(field) > 65535
                or (field[0] == ord("0") and len(field) > 1)):
            raise ProxyProtocolError(f"PROXY v1 port {_show(field)} is invalid")
        return int(field)
    charset, longest = _V1_ADDRESS[protocol]
    if field.translate(None, charset) or len(field) > longest:
        raise ProxyProtocolError(f"PROXY v1 {protocol.decode()} address {_show(field)} is invalid")
    if not final:
        return None
    try:
        # The charset check above already ruled out non-ASCII text and scope ids.
        parsed = (IPv4Address if protocol == b"TCP4" else IPv6Address)(field.decode())
    except ValueError:
        raise ProxyProtocolError(
            f"PROXY v1 {protocol.decode()} address {_show(field)} is invalid") from None
    return str(parsed)


# -- v2 --------------------------------------------------------------------------------

def _parse_v2(data: bytes, max_v2: int) -> tuple[ProxyHeader | None, int]:
    if data[:12] != V2_SIGNATURE[: len(data)]:
        raise ProxyProtocolError("not a PROXY protocol header")
    if len(data) < 13:
        return None, 0
    if data[12] >> 4 != 2:
        raise ProxyProtocolError(f"PROXY v2 header has version {data[12] >> 4}")
    command = _COMMANDS.get(data[12] & 0xF)
    if command is None:
        raise ProxyProtocolError(f"PROXY v2 header has unknown command {data[12] & 0xF}")
    # LOCAL ignores the family byte entirely (spec: the whole block is discarded).
    if len(data) >= 14 and command == "PROXY" and data[13] not in _FAMILIES:
        raise ProxyProtocolError(f"PROXY v2 header has unknown family/transport {data[13]:#04x}")
    if len(data) < 16:
        return None, 0
    (length,) = struct.unpack_from("!H", data, 14)
    if length > max_v2:
        raise ProxyProtocolError(f"PROXY v2 header of {length} bytes exceeds {max_v2}")
    family, transport, address_len = _FAMILIES[data[13]] if command == "PROXY" else _LOCAL
    if length < address_len:
        raise ProxyProtocolError(
            f"PROXY v2 {family} address block needs {address_len} bytes, length is {length}")
    total = 16 + length
    if len(data) < total:
        return None, 0
    if family == "UNKNOWN":
        return ProxyHeader(2, command, "UNKNOWN", None, None, "UNSPEC"), total
    block = bytes(data[16:total])
    source, destination = _v2_addresses(family, block)
    return ProxyHeader(2, command, family, source, destination, transport,
                       _parse_tlvs(block, address_len)), total


def _v2_addresses(family: str, block: bytes) -> tuple[Address, Address]:
    if family == "UNIX":
        paths = [os.fsdecode(block[i:i + 108].partition(b"\0")[0]) for i in (0, 108)]
        return (paths[0], 0), (paths[1], 0)
    size = 4 if family == "TCP4" else 16
    kind = IPv4Address if family == "TCP4" else IPv6Address
    src, dst = kind(block[:size]), kind(block[size:2 * size])
    sport, dport = struct.unpack_from("!HH", block, 2 * size)
    return (str(src), sport), (str(dst), dport)


def _parse_tlvs(block: bytes, pos: int) -> tuple[tuple[int, bytes], ...]:
    tlvs = []
    while pos < len(block):
        if pos + 3 > len(block):
            raise ProxyProtocolError("PROXY v2 TLV header is truncated")
        kind, size = struct.unpack_from("!BH", block, pos)
        pos += 3
        if pos + size > len(block):
            raise ProxyProtocolError(f"PROXY v2 TLV {kind:#04x} of {size} bytes is truncated")
        tlvs.append((kind, block[pos:pos + size]))
        pos += size
    return tuple(tlvs)


def _show(raw: bytes) -> str:    # hostile bytes, quoted and shortened for a message
    return repr(bytes(raw[:48]))[1:]


# -- encoders --------------------------------------------------------------------------

def encode_v1(source: Address | None, destination: Address | None) -> bytes:
    """The v1 line for a connection from ``source`` to ``destination``.

    Both None gives ``PROXY UNKNOWN``. Raises ValueError for a host that is not an IP
    address or a port outside 0..65535 (a bug of the caller, not of the client).
    """
    if source is None or destination is None:
        _check_both_or_neither(source, destination)
        return b"PROXY UNKNOWN\r\n"
    v, src, dst = _ip_pair(source, destination)
    return f"PROXY TCP{v} {src} {dst} {source[1]} {destination[1]}\r\n".encode()


def encode_v2(source: Address | None, destination: Address | None,
              command: str = "PROXY", tlvs: tuple[tuple[int, bytes], ...] = ()) -> bytes:
    """The v2 header for a connection from ``source`` to ``destination``, STREAM transport.

    ``command="LOCAL"`` (a health check of our own) and both addresses None send no
    addresses (family UNSPEC). ``tlvs`` are appended as given. Raises ValueError as
    :func:`encode_v1` does, for LOCAL with addresses, or beyond 65535 bytes.
    """
    if command not in ("PROXY", "LOCAL"):
        raise ValueError(f"unknown PROXY v2 command {command!r}")
    if command == "LOCAL" and (source or destination):
        raise ValueError("a LOCAL header carries no addresses")
    if source is None or destination is None:
        _check_both_or_neither(source, destination)
        family, body = 0x00, b""
    else:
        v, src, dst = _ip_pair(source, destination)
        family = 0x11 if v == 4 else 0x21
        body = src.packed + dst.packed + struct.pack("!HH", source[1], destination[1])
    body += b"".join(struct.pack("!BH", kind, len(value)) + value for kind, value in tlvs)
    if len(body) > 0xFFFF:
        raise ValueError(f"PROXY v2 header body of {len(body)} bytes exceeds 65535")
    cmd = 0x1 if command == "PROXY" else 0x0
    return V2_SIGNATURE + struct.pack("!BBH", 0x20 | cmd, family, len(body)) + body


def _check_both_or_neither(source: Address | None, destination: Address | None) -> None:
    if source is not None or destination is not None:
        raise ValueError("give both addresses or neither")


def _ip_pair(source: Address, destination: Address
             ) -> tuple[int, IPv4Address | IPv6Address, IPv4Address | IPv6Address]:
    """Both addresses in one family (4 or 6), per the rule in the module docstring."""
    ips: list[IPv4Address | IPv6Address] = []
    for host, port in (source, destination):
        if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 0xFFFF:
            raise ValueError(f"port {port!r} is outside 0..65535")
        ip = ip_address(host)
        if isinstance(ip, IPv6Address):
            # Rebuilt from its bytes to drop a scope id, which neither format can carry.
            mapped = ip.ipv4_mapped
            ip = mapped if mapped is not None else IPv6Address(ip.packed)
        ips.append(ip)
    if all(isinstance(ip, IPv4Address) for ip in ips):
        return 4, ips[0], ips[1]
    six = [IPv6Address(b"\0" * 10 + b"\xff\xff" + ip.packed) if ip.version == 4 else ip
           for ip in ips]
    return 6, six[0], six[1]


def header_for(version: str, client: Address | None, local: Address | None) -> bytes:
    """The header to send a backend (``version`` ``"v1"`` or ``"v2"``) for a client
    connection from ``client`` to ``local``: ``PROXY UNKNOWN`` (v1) or ``LOCAL`` (v2)
    when either address is unknown or not an IP address (a UNIX socket client)."""
    encode = encode_v1 if version == "v1" else encode_v2
    if client is not None and local is not None:
        try:
            return encode(client, local)
        except ValueError:
            pass
    return encode_v1(None, None) if version == "v1" else encode_v2(None, None, "LOCAL")


def connection_addresses(proxied: tuple[Address, Address] | None,
                         transport: object) -> tuple[Address | None, Address | None]:
    """``(client, local)`` of a connection, each ``(ip, port)``: ``proxied`` (what its
    PROXY header carried) if given, else the socket's own; None where unknown."""
    if proxied is not None:
        return proxied
    if transport is None:
        return None, None
    extra = transport.get_extra_info  # type: ignore[attr-defined]
    peer, local = extra("peername"), extra("sockname")
    return (peer[:2] if isinstance(peer, tuple) else None,
            local[:2] if isinstance(local, tuple) else None)
