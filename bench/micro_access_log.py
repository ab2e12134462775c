"""CPU per access log line, JSON and Combined, without sockets.

Two figures per format:
- ``log()``: formatting a typical line and appending it to the buffer (timeit, best of 5);
- ``all-in``: process CPU (every thread) per line for N lines written to a file through
  the buffer, the flushes and the writer thread, ``close()`` included.

    .venv/bin/python bench/micro_access_log.py [lines]
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
import timeit

from poise.config.model import Config
from poise.observability.access_log import AccessLogs

REQUEST = dict(client=b"192.0.2.7", method=b"GET", path=b"/api/v1/users/12345/orders?limit=10",
               http11=True, status=200, bytes_sent=1234, duration=0.0123456, cluster="api",
               upstream="10.0.0.1:8080", attempts=1, trace_id="4bf92f3577b34da6a3ce929d0e0e4736",
               referer=None, user_agent=b"Mozilla/5.0 (X11; Linux x86_64; rv:121.0) "
                                        b"Gecko/20100101 Firefox/121.0")


def config(fmt: str, path: str) -> Config:
    return Config.model_validate({
        "access_log": {"format": fmt, "path": path},
        "listeners": [{"name": "web", "bind": "127.0.0.1:1", "routes": [{"cluster": "api"}]}],
        "clusters": [{"name": "api", "backends": [{"address": "127.0.0.1:2"}]}]})


async def measure(fmt: str, lines: int, directory: str) -> tuple[float, float]:
    path = os.path.join(directory, f"{fmt}.log")
    logs = AccessLogs(asyncio.get_running_loop(), max_queued_bytes=1 << 30)
    logs.configure(config(fmt, path))
    logger = logs.for_listener("web")
    assert logger is not None
    log, args = logger.log, tuple(REQUEST.values())
    best = min(timeit.repeat(lambda: log(*args), number=20_000, repeat=7)) / 20_000
    start = time.process_time()
    for _ in range(lines):
        log(*args)
    await logs.close()
    all_in = (time.process_time() - start) / lines
    assert logs.dropped == 0
    return best, all_in


async def main(lines: int) -> None:
    with tempfile.TemporaryDirectory() as directory:
        for fmt in ("json", "combined"):
            best, all_in = await measure(fmt, lines, directory)
            print(f"{fmt:9} log(): {best * 1e6:5.2f} µs/line   "
                  f"all-in: {all_in * 1e6:5.2f} µs/line")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 200_000))
