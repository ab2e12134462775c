"""A load generator for the control-plane tests: ``connections`` keep-alive HTTP/1.1
client connections on an asyncio loop in a thread of their own, each looping ``GET
target`` requests until :meth:`LoadGen.stop`, counting every failure
(``per_connection=N``: each client reconnects after N requests, to load the accept
path too).

A failure is anything a client would notice: a connect that fails, a reset, the server
closing a keep-alive connection without saying so (EOF where a response should start),
a truncated or malformed response, no response within ``timeout``, or a status other
than 200.  After a failure the connection is replaced.  A response with
``Connection: close`` is no failure: the client reconnects, as any client would.

Every successful request is recorded as ``(sent, done, backend)``: monotonic times
(system-wide on Linux, so comparable with backend processes' request logs) and the
``x-backend`` header of the h11 test backends.  :meth:`stop` lets requests in flight
finish, so stopping is never counted as a failure.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from dataclasses import dataclass

from tests.support.waiting import wait_for


@dataclass(frozen=True)
class Failure:
    at: float       # time.monotonic() when the request was sent
    kind: str       # connect, reset, closed, truncated, malformed, timeout, status
    detail: str


class ResponseError(Exception):
    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind


class LoadGen:
    def __init__(self, addr: tuple[str, int], connections: int = 64,
                 target: str = "/echo?load", pause: float = 0.0,
                 timeout: float = 10.0, per_connection: int | None = None) -> None:
        self.addr = addr
        self.connections = connections
        # Requests sent on a connection before the client closes it and connects anew
        # (None: as long as the server keeps it open).
        self.per_connection = per_connection
        self.target = target
        self.pause = pause
        self.timeout = timeout
        self.request = (f"GET {target} HTTP/1.1\r\nHost: load.test\r\n"
                        f"User-Agent: poise-tests-loadgen\r\n\r\n").encode()
        self.records: list[tuple[float, float, str | None]] = []
        self.failures: list[Failure] = []
        self.connects = 0
        self._in_flight: dict[int, float] = {}     # connection → when its request was sent
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, name="loadgen", daemon=True)
        self._done = threading.Event()

    # -- control -------------------------------------------------------------------------

    def start(self, warm: int | None = None) -> LoadGen:
        """Start, and wait until ``warm`` requests (default: one per connection) were
        answered."""
        self._thread.start()
        self.wait_requests(self.connections if warm is None else warm)
        return self

    def stop(self, timeout: float = 20.0) -> LoadGen:
        self._stopping = True
        assert self._done.wait(timeout), "the load generator did not stop"
        self._thread.join(timeout)
        return self

    def __enter__(self) -> LoadGen:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- results -------------------------------------------------------------------------

    @property
    def ok(self) -> int:
        return len(self.records)

    def backends(self, since: float = 0.0) -> Counter:
        """How many requests sent at or after ``since`` each backend answered."""
        return Counter(b for sent, _, b in list(self.records) if sent >= since)

    def wait_requests(self, n: int, timeout: float = 15.0) -> None:
        """Until ``n`` requests in all were answered."""
        wait_for(lambda: self.ok >= n, timeout,
                 lambda: f"{n} requests answered ({self.summary()})")

    def wait_more(self, n: int, timeout: float = 15.0) -> None:
        """Until ``n`` more requests than now were answered."""
        self.wait_requests(self.ok + n, timeout)

    def oldest_in_flight(self) -> float | None:
        """When the oldest request now in flight was sent (None: none is)."""
        times = list(self._in_flight.values())
        return min(times) if times else None

    def wait_sent_after(self, t: float, timeout: float = 15.0) -> None:
        """Until every request in flight was sent after ``t`` (those sent before have
        all been answered or failed)."""
        wait_for(lambda: (o := self.oldest_in_flight()) is None or o > t, timeout,
                 "requests sent before the mark to finish")

    def summary(self) -> str:
        kinds = Counter(f.kind for f in self.failures)
        sample = "; ".join(f"{f.kind}: {f.detail}" for f in self.failures[:5])
        return (f"{self.ok} ok, {len(self.failures)} failed {dict(kinds)}, "
                f"{self.connects} connects, backends {dict(self.backends())}"
                + (f" — first failures: {sample}" if sample else ""))

    # -- the loop ------------------------------------------------------------------------

    def _run(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._main())
        finally:
            loop.close()
            self._done.set()

    async def _main(self) -> None:
        await asyncio.gather(*(self._client(i) for i in range(self.connections)))

    async def _client(self, i: int) -> None:
        reader = writer = None
        sent_here = 0
        while not self._stopping:
            sent = time.monotonic()
            try:
                if writer is None:
                    try:
                        reader, writer = await asyncio.wait_for(
                            asyncio.open_connection(*self.addr), self.timeout)
                    except (OSError, TimeoutError) as e:
                        raise ResponseError("connect", repr(e)) from None
                    self.connects += 1
                    sent_here = 0
                    sent = time.monotonic()
                self._in_flight[i] = sent
                writer.write(self.request)
                try:
                    status, backend, close = await asyncio.wait_for(
                        self._response(reader), self.timeout)
                except TimeoutError:
                    raise ResponseError("timeout", f"no response in {self.timeout}s") \
                        from None
                except ConnectionResetError as e:
                    raise ResponseError("reset", repr(e)) from None
                except OSError as e:
                    raise ResponseError("error", repr(e)) from None
                if status != 200:
                    raise ResponseError("status", f"{status} from {backend}")
                self.records.append((sent, time.monotonic(), backend))
                sent_here += 1
                if close or sent_here == self.per_connection:
                    writer.close()
                    writer = None
            except ResponseError as e:
                self.failures.append(Failure(sent, e.kind, str(e)))
                if writer is not None:
                    writer.transport.abort()
                    writer = None
            finally:
                self._in_flight.pop(i, None)
            if self.pause:
                await asyncio.sleep(self.pause)
        if writer is not None:
            writer.close()

    async def _response(self, reader: asyncio.StreamReader) -> tuple[int, str | None, bool]:
        """Read one whole response: (status, x-backend, the connection must close)."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as e:
            if not e.partial:
                raise ResponseError("closed", "EOF instead of a response") from None
            raise ResponseError("truncated", f"EOF in a response head: {e.partial[:200]!r}") \
                from None
        except asyncio.LimitOverrunError:
            raise ResponseError("malformed", "response head too long") from None
        lines = head[:-4].split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or parts[0] not in (b"HTTP/1.1", b"HTTP/1.0") \
                or not parts[1].isdigit():
            raise ResponseError("malformed", f"status line {lines[0][:200]!r}")
        status = int(parts[1])
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                raise ResponseError("malformed", f"header line {line[:200]!r}")
            headers[name.strip().lower()] = value.strip()
        close = b"close" in headers.get(b"connection", b"").lower() or parts[0] == b"HTTP/1.0"
        try:
            if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
                body = await _chunked(reader)
            elif b"content-length" in headers:
                body = await reader.readexactly(int(headers[b"content-length"]))
            elif status in (204, 304):
                body = b""
            else:
                body = await reader.read()
                close = True
        except asyncio.IncompleteReadError as e:
            raise ResponseError("truncated", f"EOF after {len(e.partial)} body bytes of a "
                                             f"{status} response") from None
        if status == 200 and self.target.encode() not in body:
            raise ResponseError("malformed", f"a body that is not the echo: {body[:200]!r}")
        backend = headers.get(b"x-backend")
        return status, backend.decode() if backend is not None else None, close


async def _chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":
                pass
            return bytes(body)
        body += await reader.readexactly(size)
        if await reader.readexactly(2) != b"\r\n":
            raise ResponseError("malformed", "a chunk not followed by CRLF")
