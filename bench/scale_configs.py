"""Configs, processes and /proc readings of bench/scale.py.

- poise: bench/templates/poise.yaml with ``workers: auto``, the listener's
  ``max_connections`` set to the connections the bench opens (plus 1%) and a long
  ``client_idle_timeout``: ``auto`` then runs as many workers as the open-files limit
  needs (poise/config/workers.py).
- HAProxy ≥ 2.5 has no ``nbproc``, and one process cannot hold 50,000 sockets under a
  20,000-file limit (nbthread shares the process's limit), so the bench starts as many
  independent ``haproxy -db`` processes as poise has workers, each ``nbthread 1``,
  binding the same port (HAProxy sets SO_REUSEPORT on its listeners by default on
  Linux, so the kernel spreads connections over them as over poise's workers), each
  with ``maxconn`` its share of the connections plus 10%, capped at what its file limit
  allows.
"""

from __future__ import annotations

import math
import os
import resource
import subprocess
from pathlib import Path

import configs
import procs

# Open client connections a poise listener may hold beyond those the bench opens (the
# readiness probe, reconnects after an error).
CAP_SLACK = 0.01
# Idle connections must outlive the whole run (ramp, measurement, idle probe).
IDLE_TIMEOUT = "10m"
HAPROXY = """\
# HAProxy under bench/scale.py: one of {count} processes binding the same port
# (SO_REUSEPORT), each one thread.
global
    nbthread 1
    maxconn {maxconn}

defaults
    mode http
    maxconn {maxconn}
    http-reuse always
    option http-keep-alive
    timeout connect 5s
    timeout client {idle}
    timeout server 30s
    timeout http-keep-alive {idle}

frontend web
    bind 127.0.0.1:{port}
    default_backend app

backend app
    balance roundrobin
{servers}
"""


class Service(procs.Service):
    """procs.Service whose processes get RLIMIT_NOFILE = ``nofile`` (soft and hard), the
    per-process file limit both proxies are held to."""

    def __init__(self, name: str, argv: list[str], log_path: Path, nofile: int) -> None:
        super().__init__(name, argv, log_path)
        self.nofile = nofile

    def start(self) -> None:
        nofile = self.nofile
        try:
            with open(self.log_path, "wb") as out:
                self.proc = subprocess.Popen(
                    self.argv, stdin=subprocess.DEVNULL, stdout=out,
                    stderr=subprocess.STDOUT, start_new_session=True,
                    preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE,
                                                          (nofile, nofile)))
        except OSError as exc:
            raise procs.StartError(f"{self.name}: cannot run {self.argv[0]!r}: {exc}") \
                from exc


def poise_cap(connections: int) -> int:
    """The listener's max_connections for ``connections`` client connections."""
    return connections + math.ceil(CAP_SLACK * connections)


def poise_argv(root: Path, port: int, backends: list[int], cmd: str,
               connections: int) -> list[str]:
    """poise with ``workers: auto`` sized by its listener's max_connections."""
    extra = (f"    max_connections: {poise_cap(connections)}\n"
             f"    client_idle_timeout: {IDLE_TIMEOUT}\n")
    return configs.poise(root, port, backends, cmd, workers="auto", tag="-scale",
                         listener_extra=extra)


def haproxy_maxconn(connections: int, count: int, nofile: int) -> int:
    """Each of ``count`` HAProxy processes' maxconn: its share plus 10%, at most what
    ``nofile`` files allow (two per proxied connection, and some to spare)."""
    return min(math.ceil(1.1 * connections / count), (nofile - 100) // 2)


def haproxy_config(root: Path, port: int, backends: list[int], count: int,
                   maxconn: int) -> Path:
    servers = "\n".join(f"    server b{i} 127.0.0.1:{p}" for i, p in enumerate(backends, 1))
    path = root / "haproxy-scale.cfg"
    path.write_text(HAPROXY.format(count=count, maxconn=maxconn, idle=IDLE_TIMEOUT,
                                   port=port, servers=servers))
    return path


# ---------------------------------------------------------------- /proc readings


def tree_pids(services: list[procs.Service]) -> list[int]:
    """Every live process of the services (roots and descendants)."""
    pids: list[int] = []
    for svc in services:
        if svc.proc is not None:
            pids.extend(procs.process_tree(svc.proc.pid))
    return pids


def _status_kib(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _sockets(pid: int) -> int:
    count = 0
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                    count += 1
            except OSError:
                pass
    except OSError:
        pass
    return count


def memory(services: list[procs.Service], sockets: bool = False) -> dict:
    """RSS and PSS (MiB) summed over every process of ``services``, how many processes,
    and with ``sockets`` how many sockets they hold.  PSS shares each shared page among
    the processes mapping it, so it does not count a library or a forked parent's pages
    once per process as summed RSS does."""
    pids = tree_pids(services)
    out = {"processes": len(pids),
           "rss_mib": sum(_status_kib(p, "VmRSS") for p in pids) / 1024,
           "pss_mib": sum(_pss_kib(p) for p in pids) / 1024}
    if sockets:
        out["sockets"] = sum(_sockets(p) for p in pids)
    return out


def cpu_seconds(services: list[procs.Service]) -> float:
    return sum(svc.cpu_seconds() for svc in services)
