"""Throwaway certificates for TLS tests, minted with the ``openssl`` command-line tool
(present wherever OpenSSL is; trustme is not a project dependency yet).

``Pki(root)`` creates a CA in ``root``; ``pki.leaf(stem, cn, sans)`` signs a leaf for
server and client use. Tests skip themselves with ``needs_openssl`` where the tool is
missing.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from poise.config.tls import Certificate

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl CLI")


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


class Pki:
    """A throwaway CA in ``root`` (``ca`` is its PEM certificate) that signs leaves on
    demand."""

    def __init__(self, root: Path, name: str = "poise test CA") -> None:
        self.root = root
        self.ca = root / "ca.pem"
        openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
                "-subj", f"/CN={name}",
                "-addext", "basicConstraints=critical,CA:TRUE",
                "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=root)

    def leaf(self, stem: str, cn: str, sans: list[str], ips: list[str] = ()) -> Certificate:
        """A certificate for DNS names ``sans`` and IP addresses ``ips`` (none at all:
        the commonName ``cn`` only), valid for servers and clients, in ``stem``.pem/.key."""
        ext = self.root / f"{stem}.ext"
        lines = ["basicConstraints=CA:FALSE", "extendedKeyUsage=serverAuth,clientAuth"]
        names = [f"DNS:{n}" for n in sans] + [f"IP:{ip}" for ip in ips]
        if names:
            lines.append("subjectAltName=" + ",".join(names))
        ext.write_text("\n".join(lines) + "\n")
        openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                "-keyout", f"{stem}.key", "-out", f"{stem}.csr", "-subj", f"/CN={cn}",
                cwd=self.root)
        openssl("x509", "-req", "-in", f"{stem}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-days", "2", "-out", f"{stem}.pem",
                "-extfile", ext.name, cwd=self.root)
        return Certificate(cert=str(self.root / f"{stem}.pem"), key=str(self.root / f"{stem}.key"))
