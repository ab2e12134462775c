"""Figures and the markdown report of bench/scale.py.

A *sample* is one run of one proxy (scale.one_run): the generators' reports, merged
latency percentiles (µs) and the proxy's memory and CPU readings.  Each run's figures
are listed; medians over rounds and per-round ratios poise ÷ HAProxy follow.
"""

from __future__ import annotations

from statistics import median

from latency_gen import failures
from report import failure_lines, fmt, table

NAMES = {"poise": "poise", "haproxy": "HAProxy"}


def figures(sample: dict) -> dict:
    """One run's figures (counts summed over its generators)."""
    reps, ready = sample["reports"], sample["ready"]
    expected = sum(r["active"] + r["idle"] for r in reps)
    opened = sum(r["active"] + r["idle"] for r in ready)
    errors = [r["errors"] for r in reps]
    lost = sum(e["closed_idle"] + e["idle_failed"] for e in errors)
    probe_failed = sum(r["idle_probe_failed"] for r in reps)
    failed = sum(failures(r) for r in reps)
    served = sum(r["done_all"] + r["idle_probe_ok"] for r in reps)
    conn, started = sample["memory_connected"], sample["memory_started"]
    return {
        "target": sample["target"], "round": sample["round"],
        "processes": sample["processes"],
        "connections": opened, "expected": expected,
        "sockets": conn.get("sockets"), "sockets_loaded": sample["memory_loaded"].get("sockets"),
        "requests": sum(r["ok"] for r in reps),
        "rate": sum(r["ok"] for r in reps) / max(r["duration_s"] for r in reps),
        "failed": failed, "lost_connections": lost,
        "idle_probe_ok": sum(r["idle_probe_ok"] for r in reps), "idle_probe_failed": probe_failed,
        "errors": failed + lost + probe_failed + (expected - opened),
        **{k: sample["latency_us"].get(k) for k in ("p50", "p99", "p99.9", "max")},
        "rss_started": started["rss_mib"], "rss_connected": conn["rss_mib"],
        "rss_peak": sample["memory_peak"]["rss_mib"], "pss_connected": conn["pss_mib"],
        "pss_peak": sample["memory_peak"]["pss_mib"],
        "kib_per_connection": (conn["pss_mib"] - started["pss_mib"]) * 1024 / opened
        if opened else None,
        "cpu_us_per_req": sample["proxy_cpu_s"] / served * 1e6 if served else None,
        "ramp_s": sample["ramp_s"], "late_sends": sum(r["late_sends"] for r in reps),
        "gen_cpu_s": sum(r["cpu_s"] for r in reps),
        "log_problems": sample["log_lines"]["warnings_and_errors"],
        "alive_at_end": sample["alive_at_end"],
    }


def summarize(samples: list[dict], targets: list[str]) -> dict:
    runs = [figures(s) for s in samples]
    medians = {}
    for name in targets:
        mine = [r for r in runs if r["target"] == name]
        if not mine:
            continue
        medians[name] = {k: median(r[k] for r in mine) for k in
                         ("p50", "p99", "p99.9", "max", "rss_connected", "rss_peak",
                          "pss_connected", "pss_peak", "kib_per_connection", "cpu_us_per_req",
                          "rate") if all(r[k] is not None for r in mine)}
        medians[name].update(rounds=len(mine), errors=sum(r["errors"] for r in mine),
                             processes=mine[0]["processes"])
    ratios = {}
    for key in ("p99", "p99.9", "pss_connected", "rss_peak", "cpu_us_per_req"):
        pairs = [(a[key], b[key]) for a in runs for b in runs
                 if a["target"] == "poise" and b["target"] == "haproxy"
                 and a["round"] == b["round"] and a[key] and b[key]]
        if pairs:
            values = [a / b for a, b in pairs]
            ratios[key] = {"rounds": values, "median": median(values)}
    return {"runs": runs, "medians": medians, "ratios_poise_haproxy": ratios}


def _ms(us: float | None) -> str:
    return fmt(us / 1e3 if us is not None else None, ".2f", " ms")


def progress_line(sample: dict) -> str:
    f = figures(sample)
    return (f"#   {f['errors']} errors, p50 {_ms(f['p50'])}, p99 {_ms(f['p99'])}, p99.9 "
            f"{_ms(f['p99.9'])}, RSS {f['rss_connected']:,.0f} MiB connected / "
            f"{f['rss_peak']:,.0f} MiB peak, {fmt(f['cpu_us_per_req'], '.1f')} CPU µs/req")


def render(result: dict) -> str:
    m, s, summary = result["machine"], result["settings"], result["summary"]
    runs = summary["runs"]
    lines = [f"# Many concurrent connections: poise vs HAProxy {result['timestamp']}", "",
             f"- machine: {m['nproc']} CPUs ({m['cpu_model']}), kernel {m['kernel']}, "
             f"Python {m['python']}; load average at start "
             f"{', '.join(f'{x:.2f}' for x in m['loadavg_at_start'])}",
             f"- tools: {m['haproxy']}; poise hot path: {m.get('poise_hot_path', 'n/a')}",
             f"- load: {s['connections']:,} concurrent connections from {s['generators']} "
             f"latency_gen processes (4 source addresses 127.R.G.1-4 each, fresh per run): "
             f"{s['active']:,} active at {s['rate']:,.0f} req/s in all (open loop, "
             f"{s['skip']:g} s unrecorded then {s['duration']:g} s recorded), "
             f"{s['connections'] - s['active']:,} idle (one request after connecting, one "
             f"more after the measurement)",
             f"- every proxy process: RLIMIT_NOFILE {s['nofile']:,}; one backend nginx",
             f"- {_setup_line(result)}", ""]
    rows = [[NAMES.get(r["target"], r["target"]), str(r["round"]), str(r["processes"]),
             f"{r['connections']:,}/{r['expected']:,}", fmt(r["sockets"], ",d"),
             f"{r['errors']:,}", f"{r['rate']:,.0f}", _ms(r["p50"]), _ms(r["p99"]),
             _ms(r["p99.9"]), _ms(r["max"]),
             f"{r['rss_started']:,.0f} → {r['rss_connected']:,.0f} → {r['rss_peak']:,.0f}",
             f"{r['pss_connected']:,.0f}", fmt(r["kib_per_connection"], ".1f"),
             fmt(r["cpu_us_per_req"], ".1f")] for r in runs]
    lines += ["## Every run", ""]
    lines += table(["proxy", "round", "processes", "connections open", "sockets held",
                    "errors", "req/s", "p50", "p99", "p99.9", "max",
                    "RSS MiB started → connected → peak", "PSS MiB connected",
                    "KiB/connection", "CPU µs/req"], rows or [["(none)"] + [""] * 14])
    lines += ["", "## Medians over rounds", ""]
    med = summary["medians"]
    rows = [[NAMES.get(n, n), str(r["processes"]), f"{r['errors']:,}", _ms(r.get("p50")),
             _ms(r.get("p99")), _ms(r.get("p99.9")), fmt(r.get("rss_peak"), ",.0f"),
             fmt(r.get("pss_connected"), ",.0f"), fmt(r.get("kib_per_connection"), ".1f"),
             fmt(r.get("cpu_us_per_req"), ".1f"), str(r["rounds"])] for n, r in med.items()]
    lines += table(["proxy", "processes", "errors (all rounds)", "p50", "p99", "p99.9",
                    "RSS MiB peak", "PSS MiB connected", "KiB/connection", "CPU µs/req",
                    "rounds"], rows or [["(none)"] + [""] * 10])
    ratios = summary["ratios_poise_haproxy"]
    if ratios:
        lines += ["", "poise ÷ HAProxy per round: " + "; ".join(
            f"{k} {', '.join(f'{v:.2f}×' for v in r['rounds'])} (median {r['median']:.2f}×)"
            for k, r in ratios.items())]
    lines += ["", "*errors*: failed or unsent requests, connections lost while idle, idle "
              "connections whose second request failed, connections never opened. "
              "*sockets held*: sockets open in the proxy's processes with every connection "
              "open (client, backend and listening sockets). *KiB/connection*: PSS growth "
              "from started to connected ÷ connections (user-space memory only; the "
              "kernel's socket buffers are not in it). CPU: the proxy's, from the load's "
              "start to the idle probe's end, ÷ requests answered in that time.", ""]
    dead = [f"{NAMES.get(r['target'], r['target'])} round {r['round']}" for r in runs
            if not r["alive_at_end"]]
    if dead:
        lines += ["**Proxy processes that had exited by the end of their run:** "
                  + ", ".join(dead), ""]
    notes = [line for sample in result["samples"] for line in sample["log_lines"]["open_files"]]
    if notes:
        lines += ["poise's log about file limits: " + "; ".join(
            f"`{n}`" for n in dict.fromkeys(notes)), ""]
    lines += failure_lines(result["failures"])
    return "\n".join(lines).rstrip() + "\n"


def _setup_line(result: dict) -> str:
    s = result["settings"]
    poise = [r for r in result["summary"]["runs"] if r["target"] == "poise"]
    haproxy = [r for r in result["samples"] if r["target"] == "haproxy"]
    parts = []
    if poise:
        parts.append(f"poise: `workers: auto` with listener `max_connections` "
                     f"{s['connections'] + -(-s['connections'] // 100):,} → "
                     f"{poise[0]['processes'] - 1} workers + the supervisor")
    if haproxy:
        parts.append(f"HAProxy: {haproxy[0]['processes']} processes (`nbthread 1` and "
                     f"`maxconn {haproxy[0]['haproxy_maxconn']:,}` each, one port shared "
                     f"with SO_REUSEPORT)")
    return "; ".join(parts) or "no proxy ran"
