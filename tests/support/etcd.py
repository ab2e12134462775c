"""A real etcd (Debian's ``etcd-server``) for the discovery tests: one member on two free
loopback ports with a temp data dir, driven through its HTTP/JSON gateway.

``etcd_server`` is a session-scoped fixture (the server starts once per test session);
a test module uses it with ``etcd_server = tests.support.etcd.etcd_server``.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest

from tests.support.procs import LOOPBACK, free_port, terminate
from tests.support.waiting import wait_for


def b64(text: str | bytes) -> str:
    return base64.b64encode(text.encode() if isinstance(text, str) else text).decode()


class Etcd:
    """``etcd`` on ``client_port``/``peer_port`` with ``data_dir``; :meth:`stop` and
    :meth:`start` again keep ports and data."""

    def __init__(self, data_dir: Path, name: str = "poise-test", *args: str) -> None:
        self.data_dir = Path(data_dir)
        self.name = name
        self.extra_args = list(args)
        self.client_port, self.peer_port = free_port(), free_port()
        self.url = f"http://{LOOPBACK}:{self.client_port}"
        self.proc: subprocess.Popen | None = None
        self.log_path = self.data_dir.parent / f"{name}.log"
        self.start()

    def start(self) -> None:
        peer = f"http://{LOOPBACK}:{self.peer_port}"
        args = ["etcd", "--name", self.name, "--data-dir", str(self.data_dir),
                "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"{self.name}={peer}",
                "--log-level", "warn", "--logger", "zap", *self.extra_args]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)

        def up() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited:\n{self.log_path.read_text()[-3000:]}")
            try:
                return self.post("/v3/maintenance/status", {}).get("leader") is not None
            except OSError:
                return False
        wait_for(up, 20, "etcd answering", step=0.05)

    def stop(self) -> None:
        terminate(self.proc)

    # -- the gateway -------------------------------------------------------------------

    def post(self, path: str, payload: dict, token: str | None = None) -> dict:
        """One request; its JSON answer (an error answer raises HTTPError)."""
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = token
        req = urllib.request.Request(self.url + path, json.dumps(payload).encode(), headers)
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read().split(b"\n", 1)[0])

    def put(self, key: str, value: object, *, lease: int | None = None,
            token: str | None = None) -> int:
        """Put ``value`` (a str as it is, anything else as JSON); the new revision."""
        text = value if isinstance(value, str) else json.dumps(value)
        payload = {"key": b64(key), "value": b64(text)}
        if lease is not None:
            payload["lease"] = str(lease)
        return int(self.post("/v3/kv/put", payload, token)["header"]["revision"])

    def delete(self, key: str, token: str | None = None) -> int:
        answer = self.post("/v3/kv/deleterange", {"key": b64(key)}, token)
        return int(answer["header"]["revision"])

    def get(self, key: str, token: str | None = None) -> dict | None:
        """The key's kv (``value`` decoded, ``lease`` an int) or None."""
        kvs = self.post("/v3/kv/range", {"key": b64(key)}, token).get("kvs") or []
        if not kvs:
            return None
        kv = kvs[0]
        return {"value": base64.b64decode(kv.get("value", "")).decode(),
                "lease": int(kv.get("lease", 0))}

    def revision(self) -> int:
        return int(self.post("/v3/kv/range", {"key": b64("\0")})["header"]["revision"])

    def enable_auth(self, password: str) -> None:
        """A ``root`` user (password ``password``) with the ``root`` role, then auth on."""
        self.post("/v3/auth/user/add", {"name": "root", "password": password})
        self.post("/v3/auth/role/add", {"name": "root"})
        self.post("/v3/auth/user/grant", {"user": "root", "role": "root"})
        self.post("/v3/auth/enable", {})

    def token(self, name: str, password: str) -> str:
        return self.post("/v3/auth/authenticate", {"name": name, "password": password})["token"]

    def compact(self, revision: int | None = None) -> None:
        self.post("/v3/kv/compaction", {"revision": str(revision or self.revision()),
                                        "physical": True})


def connections_to(port: int) -> int:
    """How many of this process's TCP connections to loopback ``port`` are open
    (established, or closing but not yet closed on this side)."""
    import os
    mine = {_readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")}
    count = 0
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            remote_port = int(fields[2].split(":")[1], 16)
            state, inode = fields[3], fields[9]
            # 01 established, 08 close-wait (the peer closed; we have not)
            if remote_port == port and state in ("01", "08") and f"socket:[{inode}]" in mine:
                count += 1
    return count


def _readlink(path: str) -> str:
    import os
    try:
        return os.readlink(path)
    except OSError:
        return ""


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory):
    if shutil.which("etcd") is None:
        pytest.skip("etcd is not installed (Debian: etcd-server; see .ci/apt-deps)")
    server = Etcd(tmp_path_factory.mktemp("etcd") / "data")
    yield server
    server.stop()
