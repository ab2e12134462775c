"""Build and drive latency_gen (latency_gen.c), the open-loop HTTP/1.1 load generator of
bench/latency.py and bench/scale.py, and turn its latencies into percentiles.

Why a generator of our own: wrk is closed-loop (a connection sends its next request
when the last answer arrives, so a stalled proxy is sent less and its stall counted
once), and ``h2load --rps`` schedules requests on time but, on HTTP/1.1, sends a due
request only when its connection is free and measures from that moment (coordinated
omission; bench/README.md shows it on a stalling server).  latency_gen measures every
request from the moment it was due.  It is C because a Python client would need more
CPU than the proxies it measures at tens of thousands of requests per second on a
2-CPU box.

Everything here is stdlib; building needs a C compiler (``cc``, as poise's compiled hot
path does).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from array import array
from pathlib import Path

SOURCE = Path(__file__).resolve().parent / "latency_gen.c"
PERCENTILES = (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p99.9", 0.999),
               ("p99.99", 0.9999))


class GenError(RuntimeError):
    """latency_gen could not be built, failed, or printed nothing we can read."""


def build(out_dir: Path) -> Path:
    """Compile latency_gen.c into ``out_dir``; return the executable's path."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise GenError("no C compiler (cc): apt-get install gcc")
    exe = out_dir / "latency_gen"
    proc = subprocess.run([cc, "-O2", "-Wall", "-o", str(exe), str(SOURCE)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise GenError(f"building latency_gen failed:\n{proc.stderr}")
    return exe


def argv(exe: Path, port: int, rate: float, duration: float, connections: int, *,
         idle: int = 0, source: str | None = None, connect_rate: float | None = None,
         raw: Path | None = None, wait_go: bool = False, probe_idle: bool = False,
         host: str = "127.0.0.1", drain: float = 2.0, skip: float = 0.0) -> list[str]:
    """The command line of one generator process (see latency_gen.c for each option)."""
    args = [str(exe), "--target", f"{host}:{port}", "--rate", f"{rate:.3f}",
            "--duration", f"{duration:g}", "--connections", str(connections),
            "--drain", f"{drain:g}", "--skip", f"{skip:g}"]
    if idle:
        args += ["--idle", str(idle)]
    if source:
        args += ["--source", source]
    if connect_rate:
        args += ["--connect-rate", f"{connect_rate:g}"]
    if raw is not None:
        args += ["--raw", str(raw)]
    if wait_go:
        args.append("--wait-go")
    if probe_idle:
        args.append("--probe-idle")
    return args


def run(args: list[str], timeout: float) -> dict:
    """Run one generator to the end and return its JSON report."""
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise GenError(f"latency_gen did not finish within {timeout:.0f} s") from None
    return _report(proc.returncode, proc.stdout, proc.stderr)


def _report(code: int | None, stdout: str, stderr: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if code not in (0, None) or not lines:
        raise GenError(f"latency_gen exited {code}: {stderr.strip() or stdout.strip()}")
    return json.loads(lines[-1])


class Fleet:
    """Several generator processes started with ``--wait-go``: :meth:`wait_ready` once
    every one has opened its connections, :meth:`go` starts their measurements at once,
    :meth:`results` waits for their reports while they keep the connections open, and
    :meth:`close` lets them exit (closing them)."""

    def __init__(self, commands: list[list[str]]) -> None:
        self.procs = [subprocess.Popen(c, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True) for c in commands]
        self.ready: list[dict | None] = [None] * len(self.procs)
        self.reports: list[dict | None] = [None] * len(self.procs)
        self._events = [threading.Event() for _ in self.procs]
        self._done = [threading.Event() for _ in self.procs]
        self._threads = [threading.Thread(target=self._read, args=(i,), daemon=True)
                         for i in range(len(self.procs))]
        for t in self._threads:
            t.start()

    def _read(self, i: int) -> None:
        for line in self.procs[i].stdout:
            if line.startswith("ready "):
                self.ready[i] = json.loads(line[6:])
                self._events[i].set()
            elif line.startswith("{"):
                self.reports[i] = json.loads(line)
                self._done[i].set()
        self._events[i].set()
        self._done[i].set()

    def wait_ready(self, timeout: float) -> list[dict]:
        for i, event in enumerate(self._events):
            if not event.wait(timeout) or self.ready[i] is None:
                raise GenError(f"generator {i} not ready: {self._stderr(i)}")
        return list(self.ready)

    def go(self) -> None:
        for p in self.procs:
            p.stdin.write("go\n")
            p.stdin.flush()

    def results(self, timeout: float) -> list[dict]:
        for i, done in enumerate(self._done):
            if not done.wait(timeout) or self.reports[i] is None:
                raise GenError(f"generator {i} gave no report: {self._stderr(i)}")
        return list(self.reports)

    def done(self) -> bool:
        """True once every generator has reported (or exited)."""
        return all(event.is_set() for event in self._done)

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.procs)

    def _stderr(self, i: int) -> str:
        p = self.procs[i]
        if p.poll() is None:
            return "(still running)"
        return f"exited {p.returncode}: {p.stderr.read().strip()}"

    def close(self, timeout: float = 10.0) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    p.stdin.close()
                except OSError:
                    pass
        for p in self.procs:
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


# ---------------------------------------------------------------- latencies


def read_raw(path: Path) -> array:
    """The latencies (µs) a generator wrote with ``--raw``."""
    values = array("I")
    data = path.read_bytes()
    values.frombytes(data[: len(data) - len(data) % values.itemsize])
    return values


def percentiles(values) -> dict:
    """p50 … p99.99 and max of ``values`` (µs), nearest rank as latency_gen computes them;
    empty when there are none."""
    ordered = sorted(values)
    n = len(ordered)
    if not n:
        return {}
    out = {name: ordered[int(q * (n - 1) + 0.5)] for name, q in PERCENTILES}
    out["max"] = ordered[-1]
    return out


def failures(report: dict) -> int:
    """Requests that failed or were never sent, in one generator's report: socket errors,
    non-2xx/3xx answers, timeouts and due requests left unsent (the load was not held)."""
    errors = report["errors"]
    return (errors["connect"] + errors["read"] + errors["eof"] + errors["parse"]
            + errors["timeout"] + report["non2xx"] + report["unsent"])
