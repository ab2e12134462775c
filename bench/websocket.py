#!/usr/bin/env python3
"""WebSocket relaying: poise vs HAProxy vs nginx (vs direct), with a uvloop load generator.

One echo backend (bench/ws_load.py: answers the handshake with a correct 101, then
echoes every byte) sits behind each proxy, each with one worker/thread. The load
generator (bench/ws_load.py, one uvloop process) measures, in alternating rounds:
echo messages/s on 50 connections and the proxy's CPU µs per message, for 64-byte
messages one at a time per connection, 64-byte and 4 KiB messages eight in flight per
connection; and WebSocket handshakes/s (connect, handshake, close) with the proxy's
CPU µs per handshake. Results: stdout (markdown), bench/results/websocket-latest.md
and bench/results/websocket-<UTC timestamp>.json.

    python bench/websocket.py              # 3 rounds x 5 s per case (~4.5 min)
    python bench/websocket.py --quick      # 1 round x 2 s (~1 min)
    python bench/websocket.py --only poise,haproxy,nginx,direct,uvloop-relay

See bench/README.md ("WebSocket") for what each figure means.
"""

from __future__ import annotations

import argparse
import json
import select
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from statistics import median

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import procs  # noqa: E402
import report  # noqa: E402
import tcp_configs  # noqa: E402
import ws_configs  # noqa: E402

REPO = BENCH_DIR.parent
# A handshake run with more failed connections than this share of its handshakes
# measured a failure, not the proxy (a message run: any failed connection).
MAX_ERROR_SHARE = 0.01
# uvloop-relay (bench/floors.py, not run by default): a bare byte relay on uvloop, the
# least a Python relay costs: poise ÷ it is what poise's own logic adds.
TARGETS = ("poise", "haproxy", "nginx", "direct", "uvloop-relay")
DEFAULT_TARGETS = TARGETS[:4]


class RunError(RuntimeError):
    """The load generator failed or printed something unexpected."""


@dataclass(frozen=True)
class Case:
    """One measured case: ``messages`` (echo messages of ``size`` payload bytes,
    ``window`` in flight per connection) or ``handshakes``."""
    name: str
    kind: str
    connections: int
    size: int = 0
    window: int = 0


CASES = (
    # One message in flight per connection: every message is a read and a write each
    # way on its own (the per-message cost of interactive traffic).
    Case("msg-64", "messages", 50, size=64, window=1),
    # Eight in flight: reads carry several messages (streaming traffic).
    Case("msg-64-x8", "messages", 50, size=64, window=8),
    Case("msg-4k-x8", "messages", 50, size=4096, window=8),
    Case("handshake", "handshakes", 32),
)


def log(msg: str) -> None:
    """Progress goes to stderr so stdout carries only the report."""
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse and check the command line; --quick overrides rounds/duration/warm-up."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=5, help="seconds per run (default 5)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    p.add_argument("--warmup", type=float, default=1,
                   help="unmeasured seconds per target before each case (default 1)")
    p.add_argument("--only", default=",".join(DEFAULT_TARGETS),
                   help=f"comma-separated subset of: {','.join(TARGETS)} "
                        f"(default: {','.join(DEFAULT_TARGETS)})")
    p.add_argument("--cases", default=",".join(c.name for c in CASES),
                   help=f"comma-separated subset of: {','.join(c.name for c in CASES)}")
    p.add_argument("--quick", action="store_true", help="1 round of 2 s, 1 s warm-up")
    p.add_argument("--poise-cmd", default=f"{REPO}/.venv/bin/poise run",
                   help="command that runs poise; the config path is appended")
    p.add_argument("--start-timeout", type=float, default=20.0,
                   help="seconds to wait for each service to answer (default 20)")
    p.add_argument("--base-port", type=int, default=19500,
                   help="first port tried in the 19xxx range (default 19500)")
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
    if args.duration <= 0 or args.rounds < 1 or args.warmup < 0:
        p.error("--duration must be > 0, --rounds >= 1, --warmup >= 0")
    return args


# ---------------------------------------------------------------- one run


def _line(proc: subprocess.Popen, timeout: float, stderr) -> dict:
    """The next JSON line the load generator prints, within ``timeout`` seconds."""
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else ""
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        proc.kill()
        proc.wait()
        stderr.seek(0)
        why = (f"printed {line!r}" if line else "exited" if ready else
               f"said nothing for {timeout:g} s")
        raise RunError(f"the load generator {why} (code {proc.returncode}): "
                       f"{stderr.read().strip()[-800:]}") from None


def _ticks(pid: int) -> float:
    """CPU seconds used so far by one process (0 if gone)."""
    return procs.tree_cpu_seconds(procs.process_tree(pid))


def run_load(case: Case, port: int, duration: float, svc: procs.Service | None,
             backend: procs.Service) -> dict:
    """One load-generator run; the proxy's (None: direct), the backend's and the load
    generator's CPU read between its "ready" (every connection open) and its result."""
    argv = ws_configs.client(case.kind, port, duration, case.connections, case.window,
                             case.size)
    stderr = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=stderr, text=True)
    try:
        _line(proc, 60, stderr)
        cpu0 = svc.cpu_seconds() if svc else 0.0
        bcpu0, ccpu0 = backend.cpu_seconds(), _ticks(proc.pid)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        res = _line(proc, duration + 60, stderr)
        cpu1 = svc.cpu_seconds() if svc else 0.0
        bcpu1, ccpu1 = backend.cpu_seconds(), _ticks(proc.pid)
        proc.stdin.close()      # (it closes its connections and exits)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stderr.close()
    amount = res["messages"] if case.kind == "messages" else res["handshakes"]
    res.update(argv=argv, amount=amount, rate=amount / res["seconds"],
               cpu_s=round(cpu1 - cpu0, 4) if svc else None,
               backend_cpu_s=round(bcpu1 - bcpu0, 4), client_cpu_s=round(ccpu1 - ccpu0, 4))
    return res


def failure(case: Case, res: dict) -> str | None:
    """Why a run measured a failure rather than the proxy (None: it counts)."""
    if not res["amount"]:
        return f"nothing measured; errors: {res['error_kinds']}"
    if case.kind == "messages" and (res["errors"] or res["connections"] < case.connections):
        return (f"{res['connections']} of {case.connections} connections ran, "
                f"errors: {res['error_kinds']}")
    if res["errors"] > MAX_ERROR_SHARE * res["amount"]:
        return f"{res['errors']} errors for {res['amount']} handshakes: {res['error_kinds']}"
    return None


# ---------------------------------------------------------------- services


def start(stack: ExitStack, name: str, argv: list[str], root: Path, port: int,
          timeout: float) -> procs.Service:
    """Start one service, register its stop, and wait until GET / on port answers."""
    svc = procs.Service(name, argv, root / f"{name}.log")
    stack.callback(svc.stop)
    log(f"# starting {name}: {' '.join(argv)}")
    svc.start()
    tcp_configs.wait_ready(svc, port, False, timeout)
    log(f"#   {name} ready (pid {svc.pid}) on {port}")
    return svc


def proxy_argv(target: str, root: Path, port: int, backend_port: int, args,
               failures: dict) -> list[str] | None:
    """Write ``target``'s config and return its command line (None: poise check failed)."""
    if target == "haproxy":
        return ws_configs.haproxy(root, port, backend_port)
    if target == "nginx":
        return ws_configs.nginx(root, port, backend_port)
    if target == "uvloop-relay":
        return ws_configs.uvloop_relay(port, backend_port)
    conf = ws_configs.poise_config(root, port, backend_port)
    problem = tcp_configs.poise_check(args.poise_cmd, conf)
    if problem:
        failures[target] = f"{conf.name} rejected: {problem}"
        log(f"!! {target}: {failures[target]}")
        return None
    return ws_configs.poise(args.poise_cmd, conf)


def start_proxies(stack, root, backend_port: int, args, failures) -> dict:
    """running[target] = (Service, port) for every proxy that started."""
    names = [t for t in args.only if t != "direct"]
    running = {}
    for target, port in zip(names, procs.pick_ports(len(names), base=args.base_port),
                            strict=True):
        try:
            argv = proxy_argv(target, root, port, backend_port, args, failures)
            if argv is not None:
                running[target] = (start(stack, target, argv, root, port,
                                         args.start_timeout), port)
        except procs.StartError as exc:
            failures[target] = f"failed to start: {exc}"
            log(f"!! {target} FAILED to start:\n{exc}")
    return running


def alive(target: str, svc: procs.Service | None, running: dict, failures: dict) -> bool:
    """False (and recorded, and forgotten) if a proxy has exited; direct: True."""
    if svc is None:
        return True
    if target not in running:
        return False
    if svc.alive():
        return True
    failures[target] = (f"exited during the benchmark (code {svc.proc.returncode}):\n"
                        f"{svc.log_tail()}")
    log(f"!! {target} exited during the benchmark")
    del running[target]
    return False


# ---------------------------------------------------------------- cases


def describe(case: Case) -> str:
    if case.kind == "messages":
        return f"{case.connections} connections x {case.window} in flight, {case.size} B"
    return f"{case.connections} concurrent"


def run_case(case: Case, targets: list, running: dict, backend, args, samples: list,
             failures: dict) -> None:
    """Warm each target up, then alternating rounds (every other round reversed)."""
    for target, svc, port in targets:
        if not alive(target, svc, running, failures) or not args.warmup:
            continue
        log(f"# {case.name} warm-up {target} ({args.warmup:g} s)")
        try:
            run_load(case, port, args.warmup, svc, backend)
        except RunError as exc:
            log(f"!! {case.name} warm-up {target}: {exc}")
    for rnd in range(1, args.rounds + 1):
        for target, svc, port in (targets if rnd % 2 else targets[::-1]):
            if not alive(target, svc, running, failures):
                continue
            log(f"# {case.name} round {rnd}/{args.rounds}: {target} ({args.duration:g} s, "
                f"{describe(case)})")
            sample = {"case": case.name, "round": rnd, "target": target}
            try:
                sample.update(run_load(case, port, args.duration, svc, backend))
                problem = failure(case, sample)
                sample.update(ok=problem is None, error=problem)
                cpu = "" if sample["cpu_s"] is None else f", {sample['cpu_s']:.2f} CPU s"
                log(f"#   {sample['rate']:,.0f}/s{cpu}, {sample['errors']} errors")
                if problem:
                    log(f"!! {case.name} round {rnd} {target}: not counted: {problem}")
            except RunError as exc:
                sample.update(ok=False, error=str(exc))
                log(f"!! {case.name} round {rnd} {target}: {exc}")
            samples.append(sample)


def benchmark(args, stack: ExitStack, result: dict) -> None:
    """Start everything, run every case, fill result's samples and failures."""
    root = Path(stack.enter_context(procs.tempdir(args.keep_temp, "poise-bench-ws-")))
    root.chmod(0o755)  # nginx workers run unprivileged
    log(f"# tempdir {root}")
    backend_port = procs.pick_ports(1, base=args.base_port + 90)[0]
    try:
        backend = start(stack, "backend", ws_configs.backend(backend_port), root,
                        backend_port, args.start_timeout)
    except procs.StartError as exc:
        raise SystemExit(f"!! the echo backend failed to start, nothing to measure:\n{exc}") \
            from None
    failures, samples = result["failures"], result["samples"]
    running = start_proxies(stack, root, backend_port, args, failures)
    result["ports"] = {"backend": backend_port, **{t: p for t, (_, p) in running.items()}}
    targets = [(t, None, backend_port) if t == "direct" else (t, *running[t])
               for t in args.only if t == "direct" or t in running]
    for case in args.cases:
        run_case(case, targets, running, backend, args, samples, failures)


# ---------------------------------------------------------------- summary


def _per(sample: dict, key: str) -> float | None:
    """µs of ``key`` (CPU seconds) per message or handshake."""
    value = sample.get(key)
    return value / sample["amount"] * 1e6 if value is not None and sample["amount"] else None


def _ratios(ok: list[dict], metric, name: str, ref: str) -> list[float]:
    """metric(name's sample) ÷ metric(ref's sample), per round that measured both."""
    by_round: dict[int, dict[str, float | None]] = {}
    for s in ok:
        if s["target"] in (name, ref):
            by_round.setdefault(s["round"], {})[s["target"]] = metric(s)
    return [r[name] / r[ref] for _, r in sorted(by_round.items())
            if r.get(name) is not None and r.get(ref)]


RATIOS = (("rate", "poise", "haproxy"), ("rate", "poise", "nginx"),
          ("rate", "poise", "direct"),
          ("cpu", "poise", "haproxy"), ("cpu", "poise", "nginx"),
          ("cpu", "nginx", "haproxy"), ("cpu", "poise", "uvloop-relay"),
          ("cpu", "uvloop-relay", "haproxy"))


def summarize(samples: list[dict], cases: list[Case]) -> dict:
    """Per case: medians per target, and per-round ratios (rate and CPU) with medians."""
    out = {}
    for case in cases:
        ok = [s for s in samples if s["case"] == case.name and s["ok"]]
        rows = {}
        for target in dict.fromkeys(s["target"] for s in ok):
            mine = [s for s in ok if s["target"] == target]
            cpu = [v for s in mine if (v := _per(s, "cpu_s")) is not None]
            rows[target] = {
                "rounds": len(mine),
                "rate": median(s["rate"] for s in mine),
                "cpu_us": median(cpu) if cpu else None,
                "backend_cpu_us": median(_per(s, "backend_cpu_s") for s in mine),
                "client_cpu_us": median(_per(s, "client_cpu_s") for s in mine),
                "errors": sum(s["errors"] for s in mine),
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
    if case["kind"] == "messages":
        size = f"{case['size'] // 1024} KiB" if case["size"] >= 1024 else f"{case['size']} B"
        return (f"Echo messages, {size} payload ({case['connections']} connections, "
                f"{case['window']} message{'s' if case['window'] > 1 else ''} in flight on each)")
    return (f"WebSocket handshakes ({case['connections']} concurrent loops of connect, "
            f"handshake, close)")


def _case_section(case: dict, summary: dict, duration: float) -> list[str]:
    unit = "msgs" if case["kind"] == "messages" else "handshakes"
    per = "msg" if case["kind"] == "messages" else "handshake"
    lines = [f"## {_title(case)}", "", f"{duration:g} s per run", ""]
    med = {(r["metric"], r["name"], r["ref"]): r["median"] for r in summary["ratios"]}
    rows = [[t, report.fmt(r["rate"], ",.0f"), report.fmt(r["cpu_us"], ".2f"),
             report.fmt(med.get(("cpu", t, "haproxy")), ".2f"), report.fmt(med.get(("cpu", t, "nginx")), ".2f"),
             report.fmt(r["backend_cpu_us"], ".2f"), report.fmt(r["client_cpu_us"], ".2f"), str(r["errors"])]
            for t, r in summary["targets"].items()]
    lines += report.table(["target", f"{unit}/s", f"proxy CPU µs/{per}", "÷ HAProxy", "÷ nginx",
                     f"backend CPU µs/{per}", f"client CPU µs/{per}", "errors"],
                    rows or [["(none measured)"] + [""] * 7])
    label = {"rate": f"{unit}/s", "cpu": f"CPU µs/{per}"}
    lines += [""] if summary["ratios"] else []
    for r in summary["ratios"]:
        lines.append(f"- {r['name']} ÷ {r['ref']} {label[r['metric']]}, per round: "
                     f"{', '.join(f'{v:.2f}' for v in r['per_round'])}; "
                     f"**median {r['median']:.2f}**")
    return lines + [""]


def render(result: dict) -> str:
    """The markdown report: settings, one section per case, runs not counted, failures."""
    m, s = result["machine"], result["settings"]
    lines = [f"# poise WebSocket benchmark {result['timestamp']}", "",
             f"- machine: {m['nproc']} CPUs ({m['cpu_model']}), kernel {m['kernel']}, "
             f"Python {m['python']}, load average at start "
             f"{', '.join(f'{x:.2f}' for x in m['loadavg_at_start'])}",
             f"- tools: {m['haproxy']}; {m['nginx']}; uvloop {m.get('uvloop', 'n/a')}",
             f"- poise: `{s['poise_cmd']}`; HTTP hot path {m.get('poise_hot_path', 'n/a')}",
             f"- {s['rounds']} alternating round(s) per case (every other round in reverse "
             f"order), {s['duration']:g} s per run, {s['warmup']:g} s warm-up per target and "
             f"case; every proxy with one worker/thread; backend and load generator: "
             f"bench/ws_load.py (one uvloop process each; the backend echoes bytes)",
             "- CPU: user+system time of the proxy's whole process tree (from /proc) between "
             "the load generator's \"ready\" (connections open) and its result; per message "
             "= that ÷ messages echoed; *direct* = straight to the backend (no proxy)",
             f"- elapsed: {result.get('elapsed_s', 'n/a')} s", ""]
    summary = result["summary"]
    for case in s["cases"]:
        if case["name"] in summary:
            lines += _case_section(case, summary[case["name"]], s["duration"])
    failed = [x for x in result["samples"] if not x["ok"]]
    if failed:
        lines += ["## Runs not counted", "",
                  "The load generator failed, a message run lost a connection, or more than "
                  "1% of the handshakes failed: left out of the tables and ratios above.", ""]
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
    started = datetime.now(UTC)
    machine = report.machine_info()
    machine.pop("wrk", None)
    try:
        machine["uvloop"] = metadata.version("uvloop")
    except metadata.PackageNotFoundError:
        raise SystemExit("uvloop is missing: run this with poise's venv "
                         "(.venv/bin/python bench/websocket.py)") from None
    machine["poise_hot_path"] = tcp_configs.poise_build(REPO, args.poise_cmd)
    result = {
        "timestamp": started.strftime("%Y%m%dT%H%M%SZ"),
        "settings": {"duration": args.duration, "rounds": args.rounds, "warmup": args.warmup,
                     "only": args.only, "cases": [asdict(c) for c in args.cases],
                     "poise_cmd": args.poise_cmd},
        "machine": machine, "failures": {}, "samples": [],
    }
    if not procs.run_cleanly(lambda stack: benchmark(args, stack, result), log):
        return 130
    result["elapsed_s"] = round((datetime.now(UTC) - started).total_seconds(), 1)
    result["summary"] = summarize(result["samples"], args.cases)
    markdown = render(result)
    print(markdown)
    json_path, md_path = procs.save_results("websocket", result, markdown, args.results_dir)
    log(f"# saved {json_path} and {md_path}")
    if not any(s["ok"] for s in result["samples"]):
        log("!! nothing could be measured")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
