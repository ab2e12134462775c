"""Clients for proxy tests: h11 for well-formed exchanges, raw sockets for the rest.

Every socket has a timeout, so a proxy that hangs fails the test instead of blocking it.
"""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass, field

import h11

DEFAULT_HOST = "test.example"
TIMEOUT = 10.0


@dataclass
class Response:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    version: bytes = b"1.1"
    informational: list[int] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        """The value of the only header ``name`` (case-insensitive), or None."""
        values = self.all(name)
        assert len(values) <= 1, f"{name} appears {len(values)} times"
        return values[0] if values else None

    def all(self, name: str) -> list[str]:
        key = name.lower().encode()
        return [v.decode("latin-1") for n, v in self.headers if n.lower() == key]

    def names(self) -> set[str]:
        return {n.decode("latin-1").lower() for n, _ in self.headers}

    def json(self) -> dict:
        return json.loads(self.body)


def echo_headers(echo: dict, name: str) -> list[str]:
    """Values of header ``name`` as the backend saw them (from an /echo response)."""
    return [v for n, v in echo["headers"] if n.lower() == name.lower()]


class H11Client:
    """One client connection speaking HTTP/1.1 through h11."""

    def __init__(self, addr: tuple[str, int], timeout: float = TIMEOUT) -> None:
        self.sock = socket.create_connection(addr, timeout=timeout)
        self.conn = h11.Connection(h11.CLIENT)

    @classmethod
    def over(cls, sock: socket.socket) -> H11Client:
        """A client on an already connected socket (TLS-wrapped, or after a PROXY
        header was sent on it)."""
        client = cls.__new__(cls)
        client.sock = sock
        client.conn = h11.Connection(h11.CLIENT)
        return client

    @staticmethod
    def _request_events(method: str, target: str, headers, body, chunks) -> list:
        hdrs = list(headers or [])
        if not any(n.lower() == "host" for n, _ in hdrs):
            hdrs.insert(0, ("Host", DEFAULT_HOST))
        if body is not None and not any(n.lower() == "content-length" for n, _ in hdrs):
            hdrs.append(("Content-Length", str(len(body))))
        if chunks is not None:
            hdrs.append(("Transfer-Encoding", "chunked"))
        events = [h11.Request(method=method, target=target, headers=hdrs)]
        for part in ([body] if body else []) + list(chunks or []):
            events.append(h11.Data(data=part))
        events.append(h11.EndOfMessage())
        return events

    def send(self, method: str, target: str, headers=None, body: bytes | None = None,
             chunks: list[bytes] | None = None) -> None:
        """Send a whole request (``chunks`` → Transfer-Encoding: chunked)."""
        events = self._request_events(method, target, headers, body, chunks)
        self.sock.sendall(b"".join(self.conn.send(e) for e in events))

    def send_head(self, method: str, target: str, headers) -> None:
        """Send only the head (e.g. with ``Expect: 100-continue``); see :meth:`send_body`."""
        self.sock.sendall(self.conn.send(
            self._request_events(method, target, headers, None, None)[0]))

    def send_body(self, body: bytes) -> None:
        self.sock.sendall(self.conn.send(h11.Data(data=body)) + self.conn.send(h11.EndOfMessage()))

    def next_event(self):
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            self.conn.receive_data(self.sock.recv(1 << 20))

    def read_response(self, stop_after_informational: bool = False) -> Response:
        """Read one response (after its 1xx, if any)."""
        informational = []
        while True:
            event = self.next_event()
            if isinstance(event, h11.InformationalResponse):
                informational.append(event.status_code)
                if stop_after_informational:
                    return Response(event.status_code, list(event.headers),
                                    informational=informational)
                continue
            assert isinstance(event, h11.Response), f"expected a response, got {event!r}"
            break
        resp = Response(event.status_code, list(event.headers.raw_items()),
                        version=event.http_version, informational=informational)
        body = bytearray()
        while True:
            event = self.next_event()
            if isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                raise AssertionError(f"unexpected {event!r} in a response body")
        resp.body = bytes(body)
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        return resp

    def request(self, method: str, target: str, headers=None, body: bytes | None = None,
                chunks: list[bytes] | None = None) -> Response:
        self.send(method, target, headers, body, chunks)
        return self.read_response()

    def get(self, target: str, headers=None) -> Response:
        return self.request("GET", target, headers)

    def pipeline(self, requests: list[tuple]) -> list[Response]:
        """Send ``requests`` (``(method, target, headers, body)``) in ONE write, then read
        the responses in order (stopping early if the server closes the connection).  Request bytes come from throwaway h11 connections (h11
        does not pipeline); the h11 state of this connection is advanced per response."""
        wire = []
        for method, target, headers, body in requests:
            scratch = h11.Connection(h11.CLIENT)
            events = self._request_events(method, target, headers, body, None)
            wire.append(b"".join(scratch.send(e) for e in events))
        self.sock.sendall(b"".join(wire))
        responses = []
        for method, target, headers, body in requests:
            if responses and not self.reusable:
                break       # the server ended the connection: return what came back
            for e in self._request_events(method, target, headers, body, None):
                self.conn.send(e)
            responses.append(self.read_response())
        return responses

    @property
    def reusable(self) -> bool:
        """h11 agrees the connection may carry another request."""
        return self.conn.our_state is h11.IDLE and self.conn.their_state is h11.IDLE

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> H11Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- raw sockets -------------------------------------------------------------------------

def connect(addr: tuple[str, int], timeout: float = TIMEOUT) -> socket.socket:
    return socket.create_connection(addr, timeout=timeout)


def read_until_close(sock: socket.socket, timeout: float = TIMEOUT) -> bytes:
    """Everything until the peer closes; AssertionError if it does not within ``timeout``.
    A reset counts as a close."""
    sock.settimeout(timeout)
    data = bytearray()
    deadline = time.monotonic() + timeout
    while True:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            raise AssertionError(f"no close within {timeout}s; got {bytes(data[:300])!r}") from None
        except ConnectionResetError:
            return bytes(data)
        if not chunk:
            return bytes(data)
        data += chunk
        if time.monotonic() > deadline:
            raise AssertionError(f"no close within {timeout}s; got {bytes(data[:300])!r}")


def status_of(raw: bytes) -> int:
    """The status code of the first response in ``raw``."""
    assert raw.startswith(b"HTTP/1."), f"not an HTTP response: {raw[:200]!r}"
    return int(raw.split(b" ", 2)[1])


def is_closed(sock: socket.socket, timeout: float) -> bool:
    """True when the peer closes (EOF or reset) within ``timeout`` without sending bytes."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


class RawReader:
    """Strict reader of responses to requests sent as raw bytes (e.g. HTTP/1.0).

    Understands Content-Length, chunked and close-delimited bodies and the statuses and
    methods that have none.  ``Response.headers`` keeps names as sent.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.eof = False

    def _fill(self) -> None:
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            self.eof = True
            raise EOFError("connection closed")
        self.buf += chunk

    def _line(self) -> bytes:
        while (i := self.buf.find(b"\r\n")) < 0:
            self._fill()
        line = bytes(self.buf[:i])
        del self.buf[:i + 2]
        return line

    def _exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def read_head(self) -> Response:
        """The next final response head (1xx statuses are collected in ``informational``)."""
        informational = []
        while True:
            version, status = self._status_line()
            headers = self._headers()
            if status >= 200 or status == 101:
                return Response(status, headers, version=version, informational=informational)
            informational.append(status)

    def read_response(self, method: str = "GET") -> Response:
        resp = self.read_head()
        status = resp.status
        te = [v.lower() for v in resp.all("transfer-encoding")]
        cl = resp.all("content-length")
        if method == "HEAD" or status in (204, 304):
            return resp
        if te:
            assert te == ["chunked"], f"unexpected transfer-encoding {te}"
            assert not cl, "both Content-Length and Transfer-Encoding in a response"
            resp.body = self._chunked()
        elif cl:
            assert len(cl) == 1, f"several Content-Length headers: {cl}"
            resp.body = self._exactly(int(cl[0]))
        else:
            while not self.eof:
                try:
                    self._fill()
                except EOFError:
                    break
            resp.body = bytes(self.buf)
            self.buf.clear()
        return resp

    def _status_line(self) -> tuple[bytes, int]:
        line = self._line()
        proto, status, _ = line.split(b" ", 2)
        assert proto in (b"HTTP/1.0", b"HTTP/1.1"), line
        return proto[5:], int(status)

    def _headers(self) -> list[tuple[bytes, bytes]]:
        headers = []
        while line := self._line():
            name, sep, value = line.partition(b":")
            assert sep and name == name.strip(), f"bad header line {line!r}"
            headers.append((name, value.strip()))
        return headers

    def _chunked(self) -> bytes:
        body = bytearray()
        while True:
            size = int(self._line().split(b";")[0], 16)
            if size == 0:
                while self._line():   # trailers
                    pass
                return bytes(body)
            body += self._exactly(size)
            assert self._exactly(2) == b"\r\n", "chunk not followed by CRLF"

    def iter_chunked(self):
        """Stream a chunked body (after :meth:`read_head`): yield its data in pieces,
        checking the framing, without holding the body."""
        while True:
            size = int(self._line().split(b";")[0], 16)
            if size == 0:
                while self._line():   # trailers
                    pass
                return
            while size:
                if not self.buf:
                    self._fill()
                take = min(size, len(self.buf))
                yield bytes(self.buf[:take])
                del self.buf[:take]
                size -= take
            assert self._exactly(2) == b"\r\n", "chunk not followed by CRLF"
