"""Access logs: line formats and escaping, buffering and flushing, files (reopen, reload,
a stuck reader), listener rules — on real files, FIFOs and file descriptors."""

from __future__ import annotations

import asyncio
import json
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from poise.config.model import Config
from poise.errors import ConfigError
from poise.observability import access_format, access_writer
from poise.observability.access_format import AccessLogger
from poise.observability.access_log import AccessLogs, check

FIELDS = ["ts", "listener", "client", "method", "path", "protocol", "status", "bytes_sent",
          "duration_ms", "cluster", "upstream", "attempts", "trace_id", "user_agent", "referer"]
TS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\Z")
# The Combined Log Format; quoted fields may hold anything but a bare quote or backslash.
QUOTED = r'"((?:[^"\\]|\\x[0-9A-F]{2})*)"'
COMBINED = re.compile(
    r'(?P<client>\S+) - - \[(?P<day>\d\d)/(?P<mon>[A-Z][a-z]{2})/(?P<year>\d{4}):'
    r'(?P<hms>\d\d:\d\d:\d\d) \+0000\] ' + QUOTED.replace("(", "(?P<request>", 1) +
    r' (?P<status>\d{3}) (?P<bytes>\d+) ' + QUOTED.replace("(", "(?P<referer>", 1) + " " +
    QUOTED.replace("(", "(?P<ua>", 1) + r"\n\Z")

REQUEST = dict(client=b"192.0.2.7", method=b"GET", path=b"/api/v1/items?id=42", version=b"HTTP/1.1",
               status=200, bytes_sent=1234, duration=0.0123456, cluster="api",
               upstream="10.0.0.1:8080", attempts=1, trace_id="4bf92f3577b34da6a3ce929d0e0e4736",
               referer=b"https://example.com/", user_agent=b"curl/8.5.0")


def config(top: dict[str, Any] | None = None, **listeners: Any) -> Config:
    """A config whose listeners are named after the keywords; each value is that
    listener's ``access_log`` (a dict, False, or None to inherit ``top``)."""
    return Config.model_validate({
        "access_log": top,
        "listeners": [{"name": name, "bind": f"127.0.0.1:{8000 + i}",
                       "routes": [{"cluster": "api"}], "access_log": value}
                      for i, (name, value) in enumerate(listeners.items())],
        "clusters": [{"name": "api", "backends": [{"address": "127.0.0.1:9000"}]}],
    })


class MemorySink:
    def __init__(self) -> None:
        self.buf: list[bytes] = []
        self.size = 0


def line_of(fmt: str, **changes: Any) -> bytes:
    sink = MemorySink()
    logger = AccessLogger("web", fmt, sink, lambda s: None, 1 << 30)
    logger.log(**{**REQUEST, **changes})
    assert len(sink.buf) == 1 and sink.size == len(sink.buf[0])
    return sink.buf[0]


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True) if path.exists() else []


def open_fds_to(path: Path) -> int:
    target = str(path)
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}") == target
        except OSError:
            pass
    return count


async def until(predicate: Any, what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s")
        await asyncio.sleep(0.01)


def unescape_clf(value: str) -> bytes:
    return re.sub(rb"\\x([0-9A-F]{2})", lambda m: bytes([int(m[1], 16)]),
                  value.encode("ascii"))


# -- formats ---------------------------------------------------------------------------


def test_json_line_has_every_field_in_order() -> None:
    before = time.time()
    line = line_of("json")
    after = time.time()
    assert line.endswith(b"}\n") and line.count(b"\n") == 1
    record = json.loads(line)
    assert list(record) == FIELDS
    assert TS.match(record["ts"])
    stamp = time.mktime(time.strptime(record["ts"][:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
    assert int(before) <= stamp <= after
    assert record == {
        "ts": record["ts"], "listener": "web", "client": "192.0.2.7", "method": "GET",
        "path": "/api/v1/items?id=42", "protocol": "HTTP/1.1", "status": 200,
        "bytes_sent": 1234, "duration_ms": 12.346, "cluster": "api",
        "upstream": "10.0.0.1:8080", "attempts": 1,
        "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736", "user_agent": "curl/8.5.0",
        "referer": "https://example.com/"}
    assert b'"duration_ms":12.346,' in line      # three decimals, a JSON number


def test_json_nulls_and_an_unparsed_request() -> None:
    record = json.loads(line_of("json", method=b"", path=b"", version=b"HTTP/1.0", status=400,
                                cluster="", upstream=None, attempts=0, trace_id=None,
                                referer=None, user_agent=None))
    assert list(record) == FIELDS
    assert (record["method"], record["path"], record["protocol"]) == (None, None, "HTTP/1.0")
    assert (record["cluster"], record["upstream"], record["trace_id"]) == ("", None, None)
    assert (record["user_agent"], record["referer"], record["attempts"]) == (None, None, 0)
    # Present but empty headers stay distinguishable from absent ones.
    record = json.loads(line_of("json", referer=b"", user_agent=b""))
    assert (record["referer"], record["user_agent"]) == ("", "")


def test_combined_line() -> None:
    before = time.strftime("%d/%b/%Y:%H:%M:%S", time.gmtime())
    line = line_of("combined")
    after = time.strftime("%d/%b/%Y:%H:%M:%S", time.gmtime())
    m = COMBINED.match(line.decode("ascii"))
    assert m, line
    assert m["client"] == "192.0.2.7"
    assert f"{m['day']}/{m['mon']}/{m['year']}:{m['hms']}" in (before, after)
    assert (m["request"], m["status"], m["bytes"]) == ("GET /api/v1/items?id=42 HTTP/1.1",
                                                       "200", "1234")
    assert (m["referer"], m["ua"]) == ("https://example.com/", "curl/8.5.0")


def test_combined_dashes() -> None:
    line = line_of("combined", method=b"", path=b"", referer=None, user_agent=None,
                   client=b"", version=b"HTTP/1.0", status=408, bytes_sent=0)
    assert line.endswith(b'] "-" 408 0 "-" "-"\n') and line.startswith(b"- - - [")
    assert COMBINED.match(line.decode("ascii"))
    line = line_of("combined", version=b"HTTP/1.0", referer=b"")
    assert b'"GET /api/v1/items?id=42 HTTP/1.0" 200 1234 "-" "curl/8.5.0"\n' in line


def test_hostile_bytes_are_escaped() -> None:
    evil = b'/a"b\\c\nd\re\x00f\x7fg\xffh\xc3\xa9'
    record = json.loads(line_of("json", path=evil, user_agent=b'x","status":1', referer=b"\n"))
    assert record["path"] == evil.decode("utf-8", "replace") == '/a"b\\c\nd\re\x00f\x7fg\ufffdhé'
    assert record["status"] == 200 and record["user_agent"] == 'x","status":1'
    line = line_of("combined", path=evil, user_agent=b'x" "y', referer=b"\n")
    assert b'/a\\x22b\\x5Cc\\x0Ad\\x0De\\x00f\\x7Fg\\xFFh\\xC3\\xA9' in line
    m = COMBINED.match(line.decode("ascii"))
    assert m and unescape_clf(m["ua"]) == b'x" "y' and unescape_clf(m["referer"]) == b"\n"


any_bytes = st.binary(max_size=40)
# The client is the peer's address as poise formats it, never from the request: any
# bytes, but no space (the one unquoted field of the Combined format).
clients = st.binary(max_size=40).filter(lambda b: b" " not in b)
maybe_bytes = st.none() | any_bytes
names = st.text(max_size=12)


@settings(max_examples=300, deadline=None)
@given(client=clients, method=any_bytes, path=any_bytes, referer=maybe_bytes,
       user_agent=maybe_bytes, cluster=names, upstream=st.none() | names,
       trace_id=st.none() | names)
def test_any_input_makes_one_valid_line(client: bytes, method: bytes, path: bytes,
                                        referer: bytes | None, user_agent: bytes | None,
                                        cluster: str, upstream: str | None,
                                        trace_id: str | None) -> None:
    values = dict(client=client, method=method, path=path, referer=referer,
                  user_agent=user_agent, cluster=cluster, upstream=upstream, trace_id=trace_id)
    for fmt in ("json", "combined"):
        line = line_of(fmt, **values)
        # Printable ASCII and exactly one newline, at the end: any line splitter agrees.
        assert line.endswith(b"\n") and re.fullmatch(rb"[\x20-\x7e]*\n", line), line
    record = json.loads(line_of("json", **values))

    def text(v: bytes | None) -> str | None:
        return None if v is None else v.decode("utf-8", "replace")

    assert list(record) == FIELDS
    assert record["client"] == text(client)
    assert (record["method"], record["path"]) == (text(method or None), text(path or None))
    assert (record["referer"], record["user_agent"]) == (text(referer), text(user_agent))
    assert (record["cluster"], record["upstream"], record["trace_id"]) == (cluster, upstream,
                                                                           trace_id)
    m = COMBINED.match(line_of("combined", **values).decode("ascii"))
    assert m
    assert unescape_clf(m["client"]) == (client or b"-")   # the client is a socket address
    assert unescape_clf(m["referer"]) == (referer or b"-")
    assert unescape_clf(m["ua"]) == (user_agent or b"-")
    if method or path:
        request = unescape_clf(m["request"])
        assert request == (method or b"-") + b" " + (path or b"-") + b" HTTP/1.1"


def test_token_cache_is_bounded() -> None:
    sink = MemorySink()
    logger = AccessLogger("web", "json", sink, lambda s: None, 1 << 30)
    for i in range(3 * access_format._TOKENS_MAX):
        logger.log(**{**REQUEST, "upstream": f"10.0.{i // 256}.{i % 256}:80"})
    assert len(logger._tokens) <= access_format._TOKENS_MAX
    assert json.loads(sink.buf[-1])["upstream"] == f"10.0.{(i // 256)}.{i % 256}:80"


# -- buffering, flushing, closing ------------------------------------------------------


async def test_lines_wait_in_memory_until_the_timer(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    logs = AccessLogs(asyncio.get_running_loop(), flush_interval=0.05)
    logs.configure(config({"path": str(path)}, web=None))
    assert path.exists() and path.stat().st_mode & 0o777 == 0o644 & ~_umask()
    logger = logs.for_listener("web")
    assert logger is not None
    logger.log(**REQUEST)
    logger.log(**REQUEST)
    await asyncio.sleep(0)
    assert path.read_bytes() == b""          # buffered, not written in the request
    await until(lambda: len(lines(path)) == 2, "the timer flush")
    logger.log(**REQUEST)
    await until(lambda: len(lines(path)) == 3, "the next timer flush")
    await logs.close()
    assert [json.loads(x)["path"] for x in lines(path)] == ["/api/v1/items?id=42"] * 3


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


async def test_a_full_buffer_is_flushed_without_the_timer(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    logs = AccessLogs(asyncio.get_running_loop(), flush_interval=3600)
    logs.configure(config({"path": str(path)}, web=None))
    logger = logs.for_listener("web")
    assert logger is not None
    size = len(line_of("json"))
    count = (64 * 1024) // size + 10           # just past one 64 KiB buffer
    for _ in range(count):
        logger.log(**REQUEST)
    await until(lambda: path.stat().st_size >= 64 * 1024, "the size-triggered flush")
    written = len(lines(path))
    assert 0 < written < count                  # the rest waits for the timer (or close)
    await logs.close()
    assert len(lines(path)) == count and logs.dropped == 0


async def test_close_writes_every_line(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    logs = AccessLogs(asyncio.get_running_loop(), max_queued_bytes=1 << 30)
    logs.configure(config({"path": str(path)}, a=None, b={"path": str(path),
                                                           "format": "combined"}))
    a, b = logs.for_listener("a"), logs.for_listener("b")
    assert a is not None and b is not None
    for i in range(50_000):
        a.log(**{**REQUEST, "path": b"/a/%d" % i})
        b.log(**{**REQUEST, "path": b"/b/%d" % i})
    await logs.close()
    got = lines(path)
    assert len(got) == 100_000 and logs.dropped == 0
    assert [json.loads(x)["path"] for x in got if x.startswith(b"{")] == \
        [f"/a/{i}" for i in range(50_000)]
    assert [COMBINED.match(x.decode())["request"] for x in got if not x.startswith(b"{")] == \
        [f"GET /b/{i} HTTP/1.1" for i in range(50_000)]
    assert open_fds_to(path) == 0
    a.log(**REQUEST)                            # after close: discarded, no error
    with pytest.raises(RuntimeError):
        logs.configure(config({"path": str(path)}, a=None))


async def test_stdout(capfd: pytest.CaptureFixture[str]) -> None:
    logs = AccessLogs(asyncio.get_running_loop())
    logs.configure(config({"format": "combined"}, web=None))
    logger = logs.for_listener("web")
    assert logger is not None
    logger.log(**REQUEST)
    logs.reopen()                               # stdout: just a flush
    await logs.close()
    out = capfd.readouterr().out
    assert COMBINED.match(out) and "GET /api/v1/items?id=42 HTTP/1.1" in out
    os.write(1, b"")                            # fd 1 is still open


async def test_failed_writes_are_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    logs = AccessLogs(asyncio.get_running_loop())
    logs.configure(config({"path": "/dev/full"}, web=None))   # every write: ENOSPC
    logger = logs.for_listener("web")
    assert logger is not None
    for _ in range(10):
        logger.log(**REQUEST)
    await logs.close()
    assert logs.dropped == 10
    assert "/dev/full: write failed" in caplog.text


# -- files: reopen, reload -------------------------------------------------------------


async def test_reopen_after_logrotate_renamed_the_file(tmp_path: Path) -> None:
    path, rotated = tmp_path / "access.log", tmp_path / "access.log.1"
    logs = AccessLogs(asyncio.get_running_loop(), flush_interval=3600)
    logs.configure(config({"path": str(path)}, web=None))
    logger = logs.for_listener("web")
    assert logger is not None
    for i in range(3):
        logger.log(**{**REQUEST, "path": b"/old/%d" % i})
    os.rename(path, rotated)                    # logrotate renames, then sends SIGUSR1
    logger.log(**{**REQUEST, "path": b"/old/3"})   # logged before the signal: old file
    logs.reopen()
    for i in range(2):
        logger.log(**{**REQUEST, "path": b"/new/%d" % i})
    await logs.close()
    assert [json.loads(x)["path"] for x in lines(rotated)] == ["/old/0", "/old/1", "/old/2",
                                                               "/old/3"]
    assert [json.loads(x)["path"] for x in lines(path)] == ["/new/0", "/new/1"]


async def test_a_failed_reopen_keeps_the_old_file(tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    directory = tmp_path / "logs"
    directory.mkdir()
    path = directory / "access.log"
    logs = AccessLogs(asyncio.get_running_loop(), flush_interval=3600)
    logs.configure(config({"path": str(path)}, web=None))
    logger = logs.for_listener("web")
    assert logger is not None
    logger.log(**REQUEST)
    os.rename(directory, tmp_path / "moved")    # the path cannot be opened any more
    logs.reopen()
    logger.log(**REQUEST)
    await logs.close()
    assert "cannot open" in caplog.text and "still writing to the old file" in caplog.text
    assert len(lines(tmp_path / "moved" / "access.log")) == 2 and logs.dropped == 0


async def test_reload_keeps_a_sink_and_closes_a_removed_one(tmp_path: Path) -> None:
    kept, removed = tmp_path / "kept.log", tmp_path / "removed.log"
    logs = AccessLogs(asyncio.get_running_loop(), flush_interval=3600)
    logs.configure(config({"path": str(kept)}, a=None, b={"path": str(removed)}))
    a, b = logs.for_listener("a"), logs.for_listener("b")
    assert a is not None and b is not None
    a.log(**REQUEST)
    b.log(**REQUEST)
    assert open_fds_to(kept) == 1 and open_fds_to(removed) == 1
    # Had the reload reopened kept.log by path, lines would land in a new file.
    os.rename(kept, tmp_path / "renamed.log")
    logs.configure(config({"path": str(kept), "format": "combined"}, a=None, b=False))
    assert logs.for_listener("a") is a and logs.for_listener("b") is None
    a.log(**REQUEST)                            # the new format, from the next line
    b.log(**REQUEST)                            # b's log is off: discarded
    await until(lambda: open_fds_to(removed) == 0, "closing removed.log")
    assert len(lines(removed)) == 1             # flushed before it was closed
    await logs.close()
    first, second = lines(tmp_path / "renamed.log")
    assert json.loads(first)["listener"] == "a" and COMBINED.match(second.decode())
    assert not kept.exists() and len(lines(removed)) == 1


async def test_a_missing_directory_is_a_config_error(tmp_path: Path) -> None:
    good = tmp_path / "good.log"
    logs = AccessLogs(asyncio.get_running_loop())
    logs.configure(config({"path": str(good)}, web=None))
    before = logs.for_listener("web")
    bad = tmp_path / "no-such-dir" / "access.log"
    with pytest.raises(ConfigError) as e:
        logs.configure(config({"path": str(good)}, web=None, other={"path": str(bad)},
                              third={"path": str(tmp_path / "third.log")}))
    assert e.value.errors == [
        ("listeners[1].access_log.path",
         f"cannot open {bad}: directory {bad.parent} does not exist")]
    # Nothing changed: no half-applied reload, no file left open.
    assert logs.for_listener("web") is before and logs.for_listener("other") is None
    assert open_fds_to(tmp_path / "third.log") == 0
    with pytest.raises(ConfigError, match="access_log.path"):
        AccessLogs(asyncio.get_running_loop()).configure(config({"path": str(bad)}, web=None))
    await logs.close()


def test_check_finds_what_configure_would_raise(tmp_path: Path) -> None:
    bad = tmp_path / "no-such-dir" / "access.log"
    good = tmp_path / "good.log"
    assert check(config({"path": str(good)}, web=None, off=False,
                        stdout={"path": "stdout"})) == []
    assert good.exists()                        # created, as configure would
    assert check(config(None, web=None, other={"path": str(bad)})) == [
        ("listeners[1].access_log.path",
         f"cannot open {bad}: directory {bad.parent} does not exist")]
    assert open_fds_to(good) == 0


async def test_a_fifo_without_reader_is_a_config_error(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="no reader"):
        AccessLogs(asyncio.get_running_loop()).configure(config({"path": str(fifo)}, web=None))


async def test_listener_rules(tmp_path: Path) -> None:
    top, own = tmp_path / "top.log", tmp_path / "own.log"
    logs = AccessLogs(asyncio.get_running_loop())
    logs.configure(config({"path": str(top)}, inherit=None, own={"path": str(own),
                                                                 "format": "combined"},
                          off=False))
    inherit, mine = logs.for_listener("inherit"), logs.for_listener("own")
    assert inherit is not None and mine is not None
    assert logs.for_listener("off") is None and logs.for_listener("unknown") is None
    inherit.log(**REQUEST)
    mine.log(**REQUEST)
    logs.configure(config(None, inherit=None, own={"path": str(own)}, off=False))
    assert logs.for_listener("inherit") is None and logs.for_listener("own") is mine
    await until(lambda: open_fds_to(top) == 0, "closing top.log")
    mine.log(**REQUEST)
    await logs.close()
    assert json.loads(lines(top)[0])["listener"] == "inherit" and len(lines(top)) == 1
    first, second = lines(own)
    assert COMBINED.match(first.decode()) and json.loads(second)["listener"] == "own"

    nothing = AccessLogs(asyncio.get_running_loop())
    nothing.configure(config(None, web=None))
    assert nothing.for_listener("web") is None and not nothing._writer.running  # costs nothing
    await nothing.close()


async def test_pipes_get_whole_lines_atomically(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers sharing a pipe (stdout under a service manager) must not interleave
    mid-line: a pipe gets writes of whole lines of at most PIPE_BUF bytes, which POSIX
    makes atomic; a regular file gets a whole buffer per write (O_APPEND)."""
    writes: list[bytes] = []
    real = access_writer._write_all

    def recording(fd: int, data: bytes) -> None:
        writes.append(bytes(data))
        real(fd, data)

    monkeypatch.setattr(access_writer, "_write_all", recording)
    fifo, path = tmp_path / "fifo", tmp_path / "access.log"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    received = bytearray()

    def drain() -> None:
        os.set_blocking(reader, True)
        while chunk := os.read(reader, 1 << 16):
            received.extend(chunk)

    loop = asyncio.get_running_loop()
    logs = AccessLogs(loop, flush_interval=3600, flush_bytes=1 << 20)
    logs.configure(config(None, piped={"path": str(fifo)}, filed={"path": str(path)}))
    piped, filed = logs.for_listener("piped"), logs.for_listener("filed")
    assert piped is not None and filed is not None
    for i in range(1000):
        piped.log(**{**REQUEST, "path": b"/%d" % i, "user_agent": b"x" * (i % 700)})
        filed.log(**REQUEST)
    thread = threading.Thread(target=drain)
    thread.start()
    await logs.close()
    await loop.run_in_executor(None, thread.join)
    os.close(reader)
    to_fifo = [data for data in writes if b'"listener":"piped"' in data]
    to_file = [data for data in writes if b'"listener":"filed"' in data]
    assert len(to_file) == 1 and len(to_file[0]) > access_writer.PIPE_BUF
    assert len(to_fifo) > 1
    assert all(len(d) <= access_writer.PIPE_BUF and d.endswith(b"\n") for d in to_fifo)
    assert [json.loads(x)["path"] for x in bytes(received).splitlines()] == \
        [f"/{i}" for i in range(1000)]


# -- a writer that cannot write --------------------------------------------------------


async def test_a_stuck_reader_never_blocks_the_loop(tmp_path: Path) -> None:
    """A FIFO nobody reads: the writer thread blocks in write(2); ``log`` and the timer
    keep running on the loop, lines past the queue bound are dropped and counted, and
    every line is either delivered or counted once the reader comes back."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    loop = asyncio.get_running_loop()
    logs = AccessLogs(loop, flush_interval=0.01, flush_bytes=16 * 1024,
                      max_queued_bytes=256 * 1024)
    logs.configure(config({"path": str(fifo)}, web=None))
    logger = logs.for_listener("web")
    assert logger is not None
    total = 0
    # ~5 MB, far past the pipe and the bound (at most ~50 MB if nothing is ever dropped).
    while (logs.dropped == 0 or total < 20_000) and total < 200_000:
        for _ in range(1000):
            logger.log(**REQUEST)
        total += 1000
        await asyncio.sleep(0)                  # the loop turns; timers fire
    await asyncio.sleep(0.05)
    assert logs.queued_bytes <= 256 * 1024

    assert logs.dropped > 0
    received = bytearray()

    def drain() -> None:
        os.set_blocking(reader, True)
        while chunk := os.read(reader, 1 << 16):
            received.extend(chunk)

    thread = threading.Thread(target=drain)
    thread.start()
    await logs.close()                          # closes the FIFO's write end: EOF
    await loop.run_in_executor(None, thread.join)
    os.close(reader)
    got = bytes(received).splitlines()
    assert all(json.loads(x)["status"] == 200 for x in got)
    assert len(got) + logs.dropped == total
