"""Memory of rate-limit key tables under key rotation (issue 12: bounded tables).

1. In process, the shared GCRA table (``rate_limit_table_slots``, default 262,144
   slots) takes 1,000,000 distinct keys: the pages it touches, the live keys it evicts,
   and what Python allocates meanwhile (tracemalloc: nothing per key).
2. In process, a global limit's lease book (``max_keys`` 10,000) takes 1,000,000
   distinct keys, its refills answered as a Redis would: entries and bytes held.
3. End to end, a real poise with ``rate_limit: {key: header:x-api-key, rate: 10/s}``
   takes three runs of ``--seconds`` of wrk traffic whose every request carries a new
   X-Api-Key (a client rotating header values): poise's RSS before and after each,
   requests sent, evictions counted by /metrics.

    .venv/bin/python bench/ratelimit_memory.py [--seconds 10]
"""

from __future__ import annotations

import argparse
import random
import re
import subprocess
import sys
import tempfile
import time
import tracemalloc
import urllib.request
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent))
sys.path.insert(0, str(BENCH_DIR))

import configs  # noqa: E402
import procs  # noqa: E402

from poise.core.leases import LeaseBook  # noqa: E402
from poise.core.ratelimit import limit_ns  # noqa: E402
from poise.ratelimit.shared import SharedState  # noqa: E402

KEYS = 1_000_000
ROUNDS = 3      # wrk runs of key rotation: memory must stop growing after the first
MIB = 1024 * 1024
ROTATING = """
counter = 0
request = function()
  counter = counter + 1
  return wrk.format("GET", "/", {["X-Api-Key"] = tostring(math.random(1, 2^31)) .. "-" .. counter})
end
"""


def rss_kib(pid: int) -> int:
    """Resident KiB of ``pid`` and its children (a poise with workers)."""
    total = 0
    for p in [pid, *procs.process_tree(pid)]:
        try:
            text = Path(f"/proc/{p}/status").read_text()
        except OSError:
            continue
        total += int(re.search(r"VmRSS:\s+(\d+)", text).group(1))
    return total


def shared_table() -> None:
    state = SharedState.create(1 << 18, shareable=False)
    rng = random.Random(12)
    interval, span = limit_ns(10.0, 10)
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    now = time.monotonic_ns()
    for i in range(KEYS):
        state.rates.take(rng.getrandbits(62), now + i * 1000, interval, span)
    grown = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(before, "filename"))
    tracemalloc.stop()
    print(f"shared table: {state.slots:,} slots = {state.slots * 16 / MIB:.0f} MiB; "
          f"{KEYS:,} distinct keys taken, {state.rates.evictions:,} live keys evicted, "
          f"Python allocations grown by {grown / 1024:.1f} KiB")


def lease_book() -> None:
    book = LeaseBook(10, max_keys=10_000)
    tracemalloc.start()
    now = 1000.0
    peak = 0
    for i in range(KEYS):
        key = b"client-%d" % i
        if book.take(key, now) is None:
            book.park(key, lambda verdict: None)
        if i % 100 == 99:          # a Redis round trip answers the refills asked so far
            for lease in book.drain():
                book.settle(lease, lease.asking, 0.0, now)
            peak = max(peak, tracemalloc.get_traced_memory()[0])
        now += 0.0001
    current = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    print(f"lease book: {KEYS:,} distinct keys, {len(book):,} entries kept (max_keys 10,000), "
          f"{current / MIB:.1f} MiB held, peak {peak / MIB:.1f} MiB")


def end_to_end(seconds: int) -> None:
    with tempfile.TemporaryDirectory(prefix="poise-rl-mem-") as tmp:
        root = Path(tmp)
        root.chmod(0o755)
        backend_ports = procs.pick_ports(2, base=19700)
        port, admin_port = procs.pick_ports(2, base=19710)
        backend = procs.Service("backend", configs.backend_nginx(root, backend_ports),
                                root / "backend.log")
        argv = configs.poise(root, port, backend_ports, f"{BENCH_DIR.parent}/.venv/bin/poise run",
                             admin_port=admin_port, listener_extra=(
                                 "    rate_limit: {key: header:x-api-key, rate: 10/s}\n"))
        poise = procs.Service("poise", argv, root / "poise.log")
        script = root / "rotate.lua"
        script.write_text(ROTATING)
        try:
            backend.start()
            backend.wait_ready(backend_ports)
            poise.start()
            poise.wait_ready([port])
            rss = [rss_kib(poise.pid)]
            sent = 0
            for _ in range(ROUNDS):
                out = subprocess.run(["wrk", "-t1", "-c32", f"-d{seconds}s", "-s", str(script),
                                      f"http://127.0.0.1:{port}/"], capture_output=True,
                                     text=True, check=True).stdout
                sent += int(re.search(r"(\d+) requests in", out).group(1))
                rss.append(rss_kib(poise.pid))
            time.sleep(1.5)     # a metrics report
            metrics = urllib.request.urlopen(
                f"http://127.0.0.1:{admin_port}/metrics", timeout=5).read().decode()
            evicted = re.search(r"^poise_rate_limit_evictions_total (\S+)", metrics, re.M)
            print(f"poise under key rotation: {sent:,} requests, each with a new X-Api-Key, "
                  f"in {ROUNDS} runs of {seconds} s; RSS (MiB) at start and after each run: "
                  f"{' → '.join(f'{r / 1024:.1f}' for r in rss)}; live keys evicted "
                  f"{float(evicted.group(1)) if evicted else 0:,.0f}")
        finally:
            poise.stop()
            backend.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=int, default=10, help="wrk seconds (default 10)")
    args = p.parse_args()
    shared_table()
    lease_book()
    end_to_end(args.seconds)


if __name__ == "__main__":
    main()
