#!/usr/bin/env python3
"""Markdown table from bench/run.sh's results.csv: per workload, test and
target the median requests/s over the repetitions, their spread
((max - min) / median), median p50 and p99, and the median of the
per-repetition ratios to direct TLS (each ratio within one repetition, since
the machine's load drifts between repetitions). Then the derived figures the
targets are stated in: p50 added at -c 1, the rotation dip, mixed/tx.
Usage: bench/table.py results.csv"""
import csv
import statistics
import sys
from collections import defaultdict

ORDER = ["plain", "direct", "proxy", "proxy_rot", "haproxy", "stunnel"]
NAMES = {
    "c50": "-c 50",
    "p16": "-c 50 -P 16",
    "c1": "-c 1",
    "k0": "-c 10 -k 0",
    "v1k": "-c 50 -d 1024 (1 KB)",
    "v100k": "-c 10 -d 102400 (100 KB)",
    "rot": "-c 50, proxy_rot rotating every ~5 s",
    "tx": "transactions only, 8 clients",
    "mixed": "MULTI/EXEC + GET, 8 clients",
    "fanout": "pub/sub 1 -> 1000 subscribers",
}


def num(s):
    try:
        return float(s)
    except ValueError:
        return None


def main(path):
    rows = list(csv.DictReader(open(path)))
    # (workload, test) -> target -> rep -> row
    runs = defaultdict(lambda: defaultdict(dict))
    workloads = []
    for r in rows:
        key = (r["workload"], r["test"])
        if key not in runs:
            workloads.append(key)
        runs[key][r["target"]][r["rep"]] = r
    out = [
        "| workload | test | target | median rps | spread | p50 ms | p99 ms | ratio to direct TLS |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ratio_of = {}
    for key in workloads:
        w, test = key
        by_target = runs[key]
        direct = by_target.get("direct", {})
        for t in sorted(by_target, key=lambda t: ORDER.index(t) if t in ORDER else 99):
            reps = by_target[t]
            rps = [num(r["rps"]) for r in reps.values() if num(r["rps"])]
            if not rps:
                continue
            med = statistics.median(rps)
            spread = (max(rps) - min(rps)) / med if med else 0
            p50 = [num(r["p50_ms"]) for r in reps.values() if num(r["p50_ms"]) is not None]
            p99 = [num(r["p99_ms"]) for r in reps.values() if num(r["p99_ms"]) is not None]
            ratios = [
                num(r["rps"]) / num(direct[rep]["rps"])
                for rep, r in reps.items()
                if rep in direct and num(direct[rep]["rps"]) and num(r["rps"])
            ]
            ratio = statistics.median(ratios) if ratios else None
            ratio_of[(w, test, t)] = ratio
            out.append(
                "| {} | {} | {} | {:.0f} | {:.0%} | {} | {} | {} |".format(
                    NAMES.get(w, w),
                    test,
                    t,
                    med,
                    spread,
                    "{:.3f}".format(statistics.median(p50)) if p50 else "",
                    "{:.3f}".format(statistics.median(p99)) if p99 else "",
                    "{:.2f}x".format(ratio) if ratio is not None else "",
                )
            )
    out.append("")
    derived = []
    # p50 added by each forwarder at -c 1, median of per-repetition differences.
    for test in ("SET", "GET"):
        key = ("c1", test)
        if key in runs and "direct" in runs[key]:
            d = runs[key]["direct"]
            for t in ("proxy", "haproxy", "stunnel"):
                diffs = [
                    (num(r["p50_ms"]) - num(d[rep]["p50_ms"])) * 1000
                    for rep, r in runs[key].get(t, {}).items()
                    if rep in d
                ]
                if diffs:
                    derived.append(
                        f"- `-c 1` {test}: {t} adds {statistics.median(diffs):.0f} us to p50"
                    )
    # Rotation dip: proxy_rot against proxy, per repetition.
    for test in ("SET", "GET"):
        key = ("rot", test)
        if key in runs:
            a, b = runs[key].get("proxy", {}), runs[key].get("proxy_rot", {})
            q = [num(b[rep]["rps"]) / num(a[rep]["rps"]) for rep in b if rep in a]
            if q:
                derived.append(
                    f"- rotation every ~5 s, `-c 50` {test}: {1 - statistics.median(q):+.1%} "
                    f"dip (rotating proxy against the same proxy with an hour-long token; "
                    f"per-repetition ratios {', '.join(f'{x:.3f}' for x in q)})"
                )
    # Mixed against transactions alone, per target and repetition.
    if ("mixed", "tx") in runs and ("tx", "tx") in runs:
        for t in ORDER:
            a, b = runs[("tx", "tx")].get(t, {}), runs[("mixed", "tx")].get(t, {})
            q = [num(b[rep]["rps"]) / num(a[rep]["rps"]) for rep in b if rep in a]
            if q:
                derived.append(
                    f"- mixed MULTI/EXEC + GET against transactions only, {t}: "
                    f"{statistics.median(q):.2f}x"
                )
    out.extend(derived)
    print("\n".join(out))


if __name__ == "__main__":
    main(sys.argv[1])
