#!/usr/bin/env python3
"""Benchmark poise against HAProxy and nginx on loopback, driven by wrk.

One nginx backend (one worker, two ports) sits behind three proxies. Each proxy
is measured in alternating rounds (poise, haproxy, nginx, poise, ...) for
throughput, latency and its own CPU time per request, then for 10 MiB
streaming. Results go to stdout (markdown) and bench/results/.

    python bench/run.py                       # 3 rounds x 10 s, all proxies
    python bench/run.py --quick               # 1 round x 3 s
    python bench/run.py --only haproxy,nginx --no-stream

See bench/README.md for what each column means.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
import urllib.request
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import configs  # noqa: E402
import loadgen  # noqa: E402
import procs  # noqa: E402
import report  # noqa: E402

REPO = BENCH_DIR.parent
# poise+checks: poise with an active health check and outlier detection configured
# (the cost of resilience on the keep-alive path; issue 4 allows at most +5%).
# The floors (bench/floors.py) are references, not proxies: the least a Python relay
# on uvloop (+ httptools) costs per request.
FLOORS = ("uvloop-relay", "httptools-relay")
# poise-2w: poise with `workers: 2` (a supervisor and control plane, two worker
# processes); its admin API says how the requests were shared between the workers.
# poise-nometrics, poise+log, poise+trace: poise with `metrics: {enabled: false}`, with
# a JSON access log to a file, and with tracing every request (sample_ratio 1.0, spans
# exported over OTLP/HTTP to a local sink): the costs of observability (issue 10).
OBSERVED = {
    "poise-nometrics": "metrics: {enabled: false}\n",
    "poise+log": "access_log: {format: json, path: $root/access.log}\n",
    "poise+trace": "tracing: {otlp_endpoint: \"http://127.0.0.1:$sink\", sample_ratio: 1.0}\n",
}
# poise+limit, poise+global: a client_ip rate limit on the listener that the load never
# reaches (every request is checked and admitted), local (the table all workers share)
# and global (leases from a Redis the bench starts): their cost per request (issue 12).
LIMITED = {
    "poise+limit": "    rate_limit: {rate: 1000000000/s}\n",
    "poise+global": "    rate_limit: {rate: 1000000000/s, burst: 1000000, scope: global, "
                    "redis: \"redis://127.0.0.1:$redis/0\"}\n",
    # (not a limit) poise without X-Forwarded-For/-Proto/-Host, the work HAProxy's and
    # nginx's configs here do: compare with "haproxy" for equal work both ways.
    "poise-noxff": "    forwarded_headers: false\n",
}
# haproxy+xff: HAProxy adding the three X-Forwarded-* headers poise adds by default
# (`option forwardfor` and two set-header rules): equal work with "poise".
# The headline comparison (poise, HAProxy, nginx) runs back to back in every round, so
# that the box's drift over a round (fourteen runs of 10 s) does not fall between them.
PROXIES = ("poise", "haproxy", "nginx", "haproxy+xff", *OBSERVED, *LIMITED,
           "poise+checks", "poise-2w", *FLOORS)
# poise-base: another poise install (--baseline-cmd, e.g. a worktree of the previous
# commit) in the same alternating rounds, for before/after comparisons of one change.
BASELINE = "poise-base"
STREAM_CONNECTIONS = 4
# poise-2w's admin API listens this far above its proxy port.
ADMIN_OFFSET = 500


def log(msg: str) -> None:
    """Progress goes to stderr so stdout carries only the report."""
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse and check the command line; --quick overrides rounds/duration/warm-up."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=int, default=10, help="seconds per wrk run (default 10)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up seconds per proxy (default 2)")
    p.add_argument("--connections", type=int, default=64, help="wrk connections (default 64)")
    p.add_argument("--only", default=",".join(PROXIES),
                   help=f"comma-separated subset of: {','.join((*PROXIES, BASELINE))}")
    p.add_argument("--baseline-cmd", default=None,
                   help=f"command that runs a baseline poise ({BASELINE}, added to the "
                        "proxies measured); the config path is appended")
    p.add_argument("--quick", action="store_true", help="1 round of 3 s, 1 s warm-up")
    p.add_argument("--poise-cmd", default=f"{REPO}/.venv/bin/poise run",
                   help="command that runs poise; the config path is appended")
    p.add_argument("--no-stream", action="store_true", help="skip the 10 MiB streaming case")
    p.add_argument("--start-timeout", type=float, default=20.0,
                   help="seconds to wait for each service to answer (default 20)")
    p.add_argument("--base-port", type=int, default=19100,
                   help="first port tried in the 19xxx range (default 19100)")
    p.add_argument("--results-dir", type=Path, default=BENCH_DIR / "results")
    p.add_argument("--keep-temp", action="store_true", help="keep the tempdir (configs, logs)")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.duration, args.warmup = 1, 3, 1
    args.only = [n.strip() for n in args.only.split(",") if n.strip()]
    if args.baseline_cmd and BASELINE not in args.only:
        args.only.insert(1, BASELINE)
    if BASELINE in args.only and not args.baseline_cmd:
        p.error(f"{BASELINE} needs --baseline-cmd")
    unknown = set(args.only) - {*PROXIES, BASELINE}
    if unknown or not args.only:
        p.error(f"--only takes a subset of {','.join(PROXIES)}; got {sorted(unknown) or 'nothing'}")
    if args.duration < 1 or args.rounds < 1 or args.warmup < 0:
        p.error("--duration and --rounds must be >= 1, --warmup >= 0")
    return args



# ---------------------------------------------------------------- services


def start_service(stack: ExitStack, name: str, argv: list[str], root: Path,
                  ports: list[int], timeout: float) -> procs.Service:
    """Start a service, register its stop on the stack, and wait until it answers."""
    svc = procs.Service(name, argv, root / f"{name}.log")
    stack.callback(svc.stop)
    log(f"# starting {name}: {' '.join(argv)}")
    svc.start()
    svc.wait_ready(ports, timeout)
    log(f"#   {name} ready (pid {svc.pid}) on port(s) {', '.join(map(str, ports))}")
    return svc


def start_redis(stack: ExitStack, root: Path, port: int, timeout: float) -> procs.Service:
    """The Redis of poise+global (it does not speak HTTP: ready when it answers PING)."""
    svc = procs.Service("redis", ["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                                  "--save", "", "--appendonly", "no", "--dir", str(root)],
                        root / "redis.log")
    stack.callback(svc.stop)
    svc.start()
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    break
        except OSError:
            pass
        if time.monotonic() > deadline or not svc.alive():
            raise SystemExit(f"!! redis did not answer PING on port {port}:\n{svc.log_tail()}")
        time.sleep(0.1)
    log(f"#   redis ready (pid {svc.pid}) on port {port}")
    return svc


def proxy_argv(name: str, root: Path, port: int, backends: list[int], args) -> list[str]:
    """Write the proxy's config and return its command line."""
    if name == BASELINE:
        return configs.poise(root, port, backends, args.baseline_cmd, tag="-base")
    if name == "poise-2w":
        return configs.poise(root, port, backends, args.poise_cmd, workers=2,
                             admin_port=port + ADMIN_OFFSET)
    if name in OBSERVED:
        extra = OBSERVED[name].replace("$root", str(root)).replace(
            "$sink", str(getattr(args, "sink_port", 0)))
        return configs.poise(root, port, backends, args.poise_cmd, extra=extra,
                             tag=name.removeprefix("poise"))
    if name in LIMITED:
        return configs.poise(root, port, backends, args.poise_cmd,
                             tag=name.removeprefix("poise"), listener_extra=LIMITED[name].replace(
                                 "$redis", str(getattr(args, "redis_port", 0))))
    if name.startswith("poise"):
        return configs.poise(root, port, backends, args.poise_cmd,
                             resilience=name == "poise+checks")
    if name in FLOORS:
        return [f"{REPO}/.venv/bin/python", str(BENCH_DIR / "floors.py"), name, str(port),
                *map(str, backends)]
    if name.startswith("haproxy"):
        return configs.haproxy(root, port, backends, forwarded=name == "haproxy+xff")
    return configs.nginx_proxy(root, port, backends)


def start_proxies(stack, root, ports, backends, args, failures) -> dict:
    """Start each requested proxy; a failure is recorded and the others go on."""
    running = {}
    for name, port in zip(args.only, ports, strict=True):
        try:
            argv = proxy_argv(name, root, port, backends, args)
            running[name] = (start_service(stack, name, argv, root, [port], args.start_timeout),
                             port)
        except procs.StartError as exc:
            failures[name] = f"failed to start: {exc}"
            log(f"!! {name} FAILED to start:\n{exc}")
    return running


# ---------------------------------------------------------------- measuring


def measure(svc: procs.Service, backend: procs.Service, url: str, connections: int,
            duration: int, latency: bool) -> dict:
    """One wrk run with the proxy's and the backend's CPU time read around it."""
    cpu0, bcpu0 = svc.cpu_seconds(), backend.cpu_seconds()
    res = loadgen.run_wrk(url, connections, duration, latency=latency)
    cpu1, bcpu1 = svc.cpu_seconds(), backend.cpu_seconds()
    n = res["requests"]
    res.update(cpu_s=round(cpu1 - cpu0, 4), backend_cpu_s=round(bcpu1 - bcpu0, 4),
               cpu_us_per_req=(cpu1 - cpu0) / n * 1e6 if n else None,
               backend_cpu_us_per_req=(bcpu1 - bcpu0) / n * 1e6 if n else None)
    return res


def drop_if_dead(name: str, svc: procs.Service, running: dict, failures: dict) -> bool:
    """If the proxy has exited, record why and stop measuring it; True if dropped."""
    if svc.alive():
        return False
    failures[name] = (f"exited during the benchmark (code {svc.proc.returncode}):\n"
                      f"{svc.log_tail()}")
    log(f"!! {name} exited during the benchmark")
    del running[name]
    return True


def warm_up(running: dict, args, failures: dict) -> None:
    """A short unmeasured wrk run per proxy; a proxy that cannot take it is dropped."""
    if not args.warmup:
        return
    for name, (svc, port) in list(running.items()):
        log(f"# warm-up {name} ({args.warmup} s)")
        try:
            loadgen.run_wrk(f"http://127.0.0.1:{port}/", args.connections, args.warmup,
                            latency=False)
        except loadgen.WrkError as exc:
            failures[name] = f"warm-up failed: {exc}"
            log(f"!! {name} warm-up failed: {exc}")
            svc.stop()
            del running[name]
            continue
        drop_if_dead(name, svc, running, failures)


def run_phase(phase: str, running: dict, backend, args, samples: list, failures: dict) -> None:
    """Alternating rounds over the running proxies, appending one sample per wrk run."""
    path, conns, latency = (("/", args.connections, True) if phase == "small"
                            else ("/big", STREAM_CONNECTIONS, False))
    for rnd in range(1, args.rounds + 1):
        # Every other round in reverse order: a proxy's place in a round (the machine
        # warming up or being lent out as a round goes on) evens out over rounds.
        order = list(running.items())
        for name, (svc, port) in (order if rnd % 2 else order[::-1]):
            if phase == "stream" and (name in ("poise+checks", "poise-2w") or name in FLOORS
                                      or name in OBSERVED or name in LIMITED):
                continue    # per-request costs only: streaming is the same data path
            if drop_if_dead(name, svc, running, failures):
                continue
            log(f"# {phase} round {rnd}/{args.rounds}: {name} ({args.duration} s, -c{conns})")
            sample = {"phase": phase, "round": rnd, "proxy": name}
            try:
                sample.update(measure(svc, backend, f"http://127.0.0.1:{port}{path}", conns,
                                      args.duration, latency), ok=True)
                log(f"#   {sample['rps']:,.0f} req/s, {sample['cpu_s']:.2f} CPU s, "
                    f"{sample['error_total']} errors")
            except loadgen.WrkError as exc:
                sample.update(ok=False, error=str(exc))
                log(f"!! {name} {phase} round {rnd}: {exc}")
            samples.append(sample)


# ---------------------------------------------------------------- main


def benchmark(args, stack: ExitStack, result: dict) -> None:
    """Start everything, run both phases, fill result['samples'] and result['failures']."""
    tmp = stack.enter_context(procs.tempdir(args.keep_temp, "poise-bench-"))
    root = Path(tmp)
    root.chmod(0o755)  # nginx workers run unprivileged and must read /big
    log(f"# tempdir {root}")
    ports = procs.pick_ports(2 + len(args.only), base=args.base_port)
    backends, proxy_ports = ports[:2], ports[2:]
    try:
        backend = start_service(stack, "backend", configs.backend_nginx(root, backends), root,
                                backends, args.start_timeout)
    except procs.StartError as exc:
        raise SystemExit(f"!! backend nginx failed to start, nothing to measure:\n{exc}") from None
    result["ports"] = {"backends": backends, **dict(zip(args.only, proxy_ports, strict=True))}
    if "poise+trace" in args.only:
        args.sink_port = procs.pick_ports(1, base=args.base_port + 50)[0]
        start_service(stack, "otlp-sink", [sys.executable, str(BENCH_DIR / "otlp_sink.py"),
                                           str(args.sink_port)], root, [args.sink_port],
                      args.start_timeout)
    if "poise+global" in args.only:
        args.redis_port = procs.pick_ports(1, base=args.base_port + 60)[0]
        start_redis(stack, root, args.redis_port, args.start_timeout)
    failures, samples = result["failures"], result["samples"]
    running = start_proxies(stack, root, proxy_ports, backends, args, failures)
    warm_up(running, args, failures)
    run_phase("small", running, backend, args, samples, failures)
    if "poise-2w" in running:
        result["poise_workers"] = worker_shares(running["poise-2w"][1] + ADMIN_OFFSET)
    if not args.no_stream:
        run_phase("stream", running, backend, args, samples, failures)


def worker_shares(admin_port: int) -> list[dict]:
    """poise-2w's workers as its admin API lists them (pid, requests served)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/workers", timeout=5) as r:
            return json.load(r)["workers"]
    except (OSError, ValueError, KeyError) as exc:
        log(f"!! poise-2w: cannot read /workers: {exc}")
        return []



def finish(args, result: dict) -> int:
    """Summarize, print and save; return the exit status."""
    samples = result["samples"]
    small = report.summarize_small(samples, args.only)
    result["summary"] = {"small": small, "stream": report.summarize_stream(samples, args.only),
                         "cpu_verdict": report.cpu_verdict(small),
                         "paired_cpu_ratios": report.paired_cpu_ratios(samples),
                         "observability": report.observability_costs(samples),
                         "rate_limits": report.rate_limit_costs(samples),
                         "floor_gap": report.floor_gap(small)}
    markdown = report.render_markdown(result)
    print(markdown)
    print(report.verdict_line(result["summary"]["cpu_verdict"]))
    json_path, md_path = report.save(result, markdown, args.results_dir)
    log(f"# saved {json_path} and {md_path} (copied to latest.md)")
    if not any(s["ok"] for s in samples):
        log("!! nothing could be measured")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; always stop what was started; return the exit status."""
    args = parse_args(argv)
    procs.ensure_tools()
    started = datetime.now(UTC)
    result = {
        "timestamp": started.strftime("%Y%m%dT%H%M%SZ"),
        "settings": {"duration": args.duration, "rounds": args.rounds, "warmup": args.warmup,
                     "connections": args.connections, "stream_connections": STREAM_CONNECTIONS,
                     "stream": not args.no_stream, "only": args.only,
                     "poise_cmd": args.poise_cmd, "baseline_cmd": args.baseline_cmd,
                     "big_size": configs.BIG_SIZE},
        "machine": report.machine_info(),
        "failures": {}, "samples": [],
    }
    if not procs.run_cleanly(lambda stack: benchmark(args, stack, result), log):
        return 130
    result["elapsed_s"] = round((datetime.now(UTC) - started).total_seconds(), 1)
    return finish(args, result)


if __name__ == "__main__":
    sys.exit(main())
