"""HTTP/2 from clients through a real poise process: h2c with prior knowledge and ALPN
h2 on an ``http2`` listener, each stream forwarded as HTTP/1.1 to h11 backends.

Well-behaved clients (httpx, curl, h2load) check the protocol end to end: methods and
bodies both ways, 1xx, header rewriting, HTTP/1.1 next to HTTP/2 on one listener,
concurrency and balancing per stream, flow control, graceful stop, TLS, metrics and
the access log.  Hostile clients (``tests.support.h2``: h2's codec with validation
off, or frames written by hand) check the limits and abuse handling: refused streams,
413/414/431, malformed header lists, rapid reset, PING/SETTINGS/empty-DATA/CONTINUATION
floods and a client that never opens its window.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from poise.config import parse_config
from tests.support import pattern
from tests.support.certs import Pki, needs_openssl
from tests.support.client import H11Client, echo_headers
from tests.support.h2 import (
    CANCEL,
    ENHANCE_YOUR_CALM,
    INITIAL_WINDOW_SIZE,
    NO_ERROR,
    PROTOCOL_ERROR,
    REFUSED_STREAM,
    H2Client,
    RawH2,
    request_headers,
)
from tests.support.procs import Blackhole, Stack
from tests.support.waiting import wait_for

HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade",
              "transfer-encoding", "x-resp-hop"}
MiB = 1 << 20


# -- fixtures and helpers ----------------------------------------------------------------

@pytest.fixture(scope="module")
def backends(module_stack):
    return [module_stack.backend(f"h{i}") for i in (1, 2, 3)]


@pytest.fixture(scope="module")
def px(module_stack, backends):
    """HTTP/2 on, three backends round robin, the default limits."""
    return module_stack.poise(backends, listener={
        "http2": {"max_concurrent_streams": 100}})


def url(proxy, path: str, scheme: str = "http") -> str:
    return f"{scheme}://127.0.0.1:{proxy.port}{path}"


def h2c() -> httpx.Client:
    """httpx speaking HTTP/2 with prior knowledge on http:// URLs."""
    return httpx.Client(http1=False, http2=True, timeout=30)


def seen_by(backends, marker: str) -> list[str]:
    """The targets containing ``marker`` that reached any of ``backends``."""
    return [t for b in backends for t in b.targets() if marker in t]


def serves(proxy, path: str = "/echo?still-serving") -> None:
    """A new HTTP/2 connection still gets an answer (poise is healthy)."""
    with H2Client(proxy.addr) as c:
        assert c.response(c.request("GET", path)).status == 200


def pattern_sha256(size: int) -> str:
    h = hashlib.sha256()
    for part in pattern.chunks(size):
        h.update(part)
    return h.hexdigest()


def curl(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", "--http2-prior-knowledge", "--max-time", "30",
                           *args], input=stdin, capture_output=True, timeout=60, check=True)


def upstream_sockets(proxy, backend) -> int:
    """Established TCP connections that poise (or a worker of it) holds to ``backend``,
    read from /proc."""
    inodes = set()
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[2].endswith(f":{backend.port:04X}") and fields[3] == "01":
                inodes.add(f"socket:[{fields[9]}]")
    count = 0
    for pid in [proxy.pid, *proxy.children()]:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except FileNotFoundError:
            continue
        for fd in fds:
            try:
                count += os.readlink(f"/proc/{pid}/fd/{fd}") in inodes
            except OSError:
                continue
    return count


# -- 1. requests and responses over h2c ------------------------------------------------

def test_get_over_h2c_with_httpx_reaches_the_backend_as_http11(px):
    with h2c() as client:
        r = client.get(url(px, "/echo?get"), headers={"x-custom": "yes"})
    assert r.http_version == "HTTP/2"
    assert r.status_code == 200
    seen = r.json()
    assert (seen["method"], seen["target"], seen["version"]) == ("GET", "/echo?get", "1.1")
    assert echo_headers(seen, "x-custom") == ["yes"]
    assert r.headers["content-type"] == "application/json"
    assert int(r.headers["content-length"]) == len(r.content)


def test_response_header_names_are_lower_case_without_hop_by_hop_fields(px):
    with H2Client(px.addr) as c:
        s = c.response(c.request("GET", "/hop"))
    assert s.status == 200 and s.ended and bytes(s.body) == b"hop\n"
    names = [n.decode() for n, _ in s.headers]
    assert all(n == n.lower() for n in names), names
    assert not HOP_BY_HOP & set(names), names
    assert s.header("x-resp-end") == "kept"


@pytest.mark.parametrize(("method", "path", "status"), [
    ("HEAD", "/bytes/1000", 200),
    ("GET", "/status/204", 204),
    ("GET", "/status/304?cl=5", 304),
])
def test_responses_without_a_body_end_with_the_headers(px, method, path, status):
    # (RawH2: h2's client rejects a 304's Content-Length, which RFC 9113 §8.1.1 allows.)
    with RawH2(px.addr) as c:
        c.send(c.request_frame(1, method, path))
        s = c.response(1)
        assert (s.status, s.reset, bytes(s.body)) == (status, None, b"")
        assert s.ended
        assert not any(f.type == 0 and f.stream_id == 1 and f.data for f in c.frames)
        if method == "HEAD":
            assert s.header("content-length") == "1000"
        # and the connection goes on
        c.send(c.request_frame(3, "GET", "/echo?after"))
        assert c.response(3).status == 200


def test_post_with_content_length_and_put_without_reach_the_backend_intact(px):
    body = os.urandom(300_000)
    with h2c() as client:
        r = client.post(url(px, "/echo?post"), content=body)
        assert r.http_version == "HTTP/2" and r.status_code == 200
        seen = r.json()
        assert seen["method"] == "POST"
        assert echo_headers(seen, "content-length") == [str(len(body))]
        assert echo_headers(seen, "transfer-encoding") == []
        assert seen["body_sha256"] == hashlib.sha256(body).hexdigest()

        def pieces():
            for i in range(0, len(body), 50_000):
                yield body[i:i + 50_000]
        r = client.put(url(px, "/echo?put"), content=pieces())
        assert r.status_code == 200
        seen = r.json()
        assert seen["method"] == "PUT"
        # No length known: the backend gets the body chunked.
        assert echo_headers(seen, "content-length") == []
        assert echo_headers(seen, "transfer-encoding") == ["chunked"]
        assert (seen["body_len"], seen["body_sha256"]) == (
            len(body), hashlib.sha256(body).hexdigest())


def test_16_mib_up_and_down_with_httpx(px):
    size = 16 * MiB
    with h2c() as client:
        r = client.post(url(px, "/sink"), content=pattern.chunks(size))
        assert r.http_version == "HTTP/2" and r.status_code == 200
        assert r.json() == {"received": size, "pattern_ok": True}

        h = hashlib.sha256()
        n = 0
        with client.stream("GET", url(px, f"/bytes/{size}")) as r:
            assert r.http_version == "HTTP/2" and r.status_code == 200
            for part in r.iter_raw():
                h.update(part)
                n += len(part)
    assert (n, h.hexdigest()) == (size, pattern_sha256(size))


def test_curl_prior_knowledge_get_head_post_put(px, tmp_path):
    out = curl("-i", url(px, "/echo?curl"))
    head, _, body = out.stdout.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/2 200")
    assert json.loads(body)["target"] == "/echo?curl"

    out = curl("-I", url(px, "/bytes/777"))
    assert out.stdout.startswith(b"HTTP/2 200")
    assert b"content-length: 777" in out.stdout

    upload = tmp_path / "up.bin"
    data = os.urandom(2 * MiB + 3)
    upload.write_bytes(data)
    seen = json.loads(curl("--data-binary", f"@{upload}", url(px, "/echo?post")).stdout)
    assert seen["method"] == "POST"
    assert echo_headers(seen, "content-length") == [str(len(data))]
    assert seen["body_sha256"] == hashlib.sha256(data).hexdigest()

    # From stdin: no length known, so chunked towards the backend.
    seen = json.loads(curl("-T", "-", url(px, "/echo?put"), stdin=data).stdout)
    assert seen["method"] == "PUT"
    assert echo_headers(seen, "transfer-encoding") == ["chunked"]
    assert (seen["body_len"], seen["body_sha256"]) == (
        len(data), hashlib.sha256(data).hexdigest())

    size = 16 * MiB
    down = tmp_path / "down.bin"
    out = curl("-o", str(down), "-w", "%{http_version} %{http_code}",
               url(px, f"/bytes/{size}?te=chunked"))
    assert out.stdout == b"2 200"
    assert down.stat().st_size == size
    assert hashlib.sha256(down.read_bytes()).hexdigest() == pattern_sha256(size)


def test_103_early_hints_are_relayed_before_the_response(px):
    with H2Client(px.addr) as c:
        s = c.response(c.request("GET", "/early"))
    assert [status for status, _ in s.informational] == [103]
    assert (b"link", b"</style.css>; rel=preload; as=style") in s.informational[0][1]
    assert s.status == 200 and json.loads(s.body)["target"] == "/early"


def test_forwarded_headers_and_host_come_from_authority(px):
    with H2Client(px.addr) as c:
        s = c.response(c.request("GET", "/echo?fwd", authority="app.example:8443"))
        seen = json.loads(s.body)
        assert echo_headers(seen, "host") == ["app.example:8443"]
        assert echo_headers(seen, "x-forwarded-host") == ["app.example:8443"]
        assert echo_headers(seen, "x-forwarded-proto") == ["http"]
        assert echo_headers(seen, "x-forwarded-for") == ["127.0.0.1"]
        # A Host field next to :authority (the same, RFC 9113 §8.3.1): sent once.
        s = c.response(c.request("GET", "/echo?fwd2", authority="auth.example",
                                 headers=[("host", "auth.example")]))
        assert echo_headers(json.loads(s.body), "host") == ["auth.example"]


def test_cookie_crumbs_are_joined_for_the_backend(px):
    with H2Client(px.addr) as c:
        s = c.response(c.request("GET", "/echo?cookies", headers=[
            ("cookie", "a=1"), ("x-between", "z"), ("cookie", "b=2"), ("cookie", "c=3")]))
    assert echo_headers(json.loads(s.body), "cookie") == ["a=1; b=2; c=3"]


# -- 2. HTTP/1.1 on the same listener -----------------------------------------------------

def test_http11_clients_keep_alive_and_pipeline_on_the_same_listener(px):
    with H11Client(px.addr) as c:
        first = c.get("/echo?h1-a")
        second = c.get("/echo?h1-b")
        assert (first.status, second.status) == (200, 200)
        assert first.version == b"1.1" and c.reusable
        assert first.json()["target"] == "/echo?h1-a"
        piped = c.pipeline([("GET", "/echo?p1", None, None),
                            ("POST", "/echo?p2", None, b"pipelined body"),
                            ("GET", "/echo?p3", None, None)])
        assert [r.json()["target"] for r in piped] == ["/echo?p1", "/echo?p2", "/echo?p3"]
        assert piped[1].json()["body"] == "pipelined body"


# -- 3. concurrency and balancing per stream -----------------------------------------------

def test_300_concurrent_streams_on_one_connection_spread_over_all_backends(px):
    async def run() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=1)
        async with httpx.AsyncClient(http1=False, http2=True, limits=limits,
                                     timeout=30) as client:
            return await asyncio.gather(*(client.get(url(px, f"/echo?many={i}"))
                                          for i in range(300)))
    responses = asyncio.run(run())
    assert all(r.status_code == 200 and r.http_version == "HTTP/2" for r in responses)
    assert sorted(r.json()["target"] for r in responses) == sorted(
        f"/echo?many={i}" for i in range(300))
    by_backend: dict[str, int] = {}
    for r in responses:
        by_backend[r.headers["x-backend"]] = by_backend.get(r.headers["x-backend"], 0) + 1
    # round_robin per request: the streams of one connection go to every backend.
    assert set(by_backend) == {"h1", "h2", "h3"}
    assert all(n >= 80 for n in by_backend.values()), by_backend


# -- 4. limits and malformed requests ------------------------------------------------------

MALFORMED = {
    "upper-case name": request_headers("GET", "/echo?mal-upper", extra=[("X-Upper", "1")]),
    "connection-specific field": request_headers(
        "GET", "/echo?mal-conn", extra=[("connection", "keep-alive")]),
    "te other than trailers": request_headers("GET", "/echo?mal-te", extra=[("te", "gzip")]),
    "missing :path": [(b":method", b"GET"), (b":scheme", b"http"),
                      (b":authority", b"mal-nopath.example")],
    "duplicate :path": request_headers("GET", "/echo?mal-dup") + [(b":path", b"/echo?mal-dup2")],
    "pseudo-header after a field": [(b":method", b"GET"), (b":scheme", b"http"),
                                    (b"x-first", b"1"), (b":path", b"/echo?mal-order")],
    "host differing from :authority": request_headers(
        "GET", "/echo?mal-host", "a.example", extra=[("host", "b.example")]),
    "CONNECT with :scheme and :path": request_headers("CONNECT", "/echo?mal-connect"),
}


@pytest.fixture(scope="class")
def limited(tmp_path_factory):
    """Tight limits, one backend of its own (so what reaches it can be counted)."""
    stack = Stack(tmp_path_factory.mktemp("limits"))
    try:
        backend = stack.backend("lim")
        proxy = stack.poise([backend], listener={
            "http2": {"max_concurrent_streams": 10},
            "max_request_body": "1MiB", "max_header_size": "8KiB", "max_headers": 20,
            "max_request_line": "1KiB"})
        yield proxy, backend
    finally:
        problems = stack.close()
    if problems:
        pytest.fail("\n\n".join(problems), pytrace=False)


class TestLimits:
    """Against a poise of their own (class-scoped: a traceback it logs fails the last
    of these tests, not an unrelated one)."""

    def test_streams_beyond_max_concurrent_streams_are_refused(self, limited):
        """A client that ignores SETTINGS_MAX_CONCURRENT_STREAMS (10) opens 20 at once: the
        extra ones are refused (RST_STREAM REFUSED_STREAM), the first ones answered, and
        the connection lives on."""
        proxy, backend = limited
        with RawH2(proxy.addr) as c:
            sids = [1 + 2 * i for i in range(20)]
            c.send(*[c.request_frame(sid, path=f"/slow?delay=0.3&refused={sid}") for sid in sids])
            c.wait(lambda: all(c.stream(sid).done for sid in sids), 10,
                   "an answer or a reset on each of 20 streams")
            outcome = {sid: (c.streams[sid].status, c.streams[sid].reset) for sid in sids}
            assert c.goaway is None, outcome
            assert [outcome[sid] for sid in sids[:10]] == [(200, None)] * 10, outcome
            assert [outcome[sid] for sid in sids[10:]] == [(None, REFUSED_STREAM)] * 10, outcome
            c.send(c.request_frame(41, path="/echo?after-refused"))
            assert c.response(41).status == 200
        assert len(seen_by([backend], "refused=")) == 10


    def test_body_over_max_request_body_by_content_length_is_413(self, limited):
        proxy, backend = limited
        with H2Client(proxy.addr) as c:
            sid = c.request("POST", "/echo?cl413", headers=[("content-length", str(2 * MiB))],
                            end=False)
            s = c.response(sid)
            assert s.status == 413 and s.ended
            assert c.goaway is None
            assert c.response(c.request("GET", "/echo?after-413")).status == 200
        assert seen_by([backend], "cl413") == []


    def test_body_over_max_request_body_while_streaming_is_413(self, limited):
        proxy, _ = limited
        with H2Client(proxy.addr) as c:
            sid = c.request("POST", "/sink?stream413", end=False)
            try:
                c.send_body(sid, b"x" * (3 * MiB), timeout=10)
            except AssertionError:
                pass        # (poise may stop reading the stream once it answered)
            s = c.response(sid)
            assert s.status == 413
            # After answering early poise tells the client to stop: RST_STREAM NO_ERROR.
            assert s.reset in (None, NO_ERROR)
            assert c.goaway is None
            assert c.response(c.request("GET", "/echo?after-413s")).status == 200


    @pytest.mark.parametrize(("what", "extra", "path", "status"), [
        ("header list over max_header_size", [("x-big", "a" * 9000)], "/echo?big431", 431),
        ("more than max_headers", [(f"x-h{i}", "v") for i in range(30)], "/echo?many431", 431),
        ("path over max_request_line", [], "/echo?long414=" + "a" * 2000, 414),
    ])
    def test_oversized_heads_get_their_status(self, limited, what, extra, path, status):
        proxy, backend = limited
        with H2Client(proxy.addr) as c:
            s = c.response(c.request("GET", path, headers=extra), timeout=5)
            assert s.status == status, what
            assert c.goaway is None
            assert c.response(c.request("GET", "/echo?after-oversized")).status == 200
        assert seen_by([backend], path[6:16]) == []


    def test_connect_is_refused_without_closing_the_connection(self, limited):
        """CONNECT (RFC 9113 §8.5: :method and :authority only) is not proxied: a 4xx/5xx
        answer or a stream reset, and the connection goes on."""
        proxy, backend = limited
        before = len(backend.targets())
        with H2Client(proxy.addr) as c:
            sid = c.request("CONNECT", "", raw_headers=[(b":method", b"CONNECT"),
                                                        (b":authority", b"example.com:443")])
            c.wait(lambda: c.stream(sid).done or c.goaway is not None, 5, "an answer to CONNECT")
            s = c.stream(sid)
            assert c.goaway is None, f"CONNECT closed the connection: GOAWAY {c.goaway}"
            assert (s.status is not None and s.status >= 400) or s.reset is not None
            assert c.response(c.request("GET", "/echo?after-connect")).status == 200
        assert len(backend.targets()) == before + 1     # (only the GET after it)


    @pytest.mark.parametrize("kind", list(MALFORMED))
    def test_malformed_header_lists_are_protocol_errors_never_forwarded(self, limited, kind):
        """RFC 9113 §8.1.1/§8.2/§8.3 (CONNECT: §8.5): a malformed request is a stream
        error (or a connection error) of type PROTOCOL_ERROR; it never reaches a backend."""
        proxy, backend = limited
        before = len(backend.targets())
        with H2Client(proxy.addr) as c:
            sid = c.request("GET", "", raw_headers=MALFORMED[kind])
            c.wait(lambda: c.stream(sid).done or c.goaway is not None or c.closed, 5,
                   "a reaction to the malformed request")
            s = c.stream(sid)
            if kind.startswith("CONNECT") and s.status is not None:
                assert s.status == 400, f"{kind}: answered {s.status}"      # (or refused so)
            else:
                assert s.status is None, f"{kind}: answered {s.status}"
                assert s.reset == PROTOCOL_ERROR or (c.goaway or (None,))[0] == PROTOCOL_ERROR, (
                f"{kind}: reset={s.reset} goaway={c.goaway}")
        assert len(backend.targets()) == before
        assert seen_by([backend], "mal-") == []
        serves(proxy)


# -- 5. abuse ------------------------------------------------------------------------------

def test_rapid_reset_gets_goaway_enhance_your_calm(px, backends):
    with RawH2(px.addr) as c:
        sid = 1
        for _ in range(20):                 # 1,000 streams, opened and reset 50 at a time
            frames = []
            for _ in range(50):
                frames += [c.request_frame(sid, path=f"/slow?delay=0.5&rapid={sid}"),
                           c.rst_frame(sid, CANCEL)]
                sid += 2
            if not c.send(*frames):
                break
        assert c.wait_closed(10), "the connection must be closed"
        assert c.goaway is not None and c.goaway[0] == ENHANCE_YOUR_CALM, c.goaway
    # The backends were not flooded: the connection was cut after about a hundred.
    assert len(seen_by(backends, "rapid=")) < 300
    serves(px)


@pytest.mark.parametrize("flood", ["PING", "SETTINGS"])
def test_control_frame_floods_get_goaway_enhance_your_calm(px, flood):
    with RawH2(px.addr) as c:
        frame = c.ping_frame(b"pingpong") if flood == "PING" else c.settings_frame({})
        c.send(frame * 1000)
        assert c.wait_closed(10), "the connection must be closed"
        assert c.goaway is not None and c.goaway[0] == ENHANCE_YOUR_CALM, c.goaway
    serves(px)


def test_empty_data_frames_flood_gets_goaway_enhance_your_calm(px):
    with RawH2(px.addr) as c:
        c.send(c.request_frame(1, "POST", "/echo?empty-data", end_stream=False))
        c.send(c.data_frame(1, b"") * 300)
        assert c.wait_closed(10), "the connection must be closed"
        assert c.goaway is not None and c.goaway[0] == ENHANCE_YOUR_CALM, c.goaway
    serves(px)


def test_continuation_flood_is_a_connection_error_with_bounded_memory(px):
    serves(px)                  # (warm: what a first request allocates is not counted)
    rss_before = px.rss()
    attempted = 64 * MiB
    sent = 0
    with RawH2(px.addr) as c:
        block = c.block(request_headers("GET", "/echo?continuation"))
        c.send(c.headers_frame(1, block, end_headers=False))
        fragment = c.continuation_frame(1, b"\0" * 16_000)     # (never END_HEADERS)
        while sent < attempted and c.send(fragment * 16):
            sent += 16 * 16_000
        assert c.wait_closed(10), "the connection must be closed"
        if c.goaway is not None:
            assert c.goaway[0] in (PROTOCOL_ERROR, ENHANCE_YOUR_CALM), c.goaway
    assert sent < attempted, "poise read the whole flood instead of closing"
    grown = px.rss() - rss_before
    assert grown < 32 * MiB, f"poise grew by {grown / MiB:.1f} MiB"
    serves(px)


def test_zero_window_client_is_cancelled_and_its_backend_connection_released(stack):
    backend = stack.backend("zw")
    proxy = stack.poise([backend], listener={"http2": True, "client_idle_timeout": "1s"})
    with H2Client(proxy.addr, settings={INITIAL_WINDOW_SIZE: 0}, auto_window=False) as c:
        sid = c.request("GET", f"/bytes/{10 * MiB}")
        t0 = time.monotonic()
        s = c.response(sid, timeout=10)
        waited = time.monotonic() - t0
        assert s.reset == CANCEL, (s.status, s.reset)
        assert len(s.body) == 0
        assert waited < 8, f"reset after {waited:.1f}s"
        assert c.goaway is None, "the stream is reset, not the connection"
        wait_for(lambda: upstream_sockets(proxy, backend) == 0, 5,
                 "poise closing its connection to the backend")
        # The connection itself still serves (a response without a body needs no window).
        assert c.response(c.request("GET", "/status/204")).status == 204


# -- 6. flow control ------------------------------------------------------------------------

def test_a_small_client_window_still_gets_every_byte(px):
    size = 4 * MiB
    with H2Client(px.addr, settings={INITIAL_WINDOW_SIZE: 1024}, auto_window=False) as c:
        sid = c.request("GET", f"/bytes/{size}")
        s = c.stream(sid)
        deadline = time.monotonic() + 30
        while not s.done and time.monotonic() < deadline and not c.closed:
            c.pump(1.0)
            c.grant(sid)            # h2 sends the update once half the window is used
        assert (s.status, s.reset, s.ended) == (200, None, True)
    assert len(s.body) == size and pattern.matches(0, bytes(s.body))


def push_until_blocked(c: H2Client, sid: int, limit: int, idle: float = 1.0,
                       timeout: float = 15.0) -> int:
    """Send request-body bytes on ``sid`` as the window allows, until ``limit`` bytes
    went, or no window opened for ``idle`` seconds (blocked); the bytes sent."""
    sent = 0
    piece = b"u" * 16_384
    last_progress = time.monotonic()
    deadline = last_progress + timeout
    while sent < limit and time.monotonic() < deadline:
        window = min(c.conn.local_flow_control_window(sid), len(piece))
        if window <= 0:
            if time.monotonic() - last_progress > idle:
                break
            c.pump(0.05)
            continue
        c.conn.send_data(sid, piece[:window])
        assert c.flush(), "the server went away during the upload"
        sent += window
        last_progress = time.monotonic()
    return sent


def test_an_upload_to_a_backend_that_does_not_read_blocks_the_client(px):
    """The backend takes nothing (/stall): the client runs out of window after a
    bounded amount (the stream window plus what the sockets hold), poise does not
    buffer the 32 MiB it would send."""
    serves(px)                  # (warm: what a first request allocates is not counted)
    rss_before = px.rss()
    with H2Client(px.addr) as c:
        sid = c.request("POST", "/stall?delay=5", end=False)
        sent = push_until_blocked(c, sid, 32 * MiB)
        assert c.conn.local_flow_control_window(sid) <= 0, "the client was never blocked"
        assert sent < 12 * MiB, f"{sent / MiB:.1f} MiB accepted from a stalled upload"
        grown = px.rss() - rss_before
    assert grown < 16 * MiB, f"poise grew by {grown / MiB:.1f} MiB"


def test_an_upload_waiting_for_a_backend_connection_is_held_to_the_stream_window(stack):
    """While the backend connection is still being opened (a connect that hangs), no
    WINDOW_UPDATE is granted: the client can send the stream's initial window, no
    more."""
    hole = Blackhole()
    try:
        if not hole.hangs():
            pytest.skip("connects to a full accept queue do not hang on this kernel")
        proxy = stack.poise([hole.address], listener={
            "http2": {"initial_stream_window": "64KiB"}}, cluster={"connect_timeout": "10s"})
        with H2Client(proxy.addr) as c:
            sid = c.request("POST", "/echo?held", end=False)
            sent = push_until_blocked(c, sid, 32 * MiB)
            assert sent <= 128 * 1024, f"{sent} bytes accepted before any backend took one"
            assert c.stream(sid).status is None
    finally:
        hole.close()


# -- 7. graceful stop ------------------------------------------------------------------------

def test_graceful_stop_sends_goaway_and_finishes_the_streaming_response(stack):
    backend = stack.backend("gs")
    proxy = stack.poise([backend], listener={"http2": True})
    size = 4 * MiB
    # (RawH2: h2's own client refuses DATA once it has seen a GOAWAY.)
    with RawH2(proxy.addr, auto_window=False) as c:
        sid = 1
        c.send(c.request_frame(sid, path=f"/bytes/{size}"))
        s = c.stream(sid)
        c.wait(lambda: s.status is not None and len(s.body) > 0, 5, "the response starting")
        proxy.signal(signal.SIGTERM)
        c.wait(lambda: c.goaway is not None, 5, "a GOAWAY")
        goaway = c.goaway
        deadline = time.monotonic() + 20
        while not s.done and time.monotonic() < deadline and not c.closed:
            c.grant(sid)
            c.pump(0.5)
        closed = c.wait_closed(5)
    # (Exited before the checks: a second SIGTERM at teardown would kill it.)
    code = proxy.proc.wait(15)
    assert goaway[0] == NO_ERROR and goaway[1] >= sid, goaway
    assert (s.status, s.reset, s.ended) == (200, None, True), (
        f"{len(s.body)} of {size} bytes, reset={s.reset}")
    assert len(s.body) == size and pattern.matches(0, bytes(s.body))
    assert closed, "the drained connection is closed"
    assert code == 0


# -- 8. TLS with ALPN ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tls_site(module_stack, tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl CLI")
    pki = Pki(tmp_path_factory.mktemp("pki"))
    leaf = pki.leaf("h2", "h2.example", ["h2.example"], ips=["127.0.0.1"])
    backend = module_stack.backend("tls")
    # (alpn spelled out: the default for http2 fails to load, see the test below)
    proxy = module_stack.poise([backend], listener={
        "http2": True, "tls": {"certificates": [leaf.model_dump()],
                               "alpn": ["h2", "http/1.1"]}})
    return proxy, pki, leaf


@needs_openssl
def test_a_tls_listener_with_http2_offers_h2_then_http11_by_default(tls_site):
    _, _, leaf = tls_site
    config = parse_config(yaml.safe_dump({
        "listeners": [{"name": "web", "bind": "127.0.0.1:8443", "http2": True,
                       "tls": {"certificates": [leaf.model_dump()]}, "cluster": "app"}],
        "clusters": [{"name": "app", "backends": [{"address": "127.0.0.1:9"}]}]}))
    assert config.listeners[0].tls.alpn == ["h2", "http/1.1"]


@needs_openssl
def test_tls_alpn_negotiates_h2_and_http11_clients_still_work(tls_site):
    proxy, pki, _ = tls_site
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    with httpx.Client(http1=True, http2=True, verify=ctx, timeout=30) as client:
        r = client.get(url(proxy, "/echo?tls-h2", "https"))
        assert r.http_version == "HTTP/2" and r.status_code == 200
        assert echo_headers(r.json(), "x-forwarded-proto") == ["https"]
        r = client.post(url(proxy, "/sink", "https"), content=pattern.chunks(3 * MiB))
        assert r.json() == {"received": 3 * MiB, "pattern_ok": True}

    for alpn in (["http/1.1"], None):           # asks for HTTP/1.1, or says nothing
        ctx1 = ssl.create_default_context(cafile=str(pki.ca))
        if alpn:
            ctx1.set_alpn_protocols(alpn)
        sock = ctx1.wrap_socket(socket.create_connection(proxy.addr, timeout=10),
                                server_hostname="h2.example")
        assert sock.selected_alpn_protocol() in (None, "http/1.1")
        with H11Client.over(sock) as c:
            r = c.get("/echo?tls-h1")
            assert (r.status, r.version) == (200, b"1.1")
            assert c.get("/echo?tls-h1-again").status == 200


# -- 9. metrics and access log ------------------------------------------------------------------

def _samples(proxy) -> list:
    r = proxy.admin.get("/metrics")
    assert r.status == 200, r
    return [s for f in text_string_to_metric_families(r.body.decode()) for s in f.samples]


def _value(samples, name: str, **labels) -> float:
    return sum(s.value for s in samples if s.name == name
               and all(s.labels.get(k) == v for k, v in labels.items()))


def test_h2_requests_are_counted_in_metrics_and_logged_as_http2(stack, tmp_path):
    backend = stack.backend("obs")
    log_path = tmp_path / "access.log"
    proxy = stack.poise([backend], listener={"http2": True}, admin={},
                        access_log={"path": str(log_path), "format": "json"})
    with H2Client(proxy.addr) as c:
        for i in range(5):
            assert c.response(c.request("GET", f"/echo?h2log={i}")).status == 200
        assert c.response(c.request("GET", "/status/404?h2log")).status == 404
    with H11Client(proxy.addr) as c:
        assert c.get("/echo?h1log").status == 200
    with RawH2(proxy.addr) as c:                # an abuser, counted as rejected
        c.send(c.ping_frame() * 1000)
        assert c.wait_closed(10)

    def counted():
        samples = _samples(proxy)
        return (_value(samples, "poise_requests_total", listener="web", cluster="app",
                       code="200") >= 6
                and _value(samples, "poise_requests_total", code="404") >= 1
                and _value(samples, "poise_connections_rejected_total",
                           reason="http2_abuse") >= 1)
    wait_for(counted, 10, lambda: "h2 requests and the abuse in /metrics: "
             + str([(s.name, s.labels, s.value) for s in _samples(proxy)
                    if s.name in ("poise_requests_total", "poise_connections_rejected_total")]))
    samples = _samples(proxy)
    assert _value(samples, "poise_requests_total", code="200") == 6

    def logged():
        if not log_path.exists():
            return None
        records = [json.loads(line) for line in log_path.read_text().splitlines()]
        return records if len(records) >= 7 else None
    records = wait_for(logged, 10, "7 access log lines")
    protocols = {r["path"]: r["protocol"] for r in records}
    assert {protocols[f"/echo?h2log={i}"] for i in range(5)} == {"HTTP/2.0"}
    assert protocols["/status/404?h2log"] == "HTTP/2.0"
    assert protocols["/echo?h1log"] == "HTTP/1.1"
    assert {r["status"] for r in records if r["path"].startswith("/echo?h2log")} == {200}


# -- 10. h2load -----------------------------------------------------------------------------

def test_h2load_2000_requests_over_4_connections_all_succeed(px):
    h2load = shutil.which("h2load")
    if h2load is None:
        pytest.skip("h2load is not installed (apt-get install nghttp2-client)")
    out = subprocess.run([h2load, "-n", "2000", "-c", "4", "-m", "16",
                          url(px, "/echo?h2load")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    m = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                  r"(\d+) failed, (\d+) errored", out.stdout)
    assert m, out.stdout
    assert [int(x) for x in m.groups()] == [2000, 2000, 2000, 2000, 0, 0], out.stdout
    m = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out.stdout)
    assert m and [int(x) for x in m.groups()] == [2000, 0, 0, 0], out.stdout
    assert "Application protocol: h2c" in out.stdout
