"""poise's idle connections seen from inside: what each object costs (bench/memory.py).

    python memory_inproc.py --port L --backend P [--connections 2000] [--bursts 10]
                            [--burst 100]

Runs poise's data plane (``ProxyServer``, as a worker builds it: the config of
memory_configs.poise_yaml, metrics on) on uvloop in this process; the client is
memory_client.py in a subprocess, so that nothing of it is traced.  Prints one JSON
object:

- ``clients``: ``--connections`` connections, one GET each, then idle;
- ``upstreams``: ``--bursts`` bursts of ``--burst`` concurrent slow requests, each to
  a route of its own (``/p1/`` …), so each leaves ``--burst`` idle connections in
  another pool (warm ones: ``keepalive_park_after: 0``, nothing is parked); the first burst (``/p0/``) is made before the first snapshot, so that
  what a burst allocates and frees is not counted, only what stays.

For each, per connection: tracemalloc's growth of live memory (everything allocated
through Python's allocators, uvloop's and httptools' C structures included when they
use PyMem), the growth by object type (a census of gc objects and what they refer to,
sized with ``sys.getsizeof``), new allocations by size (with the types of that size:
what remains unnamed is C memory behind an object, such as llhttp's parser or a libuv
handle), the top allocation sites (innermost frame, and the innermost poise frame;
only meaningful with POISE_INTERPRETED=1: compiled code has no frames), and the objects
one connection holds exclusively (reachable from it and referred to only from there).

RSS is the truth (bench/memory.py measures it); this is the breakdown.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
import tracemalloc
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import memory_configs  # noqa: E402
import uvloop  # noqa: E402
from memory_objects import (  # noqa: E402
    attributes,
    calibrate,
    census,
    census_growth,
    exclusive,
    name_sizes,
    traced_growth,
)

import poise  # noqa: E402
from poise.config.load import parse_config  # noqa: E402
from poise.proxy.server import ProxyServer  # noqa: E402

FRAMES = 12     # frames kept per allocation (enough to reach poise's from the loop)


# ---------------------------------------------------------------- the client


async def hold(port: int, count: int, path: str = "/", in_flight: int = 32):
    """memory_client.py holding ``count`` connections (one GET each) until released."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(BENCH_DIR / "memory_client.py"), str(port), str(count), path,
        str(in_flight), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    line = (await asyncio.wait_for(proc.stdout.readline(), 120)).decode().strip()
    if not line.startswith("ready"):
        proc.kill()
        raise SystemExit(f"memory_inproc: client failed: {line or 'no output'}")
    return proc


async def release(proc, site) -> None:
    """Let the client close its connections; wait until poise has seen them go."""
    proc.stdin.write(b"close\n")
    await proc.stdin.drain()
    await proc.wait()
    for _ in range(200):
        if not site.connections:
            break
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.2)


# ---------------------------------------------------------------- the two cases


async def measure(args, server: ProxyServer) -> dict:
    site = next(iter(server.sites.values()))
    loop = asyncio.get_running_loop()
    port = args.port
    await release(await hold(port, 256), site)      # warm-up: code paths, pools
    c_names = await calibrate(loop)

    n = args.connections
    before = census()
    tracemalloc.start(FRAMES)
    snap0 = tracemalloc.take_snapshot()
    client = await hold(port, n)
    await asyncio.sleep(0.5)
    gc.collect()
    snap1 = tracemalloc.take_snapshot()
    tracemalloc.stop()
    traced = traced_growth(snap0, snap1, n)
    del snap0, snap1
    types_, size_of = census_growth(before, census(), n)
    name_sizes(traced["sizes"], size_of, c_names)
    shared = [site, site.connections, loop, server, *server.clusters.values()]
    one = next(iter(site.connections))
    clients = {"connections": len(site.connections), "types": types_, **traced,
               "exclusive": exclusive(one, shared), "attributes": attributes(one)}
    del one
    await release(client, site)

    w = args.burst
    await release(await hold(port, w, "/p0/slow", w), site)   # the burst's own garbage
    before = census()
    tracemalloc.start(FRAMES)
    snap0 = tracemalloc.take_snapshot()
    for k in range(1, args.bursts + 1):
        await release(await hold(port, w, f"/p{k}/slow", w), site)
    gc.collect()
    snap1 = tracemalloc.take_snapshot()
    tracemalloc.stop()
    m = args.bursts * w
    traced = traced_growth(snap0, snap1, m)
    del snap0, snap1
    types_, size_of = census_growth(before, census(), m)
    name_sizes(traced["sizes"], size_of, c_names)
    pools = [pool for cluster in server.clusters.values() for pool in cluster.pools.values()]
    idle = [c for pool in pools for c in pool.idle]
    upstreams = {"connections": m, "idle_in_pools": len(idle), "types": types_, **traced,
                 "exclusive": exclusive(idle[-1], shared + pools),
                 "attributes": attributes(idle[-1])}
    return {"hot_path": poise.hot_path(), "clients": clients, "upstreams": upstreams}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True, help="poise's listener port")
    p.add_argument("--backend", type=int, required=True, help="memory_backend.py's port")
    p.add_argument("--connections", type=int, default=2000)
    p.add_argument("--bursts", type=int, default=10)
    p.add_argument("--burst", type=int, default=100)
    args = p.parse_args()
    layout = memory_configs.Layout(port=args.port, app=(args.backend,),
                                   pools=args.bursts + 1, pool_port=args.backend,
                                   pool_size=args.burst, clients=args.connections,
                                   park_after="0")     # (the breakdown of a warm one)
    config = parse_config(memory_configs.poise_yaml(layout))
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    server = ProxyServer(config, loop)
    loop.run_until_complete(server.start(reuse_port=False))
    result = loop.run_until_complete(measure(args, server))
    json.dump(result, sys.stdout)
    print()


if __name__ == "__main__":
    main()
