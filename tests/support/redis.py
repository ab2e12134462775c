"""A real Redis (Debian's ``redis-server``) for the global rate-limit tests: one server
on a free loopback port, no persistence, its files in a temp dir.

``redis_server`` is a session-scoped fixture; a test module uses it with
``redis_server = tests.support.redis.redis_server``.  A test that stops the server must
start it again (:meth:`Redis.start` keeps the port).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from tests.support.procs import LOOPBACK, free_port, terminate
from tests.support.waiting import wait_for


class Redis:
    """``redis-server`` on ``port`` (``url``: database 0); :meth:`stop` and :meth:`start`
    again keep the port (the data is lost: nothing is saved)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.port = free_port()
        self.url = f"redis://{LOOPBACK}:{self.port}/0"
        self.log_path = self.workdir / "redis.log"
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        args = ["redis-server", "--port", str(self.port), "--bind", LOOPBACK,
                "--save", "", "--appendonly", "no", "--dir", str(self.workdir),
                "--logfile", str(self.log_path)]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT)

        def up() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited:\n{self.log()[-3000:]}")
            try:
                return self.command("PING") == b"+PONG"
            except OSError:
                return False
        wait_for(up, 10, "redis-server answering", step=0.02)

    def stop(self) -> None:
        terminate(self.proc)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def command(self, *args: str | bytes) -> bytes:
        """One command in RESP over a fresh connection; a bulk answer's bytes, else the
        answer's first line (``+PONG``, ``:1``, ``$-1``...)."""
        parts = [a.encode() if isinstance(a, str) else a for a in args]
        packed = b"*%d\r\n" % len(parts) + b"".join(
            b"$%d\r\n%b\r\n" % (len(p), p) for p in parts)
        with socket.create_connection((LOOPBACK, self.port), timeout=2) as s:
            s.sendall(packed)
            data = b""
            while True:
                chunk = s.recv(65536)
                data += chunk
                first, sep, rest = data.partition(b"\r\n")
                if not chunk or (sep and not (first.startswith(b"$") and first != b"$-1")):
                    return first
                if sep and len(rest) >= int(first[1:]) + 2:
                    return rest[:int(first[1:])]

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def __repr__(self) -> str:
        return f"<Redis {self.url} {'running' if self.running() else 'stopped'}>"


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (Debian: redis-server; see .ci/apt-deps)")
    server = Redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()
