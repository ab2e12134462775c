"""The report of bench/reload.py: per-proxy summary of the rounds, and its markdown."""

from __future__ import annotations

from collections import Counter
from statistics import median

import report
from reloaders import RELOADS

PROBE_WINDOW = 5.0  # seconds a probe keeps trying before it reports "not seen"
B3_BAR = 1.0        # the issue: the added backend serves within 1 s of its reload
# What bench/reload.py's probes watch for (its PROBES, by name).
PROBE_NAMES = ("b3_serves", "listener_up", "listener_gone")

# ---------------------------------------------------------------- summary


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return median(values) if values else None


def rejected(sample: dict) -> int:
    """Reloads the proxy turned down: as the harness saw them (`haproxy -c`, `nginx -s
    reload` failing) or, for poise, which only gets a SIGHUP, as its log tells."""
    if "rejected_in_log" in sample["notes"]:
        return sample["notes"]["rejected_in_log"]
    return sum(step["outcome"] == "rejected" for step in sample["steps"])


def summarize(samples: list[dict], names: list[str]) -> dict:
    """Per proxy: failures per round and their median, kinds, probe medians, req/s."""
    out = {}
    for name in names:
        ok = [s for s in samples if s["proxy"] == name and s["ok"]]
        if not ok:
            continue
        kinds: Counter[str] = Counter()
        for s in ok:
            kinds.update(s["errors"])
        probes = {name: [s["probes"][name]["after_s"] for s in ok] for name in PROBE_NAMES}
        gone = [g if up is not None else None
                for g, up in zip(probes["listener_gone"], probes["listener_up"], strict=True)]
        out[name] = {
            "rounds": len(ok),
            "method": ok[0]["method"],
            "failed_per_round": [s["failed"] for s in ok],
            "failed_median": median(s["failed"] for s in ok),
            "kinds": {k: v for k, v in kinds.items() if v},
            "rejected_per_round": [rejected(s) for s in ok],
            "b3_serves_s": _median(probes["b3_serves"]),
            "b3_seen": sum(v is not None for v in probes["b3_serves"]),
            "b3_worst_s": (max(probes["b3_serves"]) if None not in probes["b3_serves"]
                           else None),
            "listener_up_s": _median(probes["listener_up"]),
            "listener_up_seen": sum(v is not None for v in probes["listener_up"]),
            "listener_gone_s": _median(gone),
            "b3_probe_failed": sum(s["probes"]["b3_serves"]["errors"] for s in ok),
            "b3_probe_sent": sum(s["probes"]["b3_serves"]["attempts"] for s in ok),
            "rps": median(s["rps"] for s in ok),
            "alive_at_end": all(s["alive_at_end"] for s in ok),
            "final_backends": sorted({b for s in ok for b in s["final_backends"]}),
            "sighup_ignored": sum(s["notes"].get("sighup_ignored", 0) for s in ok),
        }
    return out


# ---------------------------------------------------------------- markdown


def _seconds(value: float | None, seen: int, rounds: int, window: str) -> str:
    """A probe's median delay in ms, with how many rounds saw it at all."""
    if value is None:
        return f"not within {window}"
    text = f"{value * 1e3:,.0f} ms"
    return text if seen == rounds else f"{text} ({seen}/{rounds} rounds)"


def _kinds(kinds: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in kinds.items()) or "—"


def render_markdown(result: dict) -> str:
    """The report: setup, the failures table, the probes table, how to read it, notes."""
    m, s, summary = result["machine"], result["settings"], result["summary"]
    changes = " · ".join(f"{k} {v.change}" for k, v in enumerate(RELOADS, 1))
    lines = [f"# Reload under load {result['timestamp']}", "",
             f"- machine: {m['nproc']} CPUs ({m['cpu_model']}), kernel {m['kernel']}, "
             f"Python {m['python']}",
             f"- tools: {m['haproxy']}; {m['nginx']}; {m['wrk']}; poise: "
             f"`{s['poise_cmd']} CONFIG`",
             f"- load: `wrk -t1 -c{s['connections']} -d{s['wrk_duration']}s --latency` GET / "
             f"through the proxy to one nginx backend (ports b1, b2, b3); "
             f"{s['rounds']} alternating round(s), each proxy started afresh on the base "
             f"config (b1, b2, round robin) every round",
             f"- 10 reloads, one every {s['interval']:g} s from {s['warmup']:g} s into the run: "
             f"{changes}", ""]
    lines += ["## Failed requests per 10 reloads", ""]
    rows = [[name, ", ".join(map(str, r["failed_per_round"])), f"**{r['failed_median']:g}**",
             _kinds(r["kinds"]), ", ".join(map(str, r["rejected_per_round"])),
             _seconds(r["b3_serves_s"], r["b3_seen"], r["rounds"], f"{PROBE_WINDOW:g} s"),
             f"{r['rps']:,.0f}"] for name, r in summary.items()]
    lines += report.table(
        ["proxy", "failed per round", "failed per 10 reloads (median)",
         "kinds (all rounds)", "reloads rejected", "b3 serves after (median)", "req/s"],
        rows or [["(none measured)"] + [""] * 6])
    lines += ["", "A *read* error is a request sent on a keep-alive connection that the proxy "
              "closed without answering; bench/README.md (*Reload under load*) says why "
              "HAProxy and nginx do that on reload.", "", *verdict_lines(summary)]
    lines += ["## Probes (a fresh connection per request)", ""]
    rows = [[name,
             _seconds(r["listener_up_s"], r["listener_up_seen"], r["rounds"],
                      f"{s['interval']:g} s"),
             "n/a" if r["listener_gone_s"] is None else f"{r['listener_gone_s'] * 1e3:,.0f} ms",
             f"{r['b3_probe_failed']} / {r['b3_probe_sent']}",
             ", ".join(r["final_backends"]) or "—",
             "yes" if r["alive_at_end"] else "**no**"] for name, r in summary.items()]
    lines += report.table(
        ["proxy", "2nd listener serves after", "2nd listener refuses after",
         "b3 probe: failed / sent", "after the last reload, served by", "alive at end"],
        rows or [["(none measured)"] + [""] * 5])
    lines += ["", "How each proxy was reloaded:", ""]
    lines += [f"- **{name}**: {r['method']}" for name, r in summary.items()]
    lines += ["", *_notes(summary)]
    if result["failures"]:
        lines += ["## Failures", ""]
        for name, msg in result["failures"].items():
            lines += [f"- **{name}**:", "", "```", msg.strip(), "```", ""]
    return "\n".join(lines).rstrip() + "\n"


def verdict_lines(summary: dict) -> list[str]:
    """The issue's bar for each poise row: 0 failed requests in every round, and the
    added backend serving within B3_BAR s after the reload in every round."""
    lines = []
    for name, r in summary.items():
        if not name.startswith("poise"):
            continue
        worst = max(r["failed_per_round"])
        b3 = r["b3_worst_s"]
        b3_text = ("b3 did not serve in every round" if b3 is None
                   else f"b3 served within {b3 * 1e3:,.0f} ms at worst")
        lines += [f"**{name}: {worst} failed requests in the worst round (bar 0: "
                  f"{'PASS' if worst == 0 else 'FAIL'}); {b3_text} (bar ≤ "
                  f"{B3_BAR:g} s: {'PASS' if b3 is not None and b3 <= B3_BAR else 'FAIL'})**",
                  ""]
    return lines


def _notes(summary: dict) -> list[str]:
    """Warnings a reader needs before trusting a row."""
    notes = []
    for name, r in summary.items():
        if r["sighup_ignored"]:
            notes.append(f"- **{name}** logged `SIGHUP ignored` {r['sighup_ignored']} time(s): "
                         f"this poise does not reload yet, so its row measures an ignored "
                         f"SIGHUP, not a reload.")
        elif r["b3_seen"] < r["rounds"]:
            notes.append(f"- **{name}**: the added backend b3 did not serve within "
                         f"{PROBE_WINDOW:g} s in {r['rounds'] - r['b3_seen']} round(s).")
    return [*notes, ""] if notes else []
