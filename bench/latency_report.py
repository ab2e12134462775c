"""Summaries and the markdown report of bench/latency.py.

A *sample* is one latency_gen run against one target at one level in one round (a dict
made by latency.measure: latency_gen's JSON report plus CPU figures).  Figures are
medians over a target's successful rounds; failures are summed; ratios are taken round
by round between runs next to each other in time, then their median.
"""

from __future__ import annotations

from statistics import median

from report import fmt, table

RATIO_PAIRS = (("poise", "haproxy"), ("poise", "nginx"))
NAMES = {"poise": "poise", "haproxy": "HAProxy", "nginx": "nginx", "direct": "direct"}
RATIO_FIGURES = (("p50", lambda s: s["latency_us"]["p50"]),
                 ("p99", lambda s: s["latency_us"]["p99"]),
                 ("p99.9", lambda s: s["latency_us"]["p99.9"]),
                 ("CPU/req", lambda s: s["cpu_us_per_req"]))


# A run in which, at some moment, more than this many seconds' worth of requests waited
# for a free connection: the target (or the box) fell behind the rate, and the run
# measured a queue rather than a proxy.
OVERLOAD_S = 0.1


def overloaded(sample: dict) -> bool:
    return sample["backlog_max"] >= OVERLOAD_S * sample["rate"]


def _med(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return median(values) if values else None


def summarize(samples: list[dict], targets: list[str]) -> dict:
    """{level: {"rate", "targets": {name: medians}, "ratios": [...]}} for every level."""
    out: dict[str, dict] = {}
    for level in sorted({s["level"] for s in samples}):
        at = [s for s in samples if s["level"] == level]
        rows = {}
        for name in targets:
            ok = [s for s in at if s["target"] == name and s["ok"]]
            if not ok:
                continue
            rows[name] = {
                "rounds": len(ok),
                "held": sum(1 for s in ok if s["failed"] == 0),
                "overloaded": sum(1 for s in ok if overloaded(s)),
                **{k: _med([s["latency_us"][k] for s in ok])
                   for k in ("p50", "p99", "p99.9", "max")},
                "service_p99.9": _med([s["service_us"]["p99.9"] for s in ok]),
                "cpu_us_per_req": _med([s["cpu_us_per_req"] for s in ok]),
                "cpu_pct": _med([s["cpu_pct"] for s in ok]),
                "backend_cpu_us_per_req": _med([s["backend_cpu_us_per_req"] for s in ok]),
                "gen_cpu_us_per_req": _med([s["gen_cpu_us_per_req"] for s in ok]),
                "failed": sum(s["failed"] for s in ok),
                "late_sends": sum(s["late_sends"] for s in ok),
                "late_share": sum(s["late_sends"] for s in ok) / max(1, sum(s["sent"]
                                                                            for s in ok)),
                "requests": sum(s["ok"] for s in ok),
            }
        out[f"{level:g}"] = {"level": level, "rate": at[0]["rate"], "targets": rows,
                             "ratios": _ratios(at)}
    return out


def _ratios(samples: list[dict]) -> list[dict]:
    """Per round a ÷ b of each RATIO_FIGURES figure, for each pair measured."""
    by_round: dict[int, dict[str, dict]] = {}
    for s in samples:
        if s["ok"]:
            by_round.setdefault(s["round"], {})[s["target"]] = s
    out = []
    for a, b in RATIO_PAIRS:
        rounds = [r for _, r in sorted(by_round.items()) if a in r and b in r]
        if not rounds:
            continue
        figures = {}
        for label, get in RATIO_FIGURES:
            values = [get(r[a]) / get(r[b]) for r in rounds
                      if get(r[a]) is not None and get(r[b])]
            if values:
                figures[label] = {"rounds": values, "median": median(values)}
        out.append({"pair": [a, b], "figures": figures})
    return out


def _ms(us: float | None) -> str:
    return fmt(us and us / 1e3, ".3f", " ms") if us is not None else "n/a"


def render(result: dict) -> str:
    """The markdown report."""
    m, s = result["machine"], result["settings"]
    sat = result.get("saturation", {})
    lines = [f"# Latency at fixed request rates (open loop) {result['timestamp']}", "",
             f"- machine: {m['nproc']} CPUs ({m['cpu_model']}), kernel {m['kernel']}, "
             f"Python {m['python']}; load average at start "
             f"{', '.join(f'{x:.2f}' for x in m['loadavg_at_start'])}",
             f"- tools: {m['haproxy']}; {m['nginx']}; {m['wrk']}; poise hot path: "
             f"{m.get('poise_hot_path', 'n/a')}",
             "- configs as bench/run.py: one worker/thread per proxy, round robin over two "
             "ports of one backend nginx (one worker), keep-alive both sides"]
    if sat.get("given"):
        lines.append(f"- saturation rate given: {sat['rps']:,.0f} req/s")
    elif sat:
        lines.append(f"- poise's saturation rate: {sat['rps']:,.0f} req/s (`wrk -t1 "
                     f"-c64 -d{s['saturation_duration']}s`; wrk's p99 {sat['p99_ms']:.2f} ms, "
                     f"poise {fmt(sat['cpu_us_per_req'], '.1f')} CPU µs/req)")
    lines += [f"- each run: latency_gen (open loop, uniform schedule), {s['connections']} "
              f"keep-alive connections, {s['skip']:g} s unrecorded then {s['duration']:g} s "
              f"recorded; {s['rounds']} alternating "
              f"round(s); latency from each request's due time; medians over rounds", ""]
    for key, level in result.get("summary", {}).items():
        lines += [f"## {float(key):.0%} of poise's saturation: {level['rate']:,.0f} req/s", ""]
        rows = [[NAMES.get(name, name), _ms(r["p50"]), _ms(r["p99"]), _ms(r["p99.9"]),
                 _ms(r["max"]), _ms(r["service_p99.9"]), fmt(r["cpu_us_per_req"], ".1f"),
                 fmt(r["cpu_pct"], ".0f", "%"), fmt(r["backend_cpu_us_per_req"], ".1f"),
                 fmt(r["late_share"] * 100, ".1f", "%"), f"{r['failed']:,}",
                 f"{r['held']}/{r['rounds']}", str(r["overloaded"])]
                for name, r in level["targets"].items()]
        lines += table(["target", "p50", "p99", "p99.9", "max", "p99.9 from send",
                        "CPU µs/req", "CPU %", "backend CPU µs/req", "sent late",
                        "failed", "rounds without failures", "rounds overloaded"],
                      rows or [["(none)"] + [""] * 12])
        lines.append("")
        for ratio in level["ratios"]:
            a, b = ratio["pair"]
            parts = [f"{label} {', '.join(f'{v:.2f}×' for v in f['rounds'])} "
                     f"(median {f['median']:.2f}×)" for label, f in ratio["figures"].items()]
            lines.append(f"- {NAMES[a]} ÷ {NAMES[b]} per round: " + "; ".join(parts))
        lines.append("")
    lines += ["*p99.9 from send*: timed from when the request was written, as closed-loop "
              "tools time it (coordinated omission). *sent late*: requests written more "
              "than 1 ms after they were due (no free connection, or the generator was "
              "short of CPU). *overloaded*: at some moment more than 100 ms worth of due "
              "requests were waiting to be sent: the target (or the box) fell behind.",
              ""]
    lines += _failures(result)
    return "\n".join(lines).rstrip() + "\n"


def _failures(result: dict) -> list[str]:
    from report import failure_lines

    failed = {f"{s['target']} round {s['round']} at {s['level']:.0%}": s["error"]
              for s in result["samples"] if not s["ok"]}
    return failure_lines({**result["failures"], **failed})
