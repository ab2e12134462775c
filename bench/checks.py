"""CPU cost of active health checks: 1,000 backends at a 1 s interval.

One helper process (its own uvloop) listens on 1,000 free loopback ports and answers
``HTTP/1.1 200 OK`` keep-alive to every request.  This process runs a
:class:`poise.checks.HealthChecker` over those backends, warms up, then measures its
own CPU time (``time.process_time``: every thread of this process, user + system)
over a wall-clock window.  Target (issue 4): < 5 % of one core for the HTTP check.

    .venv/bin/python bench/checks.py [--seconds 10] [--warmup 3] [--backends 1000]

Prints one line per variant (http keep-alive, tcp) and a JSON line at the end:
``{"checks_http_pct": ..., "checks_tcp_pct": ...}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import signal
import subprocess
import sys
import time
from collections import Counter

import uvloop

from poise.checks import CheckSettings, HealthChecker
from poise.core.backend import Backend

_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"


def raise_nofile() -> None:
    """2,000+ sockets per process: lift the soft open-files limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# -- the helper: 1,000 tiny keep-alive HTTP servers -----------------------------------

class _Answer(asyncio.Protocol):
    __slots__ = ("transport", "buf")

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        n = buf.count(b"\r\n\r\n")
        if n:
            self.transport.write(_RESPONSE * n)
            buf = buf[buf.rfind(b"\r\n\r\n") + 4:]
        self.buf = buf


async def _serve(count: int) -> None:
    loop = asyncio.get_running_loop()
    servers = [await loop.create_server(_Answer, "127.0.0.1", 0, backlog=64)
               for _ in range(count)]
    ports = [s.sockets[0].getsockname()[1] for s in servers]
    sys.stdout.write(json.dumps(ports) + "\n")
    sys.stdout.flush()
    # Run until the parent closes our stdin (or dies).
    done = loop.create_future()
    loop.add_reader(sys.stdin.fileno(), lambda: done.done() or done.set_result(None))
    await done


def serve(count: int) -> None:
    raise_nofile()
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # the parent stops us
    uvloop.run(_serve(count))


# -- the measurement ------------------------------------------------------------------

def measure(kind: str, backends: list[Backend], warmup: float, seconds: float) -> dict:
    loop = uvloop.new_event_loop()
    flips: Counter[bool] = Counter()
    settings = CheckSettings(type=kind, interval=1.0, timeout=1.0)
    checker = HealthChecker(settings, backends, lambda b, up: flips.update([up]), loop=loop)
    try:
        checker.start()
        loop.run_until_complete(asyncio.sleep(warmup))
        probes0 = checker.probe_count
        ru0, cpu0, wall0 = _rusage(), time.process_time(), time.perf_counter()
        loop.run_until_complete(asyncio.sleep(seconds))
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        ru = _rusage()
        user, system = ru[0] - ru0[0], ru[1] - ru0[1]
        probes = checker.probe_count - probes0
        results = Counter(checker.last_result(b) for b in backends)
    finally:
        checker.stop()
        loop.run_until_complete(asyncio.sleep(0.05))     # let closed transports go
        loop.close()
    return {"pct": 100.0 * cpu / wall, "probes_per_s": probes / wall,
            "cpu_us_per_probe": 1e6 * cpu / max(probes, 1),
            "user_pct": 100.0 * user / wall, "sys_pct": 100.0 * system / wall,
            "down": sum(not checker.healthy(b) for b in backends),
            "flips": dict(flips), "results": dict(results.most_common(3))}


def _rusage() -> tuple[float, float]:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime, ru.ru_stime


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0, help="measured window (10)")
    ap.add_argument("--warmup", type=float, default=3.0, help="warm-up before it (3)")
    ap.add_argument("--backends", type=int, default=1000, help="backend count (1000)")
    ap.add_argument("--serve", type=int, metavar="N", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve)
        return 0

    raise_nofile()
    helper = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve",
                               str(args.backends)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        line = helper.stdout.readline()
        if not line:
            print("helper process failed to start", file=sys.stderr)
            return 1
        backends = [Backend("127.0.0.1", p) for p in json.loads(line)]
        out = {}
        for kind, label in (("http", "http, keep-alive"), ("tcp", "tcp connect")):
            r = measure(kind, backends, args.warmup, args.seconds)
            out[f"checks_{kind}_pct"] = round(r["pct"], 2)
            print(f"health checks: {len(backends)} backends @ 1s interval: "
                  f"{r['pct']:.1f}% of one core ({label})")
            print(f"  {r['probes_per_s']:.0f} probes/s, {r['cpu_us_per_probe']:.1f} µs CPU "
                  f"per probe (user {r['user_pct']:.1f}% + kernel {r['sys_pct']:.1f}%), "
                  f"down={r['down']} flips={r['flips']} last={r['results']}", file=sys.stderr)
        print(json.dumps(out))
    finally:
        helper.stdin.close()
        try:
            helper.wait(timeout=5)
        except subprocess.TimeoutExpired:
            helper.kill()
            helper.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
