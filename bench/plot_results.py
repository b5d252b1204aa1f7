#!/usr/bin/env python
"""Plots of bench/run.py results: decode GB/s against context length (batch 1, per model/dtype),
vattn next to its anchors, with the measured bandwidth ceiling as a line.

    python bench/plot_results.py bench/results/cpu.json [--out bench/decode_bandwidth_cpu.png]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict


def decode_series(rows):
    """{(model, dtype): {"vattn": [(ctx, GB/s)], "<anchor>": [...]}} for uniform batch-1 decode rows."""
    series = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        p = r.get("params") or {}
        if r["op"] != "decode" or p.get("batch") != 1 or p.get("ragged") or r.get("value") is None:
            continue
        key = (p["model"], p["dtype"])
        series[key]["vattn"][p["ctx"]] = r["value"]
        if r.get("anchor") and r.get("anchor_value"):
            series[key][r["anchor"]][p["ctx"]] = r["anchor_value"]
    return series


def plot(data: dict, out: str) -> bool:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = decode_series(data["rows"])
    series = {k: v for k, v in series.items() if len(v["vattn"]) >= 2}
    if not series:
        print("plot_results: no batch-1 decode sweep in this file", file=sys.stderr)
        return False
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    markers = iter("osD^v<>")
    for (model, dtype), lines in sorted(series.items()):
        for who, pts in sorted(lines.items(), key=lambda kv: kv[0] != "vattn"):
            xs = sorted(pts)
            style = "-" if who == "vattn" else "--"
            ax.plot(xs, [pts[x] for x in xs], style, marker=next(markers, "x"), label=f"{who} ({model}, {dtype})")
    ceil = data["ceilings"]["bandwidth"]
    ax.axhline(ceil["GBps"], color="gray", linestyle=":", label=f"ceiling: {ceil['op']} {ceil['GBps']:.0f} GB/s")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens), batch 1")
    ax.set_ylabel("GB/s (K/V bytes read + q/out)")
    m = data.get("machine", {})
    where = m.get("gpu") or f"{m.get('cpu', '?')}, {m.get('torch_threads', '?')} threads"
    ax.set_title(f"decode bandwidth on {data['device']} ({where})", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", help="a bench/run.py --json file")
    ap.add_argument("--out", help="PNG path (default bench/decode_bandwidth_<device>.png)")
    args = ap.parse_args(argv)
    with open(args.json) as f:
        data = json.load(f)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), f"decode_bandwidth_{data['device']}.png")
    return 0 if plot(data, out) else 1


if __name__ == "__main__":
    sys.exit(main())
