"""Summary and markdown of bench/memory.py's results (medians over rounds; poise's
breakdown from memory_inproc.py; what an idle connection need not hold)."""

from __future__ import annotations

from statistics import median

import memory_advice
from report import failure_lines, fmt, table

CLIENT_GOAL = 2048      # issue 15: ≤ 2 KB per idle client connection …
UPSTREAM_GOAL = 1024    # … and ≤ 1 KB more per idle pooled upstream connection
KINDS = (("clients", "per_conn"), ("upstreams", "per_upstream"))


def summarize(result: dict) -> dict:
    """Per kind and proxy: per-round figures and medians of RSS, PSS and USS bytes."""
    out: dict = {}
    for kind, key in KINDS:
        rows: dict = {}
        for s in result[kind]:
            if s.get("ok"):
                rows.setdefault(s["proxy"], []).append(s)
        out[kind] = {}
        for name, samples in rows.items():
            out[kind][name] = {
                "rounds": {s["round"]: round(s[key]["rss"]) for s in samples},
                **{m: median(s[key][m] for s in samples)
                   for m in ("rss", "pss", "uss", "dirty")},
            }
            if kind == "clients":
                out[kind][name]["kept_rss"] = median(s["kept_per_conn"]["rss"]
                                                     for s in samples)
    inproc = result.get("inproc", {}).get("compiled", {})
    out["advice"] = memory_advice.advise(inproc) if "clients" in inproc else []
    return out


def _verdict(value: float | None, goal: int) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.0f} B ({'PASS' if value <= goal else 'FAIL'}, goal ≤ {goal:,} B)"


def _figures(result: dict, kind: str, rounds: int) -> list[str]:
    summary = result["summary"][kind]
    ref = summary.get("haproxy", {}).get("dirty")
    header = ["proxy", *[f"RSS round {i}" for i in range(1, rounds + 1)], "median RSS",
              "median private dirty", "median USS", "median PSS", "private dirty ÷ HAProxy's"]
    if kind == "clients":
        header.append("RSS kept after close")
    rows = []
    for name, r in summary.items():
        # (by round number: a round not counted shows "—"; JSON made the keys strings)
        per_round = [fmt(r["rounds"].get(i, r["rounds"].get(str(i))), ",.0f")
                     .replace("n/a", "—") for i in range(1, rounds + 1)]
        row = [name, *per_round, fmt(r["rss"], ",.0f"),
               fmt(r["dirty"], ",.0f"), fmt(r["uss"], ",.0f"), fmt(r["pss"], ",.0f"),
               fmt(r["dirty"] / ref if ref else None, ".2f", "×")]
        if kind == "clients":
            row.append(fmt(r["kept_rss"], ",.0f"))
        rows.append(row)
    return table(header, rows or [["(none measured)"] + [""] * (len(header) - 1)])


def _breakdown(part: dict, n_label: str) -> list[str]:
    """One side (clients or upstreams) of poise's in-process breakdown."""
    lines = [f"tracemalloc: **{part['bytes_per_conn']:,.0f} B** of live Python-allocated "
             f"memory per connection ({n_label}).", "",
             "Objects one idle connection holds exclusively (`sys.getsizeof`, found from "
             "it with `gc.get_referents` and kept when only its own objects refer to "
             "them):", ""]
    excl = part["exclusive"]
    lines += table(["object", "held by", "bytes"],
                   [[f"`{e['type']}`", f"`{e['via']}`" if e["via"] else "(itself)",
                     str(e["bytes"])] for e in excl]
                   + [["**total, Python-visible**", "", f"**{sum(e['bytes'] for e in excl)}**"]])
    lines += ["", "New allocations per connection by size (types named by instance size; "
              "C memory named by calibration probes):", ""]
    lines += table(["size", "per conn", "B/conn", "what"],
                   [[str(z["size"]), f"{z['per_conn']:.2f}", f"{z['bytes_per_conn']:,.0f}",
                     ", ".join([f"`{t.split('.')[-1]}`" for t in z["types"]]
                               + ([f"{z['unnamed_per_conn']:.2f}× C: " + "; ".join(z["c_sources"])]
                                  if z["c_sources"] else [])
                               + (["unnamed"] if z["unnamed_per_conn"] and not z["c_sources"]
                                  else []))]
                    for z in part["sizes"][:14]])
    lines += ["", "Growth by object type (gc objects and what they refer to):", ""]
    lines += table(["type", "objects/conn", "B/conn"],
                   [[f"`{t['type']}`", f"{t['per_conn']:.2f}", f"{t['bytes_per_conn']:,.0f}"]
                    for t in part["types"][:16]])
    return lines + [""]


def _sites(part: dict) -> list[str]:
    rows = []
    for s in part.get("sites", [])[:12]:
        if s["bytes_per_conn"] < 1:
            continue
        via = "" if s["via"] in (s["site"], "-") else f" (from `{s['via']}`)"
        code = s["code"].replace("|", "\\|")
        rows.append([f"`{s['site']}`{via}", f"`{code}`" if code[:1] != "(" else code,
                     f"{s['bytes_per_conn']:,.0f}"])
    return table(["allocated at", "code", "B/conn"], rows) + [""]


def render(result: dict) -> str:
    m, s, summary = result["machine"], result["settings"], result["summary"]
    lines = [f"# poise memory per idle connection {result['timestamp']}", "",
             f"- machine: {m['nproc']} CPUs ({m['cpu_model']}), kernel {m['kernel']}, "
             f"Python {m['python']}; {m['haproxy']}; {m['nginx']}",
             f"- poise: `{s['poise_cmd']}` (workers: 1, metrics on), HTTP hot path "
             f"{m['poise_hot_path']}; commit {m['poise_git']}",
             f"- {s['rounds']} alternating round(s); every sample on a freshly started proxy "
             f"after a warm-up of {s['warmup']} connections; memory read "
             f"{s['settle']:g} s after the last connection (`/proc/PID/smaps_rollup`, whole "
             f"process tree: RSS, Private_Dirty, USS = private clean + dirty, PSS); bytes "
             f"per connection; a round not counted (see *Failures*) shows —", ""]
    n = s["connections"]
    lines += [f"## Idle client connections ({n:,} keep-alive connections, one GET each)", ""]
    lines += _figures(result, "clients", s["rounds"])
    poise_c = summary["clients"].get("poise", {}).get("rss")
    lines += ["", f"**poise per idle client connection: {_verdict(poise_c, CLIENT_GOAL)}** "
              f"(median RSS). *RSS kept after close*: what stayed resident once the "
              f"connections were gone (allocator caches, grown tables).", ""]
    lines += [f"## Idle pooled upstream connections ({s['bursts']} bursts of {s['burst']} "
              f"concurrent slow requests, each to a pool of its own)", ""]
    lines += _figures(result, "upstreams", s["rounds"])
    ups = summary["upstreams"]
    # (Results from before parking have one "poise" row: a warm connection.)
    warm = (ups.get("poise (warm)") or ups.get("poise") or {}).get("rss")
    parked = ups.get("poise (parked)", {}).get("rss")
    lines += ["", f"**poise per idle upstream connection, warm: "
              f"{_verdict(warm, UPSTREAM_GOAL)}; parked: {_verdict(parked, UPSTREAM_GOAL)}** "
              f"(median RSS, from after the first burst to after the last, over the "
              f"upstream connections added). *warm*: `keepalive_park_after: 0`, every "
              f"idle connection keeps its transport; *parked*: `keepalive_park_after: "
              f"{s.get('park_after', '1s')}`, each figure read once all the idle "
              f"connections were parked (only their sockets kept: see "
              f"docs/operations.md).", "",
              "RSS is what the issue's goals are stated in. To compare proxies, private "
              "dirty memory (`Private_Dirty`) is the fairer figure: nginx's worker copies "
              "pages it shared with its master when it writes them, which its RSS does "
              "not show (they were resident already), and USS moves when another process "
              "on the machine maps the same binary.", ""]
    inproc = result.get("inproc") or {}
    comp, interp = inproc.get("compiled", {}), inproc.get("interpreted", {})
    if "clients" in comp:
        k = comp["clients"]["connections"]
        lines += [f"## poise: what an idle connection holds (in-process, hot path "
                  f"{comp['hot_path']})", "",
                  "RSS is the truth; this is the breakdown. uvloop allocates libuv's "
                  "handles with PyMem_RawMalloc, so tracemalloc sees them (as unnamed "
                  "sizes); memory outside Python's allocators and allocator overhead are "
                  "only in RSS.", "",
                  f"### One idle client connection ({k:,} held)", ""]
        lines += _breakdown(comp["clients"], f"{k:,} connections")
        up = comp["upstreams"]
        lines += [f"### One idle pooled upstream connection ({up['connections']:,} added, "
                  f"{up['idle_in_pools']:,} idle in the pools)", ""]
        lines += _breakdown(up, f"{up['connections']:,} connections")
    elif comp.get("error"):
        lines += ["## poise breakdown failed", "", "```", comp["error"], "```", ""]
    if "clients" in interp:
        lines += ["### Top allocation sites (POISE_INTERPRETED=1: compiled code has no "
                  "frames, so its allocations show at the event loop's call)", "",
                  f"Interpreted, an idle client connection costs "
                  f"{interp['clients']['bytes_per_conn']:,.0f} B (compiled: "
                  f"{comp.get('clients', {}).get('bytes_per_conn', 0):,.0f} B); the "
                  f"interpreted path also has no fast head parser, so it creates httptools' "
                  f"parser.", "", "Client connections:", ""]
        lines += _sites(interp["clients"])
        lines += ["Upstream connections:", ""]
        lines += _sites(interp["upstreams"])
    advice = summary.get("advice") or []
    if advice:
        lines += memory_advice.render(advice, comp)
    lines += failure_lines(result["failures"])
    return "\n".join(lines).rstrip() + "\n"
