#!/usr/bin/env python
"""Plots of bench/run.py results: decode GB/s against context length (batch 1, per model/dtype),
vattn next to its anchors, with the measured bandwidth ceiling as a line; and bench/RESULTS.md.

    python bench/plot_results.py bench/results/cpu.json [--out bench/decode_bandwidth_cpu.png]
    python bench/plot_results.py --results      # plots + bench/RESULTS.md from bench/results/

Refreshing the CPU numbers (what RESULTS.md says it ran):
    python bench/run.py --device cpu --json bench/results/cpu.json --markdown bench/results/cpu.md
    python bench/manager_latency.py --device cpu --json bench/results/manager_cpu.json --markdown bench/results/manager_cpu.md
    python bench/memory_trace.py --out-dir /tmp/mt && cp /tmp/mt/memory_trace.md bench/results/memory_trace.md
    python bench/plot_results.py --results
GPU numbers: copy the OUTDIR of bench/gpu_check.sh to bench/results/gpu/ and rerun --results.
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


HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")


def _read(path):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return f.read().strip()


def _strip_command(md: str) -> str:
    """Drops the 'Command:' header line of a --markdown file (RESULTS.md states it once)."""
    return "\n".join(line for line in md.splitlines() if not line.startswith(("Command:", "Machine:"))).strip()


def cpu_targets(data) -> list:
    """The CPU decode targets (reported, not asserted): >= 2x SDPA, and >= half the measured
    read bandwidth at long context (here: rows with >= 8K tokens per row)."""
    rows = [
        r
        for r in data["rows"]
        if r["op"] == "decode" and r.get("ratio") and (r.get("params") or {}).get("ctx", 0) >= 8192
    ]
    if not rows:
        return []
    out = [
        "CPU decode targets at long context (>= 8K tokens per row; reported, not asserted): >= 2x SDPA and "
        ">= 50% of the measured read bandwidth.",
        "",
        "| shape | ratio vs SDPA | 2x? | % of read bandwidth | >= 50%? |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['shape']} | {r['ratio']:.2f} | {'yes' if r['ratio'] >= 2 else 'no'} | {r['pct_ceiling']:.0f}% | "
            f"{'yes' if r['pct_ceiling'] >= 50 else 'no'} |"
        )
    return out + [""]


def write_results(conditions: str) -> int:
    parts = [
        "# vattn benchmark results",
        "",
        "Numbers measured by the commands shown; nothing here is copied from elsewhere. Regenerate with the",
        "commands at the top of `bench/plot_results.py`. Ratio = anchor time / vattn time (> 1: vattn faster).",
        "",
    ]
    gpu_report = _read(os.path.join(RESULTS, "gpu", "report.md"))
    if gpu_report is None:
        parts += [
            "## GPU",
            "",
            "**GPU numbers are pending**: no GPU was available in the session that produced this file.",
            "They come from `bench/gpu_check.sh OUTDIR` on a GPU machine (copy OUTDIR to `bench/results/gpu/`);",
            'on a lent device machine: `VATTN_GPU_CHECK_PACK_LOGS=1 bench/gpu_check.sh "$OUT"` (6 files, under 10 minutes).',
            "",
        ]
    cpu_json = os.path.join(RESULTS, "cpu.json")
    if os.path.exists(cpu_json):
        with open(cpu_json) as f:
            data = json.load(f)
        m = data["machine"]
        parts += [
            "## CPU microbenchmarks",
            "",
            f"Command: `{data['command']}`, {data['date']}, {data['elapsed_s']:.0f} s.",
            "",
            f"Machine: {m.get('cpu')} ({m.get('cpu_count')} cores, torch {m.get('torch_threads')} threads), "
            f"torch {m.get('torch')}, Python {m.get('python')}, vattn {m.get('vattn')} at commit {m.get('commit', '?')}; "
            f"1-minute load average at the start of the run: {m.get('loadavg_1m_start', '?')}, at its end: {m.get('loadavg_1m', '?')}.",
            "",
        ]
        if conditions:
            parts += [f"Conditions: {conditions}", ""]
        parts += [_strip_command(_read(os.path.join(RESULTS, "cpu.md")) or "(cpu.md missing)"), ""]
        parts += cpu_targets(data)
        png = os.path.join(HERE, "decode_bandwidth_cpu.png")
        if plot(data, png):
            parts += ["![decode GB/s vs context, CPU](decode_bandwidth_cpu.png)", ""]
    notes = _read(os.path.join(RESULTS, "notes.md"))
    if notes:  # hand-written reading of the numbers above (bench/results/notes.md)
        parts += [notes, ""]
    man = _read(os.path.join(RESULTS, "manager_cpu.md"))
    if man:
        parts += ["## Memory manager latency (CPU, host memfd backend)", "", man, ""]
    mt = _read(os.path.join(RESULTS, "memory_trace.md"))
    if mt:
        mt = mt.replace("# KV-cache memory efficiency on request traces", "").strip()
        parts += ["## Memory efficiency on request traces (bench/memory_trace.py)", "", mt, ""]
        if os.path.exists(os.path.join(HERE, "memory_trace.png")):
            parts += ["![memory trace](memory_trace.png)", ""]
    if gpu_report is not None:
        parts += [
            "## GPU (bench/gpu_check.sh report)",
            "",
            gpu_report.replace("# vattn GPU check", "### vattn GPU check"),
            "",
        ]
        gj = os.path.join(RESULTS, "gpu", "bench.json")
        if os.path.exists(gj):
            with open(gj) as f:
                if plot(json.load(f), os.path.join(HERE, "decode_bandwidth_cuda.png")):
                    parts += ["![decode GB/s vs context, GPU](decode_bandwidth_cuda.png)", ""]
    with open(os.path.join(HERE, "RESULTS.md"), "w") as f:
        f.write("\n".join(parts).rstrip() + "\n")
    print(f"wrote {os.path.join(HERE, 'RESULTS.md')}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", nargs="?", help="a bench/run.py --json file")
    ap.add_argument("--out", help="PNG path (default bench/decode_bandwidth_<device>.png)")
    ap.add_argument("--results", action="store_true", help="write plots and bench/RESULTS.md from bench/results/")
    ap.add_argument("--conditions", default="", help="a sentence on the machine's state during the runs")
    args = ap.parse_args(argv)
    if args.results:
        return write_results(args.conditions)
    if not args.json:
        ap.error("give a JSON file or --results")
    with open(args.json) as f:
        data = json.load(f)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), f"decode_bandwidth_{data['device']}.png")
    return 0 if plot(data, out) else 1


if __name__ == "__main__":
    sys.exit(main())
