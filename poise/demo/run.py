"""Run three demo backends and a poise balancer in one process."""

from __future__ import annotations

import asyncio
import signal
import sys

import uvloop

from poise.config.load import parse_config
from poise.demo.backend import start_backend
from poise.proxy.server import ProxyServer

BACKENDS = [("alpha", 9001, 0.002), ("beta", 9002, 0.005), ("gamma", 9003, 0.010)]


def demo_config(bind: str) -> str:
    backends = "\n".join(f"      - address: 127.0.0.1:{port}" for _, port, _ in BACKENDS)
    return f"""
workers: 1
drain_timeout: 5s
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


async def _demo(host: str, port: int) -> int:
    loop = asyncio.get_running_loop()
    config = parse_config(demo_config(f"{host}:{port}"))
    proxy = ProxyServer(config, loop)
    servers = []
    try:
        for i, (name, p, lat) in enumerate(BACKENDS):
            servers.append(await start_backend(name, "127.0.0.1", p, lat, seed=i))
        await proxy.start(reuse_port=False)
    except OSError as e:
        print(f"poise demo: cannot bind: {e.strerror or e} (ports 9001-9003 and {port} "
              f"must be free; choose the balancer's with --bind)", file=sys.stderr)
        for s in servers:
            s.close()
        return 1
    bound_host, bound_port = proxy.addresses[0]
    for name, p, _ in BACKENDS:
        print(f"  demo backend {name:<6} http://127.0.0.1:{p}/")
    print(f"poise balancer      http://{bound_host}:{bound_port}/   (Ctrl-C to stop)")
    print(f"  try: curl http://{bound_host}:{bound_port}/  ·  "
          f"wrk -c32 -d5s http://{bound_host}:{bound_port}/", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await proxy.shutdown(config.drain_timeout)
    for s in servers:
        s.close()
    return 0


def run_demo(host: str = "127.0.0.1", port: int = 8080) -> int:
    return uvloop.run(_demo(host, port))
