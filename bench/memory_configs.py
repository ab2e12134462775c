"""Configs for bench/memory.py: poise, HAProxy and nginx as the other benches run them
(bench/templates/: one worker/thread, round robin, keep-alive to the backends, HAProxy
``http-reuse always``, nginx ``proxy_http_version 1.1`` + ``Connection ""``), with only
what holding thousands of idle connections needs changed:

- connection limits above the connections held (HAProxy ``maxconn`` with
  ``no strict-limits``: with a 20,000 open-files cap it cannot reserve the 2 sockets
  per connection it asks for, and only needs one per idle client; nginx
  ``worker_connections``, with room: it closes idle connections when short of them);
- idle timeouts of 10 minutes on both sides (client keep-alive, pooled upstream
  connections; HAProxy ``pool-purge-delay``, which otherwise closes idle server
  connections every 5 s), so that nothing idle is closed while it is measured;
- upstream pools large enough to keep a whole burst (poise ``keepalive_max_idle``,
  nginx ``keepalive``; HAProxy's are unlimited by default).

A :class:`Layout` says what sits behind the listener: the catch-all route to ``app``
(round robin over the ``app`` ports: bench/run.py's backend nginx), and ``pools``
extra routes ``/p0/`` … each to a cluster/backend/upstream block of its own on
``pool_port``.  Each such route has its own upstream pool in every proxy, so bursts
of requests to one route after another leave idle connections in pool after pool
(see bench/memory.py).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

import configs

IDLE = "10m"                    # every idle timeout (client and upstream side)
MAX_FILES = 20000               # the sandbox's cap per process


@dataclass(frozen=True)
class Layout:
    port: int                   # the proxy's listener (127.0.0.1)
    app: tuple[int, ...]        # backend ports of the catch-all route
    pools: int = 0              # routes /p0/ … /p{pools-1}/, each its own pool
    pool_port: int = 0          # the backend of those routes
    pool_size: int = 64         # idle connections each pool may keep (nginx, poise)
    clients: int = 10_000       # client connections the proxy must accept
    # poise: keepalive_park_after of every cluster (None: poise's default, 5 s; "0":
    # never park).
    park_after: str | None = None

    @property
    def prefixes(self) -> list[str]:
        return [f"/p{i}/" for i in range(self.pools)]


def argv(name: str, root: Path, layout: Layout, poise_cmd: str) -> list[str]:
    """Write ``name``'s config for ``layout`` under ``root``; its command line."""
    if name == "poise":
        return _poise(root, layout, poise_cmd)
    if name == "haproxy":
        return _haproxy(root, layout)
    if name == "nginx":
        return _nginx(root, layout)
    raise ValueError(f"unknown proxy {name!r}")


def _poise(root: Path, lay: Layout, cmd: str) -> list[str]:
    path = root / "poise-memory.yaml"
    path.write_text(poise_yaml(lay))
    return shlex.split(cmd) + [str(path)]


def poise_yaml(lay: Layout) -> str:
    """workers: 1, metrics on, no access log (the defaults, as templates/poise.yaml);
    ``keepalive_park_after`` as ``lay`` says."""
    routes = "".join(f"      - match: {{path_prefix: {p}}}\n        cluster: c{i}\n"
                     for i, p in enumerate(lay.prefixes))
    pool = f"    keepalive_max_idle: {max(lay.pool_size, 1024)}\n" \
           f"    keepalive_idle_timeout: {IDLE}\n"
    if lay.park_after is not None:
        pool += f"    keepalive_park_after: {lay.park_after}\n"
    clusters = "".join(f"  - name: c{i}\n{pool}    backends:\n"
                       f"      - address: 127.0.0.1:{lay.pool_port}\n"
                       for i in range(lay.pools))
    app = "".join(f"      - address: 127.0.0.1:{p}\n" for p in lay.app)
    return (f"# poise under bench/memory.py (cf. templates/poise.yaml)\nworkers: 1\n"
            f"listeners:\n  - name: web\n    bind: 127.0.0.1:{lay.port}\n    protocol: http\n"
            f"    client_idle_timeout: {IDLE}\n    routes:\n{routes}"
            f"      - cluster: app\n"
            f"clusters:\n  - name: app\n    policy: round_robin\n{pool}    backends:\n{app}"
            f"{clusters}")


def _haproxy(root: Path, lay: Layout) -> list[str]:
    """nbthread 1, http-reuse always (as templates/haproxy.cfg)."""
    maxconn = max(8192, lay.clients + 2 * lay.pools * lay.pool_size + 100)
    rules = "".join(f"    use_backend c{i} if {{ path_beg {p} }}\n"
                    for i, p in enumerate(lay.prefixes))
    pools = "".join(f"\nbackend c{i}\n    server s{i} 127.0.0.1:{lay.pool_port}\n"
                    for i in range(lay.pools))
    app = "\n".join(f"    server b{i} 127.0.0.1:{p}" for i, p in enumerate(lay.app, 1))
    text = f"""# HAProxy under bench/memory.py (cf. templates/haproxy.cfg)
global
    nbthread 1
    maxconn {maxconn}
    no strict-limits

defaults
    mode http
    http-reuse always
    option http-keep-alive
    maxconn {maxconn}
    timeout connect 5s
    timeout client {IDLE}
    timeout server 30s
    timeout http-keep-alive {IDLE}
    default-server pool-purge-delay {IDLE}

frontend web
    bind 127.0.0.1:{lay.port}
{rules}    default_backend app

backend app
    balance roundrobin
{app}
{pools}"""
    path = root / "haproxy-memory.cfg"
    path.write_text(text)
    return ["haproxy", "-f", str(path), "-db"]


_PASS = """proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_max_temp_file_size 0;"""


def _nginx(root: Path, lay: Layout) -> list[str]:
    """worker_processes 1, upstream keepalive (as templates/proxy-nginx.conf)."""
    prefix = configs.nginx_prefix(root, "nginx-memory")
    # nginx closes idle keep-alive connections ("reusing connections") once fewer
    # than 1/16 of worker_connections are free: keep well above what is held.
    needed = lay.clients + 2 * lay.pools * lay.pool_size
    workers = min(MAX_FILES - 500, needed + needed // 8 + 512)
    app = "".join(f"        server 127.0.0.1:{p};\n" for p in lay.app)
    upstreams = "".join(
        f"    upstream c{i} {{\n        server 127.0.0.1:{lay.pool_port};\n"
        f"        keepalive {lay.pool_size};\n        keepalive_timeout {IDLE};\n    }}\n"
        for i in range(lay.pools))
    locations = "".join(f"        location {p} {{\n            proxy_pass http://c{i};\n"
                        f"            {_PASS}\n        }}\n"
                        for i, p in enumerate(lay.prefixes))
    text = f"""# nginx under bench/memory.py (cf. templates/proxy-nginx.conf)
worker_processes 1;
worker_rlimit_nofile {MAX_FILES};
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;

events {{
    worker_connections {workers};
}}

http {{
    access_log off;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;

    keepalive_requests 1000000;
    keepalive_timeout {IDLE};

    upstream app {{
{app}        keepalive 64;
        keepalive_requests 1000000;
        keepalive_timeout {IDLE};
    }}
{upstreams}
    server {{
        listen 127.0.0.1:{lay.port};

        location / {{
            proxy_pass http://app;
            {_PASS}
        }}
{locations}    }}
}}
"""
    conf = prefix / "nginx.conf"
    conf.write_text(text)
    return configs.nginx_command(prefix, conf)
