#!/usr/bin/env python
"""Memory efficiency of the KV-cache layouts on a request trace (host backend, real manager).

    python bench/memory_trace.py                 # both traces, writes bench/memory_trace.{md,png}
    python bench/memory_trace.py --quick         # small and fast (CI); writes into --out-dir
    python bench/memory_trace.py --make-trace bench/traces/mixed_500.csv   # regenerate the committed trace

Requests arrive (Poisson), are prefilled in one step, then decode one token per step until their
output length, and are freed. Every step goes through vattn.KVCache.begin_step / end_step on the
host (memfd) backend with Llama-3-8B geometry (32 layers, 8 KV heads, head_dim 128, bf16) and
2 MiB pages; no data is written (the pages stay sparse), only the manager's accounting is read.
Compared, over time: physical bytes mapped vs bytes of live tokens for
  token_major   vattn's default layout (all layers of a token in one page)      measured
  layer_major   vAttention's classic layout (K and V of each layer separately)  measured
  static        max_seq_len preallocated per live request                        computed
  paged16       16-token blocks (vLLM's accounting)                              computed
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Dict, List

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM, ELEM = 32, 8, 128, 2  # Llama-3-8B, bf16
TOKEN_BYTES = NUM_LAYERS * 2 * NUM_KV_HEADS * HEAD_DIM * ELEM  # 128 KiB per token
PAGE = 2 << 20
MAX_SEQ_LEN = 8192
GIB = float(1 << 30)


@dataclass
class Request:
    arrival: int  # decode step at which it arrives
    prompt: int
    output: int


def poisson_trace(n: int, seed: int, mean_live: int = 32) -> List[Request]:
    """Seeded synthetic trace: lognormal prompt and output lengths (mean total >= 1K tokens),
    Poisson arrivals at a rate that keeps about mean_live requests running."""
    rng = np.random.default_rng(seed)
    prompt = np.clip(rng.lognormal(math.log(700), 0.8, n), 16, MAX_SEQ_LEN // 2).astype(int)
    output = np.clip(rng.lognormal(math.log(350), 0.7, n), 8, MAX_SEQ_LEN // 2).astype(int)
    rate = mean_live / float(output.mean())  # arrivals per decode step (Little's law)
    arrival = np.cumsum(rng.exponential(1.0 / rate, n)).astype(int)
    return [Request(int(a), int(p), int(o)) for a, p, o in zip(arrival, prompt, output)]


def make_realistic_trace(path: str, n: int = 500, seed: int = 2024) -> None:
    """Writes the committed trace: a mix of chat turns, long-document questions / summaries and
    code completion, with lengths shaped like public serving traces (long-tailed prompts, shorter
    outputs) and bursty Poisson arrivals (rate changes every 200 steps)."""
    rng = np.random.default_rng(seed)
    kinds = rng.choice(3, size=n, p=[0.6, 0.25, 0.15])
    med_p = np.array([450, 3000, 1200])[kinds]
    med_o = np.array([300, 220, 500])[kinds]
    prompt = np.clip(rng.lognormal(np.log(med_p), 0.75), 8, 6000).astype(int)
    output = np.clip(rng.lognormal(np.log(med_o), 0.8), 4, 2000).astype(int)
    t, arrivals = 0.0, []
    for i in range(n):
        rate = 0.06 if (int(t) // 200) % 2 == 0 else 0.12
        t += rng.exponential(1.0 / rate)
        arrivals.append(int(t))
    names = np.array(["chat", "document", "code"])[kinds]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["arrival_step", "prompt_tokens", "output_tokens", "kind"])
        for a, p, o, k in zip(arrivals, prompt, output, names):
            w.writerow([a, int(p), int(o), k])


def load_trace(path: str) -> List[Request]:
    with open(path) as f:
        return [
            Request(int(r["arrival_step"]), int(r["prompt_tokens"]), int(r["output_tokens"])) for r in csv.DictReader(f)
        ]


def replay(trace: List[Request], layout: str, max_batch: int) -> Dict[str, np.ndarray]:
    """Replays the trace through a real KVCache; per step: live requests, their token lengths,
    mapped bytes (measured) and used bytes."""
    import vattn

    cache = vattn.KVCache(
        NUM_LAYERS,
        NUM_KV_HEADS,
        HEAD_DIM,
        max_batch,
        MAX_SEQ_LEN,
        dtype=torch.bfloat16,
        layout=layout,
        device="cpu",
        page_bytes=PAGE,
        reclaim_watermark_bytes=0,
        _host_commit=False,
    )
    pending = sorted(trace, key=lambda r: r.arrival)
    nxt = 0
    live: Dict[int, List[int]] = {}  # slot -> [remaining output tokens]
    rows = {"live": [], "mapped": [], "used": [], "static": [], "paged16": []}
    step = 0
    while nxt < len(pending) or live:
        # Admit arrivals (FIFO) while slots are free: one prefill step for all of them.
        admit = []
        while nxt < len(pending) and pending[nxt].arrival <= step and len(live) + len(admit) < max_batch:
            admit.append(pending[nxt])
            nxt += 1
        if admit:
            slots = [cache.alloc() for _ in admit]
            prompts = [min(r.prompt, MAX_SEQ_LEN - 1) for r in admit]
            cache.end_step(cache.begin_step(slots, prompts))
            for s, r, p in zip(slots, admit, prompts):
                live[s] = [min(r.output, MAX_SEQ_LEN - p)]
        if live:
            slots = list(live)
            cache.end_step(cache.begin_step(slots, [1] * len(slots)))
            st = cache.stats()
            lengths = [cache.length(s) for s in slots]
            rows["live"].append(len(slots))
            rows["mapped"].append(st["mapped_bytes"])
            rows["used"].append(st["used_bytes"])
            rows["static"].append(len(slots) * MAX_SEQ_LEN * TOKEN_BYTES)
            rows["paged16"].append(sum(math.ceil(n / 16) * 16 for n in lengths) * TOKEN_BYTES)
            assert st["used_bytes"] == sum(lengths) * TOKEN_BYTES
            for s in slots:
                live[s][0] -= 1
                if live[s][0] <= 0:
                    cache.free(s)
                    del live[s]
        step += 1
    return {k: np.asarray(v, dtype=np.float64) for k, v in rows.items()}


def replay_budget(trace: List[Request], kv_format, budget: int, max_batch: int = 256) -> Dict:
    """Serves the trace under a physical budget (max_physical_bytes) with a cache of kv_format:
    arrivals are admitted FIFO while begin_step succeeds (a MemoryError leaves them queued and the
    cache unchanged); a decode step that runs out of memory preempts the most recently admitted
    request (freed and requeued at the front, as vLLM's recompute preemption). Returns the mean
    number of live requests, the steps to finish the whole trace, and the preemptions."""
    import vattn

    cache = vattn.KVCache(
        NUM_LAYERS,
        NUM_KV_HEADS,
        HEAD_DIM,
        max_batch,
        MAX_SEQ_LEN,
        dtype=torch.bfloat16,
        kv_format=kv_format,
        device="cpu",
        page_bytes=PAGE,
        max_physical_bytes=budget,
        reclaim_watermark_bytes=0,
        _host_commit=False,
    )
    queue = sorted(trace, key=lambda r: r.arrival)
    live: Dict[int, List] = {}  # slot -> [request, remaining output tokens, admission order]
    order = 0
    step, live_sum, preempted = 0, 0, 0
    while queue or live:
        while queue and queue[0].arrival <= step and len(live) < max_batch:
            r = queue[0]
            slot = cache.alloc()
            prompt = min(r.prompt, MAX_SEQ_LEN - 1)
            try:
                cache.end_step(cache.begin_step([slot], [prompt]))
            except MemoryError:
                cache.free(slot)
                break
            queue.pop(0)
            live[slot] = [r, min(r.output, MAX_SEQ_LEN - prompt), order]
            order += 1
        while live:
            slots = list(live)
            try:
                cache.end_step(cache.begin_step(slots, [1] * len(slots)))
                break
            except MemoryError:
                victim = max(live, key=lambda s: live[s][2])
                queue.insert(0, live.pop(victim)[0])
                cache.free(victim)
                preempted += 1
        live_sum += len(live)
        for s in list(live):
            live[s][1] -= 1
            if live[s][1] <= 0:
                cache.free(s)
                del live[s]
        step += 1
    cache.close()
    return {"mean_live": live_sum / max(step, 1), "steps": step, "preempted": preempted}


def formats_table(trace: List[Request], budget: int) -> str:
    """Requests of the trace served concurrently within one physical budget, per KV format."""
    out = [
        f"**Same physical budget, per KV format** ({budget / GIB:.2f} GiB, Llama-3-8B geometry, token_major, "
        f"{len(trace)} requests): more concurrent requests and fewer steps to serve the trace with fewer bytes per "
        "token (the scheduler admits FIFO while memory lasts and preempts the newest request when a decode step "
        "runs out).",
        "",
        "| kv_format | bytes per token | mean live requests | x bf16 | steps to serve the trace | preemptions |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    from vattn import formats

    base = None
    for spec in ("auto", "fp8_e4m3", "int8", ("int8", "int4"), "int4"):
        r = replay_budget(trace, spec, budget)
        tb = formats.token_bytes(NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM, torch.bfloat16, spec)
        base = base or r["mean_live"]
        name = spec if isinstance(spec, str) else ",".join(spec)
        out.append(
            f"| {name} | {tb // 1024} KiB | {r['mean_live']:.1f} | {r['mean_live'] / base:.2f} | {r['steps']} | "
            f"{r['preempted']} |"
        )
    return "\n".join(out)


def summarize(name: str, mapped: np.ndarray, used: np.ndarray, live: np.ndarray) -> Dict:
    return {
        "scheme": name,
        "mean_mapped_gib": mapped.mean() / GIB,
        "peak_mapped_gib": mapped.max() / GIB,
        "used_over_mapped": used.sum() / mapped.sum(),
        "waste_pages_per_req": float(((mapped - used) / live).mean() / PAGE),
    }


def run(trace_name: str, trace: List[Request], max_batch: int) -> Dict:
    lengths = np.array([r.prompt + r.output for r in trace])
    t0 = time.perf_counter()
    res = {layout: replay(trace, layout, max_batch) for layout in ("token_major", "layer_major")}
    secs = time.perf_counter() - t0
    tm = res["token_major"]
    rows = [
        summarize("token_major", tm["mapped"], tm["used"], tm["live"]),
        summarize("layer_major", res["layer_major"]["mapped"], res["layer_major"]["used"], res["layer_major"]["live"]),
        summarize("static (max_seq_len per request)", tm["static"], tm["used"], tm["live"]),
        summarize("paged16 (vLLM, computed)", tm["paged16"], tm["used"], tm["live"]),
    ]
    return {
        "name": trace_name,
        "requests": len(trace),
        "mean_len": float(lengths.mean()),
        "steps": len(tm["live"]),
        "mean_live": float(tm["live"].mean()),
        "rows": rows,
        "series": res,
        "seconds": secs,
    }


def table(result: Dict) -> str:
    out = [
        f"**{result['name']}**: {result['requests']} requests, mean length {result['mean_len']:.0f} tokens, "
        f"{result['steps']} steps, {result['mean_live']:.1f} live requests on average",
        "",
        "| scheme | mean mapped (GiB) | peak mapped (GiB) | used / mapped | waste per live request (2 MiB pages) |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        out.append(
            f"| {r['scheme']} | {r['mean_mapped_gib']:.2f} | {r['peak_mapped_gib']:.2f} | "
            f"{r['used_over_mapped']:.3f} | {r['waste_pages_per_req']:.2f} |"
        )
    return "\n".join(out)


def check(result: Dict) -> List[str]:
    """The memory-efficiency expectation: token_major wastes < 1 page per live request and keeps
    used/mapped >= 0.95 when the mean request length is >= 1K tokens."""
    tm = result["rows"][0]
    problems = []
    if tm["waste_pages_per_req"] >= 1.0:
        problems.append(f"{result['name']}: token_major waste {tm['waste_pages_per_req']:.2f} pages per request (>= 1)")
    if result["mean_len"] >= 1000 and tm["used_over_mapped"] < 0.95:
        problems.append(f"{result['name']}: token_major used/mapped {tm['used_over_mapped']:.3f} < 0.95")
    return problems


def plot(results: List[Dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 1, figsize=(10, 4 * len(results)), squeeze=False)
    for ax, res in zip(axes[:, 0], results):
        s = res["series"]
        x = np.arange(len(s["token_major"]["live"]))
        ax.plot(x, s["token_major"]["used"] / GIB, label="live tokens (used)", color="black", lw=1.5)
        ax.plot(x, s["token_major"]["mapped"] / GIB, label="token_major mapped", lw=1)
        ax.plot(x, s["layer_major"]["mapped"] / GIB, label="layer_major mapped", lw=1)
        ax.plot(x, s["token_major"]["paged16"] / GIB, label="16-token pages (computed)", lw=1, ls="--")
        ax.plot(x, s["token_major"]["static"] / GIB, label="static max-length (computed)", lw=1, ls=":")
        ax.set_ylim(0, max(s["layer_major"]["mapped"].max(), s["token_major"]["used"].max()) / GIB * 1.3)
        ax.set_title(f"{res['name']} (Llama-3-8B bf16, 2 MiB pages; static is off the chart)")
        ax.set_xlabel("decode step")
        ax.set_ylabel("GiB")
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small traces (CI)")
    ap.add_argument(
        "--out-dir",
        default=os.path.join(HERE, "results"),
        help="where memory_trace.md / .png go (default bench/results/, untracked)",
    )
    ap.add_argument("--trace", default=os.path.join(HERE, "traces", "mixed_500.csv"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--make-trace", metavar="PATH", help="write the realistic trace file and exit")
    ap.add_argument("--no-formats", action="store_true", help="skip the per-KV-format budget replay")
    ap.add_argument(
        "--budget-gib",
        type=float,
        default=0,
        help="physical budget of the per-format replay (default: 1/4 of the bf16 peak)",
    )
    args = ap.parse_args(argv)
    if args.make_trace:
        make_realistic_trace(args.make_trace)
        print(f"wrote {args.make_trace}")
        return 0

    n_synth = 60 if args.quick else 400
    traces = [(f"poisson (seed {args.seed})", poisson_trace(n_synth, args.seed))]
    if os.path.exists(args.trace):
        file_trace = load_trace(args.trace)
        traces.append((os.path.basename(args.trace), file_trace[:80] if args.quick else file_trace))
    results = [run(name, tr, args.max_batch) for name, tr in traces]

    cmd = "python bench/memory_trace.py" + (" --quick" if args.quick else "")
    md = [
        "# KV-cache memory efficiency on request traces",
        "",
        f"Command: `{cmd}` (host memfd backend, real vattn manager; Llama-3-8B geometry: 32 layers, 8 KV heads, "
        f"head_dim 128, bf16 = {TOKEN_BYTES // 1024} KiB per token; 2 MiB pages; max_seq_len {MAX_SEQ_LEN}; "
        f"max_batch {args.max_batch}; reclaim watermark 0). Means are over decode steps.",
        "",
    ]
    problems = []
    for res in results:
        md += [table(res), ""]
        problems += check(res)
    if not args.no_formats:
        budget_trace = traces[-1][1]
        # Default budget: a quarter of what bf16 token_major peaks at unconstrained, so memory binds.
        peak = results[-1]["series"]["token_major"]["mapped"].max()
        budget = int(args.budget_gib * GIB) if args.budget_gib else int(peak / 4) // PAGE * PAGE
        md += [formats_table(budget_trace, budget), ""]
    md.append(
        "Check (token_major: waste < 1 page per live request; used/mapped >= 0.95 at mean length >= 1K): "
        + ("**pass**" if not problems else "**FAIL**: " + "; ".join(problems))
    )
    text = "\n".join(md) + "\n"
    print(text)
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "memory_trace.md"), "w") as f:
        f.write(text)
    if not args.no_plot:
        try:
            plot(results, os.path.join(args.out_dir, "memory_trace.png"))
        except ImportError:
            print("matplotlib missing: no plot (pip install vattn[bench])", file=sys.stderr)
    print(f"replay time: {sum(r['seconds'] for r in results):.1f} s", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
