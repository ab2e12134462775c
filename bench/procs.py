"""Start, probe and stop the processes a benchmark run needs, and read their CPU time.

Every service runs in its own session (process group), so stopping it reaches
the master and all of its workers. CPU time comes from /proc/PID/stat, summed
over the whole process tree under the service's root process.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack, nullcontext
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
REQUIRED_TOOLS = {"nginx": "/usr/sbin/nginx", "haproxy": "haproxy", "wrk": "wrk"}


class StartError(RuntimeError):
    """A service could not be started or never answered on its ports."""


# ---------------------------------------------------------------- /proc reading


def _read_stat(pid: int) -> tuple[int, int, int] | None:
    """Return (ppid, cpu ticks incl. reaped children, starttime) for pid, or None if gone.

    The comm field may contain spaces or ')' so the line is split after the last ')'.
    Fields after it start at field 3 (state): ppid=4, utime=14, stime=15,
    cutime=16, cstime=17, starttime=22.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    rest = data[data.rindex(b")") + 2 :].split()
    ticks = sum(int(rest[i]) for i in (11, 12, 13, 14))
    return int(rest[1]), ticks, int(rest[19])


def process_tree(root: int) -> dict[int, tuple[int, int, int]]:
    """Map pid -> stat tuple for root and all of its live descendants."""
    stats = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _read_stat(int(entry))
            if st is not None:
                stats[int(entry)] = st
    if root not in stats:
        return {}
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    tree, todo = {}, [root]
    while todo:
        pid = todo.pop()
        tree[pid] = stats[pid]
        todo.extend(children.get(pid, ()))
    return tree


def tree_cpu_seconds(tree: dict[int, tuple[int, int, int]]) -> float:
    """CPU seconds (user+system) used so far by a process_tree().

    Each process contributes utime+stime plus cutime+cstime (children it has
    already reaped); a live child's time is not yet in its parent's cutime, so
    nothing is counted twice.
    """
    return sum(ticks for _, ticks, _ in tree.values()) / CLK_TCK


# ---------------------------------------------------------------- network helpers


def _port_free(port: int) -> bool:
    """True if 127.0.0.1:port can be bound right now."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pick_ports(count: int, base: int = 19100, limit: int = 19999) -> list[int]:
    """Pick `count` bindable ports from a fixed high range outside the ephemeral range."""
    ports = [p for p in range(base, limit + 1) if _port_free(p)][:count]
    if len(ports) < count:
        raise StartError(f"not enough free ports in {base}-{limit}")
    return ports


def http_get(port: int, path: str = "/", timeout: float = 2.0, tls: bool = False) -> int:
    """GET http://127.0.0.1:port/path (https with ``tls``, the certificate not
    verified) and return the status (body fully read)."""
    if tls:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            "127.0.0.1", port, timeout=timeout, context=ctx)
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


# ---------------------------------------------------------------- services


class Service:
    """One benchmark process (and its children), with its output in a log file."""

    def __init__(self, name: str, argv: list[str], log_path: Path):
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self._seen: dict[int, int] = {}  # pid -> starttime of every descendant seen

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> None:
        """Launch the process in its own session; raise StartError if it can't be executed."""
        try:
            with open(self.log_path, "wb") as log:
                self.proc = subprocess.Popen(
                    self.argv, stdin=subprocess.DEVNULL, stdout=log,
                    stderr=subprocess.STDOUT, start_new_session=True,
                )
        except OSError as exc:
            raise StartError(f"{self.name}: cannot run {self.argv[0]!r}: {exc}") from exc

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, ports: list[int], timeout: float = 15.0) -> None:
        """Wait until every port accepts and answers GET / with a 2xx; else raise StartError."""
        deadline = time.monotonic() + timeout
        for port in ports:
            last = "no answer"
            while True:
                if not self.alive():
                    code = self.proc.returncode if self.proc else None
                    raise StartError(f"{self.name} exited (code {code}) before answering:\n"
                                     f"{self.log_tail()}")
                try:
                    status = http_get(port, "/", timeout=1.0)
                    if 200 <= status < 300:
                        break
                    last = f"HTTP {status}"
                except (OSError, http.client.HTTPException) as exc:
                    last = f"{type(exc).__name__}: {exc}"
                if time.monotonic() > deadline:
                    raise StartError(f"{self.name} did not answer GET / on port {port} within "
                                     f"{timeout:.0f}s (last: {last})\n{self.log_tail()}")
                time.sleep(0.1)
        self._remember_tree()

    def cpu_seconds(self) -> float:
        """CPU seconds used so far by the whole process tree (see tree_cpu_seconds)."""
        if self.proc is None:
            return 0.0
        tree = process_tree(self.proc.pid)
        for pid, (_, _, start) in tree.items():
            self._seen[pid] = start
        return tree_cpu_seconds(tree)

    def _remember_tree(self) -> None:
        """Record descendants (even ones that leave our process group) for cleanup."""
        if self.proc:
            for pid, (_, _, start) in process_tree(self.proc.pid).items():
                self._seen[pid] = start

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM the process group, SIGKILL whatever is left after `timeout`."""
        if self.proc is None:
            return
        self._remember_tree()
        pgid = self.proc.pid
        _signal_group(pgid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _signal_group(pgid, signal.SIGKILL)
            self.proc.wait(timeout)
        self._reap_leftovers(pgid, timeout)

    def _reap_leftovers(self, pgid: int, timeout: float) -> None:
        """Kill group members and recorded descendants that outlived the root."""
        deadline = time.monotonic() + timeout
        while _group_exists(pgid) and time.monotonic() < deadline:
            time.sleep(0.05)
        _signal_group(pgid, signal.SIGKILL)
        for pid, start in self._seen.items():
            st = _read_stat(pid)
            if pid != pgid and st is not None and st[2] == start:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def log_tail(self, lines: int = 15) -> str:
        """The last lines of the service's output, indented for reports."""
        try:
            text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return "    (no log)"
        return "\n".join("    " + line for line in text) or "    (log is empty)"


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


# ---------------------------------------------------------------- tools


def ensure_tools() -> None:
    """Install nginx, haproxy and wrk with apt-get if any is missing (needs root)."""
    missing = [n for n, path in REQUIRED_TOOLS.items()
               if not (os.access(path, os.X_OK) if "/" in path else shutil.which(path))]
    if not missing:
        return
    if os.geteuid() != 0:
        raise SystemExit(f"missing tools {missing}; run: sudo apt-get install -y nginx haproxy wrk")
    print(f"# installing missing tools {missing} with apt-get", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update"], check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run(["apt-get", "install", "-y", "nginx", "haproxy", "wrk"], check=True, env=env,
                   stdout=subprocess.DEVNULL)


# ---------------------------------------------------------------- a whole run


def tempdir(keep: bool, prefix: str):
    """TemporaryDirectory, or a plain mkdtemp that is left in place with --keep-temp."""
    if not keep:
        return tempfile.TemporaryDirectory(prefix=prefix)
    return nullcontext(tempfile.mkdtemp(prefix=prefix))


def _raise_interrupt(signum, frame):
    """SIGTERM handler: unwind like Ctrl-C so every started process is stopped."""
    raise KeyboardInterrupt(f"signal {signum}")


def run_cleanly(work: Callable[[ExitStack], None], log: Callable[[str], None]) -> bool:
    """Run ``work(stack)``; whatever happens, then stop every process registered on the
    stack (SIGTERM unwinds like Ctrl-C, and a second one cannot skip the cleanup).
    False when interrupted."""
    signal.signal(signal.SIGTERM, _raise_interrupt)
    stack = ExitStack()
    try:
        work(stack)
    except KeyboardInterrupt:
        log("!! interrupted: stopping all processes, no results saved")
        return False
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        log("# stopping all processes")
        stack.close()
        signal.signal(signal.SIGINT, signal.default_int_handler)
    return True


def save_results(name: str, result: dict, markdown: str,
                 results_dir: Path) -> tuple[Path, Path]:
    """Write ``<name>-<timestamp>.json`` and ``<name>-latest.md`` under ``results_dir``."""
    results_dir.mkdir(parents=True, exist_ok=True)
    json_path = results_dir / f"{name}-{result['timestamp']}.json"
    md_path = results_dir / f"{name}-latest.md"
    json_path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    md_path.write_text(markdown)
    return json_path, md_path
