"""Sans-IO peek at a TLS ClientHello, for TLS passthrough routed by server name.

A passthrough listener does not terminate TLS: it reads the client's first flight,
learns the SNI server name (and the ALPN offer) from the ClientHello, picks a backend
and forwards every byte untouched. This module only looks at bytes; it never touches
a socket and never modifies or consumes what it is given.

Contract of :func:`peek` (fed all the bytes received so far on the connection):

- ``(hello, 0)`` once the whole ClientHello handshake message has arrived. Bytes
  after it (in its last record or beyond) are never looked at.
- ``(None, needed)`` while more bytes are needed; ``needed`` is a lower bound on the
  total length of data (always more than ``len(data)``), exact when the message ends
  in the record being received.
- :class:`ClientHelloError` as soon as the bytes cannot be a TLS ClientHello: each
  record header is judged byte by byte, the handshake type on its first byte, the
  message length once its four-byte header is in, the body once it is complete.
  Nothing else is ever raised, whatever the input.

Decisions the RFCs (RFC 8446 §4.1.2 and §5.1, RFC 6066 §3, RFC 7301) leave open:

- The message may be fragmented over any number of consecutive handshake records
  (record version major 3, any minor; length 1 to 2^14). Any other record type before
  it is complete is an error, and so is an SSLv2-compatible hello (first byte with
  the high bit set): it is not supported.
- ``max_size`` caps the handshake message, its four-byte header included. Framing is
  capped too: the message must be complete within ``2 * max_size`` bytes of records,
  so a client cannot make the caller buffer much more by sending tiny records.
- ``legacy_version`` is reported, not judged: the backend negotiates the version.
  A ClientHello without an extension block (allowed before TLS 1.3) has no name.
- server_name: each entry is read as ``name_type`` plus a two-byte length (the only
  form RFC 6066 defines); entries other than host_name are skipped, a second
  host_name entry is an error. The host name must be 1 to 255 visible ASCII bytes
  (0x21-0x7e; no space); it is lower-cased and one trailing dot is removed (RFC 6066
  forbids it, clients still send it). IP literals are not rejected.
- A duplicate server_name or ALPN extension is an error; duplicates of the other
  extensions are left to the backend, as is everything else this module skips.
- ALPN names are opaque bytes: they are decoded as latin-1, so every byte value maps
  to one character and ``name.encode("latin-1")`` gives the bytes back.
"""

from __future__ import annotations

from dataclasses import dataclass

from poise.errors import DownstreamError

RECORD_HEADER = 5
MAX_RECORD = 2**14                # TLSPlaintext.length limit (RFC 8446 §5.1)
HANDSHAKE_HEADER = 4
DEFAULT_MAX_SIZE = MAX_RECORD + 5

_HANDSHAKE = 0x16
_CLIENT_HELLO = 1
_EXT_SERVER_NAME = 0
_EXT_ALPN = 16
_HOST_NAME = 0
_RECORD_TYPES = {20: "change_cipher_spec", 21: "alert", 23: "application_data"}


class ClientHelloError(DownstreamError):
    """The connection does not start with a valid TLS ClientHello."""


@dataclass(frozen=True, slots=True)
class ClientHello:
    server_name: str | None       # SNI host_name, lower-cased, no trailing dot
    alpn: tuple[str, ...]         # ALPN protocol names offered, in order
    legacy_version: int           # e.g. 0x0303


def peek(data: bytes, max_size: int = DEFAULT_MAX_SIZE) -> tuple[ClientHello | None, int]:
    """The ClientHello at the start of ``data``, or how many bytes are needed first."""
    message, needed = _reassemble(data, max_size)
    if message is None:
        return None, needed
    return _parse(message[HANDSHAKE_HEADER:]), 0


# -- records -> handshake message --------------------------------------------------------

def _reassemble(data: bytes, max_size: int) -> tuple[bytes | None, int]:
    """The handshake message once complete, else ``(None, lower bound on len(data))``."""
    fragments: list[bytes] = []
    have = 0                      # handshake bytes gathered so far
    wanted = HANDSHAKE_HEADER     # the header until it is in, then the whole message
    pos = 0                       # start of the current record
    while True:
        _check_record_header(data[pos:pos + RECORD_HEADER], pos == 0)
        start = pos + RECORD_HEADER
        if start > len(data):
            return None, start + wanted - have
        end = start + int.from_bytes(data[pos + 3:start], "big")
        fragments.append(data[start:end])
        have += len(fragments[-1])
        if wanted == HANDSHAKE_HEADER:
            wanted = _message_size(b"".join(fragments)[:HANDSHAKE_HEADER], max_size)
        if have >= wanted:
            return b"".join(fragments)[:wanted], 0
        missing = wanted - have
        if end > len(data):
            left = end - len(data)
            return None, (len(data) + missing if missing <= left
                          else end + RECORD_HEADER + missing - left)
        pos = end
        if pos + RECORD_HEADER + missing > 2 * max_size:
            raise ClientHelloError("ClientHello fragmented into too many records")


def _check_record_header(header: bytes, first: bool) -> None:
    """Judge as much of a record header as has arrived."""
    if not header:
        return
    if header[0] != _HANDSHAKE:
        if first and header[0] & 0x80:
            raise ClientHelloError("SSLv2-compatible ClientHello is not supported")
        if first:
            raise ClientHelloError(f"not a TLS handshake record (first byte 0x{header[0]:02x})")
        kind = _RECORD_TYPES.get(header[0], f"content type {header[0]}")
        raise ClientHelloError(f"{kind} record before the ClientHello was complete")
    if len(header) >= 2 and header[1] != 3:
        raise ClientHelloError(f"TLS record version major {header[1]} is not 3")
    if len(header) == RECORD_HEADER:
        length = int.from_bytes(header[3:5], "big")
        if length == 0 or length > MAX_RECORD:
            raise ClientHelloError(f"TLS record length {length} is not within 1..{MAX_RECORD}")


def _message_size(head: bytes, max_size: int) -> int:
    """The whole message's size from its (possibly partial) header; 4 while unknown."""
    if head and head[0] != _CLIENT_HELLO:
        raise ClientHelloError(f"handshake message type {head[0]} is not client_hello")
    if len(head) < HANDSHAKE_HEADER:
        return HANDSHAKE_HEADER
    size = HANDSHAKE_HEADER + int.from_bytes(head[1:4], "big")
    if size > max_size:
        raise ClientHelloError(f"ClientHello of {size} bytes exceeds {max_size}")
    return size


# -- ClientHello body (RFC 8446 §4.1.2) ----------------------------------------------------

def _parse(body: bytes) -> ClientHello:
    if len(body) < 34:
        raise ClientHelloError("ClientHello truncated before its session id")
    version = int.from_bytes(body[:2], "big")
    session_id, pos = _field(body, 34, 1, "session id")
    if len(session_id) > 32:
        raise ClientHelloError(f"ClientHello session id of {len(session_id)} bytes (max 32)")
    suites, pos = _field(body, pos, 2, "cipher suites")
    if not suites or len(suites) % 2:
        raise ClientHelloError(f"ClientHello cipher suites length {len(suites)} is invalid")
    compression, pos = _field(body, pos, 1, "compression methods")
    if not compression:
        raise ClientHelloError("ClientHello offers no compression method")
    if pos == len(body):
        return ClientHello(None, (), version)
    extensions, pos = _field(body, pos, 2, "extensions")
    if pos != len(body):
        raise ClientHelloError("ClientHello has bytes after its extensions")
    server_name, alpn = _read_extensions(extensions)
    return ClientHello(server_name, alpn, version)


def _field(buf: bytes, pos: int, size: int, what: str) -> tuple[bytes, int]:
    """The field at ``pos`` prefixed by a ``size``-byte length, and the position after it."""
    start = pos + size
    if start > len(buf):
        raise ClientHelloError(f"ClientHello truncated in its {what} length")
    end = start + int.from_bytes(buf[pos:start], "big")
    if end > len(buf):
        raise ClientHelloError(f"ClientHello {what} length overruns its block")
    return buf[start:end], end


def _read_extensions(block: bytes) -> tuple[str | None, tuple[str, ...]]:
    server_name: str | None = None
    alpn: tuple[str, ...] = ()
    seen: set[int] = set()
    pos = 0
    while pos < len(block):
        if pos + 2 > len(block):
            raise ClientHelloError("ClientHello extension block ends inside a type")
        kind = int.from_bytes(block[pos:pos + 2], "big")
        content, pos = _field(block, pos + 2, 2, "extension data")
        if kind != _EXT_SERVER_NAME and kind != _EXT_ALPN:
            continue
        if kind in seen:
            raise ClientHelloError(f"ClientHello repeats extension {kind}")
        seen.add(kind)
        if kind == _EXT_SERVER_NAME:
            server_name = _server_name(content)
        else:
            alpn = _alpn(content)
    return server_name, alpn


def _server_name(content: bytes) -> str | None:
    """The host_name of a server_name extension (RFC 6066 §3)."""
    names, end = _field(content, 0, 2, "server name list")
    if end != len(content) or not names:
        raise ClientHelloError("ClientHello server name list is malformed")
    host: str | None = None
    pos = 0
    while pos < len(names):
        kind = names[pos]
        name, pos = _field(names, pos + 1, 2, "server name")
        if kind != _HOST_NAME:
            continue
        if host is not None:
            raise ClientHelloError("ClientHello carries two SNI host names")
        host = _host_name(name)
    return host


def _host_name(name: bytes) -> str:
    if name.endswith(b"."):
        name = name[:-1]
    if not name or len(name) > 255:
        raise ClientHelloError(f"SNI host name of {len(name)} bytes is invalid")
    for byte in name:
        if byte < 0x21 or byte > 0x7E:
            raise ClientHelloError(f"SNI host name contains byte 0x{byte:02x}")
    return name.decode("ascii").lower()


def _alpn(content: bytes) -> tuple[str, ...]:
    """The protocol names of an ALPN extension (RFC 7301 §3.1)."""
    names, end = _field(content, 0, 2, "ALPN list")
    if end != len(content) or not names:
        raise ClientHelloError("ClientHello ALPN list is malformed")
    protocols: list[str] = []
    pos = 0
    while pos < len(names):
        name, pos = _field(names, pos, 1, "ALPN protocol")
        if not name:
            raise ClientHelloError("ClientHello offers an empty ALPN protocol name")
        protocols.append(name.decode("latin-1"))
    return tuple(protocols)
