"""How many worker processes ``workers: auto`` means, and the open-files arithmetic
behind it (shared with :mod:`poise.control.limits`, which checks it at start).

Every client connection a worker holds is one file, and a proxied request or relayed
connection holds a second one to its backend.  A worker serving its share of the
listeners' ``max_connections`` therefore needs up to twice that many files, and one
process may open at most RLIMIT_NOFILE of them (20,000 on some boxes): ``auto`` adds
workers until that share fits.
"""

from __future__ import annotations

import math
import resource
from collections.abc import Iterable
from typing import Protocol

# The share of a process's open-files limit planned for client and backend connections;
# the rest is for listening sockets, spare pooled connections, health checks, log files
# and the admin API.
FILES_SHARE = 0.9
MAX_WORKERS = 256


class _Capped(Protocol):
    max_connections: int | None


def nofile_hard() -> int | None:
    """The hard open-files limit (RLIMIT_NOFILE), which ``poise run`` raises the soft one
    to at start; None when unlimited."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return None if hard == resource.RLIM_INFINITY else hard


def connection_cap(listeners: Iterable[_Capped]) -> int | None:
    """The client connections the listeners allow at once, all workers together: the sum
    of the ``max_connections`` set (None when no listener sets one)."""
    caps = [listener.max_connections for listener in listeners
            if listener.max_connections is not None]
    return sum(caps) if caps else None


def files_per_worker(max_connections: int, workers: int) -> int:
    """Files one of ``workers`` needs for its share of ``max_connections`` client
    connections and as many backend connections (SO_REUSEPORT spreads connections
    evenly enough that the share is what matters)."""
    return math.ceil(2 * max_connections / workers)


def auto_workers(cpus: int, max_connections: int | None, nofile: int | None) -> int:
    """What ``workers: auto`` means: one worker per CPU, or more when each one's share of
    ``max_connections`` (None: no cap, nothing to plan) plus as many backend connections
    would not fit in FILES_SHARE of ``nofile`` files (None: no limit).  At most
    MAX_WORKERS (the start then warns that the limit is too low)."""
    workers = max(1, cpus)
    if max_connections and nofile:
        workers = max(workers, math.ceil(2 * max_connections / (FILES_SHARE * nofile)))
    return min(workers, MAX_WORKERS)
