"""Configs and command lines of bench/websocket.py: the echo backend (ws_load.py),
poise, HAProxy and nginx as WebSocket proxies (one worker/thread each), and the
uvloop-relay floor (floors.py).

Every proxy relays to the one backend address. The configs are small enough to be
written here rather than as templates; each goes into the run's tempdir.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import configs

BENCH_DIR = Path(__file__).resolve().parent
# Longer than any run, as a WebSocket carries on far beyond an HTTP exchange.
TUNNEL_TIMEOUT = "1h"


def backend(port: int) -> list[str]:
    """The echo backend (bench/ws_load.py backend), on the running Python."""
    return [sys.executable, str(BENCH_DIR / "ws_load.py"), "backend", str(port)]


def client(case_kind: str, port: int, duration: float, connections: int,
           window: int = 0, size: int = 0) -> list[str]:
    """The load generator (bench/ws_load.py client) for one run."""
    argv = [sys.executable, str(BENCH_DIR / "ws_load.py"), "client", case_kind, str(port),
            "--connections", str(connections), "--duration", str(duration)]
    if case_kind == "messages":
        argv += ["--window", str(window), "--size", str(size)]
    return argv


def uvloop_relay(port: int, backend_port: int) -> list[str]:
    """The bare uvloop byte relay of bench/floors.py: the handshake and the frames
    both pass through it as bytes (one backend connection per client connection)."""
    return [sys.executable, str(BENCH_DIR / "floors.py"), "uvloop-relay", str(port),
            str(backend_port)]


HAPROXY = """\
# HAProxy under bench/websocket.py: mode http (a WebSocket handshake is forwarded and,
# on 101, the connection becomes a tunnel: `timeout tunnel` then applies).
global
    nbthread 1
    maxconn 8192

defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 30s
    timeout tunnel {tunnel}

frontend ws
    bind 127.0.0.1:{port}
    default_backend app

backend app
    http-reuse always
    server b1 127.0.0.1:{backend}
"""


def haproxy(root: Path, port: int, backend_port: int) -> list[str]:
    """HAProxy, one thread, `mode http` with `timeout tunnel`."""
    conf = root / "ws-haproxy.cfg"
    conf.write_text(HAPROXY.format(port=port, backend=backend_port, tunnel=TUNNEL_TIMEOUT))
    return ["haproxy", "-f", str(conf), "-db"]


NGINX = """\
# nginx under bench/websocket.py: the WebSocket proxying of nginx's documentation
# (proxy_http_version 1.1 and Upgrade/Connection passed on; the map keeps plain
# requests on keep-alive upstream connections).
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;

events {{
    worker_connections 4096;
}}

http {{
    access_log off;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;

    map $http_upgrade $connection_upgrade {{
        default upgrade;
        ''      "";
    }}

    upstream app {{
        server 127.0.0.1:{backend};
        keepalive 64;
    }}

    server {{
        listen 127.0.0.1:{port};

        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_read_timeout {tunnel};
            proxy_send_timeout {tunnel};
        }}
    }}
}}
"""


def nginx(root: Path, port: int, backend_port: int) -> list[str]:
    """nginx, one worker, proxying WebSocket upgrades to the backend."""
    prefix = configs.nginx_prefix(root, "ws-nginx")
    conf = prefix / "nginx.conf"
    conf.write_text(NGINX.format(prefix=prefix, port=port, backend=backend_port,
                                 tunnel=TUNNEL_TIMEOUT))
    return configs.nginx_command(prefix, conf)


POISE = """\
# poise under bench/websocket.py: an http listener whose one route allows WebSocket
# upgrades (the default, spelled out), one worker, metrics on, no access log.
workers: 1
listeners:
  - name: ws
    bind: "127.0.0.1:{port}"
    routes:
      - cluster: app
        websocket: {{enabled: true, idle_timeout: {tunnel}}}
clusters:
  - {{name: app, policy: round_robin, backends: [{{address: "127.0.0.1:{backend}"}}]}}
"""


def poise_config(root: Path, port: int, backend_port: int) -> Path:
    """poise's YAML config (see POISE)."""
    conf = root / "ws-poise.yaml"
    conf.write_text(POISE.format(port=port, backend=backend_port, tunnel=TUNNEL_TIMEOUT))
    return conf


def poise(cmd: str, conf: Path) -> list[str]:
    return shlex.split(cmd) + [str(conf)]
