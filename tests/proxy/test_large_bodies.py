"""Streaming with bounded memory: a 1 GiB upload and a 1 GiB download pass through the
proxy while its RSS grows by less than 20 MiB; a stalled peer on either side makes the
proxy stop reading instead of buffering.

The client streams the :mod:`tests.support.pattern` bytes over raw sockets and never
holds a body; the backend verifies uploads against the same pattern.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

from tests.support import pattern
from tests.support.client import H11Client, RawReader, connect

GIB = 1 << 30
MIB = 1 << 20
RSS_BUDGET = 20 * MIB
BUF = 4 * MIB


class RssSampler:
    """Peak VmRSS of a process, sampled every 20 ms on a thread."""

    def __init__(self, proxy) -> None:
        self.proxy = proxy
        self.peak = proxy.rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.proxy.rss())

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proxy.rss())


@pytest.fixture
def proxy(stack):
    backend = stack.backend("big")
    px = stack.poise([backend])
    # Warm up both directions so lazily allocated buffers count in the baseline.
    with H11Client(px.addr) as c:
        for _ in range(3):
            assert c.request("POST", "/sink", body=pattern.prefix(4 * MIB)).json()["pattern_ok"]
            assert len(c.get(f"/bytes/{4 * MIB}").body) == 4 * MIB
    return px


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BUF)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUF)


def _growth(px, base: int, peak: int) -> str:
    return f"poise RSS grew {(peak - base) / MIB:.1f} MiB (baseline {base / MIB:.1f} MiB)"


@pytest.mark.slow
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_1gib_upload_streams_with_bounded_memory(proxy, framing):
    px = proxy
    base = px.rss()
    with RssSampler(px) as rss, connect(px.addr, timeout=60) as s:
        _tune(s)
        if framing == "chunked":
            s.sendall(b"POST /sink HTTP/1.1\r\nHost: big.example\r\n"
                      b"Transfer-Encoding: chunked\r\n\r\n")
            for part in pattern.chunks(GIB, MIB):
                s.sendall(b"%x\r\n" % len(part))
                s.sendall(part)
                s.sendall(b"\r\n")
            s.sendall(b"0\r\n\r\n")
        else:
            s.sendall(b"POST /sink HTTP/1.1\r\nHost: big.example\r\nContent-Length: %d\r\n\r\n"
                      % GIB)
            for part in pattern.chunks(GIB, MIB):
                s.sendall(part)
        r = RawReader(s).read_response()
    assert r.status == 200
    assert r.json() == {"received": GIB, "pattern_ok": True}
    assert rss.peak - base < RSS_BUDGET, _growth(px, base, rss.peak)


@pytest.mark.slow
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_1gib_download_streams_with_bounded_memory(proxy, framing):
    px = proxy
    base = px.rss()
    te = "cl" if framing == "content-length" else "chunked"
    received = 0
    with RssSampler(px) as rss, connect(px.addr, timeout=60) as s:
        _tune(s)
        s.sendall(b"GET /bytes/%d?te=%b&piece=%d HTTP/1.1\r\nHost: big.example\r\n\r\n"
                  % (GIB, te.encode(), MIB))
        reader = RawReader(s)
        head = reader.read_head()
        assert head.status == 200
        if te == "chunked":
            assert head.header("transfer-encoding") == "chunked"
            for data in reader.iter_chunked():
                assert pattern.matches(received, data), f"corrupt data at offset {received}"
                received += len(data)
        else:
            assert head.header("content-length") == str(GIB)
            received = len(reader.buf)
            assert pattern.matches(0, reader.buf)
            buf = bytearray(BUF)
            view = memoryview(buf)
            while received < GIB:
                n = s.recv_into(buf)
                assert n, f"connection closed after {received} of {GIB} bytes"
                assert pattern.matches(received, view[:n]), f"corrupt data at offset {received}"
                received += n
    assert received == GIB
    assert rss.peak - base < RSS_BUDGET, _growth(px, base, rss.peak)


def test_slow_reader_makes_the_proxy_stop_reading_the_backend(proxy):
    """A client that reads nothing: the proxy must not buffer the backend's 256 MiB."""
    px = proxy
    size = 256 * MIB
    base = px.rss()
    with RssSampler(px) as rss, connect(px.addr, timeout=60) as s:
        s.sendall(b"GET /bytes/%d?te=chunked HTTP/1.1\r\nHost: x\r\n\r\n" % size)
        time.sleep(2.0)     # the backend would deliver all of it in well under 2 s
        stalled_peak = rss.peak
        received = 0
        buf = bytearray(BUF)
        while True:
            n = s.recv_into(buf)
            assert n
            received += n
            if buf[:n].endswith(b"0\r\n\r\n"):
                break
    assert stalled_peak - base < RSS_BUDGET, _growth(px, base, stalled_peak)
    assert received > size


def test_stalled_backend_makes_the_proxy_stop_reading_the_client(proxy):
    """A backend that reads nothing: the client must be pushed back, not buffered."""
    px = proxy
    base = px.rss()
    sent = 0
    with RssSampler(px) as rss, connect(px.addr, timeout=60) as s:
        s.sendall(b"POST /stall?delay=3 HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % GIB)
        s.settimeout(2.0)
        try:
            for part in pattern.chunks(GIB, MIB):
                s.sendall(part)
                sent += len(part)
        except TimeoutError:
            pass
    assert sent < 256 * MIB, f"the proxy accepted {sent / MIB:.0f} MiB for a stalled backend"
    assert rss.peak - base < RSS_BUDGET, _growth(px, base, rss.peak)
