#!/usr/bin/env python3
"""HTTP/2 from clients: poise vs HAProxy vs nginx, each an h2c front end to an HTTP/1.1
backend, driven by h2load (and wrk for poise's HTTP/1.1 reference).

One backend nginx (one worker, HTTP/1.1 keep-alive) sits behind each proxy, each with
one worker/thread and a listener taking HTTP/2 with prior knowledge (h2c). h2load
measures, in alternating rounds: small GETs with 32 streams in flight per connection
(`h2load -c16 -m32`, the issue's case) and with one (`-c16 -m1`), 64 KiB responses and
1 MiB uploads; requests/s and the proxy's CPU µs per request, with per-round ratios
poise ÷ HAProxy and poise ÷ nginx and their medians. wrk against poise's same listener
(HTTP/1.1, as many requests in flight) gives what a request costs poise without HTTP/2.
Results: stdout (markdown), bench/results/h2-latest.md and
bench/results/h2-<UTC timestamp>.json.

    python bench/http2.py                 # 3 rounds x 4 s per case (~3 min)
    python bench/http2.py --quick         # 1 round x 2 s (~45 s)
    python bench/http2.py --only poise,haproxy --cases get-m32

See bench/README.md ("HTTP/2") for what each figure means.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from statistics import median

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import http2_configs  # noqa: E402
import procs  # noqa: E402
import report  # noqa: E402
import tcp_configs  # noqa: E402

REPO = BENCH_DIR.parent
# A run with more failed requests than this share of those that succeeded measured a
# failure, not the proxy: it is listed in the report and left out of medians and ratios.
MAX_ERROR_SHARE = 0.01
# poise-h1: wrk (HTTP/1.1 keep-alive) against poise's same listener, in the cases that
# give it a connection count: what a request costs poise without HTTP/2.
TARGETS = ("poise", "haproxy", "nginx", "poise-h1")
H2_TARGETS = TARGETS[:3]


@dataclass(frozen=True)
class Case:
    """One measured case: h2load with ``connections`` x ``streams`` in flight on ``path``
    (``upload``: POSTing http2_configs.UPLOAD_MIB MiB each); ``h1_connections``: wrk's
    connections for poise-h1 (0: no HTTP/1.1 run)."""
    name: str
    connections: int
    streams: int
    path: str = "/"
    upload: bool = False
    h1_connections: int = 0


CASES = (
    # The issue's case: many streams per connection, small responses.
    Case("get-m32", 16, 32, h1_connections=512),
    # One stream in flight per connection: HTTP/2 framing without multiplexing.
    Case("get-m1", 16, 1, h1_connections=16),
    Case("get-64k", 16, 32, path="/64k"),
    Case("post-1m", 16, 1, path="/upload", upload=True),
)


def log(msg: str) -> None:
    """Progress goes to stderr so stdout carries only the report."""
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse and check the command line; --quick overrides rounds/duration/warm-up."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=int, default=4, help="seconds per run (default 4)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    p.add_argument("--warmup", type=int, default=1,
                   help="unmeasured seconds per target before each case (default 1)")
    p.add_argument("--only", default=",".join(TARGETS),
                   help=f"comma-separated subset of: {','.join(TARGETS)} (default: all)")
    p.add_argument("--cases", default=",".join(c.name for c in CASES),
                   help=f"comma-separated subset of: {','.join(c.name for c in CASES)}")
    p.add_argument("--quick", action="store_true", help="1 round of 2 s, 1 s warm-up")
    p.add_argument("--poise-cmd", default=f"{sys.executable} -m poise run",
                   help="command that runs poise (the config path is appended); it runs in "
                        "--poise-cwd, so `python -m poise` imports that checkout's poise")
    p.add_argument("--poise-cwd", type=Path, default=REPO,
                   help=f"working directory of poise (default: this checkout, {REPO})")
    p.add_argument("--start-timeout", type=float, default=20.0,
                   help="seconds to wait for each service to answer (default 20)")
    p.add_argument("--base-port", type=int, default=19700,
                   help="first port tried in the 19xxx range (default 19700)")
    p.add_argument("--results-dir", type=Path, default=BENCH_DIR / "results")
    p.add_argument("--keep-temp", action="store_true", help="keep the tempdir (configs, logs)")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.duration, args.warmup = 1, 2, 1
    args.only = [n.strip() for n in args.only.split(",") if n.strip()]
    if set(args.only) - set(TARGETS) or not args.only:
        p.error(f"--only takes a subset of {','.join(TARGETS)}")
    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    if set(names) - {c.name for c in CASES} or not names:
        p.error(f"--cases takes a subset of {','.join(c.name for c in CASES)}")
    args.cases = [c for c in CASES if c.name in names]
    if args.duration < 1 or args.rounds < 1 or args.warmup < 0:
        p.error("--duration and --rounds must be >= 1, --warmup >= 0")
    return args


# ---------------------------------------------------------------- services


class Service(procs.Service):
    """procs.Service started in a working directory (poise: `python -m poise` imports
    the poise package of its working directory)."""

    def __init__(self, name: str, argv: list[str], log_path: Path, cwd: Path | None = None):
        super().__init__(name, argv, log_path)
        self.cwd = cwd

    def start(self) -> None:
        try:
            with open(self.log_path, "wb") as out:
                self.proc = subprocess.Popen(
                    self.argv, stdin=subprocess.DEVNULL, stdout=out,
                    stderr=subprocess.STDOUT, start_new_session=True, cwd=self.cwd)
        except OSError as exc:
            raise procs.StartError(f"{self.name}: cannot run {self.argv[0]!r}: {exc}") \
                from exc


def start(stack: ExitStack, name: str, argv: list[str], root: Path, port: int,
          timeout: float, h2: bool, cwd: Path | None = None) -> Service:
    """Start one service, register its stop, and wait until GET / on port answers
    (over h2c with ``h2``, else HTTP/1.1)."""
    svc = Service(name, argv, root / f"{name}.log", cwd)
    stack.callback(svc.stop)
    log(f"# starting {name}: {' '.join(argv)}" + (f" (in {cwd})" if cwd else ""))
    svc.start()
    if h2:
        http2_configs.h2_probe(svc, port, timeout)
    else:
        tcp_configs.wait_ready(svc, port, False, timeout)
    log(f"#   {name} ready (pid {svc.pid}) on {port}")
    return svc


def start_proxies(stack: ExitStack, root: Path, backend_port: int, args,
                  failures: dict) -> dict:
    """running[proxy] = (Service, port) for every proxy that started (poise-h1 uses
    poise's)."""
    names = [t for t in H2_TARGETS if t in args.only or (t == "poise" and "poise-h1"
                                                          in args.only)]
    running = {}
    for name, port in zip(names, procs.pick_ports(len(names), base=args.base_port),
                          strict=True):
        cwd = None
        try:
            if name == "haproxy":
                argv = http2_configs.haproxy(root, port, backend_port)
            elif name == "nginx":
                argv = http2_configs.nginx(root, port, backend_port)
            else:
                conf = http2_configs.poise_config(root, port, backend_port)
                problem = http2_configs.poise_check(args.poise_cmd, conf, args.poise_cwd)
                if problem:
                    failures[name] = f"{conf.name} rejected: {problem}"
                    log(f"!! {name}: {failures[name]}")
                    continue
                argv, cwd = http2_configs.poise(args.poise_cmd, conf), args.poise_cwd
            running[name] = (start(stack, name, argv, root, port, args.start_timeout, True,
                                   cwd), port)
        except procs.StartError as exc:
            failures[name] = f"failed to start: {exc}"
            log(f"!! {name} FAILED to start:\n{exc}")
    return running


def alive(svc: Service, running: dict, failures: dict) -> bool:
    """False (and recorded, and forgotten) if a proxy has exited."""
    if svc.name not in running:
        return False
    if svc.alive():
        return True
    failures[svc.name] = (f"exited during the benchmark (code {svc.proc.returncode}):\n"
                          f"{svc.log_tail()}")
    log(f"!! {svc.name} exited during the benchmark")
    del running[svc.name]
    return False


# ---------------------------------------------------------------- one run


def load(case: Case, target: str, port: int, duration: float, upload: Path) -> dict:
    """One h2load run (poise-h1: wrk) for ``case``."""
    if target == "poise-h1":
        return http2_configs.run_wrk(port, case.path, case.h1_connections, duration)
    argv = http2_configs.h2load_argv(port, case.path, case.connections, case.streams, duration,
                                  upload if case.upload else None)
    return http2_configs.run_h2load(argv, duration + 60)


def measure(case: Case, target: str, svc: Service, backend: Service, port: int,
            duration: float, upload: Path) -> dict:
    """One run with the proxy's and the backend's CPU time read around it."""
    cpu0, bcpu0, t0 = svc.cpu_seconds(), backend.cpu_seconds(), time.monotonic()
    res = load(case, target, port, duration, upload)
    cpu1, bcpu1, wall = svc.cpu_seconds(), backend.cpu_seconds(), time.monotonic() - t0
    res.update(rate=res["requests"] / res["duration_s"] if res["duration_s"] else 0.0,
               cpu_s=round(cpu1 - cpu0, 4), backend_cpu_s=round(bcpu1 - bcpu0, 4),
               wall_s=round(wall, 3), proxy_cpu_share=(cpu1 - cpu0) / wall if wall else None)
    return res


def describe(case: Case, target: str) -> str:
    if target == "poise-h1":
        return f"wrk -c{case.h1_connections} {case.path}"
    return (f"h2load -c{case.connections} -m{case.streams} "
            f"{'POST ' if case.upload else ''}{case.path}")


def case_targets(case: Case, args, running: dict) -> list[tuple[str, Service, int]]:
    out = []
    for target in args.only:
        proxy = "poise" if target == "poise-h1" else target
        if proxy in running and (target != "poise-h1" or case.h1_connections):
            out.append((target, *running[proxy]))
    return out


def run_case(case: Case, args, running: dict, backend: Service, upload: Path,
             samples: list, failures: dict) -> None:
    """Warm each target up, then alternating rounds (every other round reversed)."""
    targets = case_targets(case, args, running)
    for target, svc, port in targets:
        if not alive(svc, running, failures) or not args.warmup:
            continue
        log(f"# {case.name} warm-up {target} ({args.warmup} s)")
        try:
            load(case, target, port, args.warmup, upload)
        except http2_configs.LoadError as exc:
            log(f"!! {case.name} warm-up {target}: {exc}")
    for rnd in range(1, args.rounds + 1):
        for target, svc, port in (targets if rnd % 2 else targets[::-1]):
            if not alive(svc, running, failures):
                continue
            log(f"# {case.name} round {rnd}/{args.rounds}: {target} ({args.duration} s, "
                f"{describe(case, target)})")
            sample = {"case": case.name, "round": rnd, "target": target}
            try:
                sample.update(measure(case, target, svc, backend, port, args.duration,
                                      upload))
                sample.update(ok=True, error=None)
                log(f"#   {sample['rate']:,.0f} req/s, {sample['cpu_s']:.2f} CPU s, "
                    f"{sample['error_total']} errors")
                if not sample["requests"] or \
                        sample["error_total"] > MAX_ERROR_SHARE * sample["requests"]:
                    sample.update(ok=False, error=(
                        f"{sample['error_total']} errors for {sample['requests']} "
                        f"successful requests: {sample['errors']}"))
                    log(f"!! {case.name} round {rnd} {target}: not counted: {sample['error']}")
            except http2_configs.LoadError as exc:
                sample.update(ok=False, error=str(exc))
                log(f"!! {case.name} round {rnd} {target}: {exc}")
            samples.append(sample)


def benchmark(args, stack: ExitStack, result: dict) -> None:
    """Start everything, run every case, fill result's samples and failures."""
    root = Path(stack.enter_context(procs.tempdir(args.keep_temp, "poise-bench-h2-")))
    root.chmod(0o755)  # nginx workers run unprivileged and must read /64k
    log(f"# tempdir {root}")
    backend_port = procs.pick_ports(1, base=args.base_port + 90)[0]
    try:
        backend = start(stack, "backend", http2_configs.backend(root, backend_port), root,
                        backend_port, args.start_timeout, False)
    except procs.StartError as exc:
        raise SystemExit(f"!! backend nginx failed to start, nothing to measure:\n{exc}") \
            from None
    upload = http2_configs.upload_file(root)
    failures, samples = result["failures"], result["samples"]
    running = start_proxies(stack, root, backend_port, args, failures)
    result["ports"] = {"backend": backend_port, **{t: p for t, (_, p) in running.items()}}
    for case in args.cases:
        run_case(case, args, running, backend, upload, samples, failures)


# ---------------------------------------------------------------- summary


def _per(sample: dict, key: str) -> float | None:
    """µs of ``key`` (CPU seconds) per successful request."""
    value = sample.get(key)
    return value / sample["requests"] * 1e6 if value is not None and sample["requests"] \
        else None


def _ratios(ok: list[dict], metric, name: str, ref: str) -> list[float]:
    """metric(name's sample) ÷ metric(ref's sample), per round that measured both."""
    by_round: dict[int, dict[str, float | None]] = {}
    for s in ok:
        if s["target"] in (name, ref):
            by_round.setdefault(s["round"], {})[s["target"]] = metric(s)
    return [r[name] / r[ref] for _, r in sorted(by_round.items())
            if r.get(name) is not None and r.get(ref)]


RATIOS = (("rate", "poise", "haproxy"), ("rate", "poise", "nginx"),
          ("cpu", "poise", "haproxy"), ("cpu", "poise", "nginx"),
          ("cpu", "nginx", "haproxy"), ("cpu", "poise", "poise-h1"))


def summarize(samples: list[dict], cases: list[Case]) -> dict:
    """Per case: medians per target, and per-round ratios (rate and CPU) with medians."""
    out = {}
    for case in cases:
        ok = [s for s in samples if s["case"] == case.name and s["ok"]]
        rows = {}
        for target in dict.fromkeys(s["target"] for s in ok):
            mine = [s for s in ok if s["target"] == target]
            rows[target] = {
                "rounds": len(mine),
                "rate": median(s["rate"] for s in mine),
                "cpu_us": median(_per(s, "cpu_s") for s in mine),
                "cpu_share": median(s["proxy_cpu_share"] or 0 for s in mine),
                "backend_cpu_us": median(_per(s, "backend_cpu_s") for s in mine),
                "client_cpu_us": median(_per(s, "client_cpu_s") for s in mine),
                "errors": sum(s["error_total"] for s in mine),
            }
        ratios = []
        for metric, name, ref in RATIOS:
            key = (lambda s: s["rate"]) if metric == "rate" else (lambda s: _per(s, "cpu_s"))
            values = _ratios(ok, key, name, ref)
            if values:
                ratios.append({"metric": metric, "name": name, "ref": ref,
                               "per_round": values, "median": median(values)})
        out[case.name] = {"targets": rows, "ratios": ratios}
    return out


# ---------------------------------------------------------------- markdown


def _title(case: dict) -> str:
    what = (f"POST {http2_configs.UPLOAD_MIB} MiB to {case['path']} (64 B answers)"
            if case["upload"] else
            f"GET {case['path']} ({'64 KiB' if case['path'] == '/64k' else '64 B'} answers)")
    h1 = (f"; poise-h1: `wrk -t1 -c{case['h1_connections']}` on poise's same listener"
          if case["h1_connections"] else "")
    return (f"{case['name']}: {what}, `h2load -c{case['connections']} -m{case['streams']}`"
            f"{h1}")


def _label(target: str) -> str:
    return "poise-h1 (HTTP/1.1)" if target == "poise-h1" else target


def _case_section(case: dict, summary: dict, duration: float) -> list[str]:
    lines = [f"## {_title(case)}", "", f"{duration:g} s per run", ""]
    med = {(r["metric"], r["name"], r["ref"]): r["median"] for r in summary["ratios"]}
    rows = [[_label(t), report.fmt(r["rate"], ",.0f"), report.fmt(r["cpu_us"], ".1f"),
             report.fmt(med.get(("cpu", t, "haproxy")), ".2f"), report.fmt(med.get(("cpu", t, "nginx")), ".2f"),
             report.fmt(100 * r["cpu_share"], ".0f"), report.fmt(r["backend_cpu_us"], ".1f"),
             report.fmt(r["client_cpu_us"], ".1f"), str(r["errors"])]
            for t, r in summary["targets"].items()]
    lines += report.table(["target", "req/s", "proxy CPU µs/req", "÷ HAProxy", "÷ nginx",
                     "proxy CPU %", "backend CPU µs/req", "client CPU µs/req", "errors"],
                    rows or [["(none measured)"] + [""] * 8])
    label = {"rate": "req/s", "cpu": "CPU µs/req"}
    lines += [""] if summary["ratios"] else []
    for r in summary["ratios"]:
        lines.append(f"- {r['name']} ÷ {r['ref']} {label[r['metric']]}, per round: "
                     f"{', '.join(f'{v:.2f}' for v in r['per_round'])}; "
                     f"**median {r['median']:.2f}**")
    return lines + [""]


def _overview(result: dict) -> list[str]:
    """One line per case: the medians of the per-round ratios."""
    rows = []
    for case in result["settings"]["cases"]:
        summary = result["summary"].get(case["name"])
        if not summary:
            continue
        med = {(r["metric"], r["name"], r["ref"]): r["median"] for r in summary["ratios"]}
        poise = summary["targets"].get("poise", {})
        rows.append([case["name"], report.fmt(poise.get("cpu_us"), ".1f"),
                     *(report.fmt(med.get(k), ".2f") for k in (
                         ("cpu", "poise", "haproxy"), ("cpu", "poise", "nginx"),
                         ("rate", "poise", "haproxy"), ("rate", "poise", "nginx"),
                         ("cpu", "poise", "poise-h1")))])
    if not rows:
        return []
    return ["## Overview (medians of the per-round ratios)", "",
            *report.table(["case", "poise CPU µs/req", "CPU ÷ HAProxy", "CPU ÷ nginx",
                     "req/s ÷ HAProxy", "req/s ÷ nginx", "CPU h2 ÷ h1"], rows), ""]


def render(result: dict) -> str:
    """The markdown report: settings, overview, one section per case, runs not counted,
    failures."""
    m, s = result["machine"], result["settings"]
    lines = [f"# poise HTTP/2 benchmark {result['timestamp']}", "",
             f"- machine: {m['nproc']} CPUs ({m['cpu_model']}), kernel {m['kernel']}, "
             f"Python {m['python']}, load average at start "
             f"{', '.join(f'{x:.2f}' for x in m['loadavg_at_start'])}",
             f"- tools: {m['haproxy']}; {m['nginx']}; {m['h2load']}; {m['wrk']}",
             f"- poise: `{s['poise_cmd']}` in `{s['poise_cwd']}`; HTTP hot path "
             f"{m.get('poise_hot_path', 'n/a')}",
             f"- {s['rounds']} alternating round(s) per case (every other round in reverse "
             f"order), {s['duration']:g} s per run, {s['warmup']:g} s warm-up per target and "
             f"case; every proxy with one worker/thread, h2c (HTTP/2 with prior knowledge) "
             f"from h2load, HTTP/1.1 keep-alive to one backend nginx (one worker)",
             "- CPU: user+system time of the proxy's whole process tree (from /proc) around "
             "each run ÷ the requests that succeeded; *proxy CPU %*: that time ÷ the run's "
             "wall time (100 = one core busy); client: h2load's or wrk's own CPU",
             f"- elapsed: {result.get('elapsed_s', 'n/a')} s", ""]
    lines += _overview(result)
    summary = result["summary"]
    for case in s["cases"]:
        if case["name"] in summary:
            lines += _case_section(case, summary[case["name"]], s["duration"])
    failed = [x for x in result["samples"] if not x["ok"]]
    if failed:
        lines += ["## Runs not counted", "",
                  "The load generator failed, or more than 1% of the requests failed: left "
                  "out of the tables and ratios above.", ""]
        lines += [f"- {x['case']} round {x['round']}, {x['target']}: "
                  f"{x['error'].strip().splitlines()[0][:300]}" for x in failed]
        lines.append("")
    lines += report.failure_lines(result["failures"])
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; always stop what was started; return the exit status."""
    args = parse_args(argv)
    procs.ensure_tools()
    if not Path(http2_configs.H2LOAD).exists():
        raise SystemExit(f"missing tool: {http2_configs.H2LOAD} (apt-get install -y nghttp2-client)")
    started = datetime.now(UTC)
    machine = report.machine_info()
    machine["h2load"] = report._tool_version([http2_configs.H2LOAD, "--version"])
    machine["poise_hot_path"] = tcp_configs.poise_build(args.poise_cwd, args.poise_cmd)
    result = {
        "timestamp": started.strftime("%Y%m%dT%H%M%SZ"),
        "settings": {"duration": args.duration, "rounds": args.rounds, "warmup": args.warmup,
                     "only": args.only, "cases": [asdict(c) for c in args.cases],
                     "poise_cmd": args.poise_cmd, "poise_cwd": str(args.poise_cwd),
                     "upload_mib": http2_configs.UPLOAD_MIB},
        "machine": machine, "failures": {}, "samples": [],
    }
    if not procs.run_cleanly(lambda stack: benchmark(args, stack, result), log):
        return 130
    result["elapsed_s"] = round((datetime.now(UTC) - started).total_seconds(), 1)
    result["summary"] = summarize(result["samples"], args.cases)
    markdown = render(result)
    print(markdown)
    json_path, md_path = procs.save_results("h2", result, markdown, args.results_dir)
    log(f"# saved {json_path} and {md_path}")
    if not any(s["ok"] for s in result["samples"]):
        log("!! nothing could be measured")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
