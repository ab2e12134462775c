"""Real processes for proxy tests: h11 backends and ``python -m poise run CONFIG``,
plus what the control-plane tests need of them: an admin API client, rewriting the
config file and reloading it, and which worker process holds a client connection."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

from tests.support.admin import AdminClient, AdminResponse, children, socket_owner
from tests.support.waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]
# Where `python -m poise` runs from (its poise/ package wins): this checkout, unless
# POISE_SRC names another tree (e.g. an exported commit, to test a fixed revision).
POISE_SRC = Path(os.environ.get("POISE_SRC") or ROOT)
LOOPBACK = "127.0.0.1"


def terminate(proc: subprocess.Popen | None, timeout: float = 10.0) -> None:
    """SIGTERM ``proc`` and wait for it; SIGKILL it after ``timeout`` seconds."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def free_port() -> int:
    """A port that was free a moment ago (poise binds it itself, so a race is possible;
    :meth:`Poise.start` retries on a bind failure)."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def refused_address() -> str:
    """A loopback address where nothing listens (connects are refused)."""
    return f"{LOOPBACK}:{free_port()}"


class Blackhole:
    """A loopback address whose connects hang: a listener with a full accept queue
    (backlog 0, already filled, never accepting).  Linux drops further SYNs, so a
    connect neither succeeds nor fails until the caller's timeout."""

    def __init__(self, fill: int = 4) -> None:
        self.listener = socket.socket()
        self.listener.bind((LOOPBACK, 0))
        self.listener.listen(0)
        host, port = self.listener.getsockname()
        self.address = f"{host}:{port}"
        self.fillers = []
        for _ in range(fill):
            s = socket.socket()
            s.setblocking(False)
            try:
                s.connect(self.listener.getsockname())
            except BlockingIOError:
                pass
            self.fillers.append(s)
        time.sleep(0.05)

    def hangs(self, timeout: float = 0.5) -> bool:
        """Check that a connect here really hangs on this kernel."""
        with socket.socket() as s:
            s.settimeout(timeout)
            try:
                s.connect(self.listener.getsockname())
            except TimeoutError:
                return True
            except OSError:
                return False
            return False

    def close(self) -> None:
        for s in self.fillers:
            s.close()
        self.listener.close()


class Backend:
    """An h11 backend process (see :mod:`tests.support.h11_backend`)."""

    def __init__(self, name: str = "b1", *, close_after_response: bool = False,
                 idle_timeout: float | None = None, drop_reused: bool = False,
                 port: int = 0, fail_ratio: float = 0.0, fail_seed: int = 0,
                 health_status: int | None = None, hang: bool = False) -> None:
        self.name = name
        self.options = dict(close_after_response=close_after_response,
                            idle_timeout=idle_timeout, drop_reused=drop_reused,
                            fail_ratio=fail_ratio, fail_seed=fail_seed,
                            health_status=health_status, hang=hang)
        args = [sys.executable, "-m", "tests.support.h11_backend", "--name", name,
                "--port", str(port)]
        if close_after_response:
            args.append("--close-after-response")
        if idle_timeout is not None:
            args += ["--idle-timeout", str(idle_timeout)]
        if drop_reused:
            args.append("--drop-reused")
        if fail_ratio:
            args += ["--fail-ratio", str(fail_ratio), "--fail-seed", str(fail_seed)]
        if health_status is not None:
            args += ["--health-status", str(health_status)]
        if hang:
            args.append("--hang")
        self.proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("READY "):
            self.proc.kill()
            raise RuntimeError(f"backend {name} did not start: {line!r}")
        self.port = int(line.split()[1])
        self.address = f"{LOOPBACK}:{self.port}"

    def _call(self, path: str) -> dict:
        with socket.create_connection((LOOPBACK, self.port), timeout=10) as s:
            s.sendall(b"GET %b HTTP/1.1\r\nHost: control\r\nConnection: close\r\n\r\n"
                      % path.encode())
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        return json.loads(data.split(b"\r\n\r\n", 1)[1])

    def stats(self) -> dict:
        """``{"requests": [{method, target, conn, index, at}], "connections": n,
        "dropped": n, "peer_closed": n}``."""
        return self._call("/_stats")

    def reset(self) -> None:
        self._call("/_reset")

    def targets(self) -> list[str]:
        return [r["target"] for r in self.stats()["requests"]]

    def kill(self) -> None:
        """SIGKILL: the process dies at once, its sockets are closed by the kernel."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        terminate(self.proc, 5)
        self.proc.stdout.close()

    def __repr__(self) -> str:
        return f"<Backend {self.name} {self.address}>"


def make_config(backends: list, port: int, listener: dict | None = None,
                cluster: dict | None = None, extra_clusters: list[dict] | None = None,
                **top) -> dict:
    """A one-listener config whose cluster ``app`` holds ``backends`` (addresses or
    ``(address, weight)`` pairs); ``listener``/``cluster``/``top`` add or override
    fields, ``extra_clusters`` are appended as given."""
    members = []
    for b in backends:
        if isinstance(b, tuple):
            members.append({"address": b[0], "weight": b[1]})
        else:
            members.append({"address": b})
    return {
        "workers": 1,
        **top,
        "listeners": [{"name": "web", "bind": f"{LOOPBACK}:{port}", "protocol": "http",
                       "routes": [{"cluster": "app"}], **(listener or {})}],
        "clusters": [{"name": "app", "policy": "round_robin", "backends": members,
                      **(cluster or {})}, *(extra_clusters or [])],
    }


class Poise:
    """``python -m poise run CONFIG`` on a free loopback port, config written as YAML."""

    def __init__(self, workdir: Path, backends: list, *, listener: dict | None = None,
                 cluster: dict | None = None, extra_clusters: list[dict] | None = None,
                 **top) -> None:
        self.workdir = Path(workdir)
        self.spec = (backends, listener, cluster, dict(top, extra_clusters=extra_clusters))
        self.proc: subprocess.Popen | None = None
        self.returncode: int | None = None
        self.admin: AdminClient | None = None
        for attempt in range(3):
            if self._start(attempt) and self._admin_ready():
                return
        raise RuntimeError(f"poise did not start:\n{self.log()}")

    def _start(self, attempt: int) -> bool:
        backends, listener, cluster, top = self.spec
        self.port = free_port()
        self.addr = (LOOPBACK, self.port)
        self.admin = None
        admin = top.get("admin")
        if isinstance(admin, dict) and "bind" not in admin:
            # (a fresh port per attempt, as for the listener)
            top = {**top, "admin": {"bind": f"{LOOPBACK}:{free_port()}", **admin}}
        self.config = make_config(backends, self.port, listener, cluster, **top)
        if self.config.get("admin") is not None:
            host, _, port = self.config["admin"]["bind"].rpartition(":")
            self.admin = AdminClient((host.strip("[]"), int(port)),
                                     self.config["admin"].get("token"))
        self.config_path = self.workdir / f"poise-{self.port}.yaml"
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        self.log_path = self.workdir / f"poise-{self.port}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "poise", "run", str(self.config_path)],
                cwd=POISE_SRC, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                probe = socket.create_connection(self.addr, timeout=1)
            except OSError:
                time.sleep(0.02)
                continue
            # The kernel completes connects to a bound listener before poise's event
            # loop serves it: on a loaded CI box poise accepted the first connection
            # 0.6 s or more later, which a test timing its first request counted (a
            # 1.2 s request_timeout was answered 1.79 s, once 3.2 s, after the request
            # was sent).  Started means that a process of poise has accepted this one.
            with probe:
                probe.setblocking(False)
                while time.monotonic() < deadline and self.proc.poll() is None:
                    if self._accepted(probe):
                        return True
                    time.sleep(0.005)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        return False

    def _accepted(self, probe: socket.socket) -> bool:
        """Whether poise has accepted the connection ``probe`` (it holds the socket,
        or it already sent bytes on it or closed it)."""
        try:
            probe.recv(1, socket.MSG_PEEK)      # (non-blocking)
            return True                 # bytes (a tcp backend's greeting), or closed
        except BlockingIOError:
            pass
        except OSError:
            return True                 # reset
        try:
            pids = [self.proc.pid, *children(self.proc.pid)]
        except OSError:
            return False                # (exited meanwhile: the caller sees it)
        return socket_owner(probe, pids) is not None

    def _admin_ready(self) -> bool:
        """With an admin API: wait until it answers and every worker runs (the
        listeners may accept before either does); False when poise exited instead
        (its admin port was taken, say)."""
        if self.admin is None:
            return True

        def up() -> bool:
            try:
                return self.admin.get("/healthz").status == 200
            except OSError:
                return self.proc.poll() is not None
        wait_for(up, 15, lambda: f"poise's admin API\n{self.log()}")
        if self.proc.poll() is not None:
            return False
        self.wait_workers()
        return True

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss(self) -> int:
        """Resident set size of the poise process in bytes (VmRSS)."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int = signal.SIGTERM) -> None:
        os.kill(self.pid, sig)

    def stop(self, timeout: float = 40.0) -> int:
        """SIGTERM and wait; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.returncode = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"poise did not exit within {timeout}s of SIGTERM") from None
        return self.returncode

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except (OSError, AttributeError):
            return ""

    def wait_log(self, pattern: str, timeout: float = 5.0, count: int = 1) -> None:
        """Until poise has logged ``count`` lines matching the regex ``pattern``."""
        regex = re.compile(pattern)
        wait_for(lambda: len(regex.findall(self.log())) >= count, timeout,
                 lambda: f"{count}× {pattern!r} in poise's log\n--- log:\n"
                         f"{self.log()[-3000:]}")

    # -- the control plane: config file, reload, workers ------------------------------

    def write_config(self, config: dict | str) -> None:
        """Replace the config file (a dict is written as YAML, a str as it is; a dict
        becomes :attr:`config`, the config last written)."""
        text = config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False)
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.config_path)       # (a reader never sees half a file)
        if isinstance(config, dict):
            self.config = config

    def reload(self, config: dict | str | None = None) -> AdminResponse:
        """Write ``config`` (if given), then ``POST /reload``; the admin API's answer."""
        if config is not None:
            self.write_config(config)
        return self.admin.post("/reload")

    def workers(self) -> list[dict]:
        """``GET /workers``: each worker slot as the control plane sees it."""
        r = self.admin.get("/workers")
        assert r.status == 200, r
        return r.json()["workers"]

    def wait_workers(self, timeout: float = 15.0, count: int | None = None,
                     **expected) -> list[dict]:
        """Until ``count`` worker slots (default: as many as poise started with) are
        all ``running`` and, per ``expected``, have e.g. that ``config_version`` or
        ``snapshot_versions``; the slots."""
        if count is None:
            count = self.spec[3].get("workers", 1)
            if count == "auto":
                count = len(os.sched_getaffinity(0))

        def settled():
            ws = self.workers()
            if len(ws) == count and all(
                    w["state"] == "running" and all(w.get(k) == v for k, v in expected.items())
                    for w in ws):
                return ws
            return None
        return wait_for(settled, timeout, lambda: f"{count} worker(s) running with "
                                                  f"{expected} (now {self.workers()})")

    def children(self) -> list[int]:
        """The pids of poise's child processes (its workers when ``workers`` > 1)."""
        return children(self.pid)

    def __repr__(self) -> str:
        return f"<Poise pid={self.proc.pid if self.proc else None} {LOOPBACK}:{self.port}>"


def _address(b):
    """A config backend entry from a Backend, an address string or a (that, weight) pair."""
    if isinstance(b, tuple):
        return (_address(b[0]), b[1])
    return b.address if isinstance(b, Backend) else b


class Stack:
    """Backends and poise processes started by one test (or module); stopped together.

    :meth:`close` stops poise with SIGTERM first and checks that it exited 0 and never
    logged a traceback (the issue demands one error hierarchy, never a traceback).
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.backends: list[Backend] = []
        self.proxies: list[Poise] = []

    def backend(self, name: str | None = None, **options) -> Backend:
        b = Backend(name or f"b{len(self.backends) + 1}", **options)
        self.backends.append(b)
        return b

    def restart(self, backend: Backend, **options) -> Backend:
        """Kill ``backend`` (SIGKILL) if it still runs and start a new process with the
        same name and options (``options`` override them) on the same port."""
        backend.kill()
        b = Backend(backend.name, port=backend.port, **{**backend.options, **options})
        self.backends.append(b)
        return b

    def poise(self, backends: list, **options) -> Poise:
        addrs = [_address(b) for b in backends]
        p = Poise(self.workdir, addrs, **options)
        self.proxies.append(p)
        return p

    def close(self) -> list[str]:
        """Stop everything; return problems found (exit codes, tracebacks)."""
        problems = []
        for p in self.proxies:
            try:
                code = p.returncode if p.returncode is not None else p.stop()
            except AssertionError as e:
                problems.append(str(e))
                continue
            if code != 0:
                problems.append(f"{p!r} exited with {code}:\n{p.log()[-3000:]}")
            if "Traceback" in p.log():
                problems.append(f"{p!r} logged a traceback:\n{p.log()[-3000:]}")
        for b in self.backends:
            b.stop()
        return problems


# -- controls of the h11 backend for the resilience and health-check tests -------------

def set_health(backend: Backend, ok: bool) -> None:
    """Make ``backend`` answer ``/health`` with 200 (``ok``) or 503 from now on."""
    backend._call("/_health/ok" if ok else "/_health/fail")


def set_mode(backend: Backend, **mode: object) -> None:
    """How ``backend`` answers ``/mode``: ``status=N``, ``kind="reset"|"close"|"never"``,
    or nothing (echo)."""
    from urllib.parse import urlencode
    backend._call("/_mode?" + urlencode(mode))


def served(backend: Backend) -> list[dict]:
    """The requests ``backend`` saw, without health probes and test controls."""
    return [r for r in backend.stats()["requests"]
            if r["target"] != "/health" and not r["target"].startswith("/_")]
