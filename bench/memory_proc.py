"""What bench/memory.py reads from /proc: a process tree's memory and its TCP sockets.

- :func:`memory` sums ``/proc/PID/smaps_rollup`` over the tree (procs.process_tree):
  RSS, PSS, USS (Private_Clean + Private_Dirty) and Private_Dirty alone, in bytes.
  Only *differences* are used (before and after opening connections), so an idle
  nginx master, counted in both, cancels out.  Private_Dirty compares proxies best:
  it counts a page nginx's worker copies on write from its master (RSS does not: the
  page was resident already), and not the clean pages of a binary that turn shared
  when another process on the machine maps the same file (USS does: another
  benchmark's HAProxy makes ours lose "private" pages).
- :func:`sockets` counts the tree's ESTABLISHED TCP sockets, by matching the socket
  inodes of its file descriptors against /proc/net/tcp: those accepted on the proxy's
  port from our client (client connections) or from elsewhere, and those whose remote
  port is a backend's (upstream connections).  The benchmark checks its counts with them, so a proxy
  that quietly closed idle connections is caught, not measured as cheap.
- :func:`parked` counts poise's parked upstream connections: upstream sockets whose
  descriptors are watched by an epoll set of their own (poise's parking lot) rather
  than by the event loop's, read from ``/proc/PID/fdinfo`` (``tfd:`` lines).
"""

from __future__ import annotations

import os
import socket
import struct
from pathlib import Path

import procs

_FIELDS = {"Rss": ("rss",), "Pss": ("pss",), "Private_Clean": ("uss",),
           "Private_Dirty": ("uss", "dirty")}


def memory(root_pid: int) -> dict[str, int]:
    """``{"rss", "pss", "uss", "dirty", "processes"}`` of the tree under ``root_pid``
    (bytes; ``dirty``: Private_Dirty, see the module docstring)."""
    out = {"rss": 0, "pss": 0, "uss": 0, "dirty": 0, "processes": 0}
    for pid in procs.process_tree(root_pid):
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue    # (exited meanwhile)
        out["processes"] += 1
        for line in text.splitlines():
            key, _, rest = line.partition(":")
            for name in _FIELDS.get(key, ()):
                out[name] += int(rest.split()[0]) * 1024
    return out


def _fd_links(pid: int) -> dict[int, str]:
    """Process ``pid``'s open descriptors and what they point to (empty if it exited)."""
    fd_dir = f"/proc/{pid}/fd"
    links: dict[int, str] = {}
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return links
    for name in names:
        try:
            links[int(name)] = os.readlink(f"{fd_dir}/{name}")
        except OSError:
            continue
    return links


def _socket_inodes(root_pid: int) -> set[int]:
    inodes = set()
    for pid in procs.process_tree(root_pid):
        inodes |= {int(v[8:-1]) for v in _fd_links(pid).values() if v.startswith("socket:[")}
    return inodes


def peer_keys(socks: list[socket.socket]) -> set[str]:
    """Our client sockets' addresses as /proc/net/tcp prints them (for :func:`sockets`)."""
    keys = set()
    for s in socks:
        ip, port = s.getsockname()[:2]
        word = struct.unpack("<I", socket.inet_aton(ip))[0]    # (host byte order)
        keys.add(f"{word:08X}:{port:04X}")
    return keys


def _established(inodes: set[int]) -> dict[int, tuple[int, str, int]]:
    """``{inode: (local port, remote address as printed, remote port)}`` of the
    established TCP sockets among ``inodes``.  /proc/net/tcp is not a snapshot: read
    while other programs open and close connections, a line can come twice or not at
    all, hence by inode, and the union of two reads (the sockets counted are idle)."""
    found: dict[int, tuple[int, str, int]] = {}
    for _ in range(2):
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            try:
                with open(table) as f:
                    next(f)
                    for line in f:
                        # sl local rem st tx:rx tr:when retrnsmt uid timeout inode
                        parts = line.split()
                        inode = int(parts[9])
                        if parts[3] == "01" and inode in inodes:
                            found[inode] = (int(parts[1].rsplit(":", 1)[1], 16), parts[2],
                                            int(parts[2].rsplit(":", 1)[1], 16))
            except OSError:
                continue
    return found


def sockets(root_pid: int, listen_port: int, backend_ports: list[int],
            ours: set[str] = frozenset()) -> dict[str, int]:
    """``{"clients", "foreign", "upstreams"}``: the tree's established connections
    accepted on ``listen_port`` from our client sockets (``ours``, see peer_keys),
    those accepted from anything else (another program on the machine that found the
    port: counted so that a sample they disturbed can be told), and those it opened to
    any of ``backend_ports``."""
    backends = set(backend_ports)
    clients = foreign = upstreams = 0
    for local, remote, remote_port in _established(_socket_inodes(root_pid)).values():
        if local == listen_port:
            if remote in ours:
                clients += 1
            else:
                foreign += 1
        elif remote_port in backends:
            upstreams += 1
    return {"clients": clients, "foreign": foreign, "upstreams": upstreams}


def parked(root_pid: int, backend_ports: list[int]) -> int:
    """Upstream connections of the tree (established, to one of ``backend_ports``)
    parked by poise: registered in an epoll set that watches nothing else (its
    parking lot's; the event loop's also watches listening and client sockets)."""
    backends = set(backend_ports)
    total = 0
    for pid in procs.process_tree(root_pid):
        links = _fd_links(pid)
        inodes = {int(v[8:-1]) for v in links.values() if v.startswith("socket:[")}
        upstream = {inode for inode, (_, _, port) in _established(inodes).items()
                    if port in backends}
        upstream_fds = {fd for fd, v in links.items()
                        if v.startswith("socket:[") and int(v[8:-1]) in upstream}
        for fd, v in links.items():
            if v != "anon_inode:[eventpoll]":
                continue
            try:
                info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
            except OSError:
                continue
            targets = {int(line.split()[1]) for line in info.splitlines()
                       if line.startswith("tfd:")}
            if targets and targets <= upstream_fds:
                total += len(targets)
    return total
