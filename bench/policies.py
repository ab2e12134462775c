"""Pick cost per balancing policy at 10 and 1,000 backends (`make bench` runs it).

Each policy is built over a snapshot of N backends and asked for picks with a
representative request context; the figure is wall time per pick (median of rounds),
including key extraction for hashing policies.  Targets (issue 3): ≤ 1 µs for round
robin, random and p2c at 10 backends; ≤ 2 µs for hashing incl. key extraction.

    .venv/bin/python bench/policies.py [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

from poise.core.backend import Backend
from poise.core.clock import FakeClock
from poise.core.cluster import ClusterSnapshot
from poise.core.context import RequestContext
from poise.core.policies import POLICIES, build_picker, create_policy

# (label, policy name, options); entries whose policy is not registered are skipped.
CASES = [
    ("round_robin (equal)", "round_robin", {}),
    ("round_robin (weighted)", "round_robin", {}),
    ("random", "random", {}),
    ("least_conn (scan: no load reports)", "least_conn", {}),
    ("least_conn (indexed, as the proxy runs it)", "least_conn", {}),
    ("p2c", "p2c", {}),
    ("peak_ewma", "peak_ewma", {}),
    ("ip_hash", "ip_hash", {}),
    ("hash ring (header)", "hash", {"key": "header:x-user", "algorithm": "ring"}),
    ("hash maglev (cookie)", "hash", {"key": "cookie:sid", "algorithm": "maglev"}),
    ("hash rendezvous (path)", "hash", {"key": "path", "algorithm": "rendezvous"}),
    ("sticky (no cookie yet: fallback)", "sticky", {"secret": "bench-secret-0123456789"}),
]
SIZES = (10, 1000)
PICKS = 20_000
ROUNDS = 5


def snapshot(n: int, weighted: bool) -> ClusterSnapshot:
    rng = random.Random(7)
    backends = [Backend("10.0.{}.{}".format(*divmod(i, 250)), 8000,
                        weight=rng.randint(1, 5) if weighted else 1) for i in range(n)]
    snap = ClusterSnapshot.build("bench", backends)
    for i, b in enumerate(backends):
        snap.stats[b].in_flight = i % 7
    return snap


def contexts(count: int) -> list[RequestContext]:
    rng = random.Random(11)
    out = []
    for i in range(count):
        user = b"user-%d" % rng.randrange(10_000)
        out.append(RequestContext(
            client_ip=f"192.0.2.{i % 250}", target=b"/items/%d?q=1" % i,
            headers=[(b"Host", b"example.com"), (b"X-User", user),
                     (b"Cookie", b"theme=dark; sid=" + user)]))
    return out


def measure(label: str, name: str, options: dict, n: int, weighted: bool) -> float:
    policy = create_policy(name, options, rng=random.Random(1), clock=FakeClock(100.0))
    snap = snapshot(n, weighted)
    picker = build_picker(policy, snap)
    if "indexed" in label:
        picker.load_changed(snap.backends[0])  # the proxy reports every in-flight change
    ctxs = contexts(256) if policy.needs_context else [None] * 256
    pick = picker.pick
    per_pick = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        for i in range(PICKS):
            pick(ctxs[i & 255])
        per_pick.append((time.perf_counter() - start) / PICKS)
    return statistics.median(per_pick) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    rows = []
    for label, name, options in CASES:
        if name not in POLICIES:
            continue
        weighted = "weighted" in label or name != "round_robin"
        rows.append((label, *(measure(label, name, options, n, weighted) for n in SIZES)))
    print(f"## Pick cost per policy (µs per pick, median of {ROUNDS} rounds)\n")
    print("| policy | " + " | ".join(f"{n} backends" for n in SIZES) + " |")
    print("|---|" + "---:|" * len(SIZES))
    for label, *costs in rows:
        print(f"| {label} | " + " | ".join(f"{c:.2f}" for c in costs) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dict(zip(("policy", *map(str, SIZES)), row, strict=True))
                       for row in rows], f, indent=2)


if __name__ == "__main__":
    main()
