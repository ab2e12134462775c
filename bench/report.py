"""Aggregate raw benchmark samples, render markdown tables, and save results.

A *sample* is one wrk run against one proxy in one round (a dict made by
run.py). The summary takes the median of each metric over a proxy's successful
rounds; errors are summed over rounds.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from statistics import median

from configs import BIG_SIZE, NGINX

CPU_BAR = 1.3  # poise CPU/request may be at most this multiple of HAProxy's
MIB = 1024 * 1024


# ---------------------------------------------------------------- machine info


def _tool_version(argv: list[str]) -> str:
    """First line a tool prints for its version flag (stdout or stderr)."""
    if not shutil.which(argv[0]):
        return "not installed"
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except OSError as exc:
        return f"error: {exc}"
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    return lines[0].strip() if lines else "unknown"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict:
    """Facts needed to compare runs across machines."""
    return {
        "nproc": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": _cpu_model(),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "haproxy": _tool_version(["haproxy", "-v"]).split(" - http")[0],
        "nginx": _tool_version([NGINX, "-v"]),
        "wrk": _tool_version(["wrk", "--version"]).split("Copyright")[0].strip(),
        "loadavg_at_start": os.getloadavg(),
    }


# ---------------------------------------------------------------- aggregation


def _med(samples: list[dict], key) -> float | None:
    values = [v for v in (key(s) for s in samples) if v is not None]
    return median(values) if values else None


def _ratio(value: float | None, ref: float | None) -> float | None:
    return value / ref if value is not None and ref else None


def summarize_small(samples: list[dict], proxies: list[str]) -> dict:
    """Per-proxy medians for the small-response phase."""
    out = {}
    for name in proxies:
        ok = [s for s in samples if s["proxy"] == name and s["phase"] == "small" and s["ok"]]
        if not ok:
            continue
        out[name] = {
            "rounds": len(ok),
            "rps": _med(ok, lambda s: s["rps"]),
            "p50_s": _med(ok, lambda s: s["latency_s"].get("p50")),
            "p99_s": _med(ok, lambda s: s["latency_s"].get("p99")),
            "cpu_us_per_req": _med(ok, lambda s: s["cpu_us_per_req"]),
            "backend_cpu_us_per_req": _med(ok, lambda s: s["backend_cpu_us_per_req"]),
            "errors": sum(s["error_total"] for s in ok),
        }
    ref = out.get("haproxy", {}).get("cpu_us_per_req")
    for row in out.values():
        row["cpu_ratio_vs_haproxy"] = _ratio(row["cpu_us_per_req"], ref)
    return out


def _per_response_ms(key: str):
    """A sample → milliseconds of ``key`` (CPU seconds) per response."""
    def per_response(sample: dict) -> float | None:
        return sample[key] / sample["requests"] * 1e3 if sample["requests"] else None
    return per_response


def summarize_stream(samples: list[dict], proxies: list[str]) -> dict:
    """Per-proxy medians for the 10 MiB streaming phase."""
    out = {}
    for name in proxies:
        ok = [s for s in samples if s["proxy"] == name and s["phase"] == "stream" and s["ok"]]
        if not ok:
            continue
        out[name] = {
            "rounds": len(ok),
            "mib_per_s": _med(ok, lambda s: s["bytes_per_s"] / MIB),
            "responses": sum(s["requests"] for s in ok),
            "cpu_ms_per_response": _med(ok, _per_response_ms("cpu_s")),
            "backend_cpu_ms_per_response": _med(ok, _per_response_ms("backend_cpu_s")),
            "errors": sum(s["error_total"] for s in ok),
        }
    ref = out.get("haproxy", {}).get("cpu_ms_per_response")
    for row in out.values():
        row["cpu_ratio_vs_haproxy"] = _ratio(row["cpu_ms_per_response"], ref)
    return out


def cpu_verdict(small: dict) -> dict | None:
    """poise CPU/request divided by HAProxy's, against CPU_BAR; None if either is missing."""
    ratio = small.get("poise", {}).get("cpu_ratio_vs_haproxy")
    if ratio is None:
        return None
    return {"ratio": ratio, "bar": CPU_BAR, "pass": ratio <= CPU_BAR}


def paired_cpu(samples: list[dict], name: str, ref: str) -> list[tuple[float, float]]:
    """``(name's, ref's)`` CPU µs/request per round of the small phase, for rounds that
    measured both (runs next to each other in time share the machine's state, so their
    ratio or difference is steadier than one of medians)."""
    by_round: dict[int, dict[str, float]] = {}
    for s in samples:
        if s["phase"] == "small" and s["ok"] and s["proxy"] in (name, ref):
            by_round.setdefault(s["round"], {})[s["proxy"]] = s["cpu_us_per_req"]
    return [(r[name], r[ref]) for _, r in sorted(by_round.items()) if name in r and ref in r]


def paired_cpu_ratios(samples: list[dict], name: str = "poise",
                      ref: str = "haproxy") -> list[float]:
    """``name``'s CPU/request ÷ ``ref``'s, per round of the small phase."""
    return [a / b for a, b in paired_cpu(samples, name, ref) if b]


# (label, proxy, reference, budget): the cost of each observability feature as the
# ratio of CPU per request, round by round (issue 10's budgets; None: quoted only).
OBSERVABILITY = (
    ("metrics on ÷ off", "poise", "poise-nometrics", 1.05),
    ("JSON access log to a file ÷ none", "poise+log", "poise", 1.25),
    ("tracing every request (sample_ratio 1.0) ÷ off", "poise+trace", "poise", None),
    ("this build ÷ the baseline build (--baseline-cmd)", "poise", "poise-base", None),
)
# (label, proxy, reference, budget µs): what a rate limit adds per request, as the
# difference of CPU µs per request round by round (issue 12's budgets).
RATE_LIMITS = (
    ("local rate limit (client_ip, shared table) − none", "poise+limit", "poise", 1.0),
    ("global rate limit (Redis leases) − none", "poise+global", "poise", 10.0),
)


def _costs(samples: list[dict], pairs: tuple, kind: str) -> list[dict]:
    """Per-round values (``kind``: "ratios" or "diffs") and their median for each pair
    of ``pairs`` measured."""
    out = []
    for label, name, ref, budget in pairs:
        values = (paired_cpu_ratios(samples, name, ref) if kind == "ratios"
                  else [a - b for a, b in paired_cpu(samples, name, ref)])
        if values:
            out.append({"label": label, kind: values, "median": median(values),
                        "budget": budget})
    return out


def observability_costs(samples: list[dict]) -> list[dict]:
    """Per-round and median CPU/request ratios of the OBSERVABILITY pairs measured."""
    return _costs(samples, OBSERVABILITY, "ratios")


def rate_limit_costs(samples: list[dict]) -> list[dict]:
    """Per-round and median CPU µs/request added by each RATE_LIMITS variant measured."""
    return _costs(samples, RATE_LIMITS, "diffs")


def floor_gap(small: dict) -> dict | None:
    """poise's own logic per request (poise − httptools-relay, µs) next to what the
    CPU bar leaves for it (CPU_BAR × HAProxy − httptools-relay); None if any is missing."""
    poise = small.get("poise", {}).get("cpu_us_per_req")
    floor = small.get("httptools-relay", {}).get("cpu_us_per_req")
    haproxy = small.get("haproxy", {}).get("cpu_us_per_req")
    if poise is None or floor is None or haproxy is None:
        return None
    return {"poise_logic_us": poise - floor, "bar_leaves_us": CPU_BAR * haproxy - floor}


def resilience_overhead(small: dict) -> float | None:
    """poise+checks CPU/request divided by poise's; None if either is missing."""
    base = small.get("poise", {}).get("cpu_us_per_req")
    checked = small.get("poise+checks", {}).get("cpu_us_per_req")
    return _ratio(checked, base)


# ---------------------------------------------------------------- markdown


def fmt(value: float | None, spec: str, suffix: str = "") -> str:
    """``value`` formatted, or ``n/a`` (shared by every bench report)."""
    return "n/a" if value is None else format(value, spec) + suffix


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table: first column left-aligned, the rest right-aligned."""
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def failure_lines(failures: dict[str, str]) -> list[str]:
    """The "Failures" section of a report (empty when nothing failed)."""
    if not failures:
        return []
    lines = ["## Failures", ""]
    for name, msg in failures.items():
        lines += [f"- **{name}**:", "", "```", msg.strip(), "```", ""]
    return lines



def verdict_line(verdict: dict | None) -> str:
    """The explicit poise-vs-HAProxy CPU/request line, with the ≤ 1.3× bar."""
    if verdict is None:
        return "poise CPU/req ÷ HAProxy CPU/req: n/a (needs both poise and haproxy measured)"
    status = "PASS" if verdict["pass"] else "FAIL"
    return (f"poise CPU/req ÷ HAProxy CPU/req = {verdict['ratio']:.2f}× "
            f"(bar ≤ {verdict['bar']}×: {status})")


def render_markdown(result: dict) -> str:
    """The human-readable report: settings, both tables, the CPU verdict, failures."""
    m, s, summary = result["machine"], result["settings"], result["summary"]
    lines = [f"# poise benchmark {result['timestamp']}", "",
             f"- machine: {m['nproc']} CPUs ({m['cpu_model']}), kernel {m['kernel']}, "
             f"Python {m['python']}",
             f"- tools: {m['haproxy']}; {m['nginx']}; {m['wrk']}",
             f"- small: {s['rounds']} alternating round(s) × {s['duration']} s, "
             f"`wrk -t1 -c{s['connections']} --latency` GET / (64-byte body), "
             f"warm-up {s['warmup']} s per proxy", ""]
    lines += ["## Small responses (GET /, 64-byte body)", ""]
    rows = [[name, fmt(r["rps"], ",.0f"), fmt(r["p50_s"] and r["p50_s"] * 1e3, ".2f", " ms"),
             fmt(r["p99_s"] and r["p99_s"] * 1e3, ".2f", " ms"), fmt(r["cpu_us_per_req"], ".1f"),
             fmt(r["cpu_ratio_vs_haproxy"], ".2f", "×"), fmt(r["backend_cpu_us_per_req"], ".1f"),
             str(r["errors"])] for name, r in summary["small"].items()]
    lines += table(["proxy", "req/s", "p50", "p99", "CPU µs/req", "ratio to HAProxy CPU/req",
                     "backend CPU µs/req", "errors"], rows or [["(none measured)"] + [""] * 7])
    lines += ["", f"**{verdict_line(summary['cpu_verdict'])}**", ""]
    paired = summary.get("paired_cpu_ratios") or []
    if paired:
        lines += [f"Per round (poise ÷ HAProxy in the same round): "
                  f"{', '.join(f'{r:.2f}×' for r in paired)}; median {median(paired):.2f}×", ""]
    gap = summary.get("floor_gap")
    if gap is not None:
        lines += [f"Above the httptools-relay floor (bench/floors.py), poise's own logic costs "
                  f"{gap['poise_logic_us']:.1f} µs/req; the ≤ {CPU_BAR}× bar leaves "
                  f"{gap['bar_leaves_us']:.1f} µs/req for it.", ""]
    overhead = resilience_overhead(summary["small"])
    if overhead is not None:
        lines += [f"Health checks + outlier detection configured (poise+checks ÷ poise CPU/req): "
                  f"{overhead:.3f}× (issue 4 bar ≤ 1.05×)", ""]
    costs = summary.get("observability") or []
    if costs:
        lines += ["Observability costs (CPU/req ratio, per round in the same round; median):", ""]
        lines += [f"- {c['label']}: {', '.join(f'{r:.3f}×' for r in c['ratios'])}; median "
                  f"{c['median']:.3f}×" + (f" (budget ≤ {c['budget']}×)" if c["budget"] else "")
                  for c in costs]
        lines.append("")
    limits = summary.get("rate_limits") or []
    if limits:
        lines += ["Rate-limit costs (CPU µs/req added, per round in the same round; median):",
                  ""]
        lines += [f"- {c['label']}: {', '.join(f'{d:+.2f}' for d in c['diffs'])}; median "
                  f"{c['median']:+.2f} µs (budget ≤ {c['budget']:g} µs)" for c in limits]
        lines.append("")
    shares = result.get("poise_workers")
    if shares:
        total = sum(w["requests"] for w in shares) or 1
        lines += ["poise-2w (`workers: 2`) requests per worker: " + ", ".join(
            f"worker {w['slot']} (pid {w['pid']}) {w['requests']:,} ({w['requests'] / total:.0%})"
            for w in shares), ""]
    if s["stream"]:
        lines += [f"## Streaming (GET /big, {BIG_SIZE // MIB} MiB body, "
                  f"`wrk -t1 -c{s['stream_connections']}` × {s['duration']} s)", ""]
        rows = [[name, fmt(r["mib_per_s"], ",.0f"), str(r["responses"]),
                 fmt(r["cpu_ms_per_response"], ".2f"), fmt(r["cpu_ratio_vs_haproxy"], ".2f", "×"),
                 fmt(r["backend_cpu_ms_per_response"], ".2f"), str(r["errors"])]
                for name, r in summary["stream"].items()]
        lines += table(["proxy", "MiB/s", "responses", "CPU ms / 10 MiB response",
                         "ratio to HAProxy", "backend CPU ms/response", "errors"],
                        rows or [["(none measured)"] + [""] * 6])
        lines.append("")
    lines += failure_lines(result["failures"])
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------- saving


def save(result: dict, markdown: str, results_dir: Path) -> tuple[Path, Path]:
    """Write <ts>.json and <ts>.md under results_dir and copy the md to latest.md."""
    results_dir.mkdir(parents=True, exist_ok=True)
    stem = result["timestamp"]
    json_path = results_dir / f"{stem}.json"
    md_path = results_dir / f"{stem}.md"
    json_path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    md_path.write_text(markdown)
    shutil.copyfile(md_path, results_dir / "latest.md")
    return json_path, md_path
