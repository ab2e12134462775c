"""CPU per request of a global rate limit (issue 12's bar: <= 10 µs amortised at
10k req/s), against a redis-server this script starts on a free loopback port.

One key whose limit is never reached takes ``--rate`` requests per second (default
10,000) for ``--seconds`` (default 3) on one event loop (uvloop when installed), as a
worker would: ``take``, and ``park`` when told to.  The figure is this process's CPU
time (``time.process_time``: the leases, redis-py, the loop's I/O; not the Redis
server's) minus that of the same driver calling a no-op instead, per request.  Also
printed: the bare ``take`` of a leased token (timeit), round trips and tokens each.

``--keys N`` spreads the requests over N keys in turn (default 1): with many keys
each gets fewer requests per lease, so more of them cost a share of a round trip.

    .venv/bin/python bench/global_limit.py [--rate N] [--seconds S] [--keys N]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from poise.ratelimit.redis_store import GlobalLimit, RedisStore  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(workdir: str) -> tuple[subprocess.Popen, str]:
    if shutil.which("redis-server") is None:
        sys.exit("redis-server is not installed (Debian: apt-get install redis-server)")
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no", "--dir", workdir],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return proc, f"redis://127.0.0.1:{port}/0"
        except OSError:
            time.sleep(0.02)
    proc.kill()
    sys.exit("redis-server did not start")


async def drive(take, park, rate: int, seconds: float, keys: int = 1
                ) -> tuple[int, int, float]:
    """``rate`` requests per second for ``seconds`` (catching up after each sleep);
    (requests, admitted, CPU seconds)."""
    admitted = 0

    def answered(verdict: float) -> None:
        nonlocal admitted
        admitted += verdict == 0.0

    names = [b"bench-%d" % i for i in range(keys)]
    done = 0
    cpu = time.process_time()
    start = time.monotonic()
    while (now := time.monotonic()) - start < seconds:
        due = int((now - start) * rate)
        while done < due:
            key = names[done % keys]
            verdict = take(key, now)
            if verdict is None:
                park(key, answered)
            else:
                admitted += verdict == 0.0
            done += 1
        await asyncio.sleep(0.001)
    await asyncio.sleep(0.05)               # the last refills land
    return done, admitted, time.process_time() - cpu


async def main(rate: int, seconds: float, keys: int, url: str) -> None:
    def no_take(key: bytes, now: float) -> float:
        return 0.0

    requests, _, baseline = await drive(no_take, None, rate, seconds, keys)
    store = RedisStore(url, timeout=0.05)
    limit = GlobalLimit("bench", rate=1e9, burst=1_000_000, store=store)
    await drive(limit.take, limit.park, rate, 0.5, keys)    # connect, grow the batch
    trips, calls, granted = store.round_trips, store.calls, store.tokens_granted
    n, admitted, cpu = await drive(limit.take, limit.park, rate, seconds, keys)
    trips, calls = store.round_trips - trips, store.calls - calls
    granted = store.tokens_granted - granted
    assert admitted == n, (admitted, n)
    assert store.up and store.errors == 0, store

    # the bare hot path: a key with leased tokens
    hot = GlobalLimit("hot", rate=1e9, burst=10**9, store=store, max_batch=10**9,
                      lease_ttl=1e9)
    hot.take(b"k", time.monotonic())
    [lease] = hot.book.drain()
    hot.book.settle(lease, 10**8, 0.0, time.monotonic())
    take, now = hot.take, time.monotonic()
    loops = 1_000_000
    bare = min(timeit.repeat(lambda: take(b"k", now), number=loops, repeat=5)) / loops
    await store.close()

    print(f"global limit, {keys:,} key(s), {rate:,} req/s for {seconds:g} s "
          f"({n:,} requests, all admitted)")
    print(f"  CPU per request, amortised: {(cpu - baseline) / n * 1e6:6.2f} µs "
          f"(with limit {cpu / n * 1e6:.2f}, driver alone {baseline / requests * 1e6:.2f})")
    print(f"  take() of a leased token:   {bare * 1e6:6.3f} µs (incl. the lambda call)")
    print(f"  Redis round trips: {trips:,} ({trips / seconds:,.0f}/s), "
          f"{calls / max(trips, 1):.1f} refills of {granted / max(calls, 1):.1f} tokens each")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--keys", type=int, default=1)
    args = parser.parse_args()
    try:
        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    with tempfile.TemporaryDirectory() as workdir:
        proc, url = start_redis(workdir)
        try:
            asyncio.run(main(args.rate, args.seconds, max(1, args.keys), url))
        finally:
            proc.terminate()
            proc.wait(10)
