"""Open-file limits at start: raise RLIMIT_NOFILE's soft limit to the hard one, and say
whether the listeners' connection limits fit in it.

Every client connection, backend connection, listening socket and log file is a file
descriptor, and a process may hold at most the *soft* RLIMIT_NOFILE of them; above that,
``accept`` and ``connect`` fail with EMFILE.  Distributions often start services with a
soft limit of 1,024 and a hard limit far higher, so (as nginx's
``worker_rlimit_nofile`` and HAProxy do) poise raises the soft limit to the hard one
(which needs no privilege) before it opens anything.  The process ``poise run`` starts
does it once; worker processes inherit the raised limit (rlimits survive fork and exec).

:func:`apply` logs one INFO line with the limit before and after, and a WARNING naming
the numbers when the listeners' ``max_connections`` (all workers together) plus as many
backend connections cannot fit in :data:`~poise.config.workers.FILES_SHARE` of it per
worker (see :mod:`poise.config.workers`, which sizes ``workers: auto`` by the same rule).
"""

from __future__ import annotations

import logging
import os
import resource
from dataclasses import dataclass

from poise.config.model import Config
from poise.config.workers import (
    FILES_SHARE,
    auto_workers,
    connection_cap,
    files_per_worker,
    nofile_hard,
)

log = logging.getLogger("poise")
# The most files a process may ever open (fs.nr_open): the target when the hard limit is
# "unlimited", which setrlimit refuses for RLIMIT_NOFILE.
NR_OPEN = "/proc/sys/fs/nr_open"
NR_OPEN_DEFAULT = 1024 * 1024


@dataclass(frozen=True)
class Raised:
    """What :func:`raise_nofile` did: the soft limit ``before`` and ``after`` it, the
    ``hard`` limit (None: unlimited) and ``error`` when the raise was refused."""
    before: int
    after: int
    hard: int | None
    error: str | None = None

    def describe(self) -> str:
        """The INFO line's text."""
        hard = "unlimited" if self.hard is None else f"{self.hard:,}"
        if self.error is not None:
            return (f"open files limit: {self.before:,} (hard {hard}); raising it failed: "
                    f"{self.error}")
        if self.after == self.before:
            return f"open files limit: {self.after:,} per process (already the hard limit)"
        return (f"open files limit raised from {self.before:,} to {self.after:,} per process "
                f"(the hard limit)")


def _nr_open() -> int:
    try:
        with open(NR_OPEN) as f:
            return int(f.read())
    except (OSError, ValueError):
        return NR_OPEN_DEFAULT


def raise_nofile(getrlimit=resource.getrlimit, setrlimit=resource.setrlimit,
                 nr_open=_nr_open) -> Raised:
    """Raise the soft RLIMIT_NOFILE to the hard one (to fs.nr_open when the hard one is
    unlimited); never lowers it.  The functions are parameters so that tests can fake
    them."""
    soft, hard = getrlimit(resource.RLIMIT_NOFILE)
    shown_hard = None if hard == resource.RLIM_INFINITY else hard
    target = nr_open() if shown_hard is None else hard
    if soft == resource.RLIM_INFINITY or soft >= target:
        return Raised(soft, soft, shown_hard)
    try:
        setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError) as e:
        return Raised(soft, soft, shown_hard, str(e))
    return Raised(soft, target, shown_hard)


def budget_problem(max_connections: int | None, workers: int, nofile: int,
                   cpus: int) -> str | None:
    """The WARNING's text when ``max_connections`` client connections (all workers
    together; None: no cap) plus as many backend connections do not fit in FILES_SHARE
    of ``nofile`` files for each of ``workers``; None when they fit."""
    if not max_connections:
        return None
    needed = files_per_worker(max_connections, workers)
    budget = int(FILES_SHARE * nofile)
    if needed <= budget:
        return None
    fits = auto_workers(cpus, max_connections, nofile)
    per = "per worker" if workers > 1 else "in its one process"
    return (f"listeners allow {max_connections:,} client connections (max_connections), "
            f"which with as many backend connections need about {needed:,} files {per} "
            f"with workers: {workers}, more than {FILES_SHARE:.0%} of the open files limit "
            f"of {nofile:,} ({budget:,}); raise the limit (ulimit -n, systemd "
            f"LimitNOFILE=) or run {fits} workers (workers: auto does)")


def apply(config: Config, cpus: int | None = None) -> Raised:
    """At start, in the process ``poise run`` started (before it opens any socket): raise
    the limit, log it, and warn if ``config``'s connection limits do not fit in it
    (``cpus``: default, the CPUs this process may run on)."""
    raised = raise_nofile()
    log.info("%s", raised.describe())
    problem = budget_problem(connection_cap(config.listeners), config.workers, raised.after,
                             cpus if cpus is not None else len(os.sched_getaffinity(0)))
    if problem is not None:
        log.warning("open files: %s", problem)
    return raised


def check_warning(config: Config, cpus: int | None = None) -> str | None:
    """For ``poise check``: the WARNING :func:`apply` would log once ``poise run`` has
    raised the soft limit to the current hard one (None: fits, or no limit)."""
    hard = nofile_hard()
    if hard is None:
        return None
    return budget_problem(connection_cap(config.listeners), config.workers, hard,
                          cpus if cpus is not None else len(os.sched_getaffinity(0)))
