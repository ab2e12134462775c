#!/usr/bin/env python3
"""Latency under load at fixed request rates: poise vs HAProxy vs nginx (issue 15,
goal 4), measured open-loop.

A saturating load generator flatters whichever proxy batches more, so this bench first
finds poise's saturation rate (`wrk -t1 -c64`, as bench/run.py measures throughput),
then offers every proxy the *same fixed rates* (default 50% and 90% of it) with
latency_gen (latency_gen.c: open loop, each request timed from when it was due) and
reports p50/p99/p99.9 and each proxy's CPU µs per request, in alternating rounds.
Configs are bench/run.py's (one worker/thread each, one backend nginx); `direct` is the
generator straight to the backend, the floor every proxy's latency sits on.
Results: stdout (markdown), bench/results/latency-latest.md and
bench/results/latency-<UTC timestamp>.json.

    python bench/latency.py                  # 3 rounds x 2 levels x 7 s (~4 min)
    python bench/latency.py --quick          # 1 round x 3 s (~1 min)
    python bench/latency.py --levels 0.5,0.7,0.9 --duration 20 --rounds 5

See bench/README.md ("Latency at fixed rates") for what each figure means.
"""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import configs  # noqa: E402
import latency_gen  # noqa: E402
import latency_report  # noqa: E402
import loadgen  # noqa: E402
import procs  # noqa: E402
import report  # noqa: E402
import run  # noqa: E402
import tcp_configs  # noqa: E402

REPO = BENCH_DIR.parent
PROXIES = ("poise", "haproxy", "nginx")
TARGETS = (*PROXIES, "direct")
SATURATION_CONNECTIONS = 64


def log(msg: str) -> None:
    """Progress goes to stderr so stdout carries only the report."""
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse and check the command line; --quick overrides rounds/duration/warm-up."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=6,
                   help="recorded seconds per run (default 6)")
    p.add_argument("--skip", type=float, default=1,
                   help="unrecorded seconds at the start of each run, while its new "
                        "connections settle (default 1)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    p.add_argument("--levels", default="0.5,0.9",
                   help="rates as fractions of poise's saturation rate (default 0.5,0.9)")
    p.add_argument("--rate", type=float, default=None,
                   help="take this as the saturation rate (req/s) instead of measuring it")
    p.add_argument("--saturation-duration", type=int, default=5,
                   help="seconds of `wrk -c64` that find the saturation rate (default 5)")
    p.add_argument("--connections", type=int, default=64,
                   help="latency_gen's keep-alive connections (default 64: as many as wrk "
                        "uses, and nginx's upstream keepalive 64 holds)")
    p.add_argument("--warmup", type=int, default=2, help="wrk warm-up s per proxy (default 2)")
    p.add_argument("--only", default=",".join(TARGETS),
                   help=f"comma-separated subset of: {','.join(TARGETS)} (poise is always "
                        "started: its saturation rate sets the rates)")
    p.add_argument("--quick", action="store_true", help="1 round of 3 s, 1 s warm-up")
    p.add_argument("--poise-cmd", default=f"{REPO}/.venv/bin/poise run",
                   help="command that runs poise; the config path is appended")
    p.add_argument("--start-timeout", type=float, default=20.0,
                   help="seconds to wait for each service to answer (default 20)")
    p.add_argument("--base-port", type=int, default=19200,
                   help="first port tried in the 19xxx range (default 19200)")
    p.add_argument("--results-dir", type=Path, default=BENCH_DIR / "results")
    p.add_argument("--keep-temp", action="store_true", help="keep the tempdir (configs, logs)")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.duration, args.warmup, args.saturation_duration = 1, 3, 1, 3
        args.skip = min(args.skip, 0.5)
    args.only = [n.strip() for n in args.only.split(",") if n.strip()]
    if set(args.only) - set(TARGETS) or not args.only:
        p.error(f"--only takes a subset of {','.join(TARGETS)}")
    try:
        args.levels = [float(x) for x in args.levels.split(",") if x.strip()]
    except ValueError:
        p.error("--levels takes fractions like 0.5,0.9")
    if not args.levels or not all(0 < x <= 2 for x in args.levels):
        p.error("--levels takes fractions in (0, 2]")
    if args.duration <= 0 or args.rounds < 1 or args.warmup < 0 or args.connections < 1:
        p.error("--duration, --rounds and --connections must be positive, --warmup >= 0")
    return args


# ---------------------------------------------------------------- measuring


def saturation(svc: procs.Service, port: int, args) -> dict:
    """poise's saturation rate: `wrk -t1 -c64` for --saturation-duration seconds."""
    cpu0 = svc.cpu_seconds()
    res = loadgen.run_wrk(f"http://127.0.0.1:{port}/", SATURATION_CONNECTIONS,
                          args.saturation_duration, latency=True)
    cpu = svc.cpu_seconds() - cpu0
    return {"rps": res["rps"], "requests": res["requests"], "errors": res["error_total"],
            "p99_ms": res["latency_s"].get("p99", 0) * 1e3,
            "cpu_us_per_req": cpu / res["requests"] * 1e6 if res["requests"] else None,
            "argv": res["argv"]}


def measure(exe: Path, svc: procs.Service | None, backend: procs.Service, port: int,
            rate: float, args) -> dict:
    """One latency_gen run at ``rate`` with the proxy's and the backend's CPU read around
    it (``svc`` None: the generator straight to the backend)."""
    cpu0, bcpu0 = (svc.cpu_seconds() if svc else 0.0), backend.cpu_seconds()
    load = os.getloadavg()[0]
    rep = latency_gen.run(latency_gen.argv(exe, port, rate, args.duration, args.connections,
                                           skip=args.skip),
                          timeout=args.skip + args.duration + 60)
    cpu, bcpu = (svc.cpu_seconds() - cpu0 if svc else None), backend.cpu_seconds() - bcpu0
    # (CPU is read around the whole run, so it is divided by every request answered.)
    done = rep["done_all"]
    rep["loadavg_1m_before"] = load
    rep["gen_cpu_s"] = rep.pop("cpu_s")
    rep.update(
        proxy_cpu_s=cpu, backend_cpu_s=round(bcpu, 4), failed=latency_gen.failures(rep),
        gen_cpu_us_per_req=rep["gen_cpu_s"] / done * 1e6 if done else None,
        cpu_us_per_req=cpu / done * 1e6 if cpu is not None and done else None,
        cpu_pct=cpu / rep["measured_s"] * 100 if cpu is not None else None,
        backend_cpu_us_per_req=bcpu / done * 1e6 if done else None)
    return rep


def run_levels(exe: Path, running: dict, backend: procs.Service, direct_port: int,
               rates: list[tuple[float, float]], args, samples: list, failures: dict) -> None:
    """Every round: every level, every target (every other round in reverse order)."""
    targets = [t for t in args.only if t in running or t == "direct"]
    for rnd in range(1, args.rounds + 1):
        for level, rate in rates:
            order = targets if rnd % 2 else targets[::-1]
            for name in order:
                if name != "direct" and (name not in running
                                         or run.drop_if_dead(name, running[name][0],
                                                             running, failures)):
                    continue
                svc, port = running[name] if name != "direct" else (None, direct_port)
                log(f"# round {rnd}/{args.rounds}, {level:.0%} ({rate:,.0f} req/s): {name} "
                    f"({args.duration:g} s, {args.connections} connections)")
                sample = {"round": rnd, "level": level, "rate": rate, "target": name}
                try:
                    sample.update(measure(exe, svc, backend, port, rate, args), ok=True)
                    lat = sample["latency_us"]
                    log(f"#   p50 {lat['p50']} µs, p99 {lat['p99']} µs, p99.9 "
                        f"{lat['p99.9']} µs, {sample['failed']} failed"
                        + (f", {sample['cpu_us_per_req']:.1f} CPU µs/req"
                           if sample["cpu_us_per_req"] else ""))
                except (latency_gen.GenError, OSError) as exc:
                    sample.update(ok=False, error=str(exc))
                    log(f"!! {name}: {exc}")
                samples.append(sample)


# ---------------------------------------------------------------- main


def benchmark(args, stack: ExitStack, result: dict) -> None:
    """Start everything, find the saturation rate, run the levels."""
    tmp = stack.enter_context(procs.tempdir(args.keep_temp, "poise-latency-"))
    root = Path(tmp)
    root.chmod(0o755)  # nginx workers run unprivileged
    log(f"# tempdir {root}")
    exe = latency_gen.build(root)
    proxies = [p for p in PROXIES if p in args.only or p == "poise"]
    ports = procs.pick_ports(2 + len(proxies), base=args.base_port)
    backends = ports[:2]
    try:
        backend = run.start_service(stack, "backend", configs.backend_nginx(root, backends),
                                    root, backends, args.start_timeout)
    except procs.StartError as exc:
        raise SystemExit(f"!! backend nginx failed to start, nothing to measure:\n{exc}") \
            from None
    failures, samples = result["failures"], result["samples"]
    run_args = argparse.Namespace(**vars(args))
    run_args.only, run_args.connections = proxies, SATURATION_CONNECTIONS
    running = run.start_proxies(stack, root, ports[2:], backends, run_args, failures)
    result["ports"] = {"backends": backends, **{n: p for n, (_, p) in running.items()}}
    if "poise" not in running:
        raise SystemExit("!! poise did not start: no saturation rate to measure at")
    run.warm_up(running, run_args, failures)
    if args.rate is None:
        log(f"# saturation: wrk -t1 -c{SATURATION_CONNECTIONS} against poise "
            f"({args.saturation_duration} s)")
        result["saturation"] = saturation(*running["poise"], args)
        log(f"#   {result['saturation']['rps']:,.0f} req/s")
    else:
        result["saturation"] = {"rps": args.rate, "given": True}
    rates = [(level, level * result["saturation"]["rps"]) for level in args.levels]
    result["rates"] = rates
    run_levels(exe, running, backend, backends[0], rates, args, samples, failures)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; always stop what was started; return the exit status."""
    args = parse_args(argv)
    procs.ensure_tools()
    started = datetime.now(UTC)
    machine = report.machine_info()
    machine["poise_hot_path"] = tcp_configs.poise_build(REPO, args.poise_cmd)
    result = {
        "timestamp": started.strftime("%Y%m%dT%H%M%SZ"),
        "settings": {"duration": args.duration, "skip": args.skip, "rounds": args.rounds,
                     "levels": args.levels,
                     "connections": args.connections, "warmup": args.warmup,
                     "saturation_duration": args.saturation_duration, "only": args.only,
                     "poise_cmd": args.poise_cmd},
        "machine": machine, "failures": {}, "samples": [],
    }
    if not procs.run_cleanly(lambda stack: benchmark(args, stack, result), log):
        return 130
    result["elapsed_s"] = round((datetime.now(UTC) - started).total_seconds(), 1)
    result["summary"] = latency_report.summarize(result["samples"], args.only)
    markdown = latency_report.render(result)
    print(markdown)
    json_path, md_path = procs.save_results("latency", result, markdown, args.results_dir)
    log(f"# saved {json_path} and {md_path}")
    return 0 if any(s.get("ok") for s in result["samples"]) else 1


if __name__ == "__main__":
    sys.exit(main())
