"""Render the config files for the backend and each proxy, and build their command lines.

Templates live in bench/templates/ and use string.Template placeholders ($name).
Each builder writes its config under its own directory in the run's tempdir and
returns the argv that starts the process in the foreground.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from string import Template

TEMPLATES = Path(__file__).resolve().parent / "templates"
NGINX = "/usr/sbin/nginx"
SMALL_BODY = "poise-bench: a small fixed response body of exactly 64 bytes...\n"
BIG_SIZE = 10 * 1024 * 1024  # bytes served at /big
assert len(SMALL_BODY) == 64


def render(template: str, out: Path, **values: object) -> Path:
    """Fill bench/templates/<template> with values and write it to out."""
    text = Template((TEMPLATES / template).read_text()).substitute(values)
    out.write_text(text)
    return out


def _nginx_prefix(root: Path, name: str) -> Path:
    """Create an nginx prefix dir with a tmp/ dir readable by the (unprivileged) worker."""
    prefix = root / name
    (prefix / "tmp").mkdir(parents=True, exist_ok=True)
    return prefix


def _nginx_argv(prefix: Path, conf: Path) -> list[str]:
    """nginx in the foreground with its own prefix and error log (never /var/log/nginx)."""
    return [NGINX, "-p", f"{prefix}/", "-c", str(conf), "-e", str(prefix / "error.log")]


def make_big_file(root: Path) -> Path:
    """Write the BIG_SIZE file served at /big (non-zero bytes, world-readable)."""
    path = root / "big.bin"
    chunk = bytes(range(256)) * 4096  # 1 MiB
    with open(path, "wb") as f:
        for _ in range(BIG_SIZE // len(chunk)):
            f.write(chunk)
    os.chmod(path, 0o644)
    return path


def backend_nginx(root: Path, ports: list[int]) -> list[str]:
    """Backend nginx: one worker, `/` = 64-byte body, `/big` = 10 MiB file, on both ports."""
    prefix = _nginx_prefix(root, "backend")
    big = make_big_file(root)
    conf = render("backend-nginx.conf", prefix / "nginx.conf", prefix=prefix,
                  port1=ports[0], port2=ports[1], small_body=SMALL_BODY.replace("\n", "\\n"),
                  big_file=big)
    return _nginx_argv(prefix, conf)


# What poise's default forwarded_headers add, done by HAProxy (haproxy+xff).
HAPROXY_FORWARDED = """\
    option forwardfor
    http-request set-header X-Forwarded-Proto http
    http-request set-header X-Forwarded-Host %[req.hdr(host)]
"""


def haproxy(root: Path, port: int, backends: list[int], forwarded: bool = False) -> list[str]:
    """HAProxy: one thread, http-reuse always, roundrobin over the backends;
    ``forwarded`` adds X-Forwarded-For/-Proto/-Host as poise does by default."""
    servers = "\n".join(f"    server b{i} 127.0.0.1:{p}" for i, p in enumerate(backends, 1))
    name = "haproxy-xff.cfg" if forwarded else "haproxy.cfg"
    conf = render("haproxy.cfg", root / name, port=port, servers=servers,
                  forwarded=HAPROXY_FORWARDED if forwarded else "")
    return ["haproxy", "-f", str(conf), "-db"]


def nginx_proxy(root: Path, port: int, backends: list[int]) -> list[str]:
    """nginx reverse proxy: one worker, upstream keepalive 64, HTTP/1.1 to backends."""
    prefix = _nginx_prefix(root, "nginx-proxy")
    servers = "\n".join(f"        server 127.0.0.1:{p};" for p in backends)
    conf = render("proxy-nginx.conf", prefix / "nginx.conf", prefix=prefix, port=port,
                  servers=servers)
    return _nginx_argv(prefix, conf)


# Cluster keys added for the poise+checks variant.
RESILIENCE = """\
    health_check: {path: /, interval: 1s, timeout: 500ms}
    outlier_detection: {consecutive_failures: 5, consecutive_gateway_errors: 5}
"""


def poise(root: Path, port: int, backends: list[int], cmd: str,
          resilience: bool = False, workers: int = 1,
          admin_port: int | None = None, extra: str = "", tag: str = "",
          listener_extra: str = "") -> list[str]:
    """poise: `<cmd> CONFIG` with a round-robin YAML config of ``workers`` workers;
    ``resilience`` adds an active health check and outlier detection, ``admin_port``
    the admin API on that loopback port, ``extra`` top-level YAML lines (metrics,
    access_log, tracing; ``tag`` names the config file after them), ``listener_extra``
    lines of the listener (indented by 4: rate limits)."""
    servers = "\n".join(f"      - address: 127.0.0.1:{p}" for p in backends)
    name = f"poise-{'checks' if resilience else 'plain'}-{workers}w{tag}.yaml"
    admin = f"admin: {{bind: 127.0.0.1:{admin_port}}}\n" if admin_port else ""
    conf = render("poise.yaml", root / name, port=port, servers=servers, workers=workers,
                  admin=admin, resilience=RESILIENCE if resilience else "", extra=extra,
                  listener_extra=listener_extra)
    return shlex.split(cmd) + [str(conf)]


# ---------------------------------------------------------------- reload bench


def nginx_prefix(root: Path, name: str) -> Path:
    """``root/name`` set up as an nginx prefix (see _nginx_prefix)."""
    return _nginx_prefix(root, name)


def nginx_command(prefix: Path, conf: Path, *extra: str) -> list[str]:
    """The nginx command line for a prefix and config, e.g. with ``"-s", "reload"``."""
    return _nginx_argv(prefix, conf) + list(extra)


def tagged_backend_nginx(root: Path, backends: dict[str, int]) -> list[str]:
    """Backend nginx for bench/reload.py: one worker, one port per named backend, each
    answering `GET /` with the 64-byte body and an `x-backend: NAME` header."""
    prefix = _nginx_prefix(root, "tagged-backend")
    body = SMALL_BODY.replace("\n", "\\n")
    servers = "\n".join(
        f"    server {{\n"
        f"        listen 127.0.0.1:{port};\n"
        f"        location = / {{\n"
        f"            default_type text/plain;\n"
        f"            add_header x-backend {name};\n"
        f"            return 200 \"{body}\";\n"
        f"        }}\n"
        f"    }}"
        for name, port in backends.items())
    conf = render("reload-backend-nginx.conf", prefix / "nginx.conf", prefix=prefix,
                  servers=servers)
    return _nginx_argv(prefix, conf)
