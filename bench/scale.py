#!/usr/bin/env python3
"""Many concurrent connections: poise vs HAProxy under the same per-process file limit
(issue 15, goal 3).

Each proxy in turn (alternating rounds, started afresh for each run) gets 50,000
concurrent client connections from several latency_gen processes (each under the file
limit, each binding its own 127.x.y.z source addresses so that no source runs out of
ephemeral ports): 40,000 idle (one request each, then silent) and 10,000 active at a
fixed total rate (default 10,000 req/s), measured open-loop for --duration seconds.
Then every idle connection sends one more request, to show it was still being served.
Reported: failed requests and lost connections, p50/p99/p99.9, memory (RSS and PSS of
all the proxy's processes, idle and loaded), sockets held, CPU.

    python bench/scale.py                       # 3 rounds, 50,000 connections (~3.5 min)
    python bench/scale.py --quick               # 1 round, 10,000 connections (~1 min)
    python bench/scale.py --connections 50000 --active 10000 --rate 10000 --rounds 3

poise runs with ``workers: auto`` and ``max_connections`` on its listener, which make it
start enough workers for the file limit; HAProxy runs as many single-threaded processes
sharing the port (bench/scale_configs.py says why).  See bench/README.md ("Many
connections").  Results: stdout, bench/results/scale-latest.md, scale-<UTC>.json.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import sys
import time
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import configs  # noqa: E402
import latency_gen  # noqa: E402
import procs  # noqa: E402
import report  # noqa: E402
import run  # noqa: E402
import scale_configs as sc  # noqa: E402
import scale_report  # noqa: E402
import tcp_configs  # noqa: E402

REPO = BENCH_DIR.parent
TARGETS = ("poise", "haproxy")
# Files a generator process may use for connections: it holds its share of them all.
GEN_FILES_SHARE = 0.8


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--connections", type=int, default=50_000,
                   help="concurrent client connections in all (default 50000)")
    p.add_argument("--active", type=int, default=10_000,
                   help="of which carry the load (default 10000); the rest stay idle")
    p.add_argument("--rate", type=float, default=10_000,
                   help="requests/s over the active connections (default 10000)")
    p.add_argument("--duration", type=float, default=15, help="recorded seconds (default 15)")
    p.add_argument("--skip", type=float, default=2,
                   help="unrecorded seconds of load first (default 2)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    p.add_argument("--generators", type=int, default=0,
                   help="latency_gen processes (default: enough for the file limit, >= 4)")
    p.add_argument("--connect-rate", type=float, default=10_000,
                   help="new connections per second, all generators together (default "
                        "10000)")
    p.add_argument("--nofile", type=int,
                   default=hard if hard != resource.RLIM_INFINITY else 20_000,
                   help="RLIMIT_NOFILE of every proxy process (default: this process's "
                        "hard limit, else 20000)")
    p.add_argument("--only", default=",".join(TARGETS),
                   help=f"comma-separated subset of: {','.join(TARGETS)}")
    p.add_argument("--quick", action="store_true",
                   help="1 round, 10,000 connections (2,000 active at 2,000 req/s), 5 s")
    p.add_argument("--poise-cmd", default=f"{REPO}/.venv/bin/poise run",
                   help="command that runs poise; the config path is appended")
    p.add_argument("--start-timeout", type=float, default=30.0)
    p.add_argument("--base-port", type=int, default=19300)
    p.add_argument("--results-dir", type=Path, default=BENCH_DIR / "results")
    p.add_argument("--keep-temp", action="store_true", help="keep the tempdir (configs, logs)")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.connections, args.active, args.rate = 1, 10_000, 2_000, 2_000
        args.duration, args.skip = 5, 1
    args.only = [n.strip() for n in args.only.split(",") if n.strip()]
    if set(args.only) - set(TARGETS) or not args.only:
        p.error(f"--only takes a subset of {','.join(TARGETS)}")
    if not 0 < args.active <= args.connections or args.rate <= 0 or args.rounds < 1:
        p.error("need 0 < --active <= --connections, --rate > 0, --rounds >= 1")
    if not args.generators:
        args.generators = max(4, math.ceil(args.connections / (GEN_FILES_SHARE * args.nofile)))
    if args.active < args.generators:
        p.error("--active must be at least --generators")
    return args


# ---------------------------------------------------------------- one run


def start_proxy(stack: ExitStack, name: str, root: Path, port: int, backends: list[int],
                args, workers: int | None) -> list[sc.Service]:
    """Start ``name`` (poise, or ``workers`` HAProxy processes) and wait until it answers."""
    if name == "poise":
        argvs = [sc.poise_argv(root, port, backends, args.poise_cmd, args.connections)]
    else:
        maxconn = sc.haproxy_maxconn(args.connections, workers, args.nofile)
        cfg = sc.haproxy_config(root, port, backends, workers, maxconn)
        argvs = [["haproxy", "-f", str(cfg), "-db"]] * workers
    services = []
    for i, argv in enumerate(argvs):
        svc = sc.Service(f"{name}-{i}" if len(argvs) > 1 else name, argv,
                         root / f"{name}-{i}.log", args.nofile)
        stack.callback(svc.stop)
        svc.start()
        services.append(svc)
    for svc in services:
        svc.wait_ready([port], args.start_timeout)
    # (poise answers once one worker has bound the port: wait until all of them are up.)
    deadline = time.monotonic() + args.start_timeout
    while name == "poise" and time.monotonic() < deadline:
        if "workers serving" in services[0].log_path.read_text(errors="replace") or \
                sc.memory(services)["processes"] == 1:
            break
        time.sleep(0.2)
    log(f"#   {name} ready: {sc.memory(services)['processes']} process(es) on port {port}")
    return services


def generator_commands(exe: Path, port: int, args, run_no: int, root: Path) -> list[list[str]]:
    """One command per generator: its share of the connections, the rate and the connect
    rate, and its own source addresses (127.R.G.1-4: fresh for each run, so no port is
    in TIME_WAIT from the run before)."""
    g = args.generators
    cmds = []
    for k in range(g):
        active = args.active // g + (k < args.active % g)
        idle = (args.connections - args.active) // g + (k < (args.connections - args.active) % g)
        cmds.append(latency_gen.argv(
            exe, port, args.rate * active / args.active, args.duration, active, idle=idle,
            source=f"127.{run_no % 250 + 1}.{k + 1}.1-4", connect_rate=args.connect_rate / g,
            raw=root / f"raw-{run_no}-{k}.bin", wait_go=True, probe_idle=True,
            skip=args.skip, drain=3.0))
    return cmds


def one_run(exe: Path, name: str, rnd: int, run_no: int, root: Path, backend_ports: list[int],
            port: int, args, workers: int | None) -> dict:
    """Start the proxy, open every connection, measure, probe the idle ones, stop."""
    sample: dict = {"target": name, "round": rnd}
    with ExitStack() as stack:
        services = start_proxy(stack, name, root, port, backend_ports, args, workers)
        if name == "haproxy":
            sample["haproxy_maxconn"] = sc.haproxy_maxconn(args.connections, workers,
                                                           args.nofile)
        sample["processes"] = sc.memory(services)["processes"]
        sample["memory_started"] = sc.memory(services, sockets=True)
        fleet = latency_gen.Fleet(generator_commands(exe, port, args, run_no, root))
        stack.callback(fleet.close)
        t0 = time.monotonic()
        ready = fleet.wait_ready(timeout=args.connections / args.connect_rate * 4 + 60)
        sample["ramp_s"] = round(time.monotonic() - t0, 2)
        sample["ready"] = ready
        sample["memory_connected"] = sc.memory(services, sockets=True)
        log(f"#   {sum(r['active'] + r['idle'] for r in ready):,} connections open in "
            f"{sample['ramp_s']} s; proxy holds {sample['memory_connected']['sockets']:,} "
            f"sockets, RSS {sample['memory_connected']['rss_mib']:,.0f} MiB")
        cpu0 = sc.cpu_seconds(services)
        fleet.go()
        peak = dict(sample["memory_connected"])
        end = time.monotonic() + args.skip + args.duration + 120
        while not fleet.done():
            if time.monotonic() > end:
                break
            time.sleep(1.0)
            now = sc.memory(services)
            peak = {k: max(v, now.get(k, 0)) for k, v in peak.items()}
        reports = fleet.results(timeout=10)
        sample["proxy_cpu_s"] = round(sc.cpu_seconds(services) - cpu0, 3)
        sample["memory_loaded"] = sc.memory(services, sockets=True)
        sample["memory_peak"] = peak
        sample["reports"] = reports
        sample["log_lines"] = proxy_log_lines(services)
        lat = []
        for k in range(len(reports)):
            lat.extend(latency_gen.read_raw(root / f"raw-{run_no}-{k}.bin"))
        sample["latency_us"] = latency_gen.percentiles(lat)
        sample["alive_at_end"] = all(svc.alive() for svc in services)
    return sample


def proxy_log_lines(services: list[procs.Service]) -> dict:
    """What the proxy said about file limits, and its warnings and errors (counted)."""
    notes, problems = [], 0
    for svc in services:
        try:
            lines = svc.log_path.read_text(errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            if "open files" in line and line not in notes:
                notes.append(line)
            elif any(w in line for w in ("WARNING", "ERROR", "ALERT", "Too many open files")):
                problems += 1
    return {"open_files": notes, "warnings_and_errors": problems}


# ---------------------------------------------------------------- main


def benchmark(args, stack: ExitStack, result: dict) -> None:
    tmp = stack.enter_context(procs.tempdir(args.keep_temp, "poise-scale-"))
    root = Path(tmp)
    root.chmod(0o755)
    log(f"# tempdir {root}")
    exe = latency_gen.build(root)
    ports = procs.pick_ports(3, base=args.base_port)
    backends, port = ports[:2], ports[2]
    backend = run.start_service(stack, "backend", configs.backend_nginx(root, backends),
                                root, backends, args.start_timeout)
    result["ports"] = {"backends": backends, "proxy": port}
    workers = None
    run_no = 0
    for rnd in range(1, args.rounds + 1):
        order = args.only if rnd % 2 else args.only[::-1]
        if workers is None and "haproxy" in order and order[0] == "haproxy":
            order = order[::-1]     # (poise first: HAProxy gets as many processes)
        for name in order:
            run_no += 1
            log(f"# round {rnd}/{args.rounds}: {name}, {args.connections:,} connections "
                f"({args.active:,} active at {args.rate:,.0f} req/s)")
            count = workers or _default_processes(args)
            try:
                sample = one_run(exe, name, rnd, run_no, root, backends, port, args, count)
            except (procs.StartError, latency_gen.GenError, OSError) as exc:
                result["failures"][f"{name} round {rnd}"] = str(exc)
                log(f"!! {name} round {rnd}: {exc}")
                continue
            if name == "poise" and sample["processes"] > 1:
                workers = sample["processes"] - 1       # (the supervisor serves no traffic)
            result["samples"].append(sample)
            log(scale_report.progress_line(sample))
            time.sleep(1.0)     # (the closed connections' last packets)
    result["backend_alive"] = backend.alive()


def _default_processes(args) -> int:
    """HAProxy processes when poise did not run first: as many as poise's ``workers:
    auto`` would start (the rule of poise/config/workers.py, on at least 2 CPUs)."""
    cpus = max(2, len(os.sched_getaffinity(0)))
    return max(cpus, math.ceil(2 * sc.poise_cap(args.connections) / (0.9 * args.nofile)))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    procs.ensure_tools()
    started = datetime.now(UTC)
    machine = report.machine_info()
    machine["poise_hot_path"] = tcp_configs.poise_build(REPO, args.poise_cmd)
    result = {
        "timestamp": started.strftime("%Y%m%dT%H%M%SZ"),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": machine, "failures": {}, "samples": [],
    }
    if not procs.run_cleanly(lambda stack: benchmark(args, stack, result), log):
        return 130
    result["elapsed_s"] = round((datetime.now(UTC) - started).total_seconds(), 1)
    result["summary"] = scale_report.summarize(result["samples"], args.only)
    markdown = scale_report.render(result)
    print(markdown)
    json_path, md_path = procs.save_results("scale", result, markdown, args.results_dir)
    log(f"# saved {json_path} and {md_path}")
    return 0 if result["samples"] else 1


if __name__ == "__main__":
    sys.exit(main())
