"""Run three demo backends and a poise balancer (with its admin API) in one process."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import uvloop

from poise.config.load import load_config
from poise.control.supervisor import serve_here
from poise.demo.backend import start_backend
from poise.proxy.server import ProxyServer

BACKENDS = [("alpha", 9001, 0.002), ("beta", 9002, 0.005), ("gamma", 9003, 0.010)]


def demo_config(bind: str, admin: str) -> str:
    backends = "\n".join(f"      - address: 127.0.0.1:{port}" for _, port, _ in BACKENDS)
    return f"""# poise demo: edit me, then `poise reload {{this file}}` (or kill -HUP the demo)
workers: 1
drain_timeout: 5s
admin:
  bind: {admin}
listeners:
  - name: demo
    bind: {bind}
    routes:
      - cluster: demo
clusters:
  - name: demo
    policy: round_robin
    health_check: {{path: /, interval: 2s, timeout: 1s}}
    outlier_detection: {{consecutive_gateway_errors: 3, base_ejection_time: 10s}}
    retries: {{attempts: 2}}
    backends:
{backends}
"""


async def _demo(bind: str, admin: str) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="poise-demo-"))
    path = workdir / "poise.yaml"
    path.write_text(demo_config(bind, admin))
    config = load_config(path)
    servers = []
    try:
        for i, (name, p, lat) in enumerate(BACKENDS):
            servers.append(await start_backend(name, "127.0.0.1", p, lat, seed=i))
    except OSError as e:
        print(f"poise demo: cannot bind: {e.strerror or e} (ports 9001-9003 must be free)",
              file=sys.stderr)
        for s in servers:
            s.close()
        return 1

    def ready(proxy: ProxyServer) -> None:
        host, port = proxy.addresses[0]
        for name, p, _ in BACKENDS:
            print(f"  demo backend {name:<6} http://127.0.0.1:{p}/")
        print(f"poise balancer      http://{host}:{port}/   (Ctrl-C to stop)")
        print(f"  admin API         http://{admin}/clusters")
        print(f"  dashboard         http://{admin}/   ·  metrics http://{admin}/metrics")
        print(f"  config            {path}  (edit, then: poise reload {path})")
        print(f"  try: curl http://{host}:{port}/  ·  wrk -c32 -d5s http://{host}:{port}/",
              flush=True)

    try:
        code = await serve_here(config, str(path), ready)
        if code:
            print(f"poise demo: the balancer could not start (ports {bind} and {admin} must "
                  f"be free; choose others with --bind and --admin)", file=sys.stderr)
        return code
    finally:
        for s in servers:
            s.close()


def run_demo(bind: str = "127.0.0.1:8080", admin: str = "127.0.0.1:9901") -> int:
    return uvloop.run(_demo(bind, admin))
