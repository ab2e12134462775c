#!/usr/bin/env python3
"""Memory per idle connection: poise vs HAProxy vs nginx (issue 15, goal 2).

    .venv/bin/python bench/memory.py                        # 10,000 clients, 3 rounds
    .venv/bin/python bench/memory.py --connections 2000 --rounds 2
    .venv/bin/python bench/memory.py --quick                # 1 round, 2,000 / 500

Three measurements (bench/README.md, "Memory per idle connection"):

1. **Idle client connections.** Each proxy, started afresh for every sample (a
   process that already held and freed connections would reuse that memory), takes a
   warm-up, then ``--connections`` keep-alive connections, one small GET on each
   (response read), held idle.  The growth of the proxy's RSS, PSS and USS
   (/proc/PID/smaps_rollup, whole process tree) divided by the connections held.
2. **Idle pooled upstream connections.** Each proxy, afresh, takes ``--upstreams /
   --burst`` bursts of ``--burst`` concurrent slow requests (memory_backend.py
   answers after 0.5 s), each burst to a route with its own upstream pool, its client
   connections closed after it: every burst leaves ``--burst`` more idle connections
   in the proxy's pools.  Growth from after the first burst (which also pays for what
   any burst allocates and frees) to after the last, divided by the upstream
   connections added (counted from /proc, as are the client connections in 1).
   poise is measured twice: *warm* (``keepalive_park_after: 0``: every idle
   connection keeps its transport) and *parked* (``keepalive_park_after: 1s``, and
   each point is read once /proc shows all its upstream connections parked:
   memory_proc.parked).
3. **poise's breakdown** (memory_inproc.py, poise's data plane in a process of its
   own under tracemalloc): bytes per connection by type, by allocation size and site,
   and the objects one idle connection holds exclusively; once compiled (what runs)
   and once with POISE_INTERPRETED=1 (whose frames name allocation sites).

Rounds alternate the proxies' order.  Results: markdown on stdout and in
``results/memory-latest.md``, everything in ``results/memory-<UTC timestamp>.json``.
It exits non-zero only if nothing could be measured.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import configs  # noqa: E402
import memory_client  # noqa: E402
import memory_configs  # noqa: E402
import memory_proc  # noqa: E402
import memory_report  # noqa: E402
import procs  # noqa: E402
import report  # noqa: E402
import tcp_configs  # noqa: E402

REPO = BENCH_DIR.parent
PROXIES = ("poise", "haproxy", "nginx")
WARMUP = 256            # connections (one GET each, then closed) before measuring
SLOW_DELAY = 0.5        # seconds memory_backend.py takes to answer /slow
PARK_AFTER = "1s"       # poise's keepalive_park_after in the parked upstream sample
PARK_WAIT = 15.0        # seconds a burst's connections may take to be seen parked
# poise's two upstream samples: keepalive_park_after 0, and PARK_AFTER.
WARM, PARKED = "poise (warm)", "poise (parked)"


def log(msg: str) -> None:
    """Progress goes to stderr so stdout carries only the report."""
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--connections", type=int, default=10_000,
                   help="idle client connections per sample (default 10,000)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    p.add_argument("--upstreams", type=int, default=2000,
                   help="idle upstream connections to build up (default 2,000)")
    p.add_argument("--burst", type=int, default=100,
                   help="concurrent requests per burst, one pool each (default 100)")
    p.add_argument("--inproc-connections", type=int, default=2000,
                   help="client connections of poise's in-process breakdown (default 2,000)")
    p.add_argument("--only", default=",".join(PROXIES), help="subset of poise,haproxy,nginx")
    p.add_argument("--no-inproc", action="store_true", help="skip poise's breakdown")
    p.add_argument("--quick", action="store_true",
                   help="1 round, 2,000 connections, 500 upstreams")
    p.add_argument("--settle", type=float, default=1.0,
                   help="seconds to wait before reading memory (default 1)")
    p.add_argument("--poise-cmd", default=f"{REPO}/.venv/bin/poise run",
                   help="command that runs poise; the config path is appended")
    p.add_argument("--start-timeout", type=float, default=20.0)
    p.add_argument("--base-port", type=int, default=19850,
                   help="first port tried (default 19850, up to 19999)")
    p.add_argument("--results-dir", type=Path, default=BENCH_DIR / "results")
    p.add_argument("--keep-temp", action="store_true", help="keep the tempdir (configs, logs)")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.connections, args.upstreams = 1, 2000, 500
    args.only = [n.strip() for n in args.only.split(",") if n.strip()]
    if not args.only or set(args.only) - set(PROXIES):
        p.error(f"--only takes a subset of {','.join(PROXIES)}")
    if args.rounds < 1 or args.burst < 1 or args.upstreams < 2 * args.burst:
        p.error("--rounds >= 1, --burst >= 1 and --upstreams >= 2 x --burst")
    # One process holds all the client sockets, the proxy all of them plus its own.
    if args.connections < 1 or args.connections > memory_configs.MAX_FILES - 1000:
        p.error(f"--connections must be 1 … {memory_configs.MAX_FILES - 1000} "
                f"(the open-files cap is {memory_configs.MAX_FILES} per process)")
    return args


# ---------------------------------------------------------------- one sample


def start_proxy(stack: ExitStack, name: str, root: Path, layout, args) -> procs.Service:
    """A fresh proxy for one sample (stopped by the caller, or by the stack)."""
    argv = memory_configs.argv(name, root, layout, args.poise_cmd)
    log_name = name if layout.park_after is None else f"{name}-park-{layout.park_after}"
    svc = procs.Service(name, argv, root / f"{log_name}.log")
    stack.callback(svc.stop)
    svc.start()
    svc.wait_ready([layout.port], args.start_timeout)
    return svc


def per_conn(after: dict, before: dict, n: int) -> dict:
    """Growth of each memory figure from ``before`` to ``after``, per connection."""
    return {k: (after[k] - before[k]) / n for k in ("rss", "pss", "uss", "dirty")} if n else {}


def clients_sample(stack, name, rnd, root, ports, args) -> dict:
    """Measurement 1 for one proxy: memory per idle client connection."""
    n, port = args.connections, ports["proxy"]
    layout = memory_configs.Layout(port=port, app=tuple(ports["backends"]), clients=n)
    svc = start_proxy(stack, name, root, layout, args)
    sample: dict = {"proxy": name, "round": rnd, "connections": n}
    held: list = []
    try:
        memory_client.close_all(memory_client.hold(port, WARMUP))
        time.sleep(args.settle / 2)
        sample["before"] = memory_proc.memory(svc.pid)
        sample["sockets_before"] = memory_proc.sockets(svc.pid, port, ports["backends"])
        started = time.monotonic()
        held = memory_client.hold(port, n)
        sample["open_s"] = round(time.monotonic() - started, 2)
        time.sleep(args.settle)
        sample["held"] = memory_proc.memory(svc.pid)
        sample["sockets_held"] = socks = memory_proc.sockets(
            svc.pid, port, ports["backends"], memory_proc.peer_keys(held))
        memory_client.close_all(held)
        held = []
        time.sleep(args.settle)
        sample["closed"] = memory_proc.memory(svc.pid)
        sample["per_conn"] = per_conn(sample["held"], sample["before"], n)
        sample["kept_per_conn"] = per_conn(sample["closed"], sample["before"], n)
        # Connections from another program on the machine that found the port add
        # their memory: a sample with more than 1% of them is not counted.
        problems = [f"exited:\n{svc.log_tail()}"] if not svc.alive() else []
        if socks["clients"] != n:
            problems.append(f"held {socks['clients']} of {n} client connections")
        if socks["foreign"] > n / 100:
            problems.append(f"{socks['foreign']} connections from elsewhere on the machine")
        sample["ok"] = not problems
        if problems:
            sample["error"] = "; ".join(problems)
    finally:
        memory_client.close_all(held)
        svc.stop()
    return sample


def all_parked(svc, ports) -> dict:
    """Wait until every upstream connection poise holds is parked; its /proc counts.
    (Read from /proc rather than the admin API's gauge: serving /metrics several times
    a burst grew poise's memory by a few hundred bytes per connection measured.)"""
    deadline = time.monotonic() + PARK_WAIT
    while True:
        socks = memory_proc.sockets(svc.pid, ports["proxy"], [ports["slow"]])
        parked = memory_proc.parked(svc.pid, [ports["slow"]])
        if parked == socks["upstreams"] or time.monotonic() > deadline:
            return {**socks, "parked": parked}
        time.sleep(0.2)


def upstreams_sample(stack, name, rnd, root, ports, args) -> dict:
    """Measurement 2 for one proxy (``name``: haproxy, nginx, or poise's WARM or
    PARKED): memory per idle pooled upstream connection."""
    w, bursts, port = args.burst, args.upstreams // args.burst, ports["proxy"]
    parked = name == PARKED
    proxy = "poise" if name in (WARM, PARKED) else name
    layout = memory_configs.Layout(
        port=port, app=(ports["slow"],), pools=bursts, pool_port=ports["slow"],
        pool_size=w, clients=w,
        park_after=None if proxy != "poise" else PARK_AFTER if parked else "0")
    svc = start_proxy(stack, proxy, root, layout, args)
    sample: dict = {"proxy": name, "round": rnd, "burst": w, "points": []}
    try:
        for k in range(bursts):
            memory_client.close_all(memory_client.hold(
                port, w, f"/p{k}/slow", connecting=w, in_flight=w,
                timeout=30 + 10 * SLOW_DELAY))
            time.sleep(max(0.3, args.settle / 3))
            socks = all_parked(svc, ports) if parked else \
                memory_proc.sockets(svc.pid, port, [ports["slow"]])
            point = {"burst": k + 1, **memory_proc.memory(svc.pid), **socks}
            sample["points"].append(point)
        first, last = sample["points"][0], sample["points"][-1]
        added = last["upstreams"] - first["upstreams"]
        sample["upstreams_added"] = added
        sample["per_upstream"] = per_conn(last, first, added)
        # A proxy that closed pooled connections would look cheap: not counted.
        problems = [f"exited:\n{svc.log_tail()}"] if not svc.alive() else []
        if added < 0.95 * (bursts - 1) * w:
            problems.append(f"{added} upstream connections stayed of {(bursts - 1) * w} opened")
        if last["foreign"] > added / 100:
            problems.append(f"{last['foreign']} connections from elsewhere on the machine")
        if parked and any(p["parked"] != p["upstreams"] for p in (first, last)):
            problems.append(f"not all parked: {first['parked']} of {first['upstreams']}, "
                            f"then {last['parked']} of {last['upstreams']}")
        sample["ok"] = not problems
        if problems:
            sample["error"] = "; ".join(problems)
    finally:
        svc.stop()
    return sample


def guarded(kind: str, fn, stack, name, rnd, root, ports, args, failures) -> dict:
    """One sample; a proxy that fails to start or to hold is recorded, not fatal."""
    log(f"# {kind} round {rnd}/{args.rounds}: {name}")
    try:
        sample = fn(stack, name, rnd, root, ports, args)
    except (procs.StartError, memory_client.ClientError, OSError) as exc:
        failures[f"{name} ({kind}, round {rnd})"] = str(exc)
        log(f"!! {name} {kind} round {rnd}: {exc}")
        return {"proxy": name, "round": rnd, "ok": False, "error": str(exc)}
    fig = sample.get("per_conn") or sample.get("per_upstream") or {}
    log(f"#   {fig.get('rss', 0):,.0f} B RSS, {fig.get('dirty', 0):,.0f} B private dirty "
        f"per connection"
        + ("" if sample["ok"] else f"  (NOT COUNTED: {sample.get('error')})"))
    if not sample["ok"]:
        failures[f"{name} ({kind}, round {rnd})"] = f"not counted: {sample.get('error')}"
    return sample


# ---------------------------------------------------------------- poise in-process


def inproc(ports, args, interpreted: bool) -> dict:
    """memory_inproc.py's JSON (compiled, or POISE_INTERPRETED=1), or an error."""
    env = dict(os.environ, POISE_INTERPRETED="1") if interpreted else dict(os.environ)
    if not interpreted:
        env.pop("POISE_INTERPRETED", None)
    bursts = max(2, min(10, args.upstreams // args.burst))
    cmd = [sys.executable, str(BENCH_DIR / "memory_inproc.py"),
           "--port", str(ports["inproc"]), "--backend", str(ports["slow"]),
           "--connections", str(args.inproc_connections), "--bursts", str(bursts),
           "--burst", str(args.burst)]
    log(f"# poise in-process breakdown ({'interpreted' if interpreted else 'compiled'})")
    try:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600,
                             cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"error": "memory_inproc.py timed out"}
    if out.returncode != 0:
        return {"error": f"memory_inproc.py exited {out.returncode}:\n{out.stderr[-2000:]}"}
    return json.loads(out.stdout)


# ---------------------------------------------------------------- main


def benchmark(args, stack: ExitStack, result: dict) -> None:
    root = Path(stack.enter_context(procs.tempdir(args.keep_temp, "poise-memory-")))
    root.chmod(0o755)
    log(f"# tempdir {root}")
    b1, b2, slow, proxy, in_port = procs.pick_ports(5, base=args.base_port)
    ports = {"backends": [b1, b2], "slow": slow, "proxy": proxy, "inproc": in_port}
    result["ports"] = ports
    try:
        backend = procs.Service("backend", configs.backend_nginx(root, [b1, b2]),
                                root / "backend.log")
        stack.callback(backend.stop)
        backend.start()
        backend.wait_ready([b1, b2], args.start_timeout)
        slow_backend = procs.Service(
            "slow-backend", [sys.executable, str(BENCH_DIR / "memory_backend.py"), str(slow),
                             str(SLOW_DELAY)], root / "slow-backend.log")
        stack.callback(slow_backend.stop)
        slow_backend.start()
        slow_backend.wait_ready([slow], args.start_timeout)
    except procs.StartError as exc:
        raise SystemExit(f"!! a backend failed to start, nothing to measure:\n{exc}") from None
    failures = result["failures"]
    for rnd in range(1, args.rounds + 1):
        # Every other round in reverse order: drift on the machine hits all alike.
        order = args.only if rnd % 2 else args.only[::-1]
        for name in order:
            result["clients"].append(guarded("clients", clients_sample, stack, name, rnd,
                                             root, ports, args, failures))
        for name in order:
            for label in (WARM, PARKED) if name == "poise" else (name,):
                result["upstreams"].append(guarded("upstreams", upstreams_sample, stack,
                                                   label, rnd, root, ports, args, failures))
    if "poise" in args.only and not args.no_inproc:
        result["inproc"] = {"compiled": inproc(ports, args, False),
                            "interpreted": inproc(ports, args, True)}


def git_state() -> str:
    """The commit measured, and whether poise/ differs from it (work in progress)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                              capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "poise"], cwd=REPO,
                               capture_output=True, text=True).stdout.split("\n")
    except OSError:
        return "unknown"
    changed = [line[3:] for line in dirty if line.strip()]
    return head + (f" + uncommitted changes to {', '.join(changed)}" if changed else "")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    procs.ensure_tools()
    started = datetime.now(UTC)
    result: dict = {
        "timestamp": started.strftime("%Y%m%dT%H%M%SZ"),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {**report.machine_info(),
                    "poise_hot_path": tcp_configs.poise_build(REPO, args.poise_cmd),
                    "poise_git": git_state()},
        "failures": {}, "clients": [], "upstreams": [], "inproc": {},
    }
    result["settings"].update(warmup=WARMUP, slow_delay=SLOW_DELAY,
                              bursts=args.upstreams // args.burst, park_after=PARK_AFTER)
    if not procs.run_cleanly(lambda stack: benchmark(args, stack, result), log):
        return 130
    result["elapsed_s"] = round((datetime.now(UTC) - started).total_seconds(), 1)
    result["summary"] = memory_report.summarize(result)
    markdown = memory_report.render(result)
    json_path, md_path = procs.save_results("memory", result, markdown, args.results_dir)
    print(markdown)
    log(f"# saved {json_path} and {md_path}")
    measured = any(s.get("ok") for s in result["clients"] + result["upstreams"])
    return 0 if measured else 1


if __name__ == "__main__":
    sys.exit(main())
