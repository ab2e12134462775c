"""Summaries and the markdown report of bench/tcp.py.

A *sample* is one wrk run against one target (poise, haproxy, nginx or direct) in one
round of one case. Tables give medians over rounds; the ratios are taken round by round
(runs next to each other in time share the machine's state) and then their median.
"""

from __future__ import annotations

from statistics import median

import report

# case -> (title, rate unit, CPU unit, CPU scale: per GiB in s, per request in µs)
INFO = {
    "download": ("Bulk download through an L4 relay (GET /big, {big} MiB responses)",
                 "GiB/s", "CPU s/GiB", 1.0),
    "upload": ("Bulk upload through an L4 relay (POST /upload, {up} MiB bodies)",
               "GiB/s", "CPU s/GiB", 1.0),
    "connect": ("Short connections through an L4 relay (GET /, 64-byte body, "
                "`Connection: close`)", "conn/s", "CPU µs/conn", 1e6),
    "handshake": ("TLS handshakes (https GET /, `Connection: close`: a full handshake "
                  "per request)", "handshakes/s", "CPU µs/handshake", 1e6),
    "tls-keepalive": ("TLS keep-alive requests (https GET /, 64-byte body)",
                      "req/s", "CPU µs/req", 1e6),
}
# Goals of issue 13 for poise (bulk, both directions): throughput ÷ direct, CPU ÷ HAProxy.
RATE_GOAL, CPU_GOAL = 0.9, 1.0


def _per(sample: dict, key: str, scale: float) -> float | None:
    value = sample.get(key)
    return value / sample["amount"] * scale if value is not None and sample["amount"] else None


def _ratios(samples: list[dict], case: str, metric, name: str, ref: str) -> list[float]:
    """metric(name's sample) ÷ metric(ref's sample), per round that measured both."""
    by_round: dict[int, dict[str, float | None]] = {}
    for s in samples:
        if s["case"] == case and s["ok"] and s["target"] in (name, ref):
            by_round.setdefault(s["round"], {})[s["target"]] = metric(s)
    return [r[name] / r[ref] for _, r in sorted(by_round.items())
            if r.get(name) is not None and r.get(ref)]


def summarize(samples: list[dict], cases) -> dict:
    """Per case: medians per target, and per-round ratios (rate and CPU) with medians."""
    out = {}
    for case in cases:
        scale = INFO[case.name][3]
        ok = [s for s in samples if s["case"] == case.name and s["ok"]]
        rows = {}
        for target in dict.fromkeys(s["target"] for s in ok):
            mine = [s for s in ok if s["target"] == target]
            cpu = [v for s in mine if (v := _per(s, "cpu_s", scale)) is not None]
            rows[target] = {
                "rounds": len(mine),
                "rate": median(s["rate"] for s in mine),
                "cpu_per": median(cpu) if cpu else None,
                "backend_cpu_per": median(_per(s, "backend_cpu_s", scale) for s in mine),
                "errors": sum(s["error_total"] for s in mine),
            }
        rate_ref = "direct" if case.role == "l4" else "haproxy"
        ratios = []
        for name in ("poise", "nginx", "haproxy", "uvloop-relay"):
            if name == rate_ref:
                continue
            ratios.append(("rate", name, rate_ref,
                           _ratios(ok, case.name, lambda s: s["rate"], name, rate_ref)))
        def cpu(sample: dict, scale: float = scale) -> float | None:
            return _per(sample, "cpu_s", scale)
        for name, ref in (("poise", "haproxy"), ("nginx", "haproxy"),
                          ("uvloop-relay", "haproxy"), ("poise", "uvloop-relay")):
            ratios.append(("cpu", name, ref, _ratios(ok, case.name, cpu, name, ref)))
        out[case.name] = {
            "targets": rows,
            "ratios": [{"metric": m, "name": n, "ref": r, "per_round": v, "median": median(v)}
                       for m, n, r, v in ratios if v],
        }
    return out


# ---------------------------------------------------------------- markdown


def _goal(case: str, ratio: dict) -> str:
    if case not in ("download", "upload") or ratio["name"] != "poise":
        return ""
    if ratio["metric"] == "rate" and ratio["ref"] == "direct":
        return f" (goal ≥ {RATE_GOAL}: {'PASS' if ratio['median'] >= RATE_GOAL else 'FAIL'})"
    if ratio["metric"] == "cpu" and ratio["ref"] == "haproxy":
        return f" (goal ≤ {CPU_GOAL}: {'PASS' if ratio['median'] <= CPU_GOAL else 'FAIL'})"
    return ""


def _case_section(case: dict, summary: dict, settings: dict) -> list[str]:
    name = case["name"]
    title, rate_unit, cpu_unit, scale = INFO[name]
    title = title.format(big=settings["big_mib"], up=settings["upload_mib"])
    lines = [f"## {title}", "",
             f"`wrk -t1 -c{case['connections']}` × {settings['duration']} s per run", ""]
    rate_fmt, cpu_fmt = (".3f", ".3f") if scale == 1.0 else (",.0f", ".1f")
    ratios = {(r["metric"], r["name"]): r["median"] for r in summary["ratios"]
              if r["ref"] in ("direct", "haproxy")}
    rows = [[t, report.fmt(r["rate"], rate_fmt), report.fmt(ratios.get(("rate", t)), ".2f"),
             report.fmt(r["cpu_per"], cpu_fmt), report.fmt(ratios.get(("cpu", t)), ".2f"),
             report.fmt(r["backend_cpu_per"], cpu_fmt), str(r["errors"])]
            for t, r in summary["targets"].items()]
    ref = "direct" if case["role"] == "l4" else "HAProxy"
    lines += report.table(["target", rate_unit, f"÷ {ref}", f"proxy {cpu_unit}", "÷ HAProxy",
                     f"backend {cpu_unit}", "errors"],
                    rows or [["(none measured)"] + [""] * 6])
    label = {"rate": rate_unit, "cpu": cpu_unit}
    lines += [""] if summary["ratios"] else []
    for r in summary["ratios"]:
        lines.append(f"- {r['name']} ÷ {r['ref']} {label[r['metric']]}, per round: "
                     f"{', '.join(f'{v:.2f}' for v in r['per_round'])}; "
                     f"**median {r['median']:.2f}**{_goal(name, r)}")
    return lines + [""]


def _tls_lines(tls: dict) -> list[str]:
    if not tls:
        return []
    keys = ("protocol", "cipher", "group", "signature")
    seen = {tuple(p.get(k) for k in keys) for p in tls.values()}
    lines = ["## TLS parameters (`openssl s_client`, OpenSSL's default offer, as wrk's)", ""]
    lines += report.table(["proxy", *keys], [[t, *(p.get(k) or "n/a" for k in keys)]
                                       for t, p in tls.items()])
    lines += ["", "All proxies negotiate the same parameters." if len(seen) == 1 else
              "**The proxies do not all negotiate the same parameters.**", ""]
    for t, p in tls.items():
        if p.get("error"):
            lines += [f"- {t}: s_client failed: `{p['error'][-200:]}`"]
    return lines


def render(result: dict) -> str:
    """The markdown report: settings, TLS parameters, one section per case, failures."""
    m, s = result["machine"], result["settings"]
    lines = [f"# poise L4 relay and TLS benchmark {result['timestamp']}", "",
             f"- machine: {m['nproc']} CPUs ({m['cpu_model']}), kernel {m['kernel']}, "
             f"Python {m['python']}, load average at start "
             f"{', '.join(f'{x:.2f}' for x in m['loadavg_at_start'])}",
             f"- tools: {m['haproxy']}; {m['nginx']}; {m['wrk']}; {m.get('openssl', '')}",
             f"- poise: `{s['poise_cmd']}`; HTTP hot path {m.get('poise_hot_path', 'n/a')}",
             f"- {s['rounds']} alternating round(s) per case (every other round in reverse "
             f"order), {s['duration']} s per run, {s['warmup']} s warm-up per target and case; "
             f"every proxy with one worker/thread, one backend nginx (one worker)",
             f"- certificate: self-signed, "
             f"{'EC P-256 (ECDSA)' if s['key_type'] == 'ec' else 'RSA 2048'}, minted by "
             f"`openssl req` at bench time; TLS 1.3 with each server's defaults",
             "- CPU: user+system time of the proxy's whole process tree (from /proc) during "
             "the run; *direct* = wrk straight to the backend (no proxy)",
             f"- elapsed: {result.get('elapsed_s', 'n/a')} s", ""]
    lines += _tls_lines(result.get("tls") or {})
    summary = result["summary"]
    for case in s["cases"]:
        if case["name"] in summary:
            lines += _case_section(case, summary[case["name"]], s)
    failed = [x for x in result["samples"] if not x["ok"]]
    if failed:
        lines += ["## Runs not counted", "",
                  "wrk failed, or more than 1% of the requests failed (connection errors "
                  "or non-2xx/3xx): left out of the tables and ratios above.", ""]
        lines += [f"- {x['case']} round {x['round']}, {x['target']}: "
                  f"{x['error'].strip().splitlines()[0][:300]}" for x in failed]
        lines.append("")
    if result["failures"]:
        lines += ["## Failures", ""]
        if "STALE" in m.get("poise_hot_path", "") and any(
                n.startswith("poise") for n in result["failures"]):
            lines += ["poise's compiled hot path is older than its sources (see above): "
                      "`make install` rebuilds it; `--poise-cmd \"env POISE_INTERPRETED=1 "
                      ".venv/bin/poise run\"` runs the sources instead.", ""]
        for name, msg in result["failures"].items():
            lines += [f"- **{name}**:", "", "```", msg.strip(), "```", ""]
    return "\n".join(lines).rstrip() + "\n"
