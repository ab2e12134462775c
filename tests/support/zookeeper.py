"""A real ZooKeeper server for tests (Debian's ``zookeeper`` package), standalone on a
free loopback port with a temp data dir, plus the four-letter words tests ask it.

``zookeeper_server`` is a session-scoped fixture (the JVM takes seconds to start: once
per test session); request it from a test module.  :meth:`ZooKeeper.stop` and
:meth:`ZooKeeper.start` restart it on the same port and data (for failure tests).
:func:`watching_sessions` counts who watches a znode: one session per source, whatever
the number of workers.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.support.procs import free_port, terminate
from tests.support.waiting import wait_for

JAR = Path("/usr/share/java/zookeeper.jar")     # its manifest names its dependencies
MAIN = "org.apache.zookeeper.server.ZooKeeperServerMain"
TICK_MS = 500       # sessions from 2 ticks (1 s) to 20 ticks (10 s)


class ZooKeeper:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.hosts = f"127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        (root / "data").mkdir()
        (root / "zoo.cfg").write_text(
            f"tickTime={TICK_MS}\n"
            f"dataDir={root / 'data'}\n"
            f"clientPort={self.port}\n"
            "clientPortAddress=127.0.0.1\n"
            "admin.enableServer=false\n"
            "4lw.commands.whitelist=*\n"
            "maxClientCnxns=0\n")

    def start(self, timeout: float = 60.0) -> None:
        log = open(self.root / "server.log", "ab")
        java = shutil.which("java") or "java"
        # A small, quickly started JVM: tests need neither throughput nor a big heap.
        self.proc = subprocess.Popen(
            [java, "-Xmx256m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
             "-Dzookeeper.jmx.log4j.disable=true", "-cp", str(JAR), MAIN,
             str(self.root / "zoo.cfg")],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        log.close()

        def up() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"zookeeper exited ({self.proc.returncode}): "
                                     f"{(self.root / 'server.log').read_text()[-2000:]}")
            try:
                return self.four_letters("ruok") == "imok"
            except OSError:
                return False

        wait_for(up, timeout, "zookeeper answering ruok", step=0.1)

    def stop(self) -> None:
        terminate(self.proc)
        self.proc = None

    def four_letters(self, word: str, timeout: float = 5.0) -> str:
        """The server's answer to a four-letter word (``ruok``, ``wchc``, ``srvr`` ...)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
            s.sendall(word.encode())
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()


def watches_by_path(zk: ZooKeeper) -> dict[str, set[str]]:
    """znode path → the session ids (``0x...``) watching it (the ``wchp`` word)."""
    watches: dict[str, set[str]] = {}
    path = None
    for line in zk.four_letters("wchp").splitlines():
        if not line.strip():
            continue
        if line[0].isspace():
            watches.setdefault(path, set()).add(line.strip())
        else:
            path = line.strip()
    return watches


def watches_by_session(zk: ZooKeeper) -> dict[str, set[str]]:
    """Session id → the paths it watches (the ``wchc`` word)."""
    watches: dict[str, set[str]] = {}
    session = None
    for line in zk.four_letters("wchc").splitlines():
        if not line.strip():
            continue
        if line[0].isspace():
            watches.setdefault(session, set()).add(line.strip())
        else:
            session = line.strip()
    return watches


def watching_sessions(zk: ZooKeeper, path: str) -> set[str]:
    """The sessions watching ``path``: a zookeeper source keeps exactly one (its children
    watch), whatever the number of poise workers."""
    return watches_by_path(zk).get(path, set())


@pytest.fixture(scope="session")
def zookeeper_server():
    if not JAR.exists():
        pytest.skip("ZooKeeper is not installed (Debian package zookeeper: .ci/apt-deps)")
    root = Path(tempfile.mkdtemp(prefix="poise-zk-"))
    zk = ZooKeeper(root)
    try:
        zk.start()
        yield zk
    finally:
        zk.stop()
        if os.environ.get("POISE_KEEP_ZK_LOGS") is None:
            shutil.rmtree(root, ignore_errors=True)
