"""ProxyProtocolServer over real loopback sockets, in-process: the PROXY header is
consumed exactly (what follows it reaches the protocol intact, however the bytes are
split), bad or missing headers close the connection before any protocol exists."""

from __future__ import annotations

import asyncio
import socket

import pytest
import uvloop

from poise.proxy.acceptor import ProxyProtocolServer, listening_socket
from poise.proxy.proxy_protocol import encode_v1, encode_v2

CLIENT = ("10.1.2.3", 40000)
LOCAL = ("10.0.0.1", 443)


class Recorder(asyncio.Protocol):
    """Keeps what its connection received; ``done`` resolves at EOF."""

    def __init__(self, addresses, done: asyncio.Future) -> None:
        self.addresses = addresses
        self.data = bytearray()
        self.done = done

    def data_received(self, data: bytes) -> None:
        self.data += data

    def eof_received(self) -> bool:
        self.done.set_result((self.addresses, bytes(self.data)))
        return False


async def serve(timeout: float = 2.0):
    loop = asyncio.get_running_loop()
    results: asyncio.Queue = asyncio.Queue()
    rejected: list[str] = []

    def factory(addresses):
        done = loop.create_future()
        done.add_done_callback(lambda f: results.put_nowait(f.result()))
        return Recorder(addresses, done)

    sock = listening_socket("127.0.0.1", 0, reuse_port=False)
    server = ProxyProtocolServer(loop, sock, factory, ssl_context=None, timeout=timeout,
                                 on_reject=rejected.append)
    return server, sock.getsockname()[:2], results, rejected


async def send_in_pieces(address, pieces: list[bytes], pause: float = 0.02) -> bytes:
    """Send ``pieces`` as separate segments, half-close, and return what came back."""
    loop = asyncio.get_running_loop()
    sock = socket.create_connection(address)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
    try:
        for piece in pieces:
            await loop.sock_sendall(sock, piece)
            await asyncio.sleep(pause)
        sock.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := await asyncio.wait_for(loop.sock_recv(sock, 4096), 5):
            out += chunk
        return out
    except (ConnectionResetError, OSError):     # (closed by the server, maybe reset)
        return b"<reset>"
    finally:
        sock.close()


def run(coro):
    return uvloop.run(coro)


@pytest.mark.parametrize("header", [encode_v1(CLIENT, LOCAL), encode_v2(CLIENT, LOCAL)],
                         ids=["v1", "v2"])
@pytest.mark.parametrize("split", ["one segment", "byte by byte", "header then payload"])
def test_exactly_the_header_is_consumed(header, split):
    payload = b"GET / HTTP/1.1\r\n\r\n" + bytes(range(256)) * 8

    async def main():
        server, address, results, rejected = await serve()
        whole = header + payload
        if split == "one segment":
            pieces = [whole]
        elif split == "byte by byte":
            pieces = [whole[i:i + 1] for i in range(len(header) + 3)] + [whole[len(header) + 3:]]
        else:
            pieces = [header, payload]
        client = asyncio.ensure_future(send_in_pieces(address, pieces, pause=0.001))
        addresses, data = await asyncio.wait_for(results.get(), 10)
        await client
        server.close()
        return addresses, data, rejected

    addresses, data, rejected = run(main())
    assert addresses == (CLIENT, LOCAL)
    assert data == payload
    assert rejected == []


def test_local_and_unknown_headers_carry_no_addresses():
    async def main():
        server, address, results, _ = await serve()
        out = []
        for header in (encode_v1(None, None), encode_v2(None, None, "LOCAL")):
            client = asyncio.ensure_future(send_in_pieces(address, [header + b"x"]))
            out.append(await asyncio.wait_for(results.get(), 10))
            await client
        server.close()
        return out

    assert run(main()) == [(None, b"x"), (None, b"x")]


@pytest.mark.parametrize("opening", [
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
    b"PROXY TCP4 999.2.3.4 5.6.7.8 1 2\r\n",
    b"\r\n\r\n\x00\r\nQUIT\n\x99" + b"\x00" * 20,
    b"\x16\x03\x01\x02\x00\x01",            # a TLS ClientHello without any header
])
def test_a_bad_header_closes_before_any_protocol(opening):
    async def main():
        server, address, results, rejected = await serve()
        answer = await send_in_pieces(address, [opening])
        await asyncio.sleep(0.05)
        server.close()
        return answer, results.qsize(), rejected

    answer, protocols, rejected = run(main())
    assert answer in (b"", b"<reset>")
    assert protocols == 0
    assert len(rejected) == 1


def test_no_header_within_the_timeout_closes():
    async def main():
        server, address, results, rejected = await serve(timeout=0.2)
        loop = asyncio.get_running_loop()
        sock = socket.create_connection(address)
        sock.setblocking(False)
        await loop.sock_sendall(sock, b"PROXY TCP4 1.2.")     # and then nothing
        closed = await asyncio.wait_for(loop.sock_recv(sock, 10), 5)
        sock.close()
        server.close()
        return closed, results.qsize(), rejected

    closed, protocols, rejected = run(main())
    assert closed == b""
    assert protocols == 0
    assert rejected and "within 0.2s" in rejected[0]


def test_close_stops_accepting_and_drops_connections_mid_header():
    async def main():
        server, address, results, _ = await serve()
        loop = asyncio.get_running_loop()
        sock = socket.create_connection(address)
        sock.setblocking(False)
        await loop.sock_sendall(sock, b"PROXY ")
        await asyncio.sleep(0.05)
        server.close()
        closed = await asyncio.wait_for(loop.sock_recv(sock, 10), 5)
        sock.close()
        try:
            socket.create_connection(address, timeout=1).close()
            refused = False
        except ConnectionRefusedError:
            refused = True
        return closed, refused

    closed, refused = run(main())
    assert closed == b""
    assert refused
