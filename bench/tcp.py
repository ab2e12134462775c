#!/usr/bin/env python3
"""L4 relay and TLS termination: poise vs HAProxy vs nginx (vs direct), with wrk.

One backend nginx (one worker, one port) sits behind each proxy's L4 relay (poise
`protocol: tcp`, HAProxy `mode tcp`, nginx `stream {}`) and TLS-terminating HTTP
listener, each proxy with one worker/thread. Five cases, each in alternating rounds:
bulk download and upload (GiB/s, proxy CPU s per GiB), short connections (conn/s, CPU
µs per connection), TLS handshakes (handshakes/s, CPU µs each) and TLS keep-alive
requests (CPU µs per request). Results: stdout (markdown), bench/results/tcp-latest.md
and bench/results/tcp-<UTC timestamp>.json.

    python bench/tcp.py                # 3 rounds x 5 s per case (~5 min)
    python bench/tcp.py --quick        # 1 round x 2 s (~1 min)

See bench/README.md ("L4 relay and TLS") for what each figure means.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import loadgen  # noqa: E402
import procs  # noqa: E402
import report  # noqa: E402
import tcp_configs  # noqa: E402
import tcp_report  # noqa: E402

REPO = BENCH_DIR.parent
GIB = 1024**3
# A run with more errors than this share of its completed requests measured a failure,
# not the proxy: it is listed in the report and left out of medians and ratios.
MAX_ERROR_SHARE = 0.01
# uvloop-relay (bench/floors.py, L4 cases only, not run by default): a bare byte relay on
# uvloop, the least a Python L4 relay costs: poise ÷ it is what poise's own logic adds.
TARGETS = ("poise", "haproxy", "nginx", "direct", "uvloop-relay")
DEFAULT_TARGETS = TARGETS[:4]


@dataclass(frozen=True)
class Case:
    """One measured case: which listener (``l4`` or ``tls``), what wrk sends, and how a
    run's amount is counted (``bytes`` read, ``upload`` bodies sent, or requests)."""
    name: str
    role: str
    path: str
    connections: int
    amount: str = "requests"
    close: bool = False       # `Connection: close`: one request per connection
    script: bool = False      # the upload Lua script


CASES = (
    Case("download", "l4", "/big", 4, amount="bytes"),
    Case("upload", "l4", "/upload", 4, amount="upload", script=True),
    Case("connect", "l4", "/", 32, close=True),
    Case("handshake", "tls", "/", 32, close=True),
    Case("tls-keepalive", "tls", "/", 64),
)
# (service, target, roles): HAProxy and nginx serve both roles from one process; poise
# runs a process per role, so that one listener kind failing leaves the other measured.
UNITS = (("poise-l4", "poise", ("l4",)), ("poise-tls", "poise", ("tls",)),
         ("haproxy", "haproxy", ("l4", "tls")), ("nginx", "nginx", ("l4", "tls")),
         ("uvloop-relay", "uvloop-relay", ("l4",)))


def log(msg: str) -> None:
    """Progress goes to stderr so stdout carries only the report."""
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse and check the command line; --quick overrides rounds/duration/warm-up."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=int, default=5, help="seconds per wrk run (default 5)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    p.add_argument("--warmup", type=int, default=1,
                   help="unmeasured seconds per target before each case (default 1)")
    p.add_argument("--only", default=",".join(DEFAULT_TARGETS),
                   help=f"comma-separated subset of: {','.join(TARGETS)} "
                        f"(default: {','.join(DEFAULT_TARGETS)})")
    p.add_argument("--cases", default=",".join(c.name for c in CASES),
                   help=f"comma-separated subset of: {','.join(c.name for c in CASES)}")
    p.add_argument("--key-type", choices=("ec", "rsa"), default="ec",
                   help="certificate key: ec = P-256 ECDSA (default), rsa = RSA 2048")
    p.add_argument("--quick", action="store_true", help="1 round of 2 s, 1 s warm-up")
    p.add_argument("--poise-cmd", default=f"{REPO}/.venv/bin/poise run",
                   help="command that runs poise; the config path is appended")
    p.add_argument("--start-timeout", type=float, default=20.0,
                   help="seconds to wait for each service to answer (default 20)")
    p.add_argument("--base-port", type=int, default=19300,
                   help="first port tried in the 19xxx range (default 19300)")
    p.add_argument("--results-dir", type=Path, default=BENCH_DIR / "results")
    p.add_argument("--keep-temp", action="store_true", help="keep the tempdir (configs, logs)")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.duration, args.warmup = 1, 2, 1
    args.only = [n.strip() for n in args.only.split(",") if n.strip()]
    if set(args.only) - set(TARGETS) or not args.only:
        p.error(f"--only takes a subset of {','.join(TARGETS)}")
    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    args.cases = [c for c in CASES if c.name in names]
    if set(names) - {c.name for c in CASES} or not args.cases:
        p.error(f"--cases takes a subset of {','.join(c.name for c in CASES)}")
    if args.duration < 1 or args.rounds < 1 or args.warmup < 0:
        p.error("--duration and --rounds must be >= 1, --warmup >= 0")
    return args


# ---------------------------------------------------------------- wrk


def wrk(url: str, case: Case, duration: int, script: Path | None) -> dict:
    """One wrk run (one thread) for ``case``; loadgen.parse_wrk() plus argv and raw text."""
    argv = ["wrk", "-t1", f"-c{case.connections}", f"-d{duration}s", "--timeout", "30s"]
    if case.close:
        argv += ["-H", "Connection: close"]
    if case.script and script is not None:
        argv += ["-s", str(script)]
    argv.append(url)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    if proc.returncode != 0:
        raise loadgen.WrkError(f"wrk exited {proc.returncode}: {(proc.stdout + proc.stderr)}")
    res = loadgen.parse_wrk(proc.stdout + proc.stderr)
    res.update(argv=argv, raw=proc.stdout)
    return res


def url(case: Case, port: int) -> str:
    return f"{'https' if case.role == 'tls' else 'http'}://127.0.0.1:{port}{case.path}"


def measure(case: Case, svc: procs.Service | None, backend: procs.Service, port: int,
            duration: int, script: Path) -> dict:
    """One wrk run with the proxy's (None: direct, no proxy) and the backend's CPU time
    read around it; ``amount`` is GiB for the bulk cases, else requests."""
    cpu0 = svc.cpu_seconds() if svc else 0.0
    bcpu0 = backend.cpu_seconds()
    res = wrk(url(case, port), case, duration, script)
    cpu1 = svc.cpu_seconds() if svc else 0.0
    bcpu1 = backend.cpu_seconds()
    amount = {"bytes": res["bytes_read"] / GIB,
              "upload": res["requests"] * tcp_configs.UPLOAD_MIB / 1024}.get(
                  case.amount, res["requests"])
    res.update(amount=amount, rate=amount / res["duration_s"] if res["duration_s"] else None,
               cpu_s=round(cpu1 - cpu0, 4) if svc else None,
               backend_cpu_s=round(bcpu1 - bcpu0, 4))
    return res


# ---------------------------------------------------------------- services


def start_unit(stack: ExitStack, unit: str, argv: list[str], root: Path,
               ports: dict[str, int], timeout: float) -> procs.Service:
    """Start one service, register its stop, and wait until each of its ports answers."""
    svc = procs.Service(unit, argv, root / f"{unit}.log")
    stack.callback(svc.stop)
    log(f"# starting {unit}: {' '.join(argv)}")
    svc.start()
    for role, port in ports.items():
        tcp_configs.wait_ready(svc, port, role == "tls", timeout)
    log(f"#   {unit} ready (pid {svc.pid}) on {', '.join(f'{r} {p}' for r, p in ports.items())}")
    return svc


def unit_argv(unit: str, root: Path, ports: dict[str, int], backend: int, certs, args,
              failures: dict) -> list[str] | None:
    """Write ``unit``'s config and return its command line (None: poise check failed)."""
    if unit == "haproxy":
        return tcp_configs.haproxy(root, ports["l4"], ports["tls"], backend, certs)
    if unit == "nginx":
        return tcp_configs.nginx_proxy(root, ports["l4"], ports["tls"], backend, certs)
    if unit == "uvloop-relay":
        return [f"{REPO}/.venv/bin/python", str(BENCH_DIR / "floors.py"), unit,
                str(ports["l4"]), str(backend)]
    role = unit.removeprefix("poise-")
    conf = tcp_configs.poise_config(root, role, ports[role], backend, certs)
    problem = tcp_configs.poise_check(args.poise_cmd, conf)
    if problem:
        failures[unit] = f"{conf.name} rejected: {problem}"
        log(f"!! {unit}: {failures[unit]}")
        return None
    return shlex.split(args.poise_cmd) + [str(conf)]


def start_proxies(stack, root, backend_port, certs, args, failures) -> dict:
    """running[target][role] = (Service, port) for every unit that started."""
    running: dict[str, dict] = {t: {} for t in args.only}
    units = [u for u in UNITS if u[1] in args.only
             and any(c.role in u[2] for c in args.cases)]
    ports = iter(procs.pick_ports(sum(len(r) for _, _, r in units), base=args.base_port))
    for unit, target, roles in units:
        unit_ports = {role: next(ports) for role in roles}
        try:
            argv = unit_argv(unit, root, unit_ports, backend_port, certs, args, failures)
            if argv is None:
                continue
            svc = start_unit(stack, unit, argv, root, unit_ports, args.start_timeout)
        except procs.StartError as exc:
            failures[unit] = f"failed to start: {exc}"
            log(f"!! {unit} FAILED to start:\n{exc}")
            continue
        for role, port in unit_ports.items():
            running[target][role] = (svc, port)
    return running


def drop_if_dead(svc: procs.Service, running: dict, failures: dict) -> bool:
    """If a service has exited, record why and forget every role it served."""
    if svc.alive():
        return False
    failures[svc.name] = (f"exited during the benchmark (code {svc.proc.returncode}):\n"
                          f"{svc.log_tail()}")
    log(f"!! {svc.name} exited during the benchmark")
    for roles in running.values():
        for role in [r for r, (s, _) in roles.items() if s is svc]:
            del roles[role]
    return True


# ---------------------------------------------------------------- cases


def case_targets(case: Case, running: dict, backend: procs.Service, backend_port: int):
    """[(target, proxy Service or None for direct, port)] measured for ``case``."""
    out = []
    for target, roles in running.items():
        if target == "direct":
            if case.role == "l4":
                out.append((target, None, backend_port))
        elif case.role in roles:
            out.append((target, *roles[case.role]))
    return out


def run_case(case: Case, running: dict, backend, backend_port: int, args, script: Path,
             samples: list, failures: dict) -> None:
    """Warm each target up, then alternating rounds (every other round reversed)."""
    targets = case_targets(case, running, backend, backend_port)
    for target, svc, port in targets:
        if svc and drop_if_dead(svc, running, failures) or not args.warmup:
            continue
        log(f"# {case.name} warm-up {target} ({args.warmup} s)")
        try:
            wrk(url(case, port), case, args.warmup, script)
        except loadgen.WrkError as exc:
            log(f"!! {case.name} warm-up {target}: {exc}")
    for rnd in range(1, args.rounds + 1):
        for target, svc, port in (targets if rnd % 2 else targets[::-1]):
            if svc and (drop_if_dead(svc, running, failures)
                        or case.role not in running[target]):
                continue
            log(f"# {case.name} round {rnd}/{args.rounds}: {target} ({args.duration} s, "
                f"-c{case.connections})")
            sample = {"case": case.name, "round": rnd, "target": target}
            try:
                sample.update(measure(case, svc, backend, port, args.duration, script))
                sample.update(ok=True, error=None)
                cpu = "" if sample["cpu_s"] is None else f", {sample['cpu_s']:.2f} CPU s"
                log(f"#   {sample['rate']:,.3f}/s{cpu}, {sample['error_total']} errors")
                if sample["error_total"] > MAX_ERROR_SHARE * sample["requests"]:
                    sample.update(ok=False, error=(
                        f"{sample['error_total']} errors for {sample['requests']} completed "
                        f"requests: {sample['errors']}"))
                    log(f"!! {case.name} round {rnd} {target}: not counted: {sample['error']}")
            except loadgen.WrkError as exc:
                sample.update(ok=False, error=str(exc))
                log(f"!! {case.name} round {rnd} {target}: {exc}")
            samples.append(sample)


def check_tls(running: dict) -> dict:
    """tcp_configs.tls_parameters() of every running TLS listener."""
    out = {}
    for target, roles in running.items():
        if "tls" in roles:
            out[target] = tcp_configs.tls_parameters(roles["tls"][1])
            log(f"# {target} TLS: {out[target]}")
    return out


def benchmark(args, stack: ExitStack, result: dict) -> None:
    """Start everything, run every case, fill result's samples, failures and tls."""
    root = Path(stack.enter_context(procs.tempdir(args.keep_temp, "poise-bench-tcp-")))
    root.chmod(0o755)  # nginx workers run unprivileged and must read /big
    log(f"# tempdir {root}")
    backend_port = procs.pick_ports(1, base=args.base_port + 90)[0]
    backend = procs.Service("backend", tcp_configs.backend_nginx(root, backend_port),
                            root / "backend.log")
    stack.callback(backend.stop)
    backend.start()
    try:
        tcp_configs.wait_ready(backend, backend_port, False, args.start_timeout)
    except procs.StartError as exc:
        raise SystemExit(f"!! backend nginx failed to start, nothing to measure:\n{exc}") \
            from None
    certs = tcp_configs.mint_certificate(root, args.key_type)
    script = tcp_configs.upload_script(root)
    failures, samples = result["failures"], result["samples"]
    running = start_proxies(stack, root, backend_port, certs, args, failures)
    result["ports"] = {"backend": backend_port, **{
        t: {r: p for r, (_, p) in roles.items()} for t, roles in running.items()}}
    if any(c.role == "tls" for c in args.cases):
        result["tls"] = check_tls(running)
    for case in args.cases:
        run_case(case, running, backend, backend_port, args, script, samples, failures)


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; always stop what was started; return the exit status."""
    args = parse_args(argv)
    procs.ensure_tools()
    if not shutil.which("openssl"):
        raise SystemExit("missing tool: openssl (apt-get install -y openssl)")
    if "nginx" in args.only and not tcp_configs.STREAM_MODULE.exists():
        log(f"!! {tcp_configs.STREAM_MODULE} is missing: nginx's L4 relay (stream {{}}) needs "
            "it unless nginx is built with it (apt-get install libnginx-mod-stream, or "
            "bash .ci/apt-deps bench)")
    started = datetime.now(UTC)
    machine = report.machine_info()
    machine["openssl"] = report._tool_version(["openssl", "version"])
    machine["poise_hot_path"] = tcp_configs.poise_build(REPO, args.poise_cmd)
    result = {
        "timestamp": started.strftime("%Y%m%dT%H%M%SZ"),
        "settings": {"duration": args.duration, "rounds": args.rounds, "warmup": args.warmup,
                     "only": args.only, "cases": [asdict(c) for c in args.cases],
                     "key_type": args.key_type, "poise_cmd": args.poise_cmd,
                     "big_mib": tcp_configs.BIG_MIB, "upload_mib": tcp_configs.UPLOAD_MIB},
        "machine": machine, "failures": {}, "samples": [], "tls": {},
    }
    if not procs.run_cleanly(lambda stack: benchmark(args, stack, result), log):
        return 130
    result["elapsed_s"] = round((datetime.now(UTC) - started).total_seconds(), 1)
    result["summary"] = tcp_report.summarize(result["samples"], args.cases)
    markdown = tcp_report.render(result)
    print(markdown)
    json_path, md_path = procs.save_results("tcp", result, markdown, args.results_dir)
    log(f"# saved {json_path} and {md_path}")
    if not any(s["ok"] for s in result["samples"]):
        log("!! nothing could be measured")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
