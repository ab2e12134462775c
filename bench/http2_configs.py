"""Configs, command lines and load generators of bench/http2.py: the backend nginx, poise,
HAProxy and nginx as HTTP/2 (h2c) front ends forwarding HTTP/1.1, h2load and wrk.

Every proxy runs one worker/thread and forwards to the one backend address over
HTTP/1.1 keep-alive. The configs are small enough to be written here rather than as
templates; each goes into the run's tempdir.
"""

from __future__ import annotations

import os
import re
import resource
import shlex
import subprocess
import time
from pathlib import Path

import configs
import loadgen
import procs

H2LOAD = "/usr/bin/h2load"
MEDIUM_KIB = 64       # GET /64k: a file of this many KiB
UPLOAD_MIB = 1        # POST /upload: a body of this many MiB, discarded by the backend
MIB = 1024 * 1024


class LoadError(RuntimeError):
    """h2load or wrk failed or printed something unexpected."""


# ---------------------------------------------------------------- backend

BACKEND = """\
# Backend of bench/http2.py: one nginx worker, HTTP/1.1 keep-alive.
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;

events {{
    worker_connections 8192;
}}

http {{
    access_log off;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;

    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    client_max_body_size 0;

    # POST /upload reads the whole body before answering (see below), through this
    # keep-alive hop to the same server's `GET /`.
    upstream self {{
        server 127.0.0.1:{port};
        keepalive 64;
    }}

    server {{
        listen 127.0.0.1:{port};

        location = / {{
            default_type text/plain;
            return 200 "{small_body}";
        }}

        location = /64k {{
            default_type application/octet-stream;
            alias {medium_file};
        }}

        # Not `return 200`: that answers before the body has arrived, and a proxy
        # facing HTTP/2 may then reset the stream rather than send the rest of the
        # upload (nginx does). proxy_pass reads the whole body first (into memory),
        # then forwards a bodiless GET / to this server.
        location = /upload {{
            client_body_buffer_size {upload_buffer};
            proxy_pass http://self/;
            proxy_method GET;
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_set_header Connection "";
            proxy_http_version 1.1;
        }}
    }}
}}
"""


def _data_file(path: Path, size: int) -> Path:
    """``size`` non-zero bytes, world-readable (the nginx worker is unprivileged)."""
    path.write_bytes((bytes(range(256)) * (size // 256 + 1))[:size])
    os.chmod(path, 0o644)
    return path


def backend(root: Path, port: int) -> list[str]:
    """The backend: one nginx worker; `GET /` 64 bytes, `GET /64k` MEDIUM_KIB KiB,
    `POST /upload` reads the whole body, then answers the 64 bytes."""
    prefix = configs.nginx_prefix(root, "backend")
    conf = prefix / "nginx.conf"
    conf.write_text(BACKEND.format(
        prefix=prefix, port=port, small_body=configs.SMALL_BODY.replace("\n", "\\n"),
        medium_file=_data_file(root / "64k.bin", MEDIUM_KIB * 1024),
        upload_buffer=f"{UPLOAD_MIB + 1}m"))
    return configs.nginx_command(prefix, conf)


def upload_file(root: Path) -> Path:
    """The request body h2load POSTs (``-d``): UPLOAD_MIB MiB."""
    return _data_file(root / "upload.bin", UPLOAD_MIB * MIB)


# ---------------------------------------------------------------- proxies

HAPROXY = """\
# HAProxy under bench/http2.py: HTTP/2 with prior knowledge (h2c) from clients, HTTP/1.1
# keep-alive to the backend.
global
    nbthread 1
    maxconn 8192

defaults
    mode http
    http-reuse always
    option http-keep-alive
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 30s

frontend h2c
    bind 127.0.0.1:{port} proto h2
    default_backend app

backend app
    server b1 127.0.0.1:{backend}
"""


def haproxy(root: Path, port: int, backend_port: int) -> list[str]:
    """HAProxy, one thread, `bind ... proto h2`, `http-reuse always`."""
    conf = root / "h2-haproxy.cfg"
    conf.write_text(HAPROXY.format(port=port, backend=backend_port))
    return ["haproxy", "-f", str(conf), "-db"]


NGINX = """\
# nginx under bench/http2.py: `listen ... http2` without ssl is HTTP/2 with prior knowledge
# (h2c); HTTP/1.1 keep-alive to the backend (as proxy-nginx.conf).
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;

events {{
    worker_connections 8192;
}}

http {{
    access_log off;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;

    # Also caps the requests of one HTTP/2 connection (default 1000).
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    client_max_body_size 0;

    upstream app {{
        server 127.0.0.1:{backend};
        # Idle connections kept: as many as requests in flight (h2load -c16 -m32: 512),
        # else most requests beyond 64 would open (and close) a backend connection.
        keepalive 1024;
        keepalive_requests 1000000;
    }}

    server {{
        listen 127.0.0.1:{port} http2;

        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            # Stream bodies through memory buffers both ways instead of spilling to disk.
            proxy_max_temp_file_size 0;
            proxy_request_buffering off;
        }}
    }}
}}
"""


def nginx(root: Path, port: int, backend_port: int) -> list[str]:
    """nginx, one worker, `listen ... http2` (h2c), upstream keepalive 1024."""
    prefix = configs.nginx_prefix(root, "h2-nginx")
    conf = prefix / "nginx.conf"
    conf.write_text(NGINX.format(prefix=prefix, port=port, backend=backend_port))
    return configs.nginx_command(prefix, conf)


POISE = """\
# poise under bench/http2.py: one worker, metrics on, no access log (the defaults, as
# templates/poise.yaml); an http listener with http2 on (h2c with prior knowledge,
# told apart from HTTP/1.1 by the connection preface, so wrk's HTTP/1.1 works too).
workers: 1
listeners:
  - name: web
    bind: "127.0.0.1:{port}"
    protocol: http
    http2: true
    routes:
      - cluster: app
clusters:
  - {{name: app, policy: round_robin, backends: [{{address: "127.0.0.1:{backend}"}}]}}
"""


def poise_config(root: Path, port: int, backend_port: int) -> Path:
    conf = root / "h2-poise.yaml"
    conf.write_text(POISE.format(port=port, backend=backend_port))
    return conf


def poise(cmd: str, conf: Path) -> list[str]:
    return shlex.split(cmd) + [str(conf)]


def poise_check(cmd: str, conf: Path, cwd: Path) -> str | None:
    """`poise check CONF` (in ``cwd``) when ``cmd`` is a `... run` command; None when it
    passes (or cannot be derived), else its output."""
    argv = shlex.split(cmd)
    if not argv or argv[-1] != "run":
        return None
    proc = subprocess.run(argv[:-1] + ["check", str(conf)], capture_output=True, text=True,
                          timeout=60, cwd=cwd)
    if proc.returncode == 0:
        return None
    return f"`poise check` exited {proc.returncode}:\n{(proc.stdout + proc.stderr).strip()}"


# ---------------------------------------------------------------- h2load

_RE_FINISHED = re.compile(r"finished in ([\d.]+)(s|ms), ([\d.]+) req/s")
_RE_REQUESTS = re.compile(
    r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
    r"(\d+) errored, (\d+) timeout")
_RE_STATUS = re.compile(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx")
_RE_REQ_TIME = re.compile(r"time for request:\s+(\S+)\s+(\S+)\s+(\S+)")


def parse_h2load(text: str) -> dict:
    """The figures of h2load's summary (requests counted: those that succeeded)."""
    fin, req, status = (_RE_FINISHED.search(text), _RE_REQUESTS.search(text),
                        _RE_STATUS.search(text))
    if not fin or not req or not status:
        raise LoadError("no summary in h2load's output:\n" + text.strip()[-1500:])
    seconds = float(fin.group(1)) / (1000 if fin.group(2) == "ms" else 1)
    total, started, done, ok, failed, errored, timeout = map(int, req.groups())
    s2, s3, s4, s5 = map(int, status.groups())
    res = {"requests": min(ok, s2 + s3), "duration_s": seconds,
           "h2load_rps": float(fin.group(3)), "started": started, "done": done,
           "errors": {"failed": failed, "errored": errored, "timeout": timeout,
                      "4xx": s4, "5xx": s5}}
    res["error_total"] = failed + s4 + s5   # (errored and timeout are among failed)
    if (rt := _RE_REQ_TIME.search(text)) is not None:
        res["request_time_s"] = {k: loadgen.parse_time(v) for k, v in
                                 zip(("min", "max", "mean"), rt.groups(), strict=True)}
    return res


def h2load_argv(port: int, path: str, connections: int, streams: int,
                duration: float | None, data: Path | None = None,
                requests: int | None = None) -> list[str]:
    argv = [H2LOAD, "-t1", f"-c{connections}", f"-m{streams}"]
    argv += [f"-D{duration:g}"] if duration else [f"-n{requests or connections}"]
    if data is not None:
        argv += ["-d", str(data), "-H", "content-type: application/octet-stream"]
    return argv + [f"http://127.0.0.1:{port}{path}"]


def _children_cpu() -> float:
    """CPU seconds of every child process this one has waited for (h2load, wrk)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_h2load(argv: list[str], timeout: float) -> dict:
    """Run h2load to the end; parse_h2load() plus argv, raw text and its CPU seconds."""
    cpu0 = _children_cpu()
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise LoadError(f"h2load did not finish within {timeout:g} s") from None
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise LoadError(f"h2load exited {proc.returncode}: {text.strip()[-1500:]}")
    res = parse_h2load(text)
    res.update(argv=argv, raw=proc.stdout, client_cpu_s=round(_children_cpu() - cpu0, 4))
    return res


def run_wrk(port: int, path: str, connections: int, duration: float) -> dict:
    """One wrk run (one thread, HTTP/1.1 keep-alive) in the shape of run_h2load()'s."""
    cpu0 = _children_cpu()
    seconds = max(1, round(duration))
    try:
        res = loadgen.run_wrk(f"http://127.0.0.1:{port}{path}", connections, seconds)
    except (loadgen.WrkError, subprocess.TimeoutExpired) as exc:
        raise LoadError(str(exc)) from None
    res["client_cpu_s"] = round(_children_cpu() - cpu0, 4)
    return res


def h2_probe(svc: procs.Service, port: int, timeout: float) -> None:
    """Wait until one h2load GET / over h2c on ``port`` succeeds with a 2xx; else
    procs.StartError (the proxies' listeners speak HTTP/2 with prior knowledge)."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while True:
        if not svc.alive():
            code = svc.proc.returncode if svc.proc else None
            raise procs.StartError(f"{svc.name} exited (code {code}) before answering:\n"
                                   f"{svc.log_tail()}")
        try:
            res = run_h2load(h2load_argv(port, "/", 1, 1, None, requests=1), 10)
            if res["requests"] == 1:
                svc.cpu_seconds()   # records the process tree for cleanup
                return
            last = f"{res['errors']}"
        except LoadError as exc:
            last = str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else "?"
        if time.monotonic() > deadline:
            raise procs.StartError(f"{svc.name} did not answer an h2c GET / on port {port} "
                                   f"within {timeout:.0f}s (last: {last})\n{svc.log_tail()}")
        time.sleep(0.2)
