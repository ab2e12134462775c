"""Configs, certificates and probes for bench/tcp.py (L4 relay and TLS termination).

Every proxy gets the same one backend address. HAProxy and nginx serve both cases
from one process (an L4 listener and a TLS-terminating HTTP listener); poise runs one
process per case, so that a poise build without one of them still measures the other.
"""

from __future__ import annotations

import http.client
import os
import re
import shlex
import subprocess
import time
from pathlib import Path

import configs
import procs

MIB = 1024 * 1024
BIG_MIB = 64          # GET /big: a file of this many MiB, served with sendfile
UPLOAD_MIB = 1        # POST /upload: a body of this many MiB, discarded by the backend
STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")


# ---------------------------------------------------------------- backend


def make_big_file(root: Path) -> Path:
    """BIG_MIB MiB of non-zero bytes, world-readable (the nginx worker is unprivileged)."""
    path = root / "big.bin"
    chunk = bytes(range(256)) * 4096  # 1 MiB
    with open(path, "wb") as f:
        for _ in range(BIG_MIB):
            f.write(chunk)
    os.chmod(path, 0o644)
    return path


def backend_nginx(root: Path, port: int) -> list[str]:
    """The backend: one nginx worker; `/` 64 bytes, `/big` BIG_MIB MiB, `POST /upload`
    discards any body."""
    prefix = configs.nginx_prefix(root, "backend")
    conf = configs.render("tcp-backend-nginx.conf", prefix / "nginx.conf", prefix=prefix,
                          port=port, small_body=configs.SMALL_BODY.replace("\n", "\\n"),
                          big_file=make_big_file(root))
    return configs.nginx_command(prefix, conf)


def upload_script(root: Path) -> Path:
    """A wrk Lua script that POSTs UPLOAD_MIB MiB to /upload on every request."""
    path = root / "upload.lua"
    path.write_text('wrk.method = "POST"\n'
                    'wrk.path = "/upload"\n'
                    f'wrk.body = string.rep("x", {UPLOAD_MIB * MIB})\n'
                    'wrk.headers["Content-Type"] = "application/octet-stream"\n')
    return path


# ---------------------------------------------------------------- certificates


def mint_certificate(root: Path, key_type: str) -> dict[str, Path]:
    """A self-signed certificate for localhost and 127.0.0.1 (``ec``: P-256 ECDSA,
    ``rsa``: RSA 2048), minted with the openssl CLI. Returns the paths of cert, key and
    pem (cert + key in one file, for HAProxy)."""
    cert, key, pem = root / "cert.pem", root / "key.pem", root / "cert+key.pem"
    newkey = (["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"] if key_type == "ec"
              else ["-newkey", "rsa:2048"])
    argv = ["openssl", "req", "-x509", *newkey, "-nodes", "-sha256", "-days", "7",
            "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"!! openssl req failed:\n{proc.stderr}")
    pem.write_text(cert.read_text() + key.read_text())
    for p in (cert, key, pem):
        os.chmod(p, 0o644)
    return {"cert": cert, "key": key, "pem": pem}


def tls_parameters(port: int) -> dict:
    """What `openssl s_client` (OpenSSL's default client offer, as wrk's) negotiates
    with 127.0.0.1:port: protocol, cipher suite, key exchange group, signature."""
    argv = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername",
            "localhost", "-brief"]
    try:
        proc = subprocess.run(argv, input="", capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        return {"error": "openssl s_client timed out"}
    text = proc.stdout + proc.stderr
    fields = {"protocol": r"Protocol version: (\S+)", "cipher": r"Ciphersuite: (\S+)",
              "group": r"(?:Server Temp Key|Negotiated TLS1\.3 group): ([^\n]+)",
              "signature": r"Signature type: (\S+)"}
    out = {k: (m.group(1).strip() if (m := re.search(rx, text)) else None)
           for k, rx in fields.items()}
    if out["protocol"] is None:
        out["error"] = text.strip()[-500:]
    return out


# ---------------------------------------------------------------- proxies


def haproxy(root: Path, l4_port: int, tls_port: int, backend: int,
            certs: dict[str, Path]) -> list[str]:
    """HAProxy, one thread: `mode tcp` on l4_port, `bind ... ssl crt` (mode http,
    http-reuse always) on tls_port."""
    conf = configs.render("tcp-haproxy.cfg", root / "tcp-haproxy.cfg", l4_port=l4_port,
                          tls_port=tls_port, backend=backend, pem=certs["pem"])
    return ["haproxy", "-f", str(conf), "-db"]


def nginx_proxy(root: Path, l4_port: int, tls_port: int, backend: int,
                certs: dict[str, Path]) -> list[str]:
    """nginx, one worker: `stream {}` on l4_port, `listen ... ssl` proxying with upstream
    keep-alive on tls_port (the stream module is loaded when it is a dynamic module)."""
    prefix = configs.nginx_prefix(root, "nginx-proxy")
    load = f"load_module {STREAM_MODULE};" if STREAM_MODULE.exists() else ""
    conf = configs.render("tcp-nginx.conf", prefix / "nginx.conf", prefix=prefix,
                          load_module=load, l4_port=l4_port, tls_port=tls_port,
                          backend=backend, cert=certs["cert"], key=certs["key"])
    return configs.nginx_command(prefix, conf)


def poise_config(root: Path, role: str, port: int, backend: int,
                 certs: dict[str, Path]) -> Path:
    """poise's config for one role: ``l4`` (a tcp listener) or ``tls`` (an http
    listener terminating TLS), `workers: 1`, metrics on, no access log (defaults)."""
    if role == "l4":
        listener = f'  - {{name: tcp, bind: "127.0.0.1:{port}", protocol: tcp, cluster: app}}'
    else:
        listener = (f'  - name: https\n'
                    f'    bind: "127.0.0.1:{port}"\n'
                    f'    tls: {{certificates: [{{cert: {certs["cert"]}, key: {certs["key"]}}}]}}\n'
                    f'    routes: [{{cluster: app}}]')
    return configs.render("tcp-poise.yaml", root / f"poise-{role}.yaml", listener=listener,
                          backend=backend)


def poise_check(cmd: str, conf: Path) -> str | None:
    """Run `poise check CONF` when ``cmd`` is a `... run` command; None when it passes
    (or cannot be derived), else its output."""
    argv = shlex.split(cmd)
    if not argv or argv[-1] != "run":
        return None
    proc = subprocess.run(argv[:-1] + ["check", str(conf)], capture_output=True, text=True,
                          timeout=60)
    if proc.returncode == 0:
        return None
    return f"`poise check` exited {proc.returncode}:\n{(proc.stdout + proc.stderr).strip()}"


# ---------------------------------------------------------------- readiness


def wait_ready(svc: procs.Service, port: int, tls: bool, timeout: float) -> None:
    """Wait until GET / (over TLS if ``tls``) on port answers 2xx; else StartError."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while True:
        if not svc.alive():
            code = svc.proc.returncode if svc.proc else None
            raise procs.StartError(f"{svc.name} exited (code {code}) before answering:\n"
                                   f"{svc.log_tail()}")
        try:
            status = procs.http_get(port, "/", timeout=1.0, tls=tls)
            if 200 <= status < 300:
                svc.cpu_seconds()   # records the process tree for cleanup
                return
            last = f"HTTP {status}"
        except (OSError, http.client.HTTPException) as exc:
            last = f"{type(exc).__name__}: {exc}"
        if time.monotonic() > deadline:
            raise procs.StartError(f"{svc.name} did not answer GET / on port {port} "
                                   f"{'(TLS) ' if tls else ''}within {timeout:.0f}s "
                                   f"(last: {last})\n{svc.log_tail()}")
        time.sleep(0.1)


# ---------------------------------------------------------------- poise's build


def poise_build(repo: Path, cmd: str) -> str:
    """How poise's HTTP hot path will run: interpreted, compiled, or compiled from older
    sources (an edited module not rebuilt yet: `make install` rebuilds it; until then
    Python imports the stale compiled module, which may not fit the edited rest)."""
    if "POISE_INTERPRETED=1" in cmd:
        return "interpreted (POISE_INTERPRETED=1)"
    compiled = list((repo / "poise").rglob("*.cpython-*.so"))
    if not compiled:
        return "interpreted (no compiled modules)"
    stale = sorted(str(so.relative_to(repo)).split(".")[0] + ".py" for so in compiled
                   if (src := so.with_name(so.name.split(".")[0] + ".py")).exists()
                   and src.stat().st_mtime > so.stat().st_mtime)
    if stale:
        return (f"compiled, but STALE: {', '.join(stale)} newer than the compiled module "
                f"(run `make install`)")
    return "compiled (up to date)"
