"""Run wrk and parse its text output into numbers (seconds, bytes, counts).

Example of the output parsed (`wrk --latency`):

      1 threads and 64 connections
      Thread Stats   Avg      Stdev     Max   +/- Stdev
        Latency     1.02ms  211.33us   9.87ms   93.21%
      Latency Distribution
         50%    0.98ms
         99%    1.83ms
      623401 requests in 10.00s, 128.42MB read
      Socket errors: connect 0, read 3, write 0, timeout 0
      Non-2xx or 3xx responses: 12
    Requests/sec:  62335.12
    Transfer/sec:     12.84MB
"""

from __future__ import annotations

import re
import subprocess

_TIME_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_SIZE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4, "P": 1024**5}

_RE_TOTAL = re.compile(r"(\d+) requests in ([\d.]+[a-z]+), ([\d.]+)([KMGTP]?)B read")
_RE_PCT = re.compile(r"^\s*(50|75|90|99)(?:\.0+)?%\s+([\d.]+)([a-z]+)\s*$", re.M)
_RE_SOCKET = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_RE_NON2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")
_RE_RPS = re.compile(r"Requests/sec:\s+([\d.]+)")


class WrkError(RuntimeError):
    """wrk failed or printed something we cannot parse."""


def parse_time(text: str) -> float:
    """'1.23ms' -> 0.00123 seconds."""
    m = re.fullmatch(r"([\d.]+)([a-z]+)", text.strip())
    if not m or m.group(2) not in _TIME_UNITS:
        raise WrkError(f"unparseable wrk time {text!r}")
    return float(m.group(1)) * _TIME_UNITS[m.group(2)]


def parse_wrk(text: str) -> dict:
    """Turn wrk's report into a dict; missing error lines mean zero errors."""
    total = _RE_TOTAL.search(text)
    rps = _RE_RPS.search(text)
    if not total or not rps:
        raise WrkError("no summary in wrk output:\n" + text)
    sock = _RE_SOCKET.search(text)
    non2xx = _RE_NON2XX.search(text)
    errors = dict(zip(("connect", "read", "write", "timeout"),
                      map(int, sock.groups()) if sock else (0, 0, 0, 0), strict=True))
    errors["non_2xx_3xx"] = int(non2xx.group(1)) if non2xx else 0
    duration = parse_time(total.group(2))
    bytes_read = float(total.group(3)) * _SIZE_UNITS[total.group(4)]
    return {
        "requests": int(total.group(1)),
        "duration_s": duration,
        "bytes_read": bytes_read,
        "rps": float(rps.group(1)),
        "bytes_per_s": bytes_read / duration if duration else 0.0,
        "latency_s": {f"p{p}": float(v) * _TIME_UNITS[u] for p, v, u in _RE_PCT.findall(text)},
        "errors": errors,
        "error_total": sum(errors.values()),
    }


def wrk_argv(url: str, connections: int, duration: int, threads: int = 1,
             latency: bool = True) -> list[str]:
    """The wrk command line for one run."""
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s"]
    if latency:
        argv.append("--latency")
    argv.append(url)
    return argv


def _result(argv: list[str], returncode: int, stdout: str, stderr: str) -> dict:
    """parse_wrk() of a finished wrk plus its argv and raw text; WrkError if it failed."""
    text = stdout + stderr
    if returncode != 0:
        raise WrkError(f"wrk exited {returncode}: {text.strip()}")
    result = parse_wrk(text)
    result["argv"] = argv
    result["raw"] = stdout
    return result


def run_wrk(url: str, connections: int, duration: int, threads: int = 1,
            latency: bool = True) -> dict:
    """Run wrk against url for `duration` seconds and return parse_wrk() plus the raw text."""
    argv = wrk_argv(url, connections, duration, threads, latency)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    return _result(argv, proc.returncode, proc.stdout, proc.stderr)


def start_wrk(url: str, connections: int, duration: int, threads: int = 1,
              latency: bool = True) -> subprocess.Popen:
    """Start wrk in the background; finish_wrk() waits for it and parses its report."""
    argv = wrk_argv(url, connections, duration, threads, latency)
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish_wrk(proc: subprocess.Popen, timeout: float) -> dict:
    """Wait for a start_wrk() process (killing it after `timeout` s) and parse its report."""
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise WrkError(f"wrk did not finish within {timeout:.0f} s") from None
    return _result(list(proc.args), proc.returncode, stdout, stderr)
