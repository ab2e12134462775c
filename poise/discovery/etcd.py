"""The ``etcd`` source: etcd v3 through its HTTP/JSON gateway (``/v3/...``, etcd >= 3.4).

Each key under ``prefix`` is one instance; its value is JSON ``{"address": "host:port",
"weight": 1, ...}`` (see :func:`~poise.discovery.base.parse_entry`; the key names the
entry in warnings).  A ``watch()`` call:

1. picks an endpoint: ``endpoints`` are tried in order (starting with the one that
   worked last) until one accepts a connection;
2. with ``username``/``password``, authenticates there for a token, sent as the
   ``Authorization`` header of every request of this call (simple tokens are only valid
   on the member that issued them, and expire: each call gets a fresh one);
3. lists the prefix (``/v3/kv/range``) and yields the full set;
4. watches the prefix from the list's revision + 1 (``/v3/watch``: one long POST whose
   response streams newline-delimited JSON) and yields the full set after each batch of
   events.

It raises (and the runner calls ``watch()`` again, which lists afresh) when no endpoint
answers, a request fails or times out (``timeout``), etcd closes the watch, or the watch
is cancelled: a compacted start revision (``compact_revision``), an invalid or expired
token, a permission denied.  The watch socket has TCP keepalives, so a peer that vanishes
without closing is noticed in about half a minute rather than never.

No client library: etcd's maintained Python clients are gRPC-based and heavy, and the
gateway needs only a few HTTP/1.1 requests, written here over asyncio streams.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from poise.config.discovery import EtcdDiscovery
from poise.discovery.base import Instance, log, parse_entry

MAX_LINE = 64 * 1024 * 1024     # one JSON message of the gateway (a big range or batch)
INVALID_TOKEN = "invalid auth token"    # (etcd's words for an expired or unknown token)
# gRPC metadata "hasleader" (through the gateway): etcd cancels the watch when its member
# loses the cluster's leader, rather than leaving it silent on a minority side.
REQUIRE_LEADER = ("Grpc-Metadata-Hasleader: true",)


class EtcdError(Exception):
    """etcd answered with an error, or something that is not etcd's protocol."""


# -- keys and values --------------------------------------------------------------------

def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str | None) -> bytes:
    return base64.b64decode(text or "")


def rotation(first: int, count: int) -> list[int]:
    """Endpoint indexes in the order to try them: ``first`` (the one that answered
    last), then the others in config order, wrapping around."""
    return [(first + i) % count for i in range(count)]


def prefix_end(prefix: bytes) -> bytes:
    """The ``range_end`` that selects every key starting with ``prefix``: the prefix with
    its last byte incremented (trailing 0xff bytes dropped first); ``b"\\0"`` (every
    key) when the prefix is all 0xff."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return b"\0"
    return stripped[:-1] + bytes([stripped[-1] + 1])


def parse_value(key: bytes, value: bytes) -> Instance | None:
    """The instance a key's value describes; None (with a warning naming the key) when
    it is not valid."""
    name = key.decode("utf-8", "replace")
    try:
        data = json.loads(value)
    except ValueError:
        log.warning("discovery: skipping invalid entry %s: not JSON", name)
        return None
    return parse_entry(data, name)


# -- a small HTTP/1.1 client over asyncio streams ---------------------------------------

@dataclass(frozen=True)
class Endpoint:
    """An etcd client URL, ``http://host:port`` or ``https://host:port``."""

    url: str
    host: str
    port: int
    tls: bool

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an etcd endpoint URL: {url!r}")
        return cls(url, parts.hostname, parts.port or 2379, parts.scheme == "https")


class Response:
    """A response's status and headers, and its body as bytes or as lines."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 status: int, headers: dict[str, str]) -> None:
        self.reader, self.writer = reader, writer
        self.status, self.headers = status, headers

    async def _pieces(self) -> AsyncIterator[bytes]:
        """The body as it arrives (chunked, by Content-Length, or until EOF)."""
        reader = self.reader
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            while True:
                size_line = await reader.readline()
                if not size_line.endswith(b"\n"):
                    raise ConnectionError("etcd closed the connection mid-response")
                size = int(size_line.split(b";", 1)[0].strip() or b"x", 16)
                if size == 0:
                    while (await reader.readline()).strip():     # trailers
                        pass
                    return
                yield await reader.readexactly(size)
                await reader.readexactly(2)                      # the chunk's CRLF
        elif "content-length" in self.headers:
            yield await reader.readexactly(int(self.headers["content-length"]))
        else:
            while chunk := await reader.read(65536):
                yield chunk

    async def body(self) -> bytes:
        return b"".join([piece async for piece in self._pieces()])

    async def lines(self) -> AsyncIterator[bytes]:
        """The body's newline-delimited messages (chunks need not align with them)."""
        buffer = b""
        async for piece in self._pieces():
            buffer += piece
            if len(buffer) > MAX_LINE:
                raise EtcdError("a message from etcd is too large")
            *complete, buffer = buffer.split(b"\n")
            for line in complete:
                if line.strip():
                    yield line
        if buffer.strip():
            yield buffer

    def close(self) -> None:
        self.writer.close()


async def request(endpoint: Endpoint, path: str, payload: dict[str, Any],
                  token: str | None = None, extra: tuple[str, ...] = ()) -> Response:
    """POST ``payload`` as JSON to ``endpoint``; the response once its headers are in
    (the caller reads the body and closes it; the caller also bounds the time)."""
    reader, writer = await asyncio.open_connection(
        endpoint.host, endpoint.port, limit=MAX_LINE,
        ssl=ssl.create_default_context() if endpoint.tls else None)
    try:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            _keepalive(sock)
        body = json.dumps(payload).encode()
        head = [f"POST {path} HTTP/1.1", f"Host: {endpoint.host}:{endpoint.port}",
                "Content-Type: application/json", f"Content-Length: {len(body)}",
                "Connection: close"]
        if token is not None:
            head.append(f"Authorization: {token}")
        head.extend(extra)
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        status_line = await reader.readline()
        parts = status_line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise EtcdError(f"not an HTTP response from {endpoint.url}: {status_line[:80]!r}")
        headers: dict[str, str] = {}
        while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        return Response(reader, writer, int(parts[1]), headers)
    except BaseException:
        writer.close()
        raise


def _keepalive(sock: socket.socket) -> None:
    # A watch is silent while nothing changes: without keepalives, a member that vanished
    # (power off, partition) would leave it hanging forever.  ~10 s idle, then 3 probes 5 s
    # apart.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


def check(message: Any, endpoint: Endpoint) -> dict[str, Any]:
    """``message`` when it is a JSON object without an error; EtcdError otherwise."""
    if not isinstance(message, dict):
        raise EtcdError(f"unexpected answer from {endpoint.url}: {message!r:.200}")
    error = message.get("error")
    if error is not None:
        if isinstance(error, dict):     # (in a stream: {"error": {"message": ...}})
            error = error.get("message") or error
        raise EtcdError(f"{endpoint.url}: {error}")
    return message


async def call(endpoint: Endpoint, path: str, payload: dict[str, Any],
               token: str | None = None) -> dict[str, Any]:
    """One unary gateway request: its JSON answer; EtcdError when etcd reports an error."""
    response = await request(endpoint, path, payload, token)
    try:
        raw = await response.body()
    finally:
        response.close()
    try:
        message = json.loads(raw)
    except ValueError:
        raise EtcdError(f"{endpoint.url}{path} answered {response.status} with "
                        f"non-JSON: {raw[:200]!r}") from None
    message = check(message, endpoint)
    if response.status != 200:
        raise EtcdError(f"{endpoint.url}{path} answered {response.status}")
    return message


# -- the source -------------------------------------------------------------------------

class EtcdSource:
    """Watches the keys under ``spec.prefix`` (see the module's docstring)."""

    def __init__(self, spec: EtcdDiscovery) -> None:
        self.endpoints = [Endpoint.parse(url) for url in spec.endpoints]
        self.prefix = spec.prefix.encode()
        self.range_end = prefix_end(self.prefix)
        self.username = spec.username
        self.password = spec.password
        self.timeout = spec.timeout
        self._first = 0         # the endpoint tried first: the one that worked last

    async def _connect(self) -> tuple[int, str | None]:
        """The index of an endpoint that answers, tried in order, and a token for it
        (with credentials); raises the last connection error when none answers."""
        error: Exception | None = None
        for index in rotation(self._first, len(self.endpoints)):
            endpoint = self.endpoints[index]
            try:
                async with asyncio.timeout(self.timeout):
                    token = await self._authenticate(endpoint)
            except (OSError, TimeoutError) as e:    # unreachable: try the next one
                error = ConnectionError(f"{endpoint.url}: {e or 'timed out'}")
                continue
            self._first = index
            return index, token
        assert error is not None
        raise error

    async def _authenticate(self, endpoint: Endpoint) -> str | None:
        if self.username is None:
            # No credentials: check the endpoint answers (the cheapest request).
            await call(endpoint, "/v3/maintenance/status", {})
            return None
        answer = await call(endpoint, "/v3/auth/authenticate",
                            {"name": self.username, "password": self.password or ""})
        token = answer.get("token")
        if not isinstance(token, str) or not token:
            raise EtcdError(f"{endpoint.url}: no token in the authentication answer")
        return token

    async def watch(self) -> AsyncIterator[list[Instance]]:
        index, token = await self._connect()
        inner = self._watch(self.endpoints[index], token)
        try:
            async for instances in inner:
                yield instances
        except Exception:
            # This member answered but failed (no quorum, restarting...): the next call
            # tries the next endpoint first.
            self._first = (index + 1) % len(self.endpoints)
            raise
        finally:
            await inner.aclose()        # (closes the watch's socket now, not at GC)

    async def _watch(self, endpoint: Endpoint, token: str | None
                     ) -> AsyncIterator[list[Instance]]:
        try:
            async with asyncio.timeout(self.timeout):
                listed = await call(endpoint, "/v3/kv/range", {
                    "key": b64(self.prefix), "range_end": b64(self.range_end)}, token)
        except TimeoutError:
            raise TimeoutError(f"{endpoint.url}: no answer within {self.timeout}s") from None
        revision = int(listed.get("header", {}).get("revision", 0))
        instances: dict[bytes, Instance | None] = {}
        for kv in listed.get("kvs") or []:
            key = unb64(kv.get("key"))
            instances[key] = parse_value(key, unb64(kv.get("value")))
        yield _full_set(instances)

        create = {"key": b64(self.prefix), "range_end": b64(self.range_end),
                  "start_revision": str(revision + 1)}
        response, messages = await self._open_watch(endpoint, create, token)
        try:
            async for line in messages:
                events = _result(line, endpoint).get("events")
                if not events:
                    continue        # (a progress notification)
                for event in events:
                    kv = event.get("kv") or {}
                    key = unb64(kv.get("key"))
                    if event.get("type") == "DELETE":
                        instances.pop(key, None)
                    else:           # PUT: the default value, left out of the JSON
                        instances[key] = parse_value(key, unb64(kv.get("value")))
                yield _full_set(instances)
            raise ConnectionError(f"{endpoint.url} closed the watch")
        except asyncio.IncompleteReadError:
            raise ConnectionError(f"{endpoint.url} closed the watch mid-message") from None
        finally:
            response.close()

    async def _open_watch(self, endpoint: Endpoint, create: dict[str, Any], token: str | None
                          ) -> tuple[Response, AsyncIterator[bytes]]:
        """The watch's response, once etcd said it created the watch, and its messages."""
        for attempt in (1, 2):
            response: Response | None = None
            try:
                async with asyncio.timeout(self.timeout):
                    response = await request(endpoint, "/v3/watch", {"create_request": create},
                                             token, REQUIRE_LEADER)
                    messages = response.lines()
                    created = _result(await anext(messages), endpoint)
                if not created.get("created"):
                    raise EtcdError(f"{endpoint.url}: the watch was not created")
                return response, messages
            except BaseException as e:     # (cancelled too: the socket is closed)
                if response is not None:
                    response.close()
                if isinstance(e, TimeoutError):
                    raise TimeoutError(f"{endpoint.url}: the watch was not created within "
                                       f"{self.timeout}s") from None
                if isinstance(e, StopAsyncIteration | asyncio.IncompleteReadError):
                    raise ConnectionError(f"{endpoint.url} closed the watch") from None
                # The token may have expired while the listed set was handed on: once
                # more with a new one.
                if token is None or attempt == 2 or INVALID_TOKEN not in str(e):
                    raise
            async with asyncio.timeout(self.timeout):
                token = await self._authenticate(endpoint)
        raise AssertionError("unreachable")


def _result(line: bytes, endpoint: Endpoint) -> dict[str, Any]:
    """The ``result`` of one watch message; raises when etcd cancelled the watch."""
    try:
        message = json.loads(line)
    except ValueError:
        raise EtcdError(f"{endpoint.url}: not JSON in the watch: {line[:200]!r}") from None
    result = check(message, endpoint).get("result")
    if not isinstance(result, dict):
        raise EtcdError(f"{endpoint.url}: unexpected watch message: {line[:200]!r}")
    if result.get("canceled") or int(result.get("compact_revision") or 0):
        if int(result.get("compact_revision") or 0):
            raise EtcdError(f"{endpoint.url}: the watch's revision was compacted (now at "
                            f"{result['compact_revision']}); listing again")
        raise EtcdError(f"{endpoint.url}: the watch was cancelled: "
                        f"{result.get('cancel_reason') or 'no reason given'}")
    return result


def _full_set(instances: dict[bytes, Instance | None]) -> list[Instance]:
    """The valid instances, in key order (so that an unchanged set compares equal)."""
    return [instances[key] for key in sorted(instances) if instances[key] is not None]
