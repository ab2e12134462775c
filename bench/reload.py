#!/usr/bin/env python3
"""Failed requests per 10 reloads: poise vs HAProxy vs nginx under the same keep-alive load.

Each proxy serves `wrk -t1 -c64 --latency` on loopback while it goes through ten
config reloads, one per second (bench/reloaders.py: add a backend, remove one, change
the policy, add and remove a listener, an invalid file, a weight, ...). The report
gives, per proxy, wrk's failed requests over the run, how soon the added backend
serves, and req/s. Results go to stdout (markdown), bench/results/reload-latest.md and
bench/results/reload-<UTC timestamp>.json.

    python bench/reload.py                  # 3 alternating rounds
    python bench/reload.py --quick          # 1 round (~90 s)
    python bench/reload.py --only haproxy,nginx

See bench/README.md, section "Reload under load".
"""

from __future__ import annotations

import argparse
import http.client
import math
import os
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import configs  # noqa: E402
import loadgen  # noqa: E402
import procs  # noqa: E402
import reloaders  # noqa: E402
import report  # noqa: E402
from reload_report import PROBE_WINDOW, render_markdown, summarize  # noqa: E402
from reloaders import RELOADS, Ports, Reloader  # noqa: E402

REPO = BENCH_DIR.parent
VARIANTS = ("poise-1", "poise-2", "haproxy", "haproxy-seamless", "nginx")
FINAL_SAMPLE = 30   # fresh requests after the run, to see which backends serve


def log(msg: str) -> None:
    """Progress goes to stderr so stdout carries only the report."""
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse and check the command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    p.add_argument("--quick", action="store_true", help="1 round")
    p.add_argument("--only", default=",".join(VARIANTS),
                   help=f"comma-separated subset of: {','.join(VARIANTS)}")
    p.add_argument("--connections", type=int, default=64, help="wrk connections (default 64)")
    p.add_argument("--warmup", type=float, default=2.0,
                   help="seconds of load before the first reload (default 2)")
    p.add_argument("--interval", type=float, default=1.0,
                   help="seconds between reloads (default 1)")
    p.add_argument("--tail", type=float, default=2.0,
                   help="seconds of load after the last reload's interval (default 2)")
    p.add_argument("--poise-cmd", default=f"{REPO}/.venv/bin/poise run",
                   help="command that runs poise; the config path is appended")
    p.add_argument("--start-timeout", type=float, default=20.0,
                   help="seconds to wait for each service to answer (default 20)")
    p.add_argument("--base-port", type=int, default=19100,
                   help="first port tried in the 19xxx range (default 19100)")
    p.add_argument("--results-dir", type=Path, default=BENCH_DIR / "results")
    p.add_argument("--keep-temp", action="store_true", help="keep the tempdir (configs, logs)")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds = 1
    args.only = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = set(args.only) - set(VARIANTS)
    if unknown or not args.only:
        p.error(f"--only takes a subset of {','.join(VARIANTS)}; got {sorted(unknown) or 'nothing'}")
    if args.rounds < 1 or args.connections < 1 or args.interval <= 0:
        p.error("--rounds and --connections must be >= 1, --interval > 0")
    if args.warmup < 0 or args.tail < 0:
        p.error("--warmup and --tail must be >= 0")
    return args


def wrk_duration(args) -> int:
    """Whole seconds of load: warm-up, ten reload intervals, then the tail."""
    return math.ceil(args.warmup + len(RELOADS) * args.interval + args.tail)



# ---------------------------------------------------------------- probes


def backend_of(port: int, timeout: float = 1.0) -> str | None:
    """GET / on a fresh connection; the x-backend of a 2xx answer, else None."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", "/", headers={"Connection": "close"})
        resp = conn.getresponse()
        resp.read()
        return resp.getheader("x-backend") if 200 <= resp.status < 300 else None
    finally:
        conn.close()


def refuses(port: int) -> bool:
    """True if nothing listens on 127.0.0.1:port any more (connection refused)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return False
    except ConnectionRefusedError:
        return True


@dataclass(frozen=True)
class Probe:
    """Something a client should see soon after reload ``step``: ``check`` is tried in a
    tight loop until it holds, for PROBE_WINDOW s, or for ``intervals`` reload intervals
    when a later reload undoes the change."""

    step: int
    name: str
    check: Callable[[Ports], bool]
    intervals: int | None = None


PROBES = (      # (reload_report.PROBE_NAMES, in this order)
    Probe(1, "b3_serves", lambda p: backend_of(p.main) == "b3"),
    Probe(4, "listener_up", lambda p: backend_of(p.extra) is not None, intervals=1),
    Probe(5, "listener_gone", lambda p: refuses(p.extra)),
)


def run_probe(probe: Probe, ports: Ports, t0: float, window: float) -> dict:
    """Try probe.check until it holds or `window` s after t0 (the reload's trigger)."""
    attempts = errors = 0
    while time.monotonic() - t0 < window:
        attempts += 1
        try:
            if probe.check(ports):
                return {"name": probe.name, "after_s": time.monotonic() - t0,
                        "attempts": attempts, "errors": errors}
        except (OSError, http.client.HTTPException):
            errors += 1
            time.sleep(0.001)    # a refused connect returns at once: do not spin
    return {"name": probe.name, "after_s": None, "attempts": attempts, "errors": errors}


def final_backends(port: int) -> dict[str, int]:
    """Which backends answer FINAL_SAMPLE fresh requests after the last reload."""
    seen: Counter[str] = Counter()
    for _ in range(FINAL_SAMPLE):
        try:
            seen[backend_of(port) or "non-2xx"] += 1
        except (OSError, http.client.HTTPException) as exc:
            seen[type(exc).__name__] += 1
    return dict(sorted(seen.items()))


# ---------------------------------------------------------------- one round


def make_reloader(name: str, workdir: Path, ports: Ports, args) -> Reloader:
    """The reloader for one of VARIANTS."""
    if name.startswith("poise"):
        return reloaders.PoiseReloader(name, workdir, ports, args.poise_cmd,
                                       workers=int(name.rsplit("-", 1)[1]))
    if name.startswith("haproxy"):
        return reloaders.HAProxyReloader(name, workdir, ports, seamless=name.endswith("seamless"))
    return reloaders.NginxReloader(name, workdir, ports)


def _sleep_until(when: float) -> None:
    delay = when - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def run_reloads(reloader: Reloader, ports: Ports, args, start: float,
                pool: ThreadPoolExecutor) -> tuple[list[dict], list[Future]]:
    """The ten reloads, one per interval from start + warm-up, each followed by its probes."""
    steps, probes = [], []
    for k, version in enumerate(RELOADS, 1):
        _sleep_until(start + args.warmup + (k - 1) * args.interval)
        t0 = time.monotonic()
        try:
            outcome = reloader.reload(k, version)
        except (OSError, procs.StartError, TimeoutError) as exc:
            outcome = {"outcome": "error", "detail": f"{type(exc).__name__}: {exc}"}
        outcome.update(step=k, change=version.change, at_s=round(t0 - start, 3),
                       took_s=round(time.monotonic() - t0, 4))
        steps.append(outcome)
        log(f"#   reload {k:2}: {version.change} → {outcome['outcome']} ({outcome['detail']})")
        for probe in PROBES:
            if probe.step == k:
                window = probe.intervals * args.interval if probe.intervals else PROBE_WINDOW
                probes.append(pool.submit(run_probe, probe, ports, t0, window))
    return steps, probes


def measure_round(reloader: Reloader, ports: Ports, args) -> dict:
    """wrk for the whole scenario while the reloads and probes run; the round's sample."""
    duration = wrk_duration(args)
    wrk = loadgen.start_wrk(f"http://127.0.0.1:{ports.main}/", args.connections, duration)
    start = time.monotonic()
    sample: dict = {"wrk_duration_s": duration}
    try:
        with ThreadPoolExecutor(max_workers=len(PROBES)) as pool:
            steps, futures = run_reloads(reloader, ports, args, start, pool)
            sample.update(steps=steps, probes={p["name"]: p for p in (f.result() for f in futures)})
        res = loadgen.finish_wrk(wrk, timeout=duration + 30)
    finally:
        if wrk.poll() is None:
            wrk.kill()
            wrk.wait()
    sample.update(wrk=res, failed=res["error_total"], errors=res["errors"], rps=res["rps"],
                  requests=res["requests"], alive_at_end=reloader.alive(),
                  final_backends=final_backends(ports.main) if reloader.alive() else {})
    return sample


def run_round(name: str, rnd: int, root: Path, ports: Ports, args, stack: ExitStack) -> dict:
    """Start the proxy on the base config, run the scenario, stop every process."""
    sample = {"proxy": name, "round": rnd, "ok": False}
    reloader = make_reloader(name, root / f"{name}-r{rnd}", ports, args)
    stack.callback(reloader.stop)
    sample["method"] = reloader.method
    try:
        log(f"# round {rnd}/{args.rounds}: {name} (main port {ports.main}, extra {ports.extra})")
        reloader.start(args.start_timeout)
        sample.update(measure_round(reloader, ports, args), ok=True)
        log(f"#   {sample['failed']} failed requests {sample['errors']}, "
            f"{sample['rps']:,.0f} req/s, b3 after {_fmt_s(sample['probes']['b3_serves'])}")
    except procs.StartError as exc:
        sample["error"] = f"failed to start: {exc}"
        log(f"!! {name} failed to start:\n{exc}")
    except loadgen.WrkError as exc:
        sample["error"] = str(exc)
        log(f"!! {name} round {rnd}: {exc}")
    finally:
        reloader.stop()
        sample["notes"] = reloader.notes()
    return sample


def _fmt_s(probe: dict) -> str:
    return "never" if probe["after_s"] is None else f"{probe['after_s'] * 1e3:.0f} ms"


# ---------------------------------------------------------------- main


def leftover_processes(root: Path) -> list[str]:
    """Processes whose command line still mentions the run's tempdir."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, UnicodeDecodeError):
            continue
        if str(root) in cmd:
            found.append(f"{entry} {cmd.strip()}")
    return found



def benchmark(args, stack: ExitStack, result: dict) -> None:
    """Start the backend, then alternate the proxies over the rounds."""
    root = Path(stack.enter_context(procs.tempdir(args.keep_temp, "poise-reload-")))
    root.chmod(0o755)  # nginx workers run unprivileged
    log(f"# tempdir {root}")
    result["tempdir"] = str(root)
    ports = procs.pick_ports(len(reloaders.BACKENDS) + 2 * len(args.only), base=args.base_port)
    backends = dict(zip(reloaders.BACKENDS, ports, strict=False))
    backend = procs.Service("backend", configs.tagged_backend_nginx(root, backends),
                            root / "backend.log")
    stack.callback(backend.stop)
    backend.start()
    try:
        backend.wait_ready(list(backends.values()), args.start_timeout)
    except procs.StartError as exc:
        raise SystemExit(f"!! backend nginx failed to start, nothing to measure:\n{exc}") from None
    rest = ports[len(backends):]
    proxy_ports = {name: Ports(rest[2 * i], rest[2 * i + 1], backends)
                   for i, name in enumerate(args.only)}
    result["ports"] = {"backends": backends,
                       **{n: [p.main, p.extra] for n, p in proxy_ports.items()}}
    for rnd in range(1, args.rounds + 1):
        for name in args.only:
            sample = run_round(name, rnd, root, proxy_ports[name], args, stack)
            result["samples"].append(sample)
            if not sample["ok"]:
                result["failures"][f"{name} round {rnd}"] = sample["error"]
    backend.stop()
    result["leftover_processes"] = leftover_processes(root)
    for line in result["leftover_processes"]:
        log(f"!! still running after stop: {line}")


def main(argv: list[str] | None = None) -> int:
    """Run the reload benchmark; always stop what was started; return the exit status."""
    args = parse_args(argv)
    procs.ensure_tools()
    started = datetime.now(UTC)
    result = {
        "timestamp": started.strftime("%Y%m%dT%H%M%SZ"),
        "settings": {"rounds": args.rounds, "connections": args.connections,
                     "warmup": args.warmup, "interval": args.interval, "tail": args.tail,
                     "wrk_duration": wrk_duration(args), "only": args.only,
                     "poise_cmd": args.poise_cmd, "probe_window": PROBE_WINDOW,
                     "reloads": [v.change for v in RELOADS]},
        "machine": report.machine_info(),
        "failures": {}, "samples": [],
    }
    if not procs.run_cleanly(lambda stack: benchmark(args, stack, result), log):
        return 130
    result["elapsed_s"] = round((datetime.now(UTC) - started).total_seconds(), 1)
    result["summary"] = summarize(result["samples"], args.only)
    markdown = render_markdown(result)
    print(markdown)
    json_path, md_path = procs.save_results("reload", result, markdown, args.results_dir)
    log(f"# saved {json_path} and {md_path}")
    if not any(s["ok"] for s in result["samples"]):
        log("!! nothing could be measured")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
