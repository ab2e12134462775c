"""Talking to a running poise from tests: its admin API (:class:`AdminClient`), and
which of its processes holds a socket (read from /proc, for multi-worker tests)."""

from __future__ import annotations

import http.client
import json
import os
import socket
from dataclasses import dataclass


@dataclass
class AdminResponse:
    status: int
    headers: dict[str, str]     # names in lower case
    body: bytes

    def json(self):
        return json.loads(self.body)


class AdminClient:
    """A client of poise's admin API: one connection per request, the bearer token
    sent unless told otherwise (``token=None`` sends none, a str sends that one)."""

    _DEFAULT = object()

    def __init__(self, addr: tuple[str, int], token: str | None = None) -> None:
        self.addr = addr
        self.token = token

    def request(self, method: str, path: str, body: bytes | str | dict | None = None,
                token=_DEFAULT, headers: dict | None = None) -> AdminResponse:
        token = self.token if token is self._DEFAULT else token
        hdrs = dict(headers or {})
        if token is not None:
            hdrs["Authorization"] = f"Bearer {token}"
        if isinstance(body, dict):
            body = json.dumps(body)
        conn = http.client.HTTPConnection(*self.addr, timeout=10)
        try:
            conn.request(method, path, body=body, headers=hdrs)
            r = conn.getresponse()
            return AdminResponse(r.status, {k.lower(): v for k, v in r.getheaders()},
                                 r.read())
        finally:
            conn.close()

    def get(self, path: str, **kw) -> AdminResponse:
        return self.request("GET", path, **kw)

    def post(self, path: str, body=None, **kw) -> AdminResponse:
        return self.request("POST", path, body if body is not None else b"", **kw)

    def put(self, path: str, body, **kw) -> AdminResponse:
        return self.request("PUT", path, body, **kw)


def children(pid: int) -> list[int]:
    """The pids of ``pid``'s child processes."""
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def socket_owner(client: socket.socket, pids: list[int]) -> int | None:
    """Which of ``pids`` holds the server end of the TCP connection ``client`` (over
    IPv4 loopback), read from /proc: the worker that accepted it."""
    local = client.getsockname()
    peer = client.getpeername()
    want_local = f"{_hex_ip(peer[0])}:{peer[1]:04X}"
    want_remote = f"{_hex_ip(local[0])}:{local[1]:04X}"
    inode = None
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[1] == want_local and fields[2] == want_remote:
                inode = fields[9]
                break
    if inode is None:
        return None
    link = f"socket:[{inode}]"
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except FileNotFoundError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == link:
                    return pid
            except FileNotFoundError:
                continue
    return None


def listening_sockets(port: int) -> int:
    """How many sockets listen on TCP ``port`` over IPv4 (workers with SO_REUSEPORT
    have one each)."""
    with open("/proc/net/tcp") as f:
        return sum(1 for line in f.readlines()[1:]
                   if line.split()[1].endswith(f":{port:04X}") and line.split()[3] == "0A")


def _hex_ip(ip: str) -> str:
    """An IPv4 address as /proc/net/tcp writes it (little-endian hex)."""
    return "".join(f"{int(part):02X}" for part in reversed(ip.split(".")))
