"""A real DNS server (Debian's ``dnsmasq``) for the dns discovery tests: authoritative-ish
for ``poise.test`` on a free loopback port, records from files in a temp dir.

* Addresses (A/AAAA) live in an ``--addn-hosts`` file: :meth:`Dnsmasq.set_host` rewrites
  it and sends SIGHUP (dnsmasq re-reads it without restarting).
* SRV records are ``srv-host=`` lines of a ``--conf-file``, which dnsmasq reads only at
  start: :meth:`Dnsmasq.set_srv` rewrites it and restarts dnsmasq on the same port.
* Names under ``poise.test`` that have no record get NXDOMAIN (``--local``); any other
  name is REFUSED (no upstream servers).  Every record has a TTL of 1 s.

Both methods return once dnsmasq answers with the new records.  ``dnsmasq_server`` is a
session-scoped fixture (one server per test session; tests use distinct names); a test
that stops its server makes its own :class:`Dnsmasq` instead.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rcode
import pytest

from tests.support.procs import LOOPBACK, free_port, terminate
from tests.support.waiting import wait_for

DOMAIN = "poise.test"
DNSMASQ = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"


class Dnsmasq:
    """``dnsmasq`` on ``LOOPBACK:port`` with its files in ``workdir``."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.hosts_path = self.workdir / "hosts"
        self.conf_path = self.workdir / "srv.conf"
        self.log_path = self.workdir / "dnsmasq.log"
        self.hosts: dict[str, list[str]] = {}       # name → addresses
        self.srv: dict[str, list[tuple[str, int, int, int]]] = {}  # name → (target, port,
        #                                                              priority, weight)
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self._write()
        self.start()

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    # -- the process -------------------------------------------------------------------

    def start(self) -> None:
        """Start dnsmasq (on a new free port the first time, on the same one after)."""
        fixed = self.port != 0
        for _ in range(1 if fixed else 5):  # a free port is only free a moment: retry
            if not fixed:
                self.port = _free_udp_and_tcp_port()
            args = [DNSMASQ, "--keep-in-foreground", f"--port={self.port}",
                    f"--listen-address={LOOPBACK}", "--bind-interfaces", "--no-resolv",
                    "--no-hosts", f"--addn-hosts={self.hosts_path}",
                    f"--conf-file={self.conf_path}", f"--local=/{DOMAIN}/",
                    "--local-ttl=1", "--user=root", "--group=root", "--pid-file=",
                    "--log-facility=-"]
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
            try:
                wait_for(self._answers, 10, "dnsmasq answering", step=0.02)
                return
            except RuntimeError as e:   # it exited (the port was taken?)
                error = e
        raise error

    def stop(self) -> None:
        terminate(self.proc)

    def _answers(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"dnsmasq exited:\n{self.log_path.read_text()[-3000:]}")
        try:
            self.query(f"ping.{DOMAIN}", "A", timeout=0.2)
        except (OSError, dns.exception.Timeout):
            return False
        return True

    # -- records -----------------------------------------------------------------------

    def set_host(self, name: str, *addresses: str) -> None:
        """Give ``name`` exactly these A/AAAA ``addresses`` (none: remove it)."""
        if addresses:
            self.hosts[name] = list(addresses)
        else:
            self.hosts.pop(name, None)
        self._write()
        self.proc.send_signal(signal.SIGHUP)
        wanted = sorted(addresses)
        wait_for(lambda: self.addresses(name) == wanted, 10,
                 lambda: f"dnsmasq serving {name} = {wanted} (has {self.addresses(name)})",
                 step=0.02)

    def set_srv(self, name: str, records: list[tuple[str, int, int, int]]) -> None:
        """Give ``name`` exactly these SRV ``(target, port, priority, weight)`` records
        (none: remove it); restarts dnsmasq."""
        if records:
            self.srv[name] = list(records)
        else:
            self.srv.pop(name, None)
        self._write()
        self.stop()
        self.start()

    def _write(self) -> None:
        hosts = "".join(f"{ip} {name}\n" for name, ips in self.hosts.items() for ip in ips)
        conf = "".join(f"srv-host={name},{target},{port},{priority},{weight}\n"
                       for name, records in self.srv.items()
                       for target, port, priority, weight in records)
        for path, text in ((self.hosts_path, hosts), (self.conf_path, conf)):
            tmp = path.with_suffix(".tmp")
            tmp.write_text(text)
            tmp.replace(path)       # never half a file for dnsmasq to read

    # -- asking it ---------------------------------------------------------------------

    def query(self, name: str, rdtype: str, timeout: float = 2.0) -> dns.message.Message:
        return dns.query.udp(dns.message.make_query(name, rdtype), LOOPBACK, timeout,
                             port=self.port)

    def addresses(self, name: str) -> list[str]:
        """The A and AAAA addresses dnsmasq serves for ``name`` now, sorted."""
        found = []
        for rdtype in ("A", "AAAA"):
            for rrset in self.query(name, rdtype).answer:
                found += [r.address for r in rrset if hasattr(r, "address")]
        return sorted(found)


def _free_udp_and_tcp_port() -> int:
    """A loopback port free for both TCP and UDP a moment ago (dnsmasq binds both)."""
    while True:
        port = free_port()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.bind((LOOPBACK, port))
            except OSError:
                continue
        return port


@pytest.fixture(scope="session")
def dnsmasq_server(tmp_path_factory):
    if not Path(DNSMASQ).exists():
        pytest.skip("dnsmasq is not installed (Debian: dnsmasq; see .ci/apt-deps)")
    server = Dnsmasq(tmp_path_factory.mktemp("dnsmasq"))
    yield server
    server.stop()

