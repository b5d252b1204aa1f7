#!/usr/bin/env python
"""Latency of the memory manager on its hot path (vattn.KVCache).

    python bench/manager_latency.py --device cpu|cuda [--quick] [--json PATH] [--markdown PATH]

Measures, for 1..256 live requests, the host time per decode step of
  begin_step + end_step   (maps what the step needs, then commits the lengths), with synchronous
                          mapping and with the background mapping thread
  reserve                 (one call per live slot, each asking for one more token)
and the time to map and to unmap one page (from the pool, and created on demand).
On CUDA it also puts the per-step cost next to the decode attention of that batch for all layers
(measured here) and next to a whole decode step estimated from the bytes it must read (weights +
KV) at the measured copy bandwidth, as shares.
The CPU run uses the host (memfd) backend, the CUDA run the CUDA driver backend.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import bench_utils as bu  # noqa: E402

# Geometry of the cache: Llama-3-8B (32 layers, 8 KV heads, dim 128, bf16) -> 128 KiB per token,
# so a 2 MiB page holds 16 tokens (token_major): a page is mapped every 16 decode steps per slot.
MODEL_LAYERS = {"llama3-8b": 32, "smollm2": 30}
# Bytes of weights a decode step reads (bf16) for the step-share estimate.
MODEL_WEIGHT_BYTES = {"llama3-8b": 8.03e9 * 2, "smollm2": 0.135e9 * 2}


def _stat(stats, key):
    return stats[key] if isinstance(stats, dict) else getattr(stats, key)


def _summ(samples_s: List[float]) -> Dict[str, float]:
    us = sorted(x * 1e6 for x in samples_s)
    return {
        "median_us": statistics.median(us),
        "mean_us": statistics.fmean(us),
        "p99_us": us[min(len(us) - 1, int(0.99 * len(us)))],
        "max_us": us[-1],
        "n": len(us),
    }


def _median_run(runs: List[Dict]) -> Dict:
    """One row from repeated runs of a configuration: the median of each timing statistic."""
    out = dict(runs[0])
    for key in ("median_us", "mean_us", "p99_us", "max_us", "per_request_us"):
        out[key] = statistics.median(r[key] for r in runs)
    out["repeats"] = len(runs)
    return out


def make_cache(device: str, model: str, max_batch: int, max_seq_len: int, **opts):
    import vattn

    _, hkv, d = bu.MODELS[model]
    return vattn.KVCache(
        num_layers=MODEL_LAYERS[model],
        num_kv_heads=hkv,
        head_dim=d,
        max_batch=max_batch,
        max_seq_len=max_seq_len,
        dtype=torch.bfloat16,
        device=device,
        **opts,
    )


def step_latency(
    device: str,
    model: str,
    n_live: int,
    steps: int,
    prompt: int,
    background: bool,
    mode: str = "step",
    gap_s: float = 0.0,
    pooled: bool = False,
    warmup: int = 0,
) -> Dict:
    """Per-decode-step host latency for n_live requests. mode "step": begin_step + end_step;
    mode "reserve": reserve(slot, length + 1) for every slot (then end the step as usual, untimed).
    gap_s: untimed pause between steps standing in for the model's forward pass: the time in which
    the background thread maps ahead in a real server (without it, it only competes for the lock).
    warmup: decode steps run (with the same pause) before the timed ones, so the background thread
    reaches its steady state (its pool and lookahead filled) instead of being timed from a cold
    start where every request needs a new page at once."""
    opts = {"background": background}
    if pooled:  # every page the run will need is created up front: growth is map + set-access only
        page = _page_bytes(device, model)
        tpp = max(1, page // _token_bytes(model))
        opts["prealloc_bytes"] = n_live * (-(-(prompt + warmup + steps) // tpp) + 1) * page
        opts["reclaim_watermark_bytes"] = opts["prealloc_bytes"]
    cache = make_cache(device, model, max(n_live, 1), prompt + warmup + steps + 64, **opts)
    try:
        slots = [cache.alloc() for _ in range(n_live)]
        st = cache.begin_step(slots=slots, new_tokens=[prompt] * n_live)
        cache.end_step(st)
        for _ in range(warmup):
            if gap_s > 0:
                time.sleep(gap_s)
            cache.end_step(cache.begin_step(slots=slots, new_tokens=[1] * n_live))
        s0 = cache.stats()
        samples = []
        for i in range(steps):
            if gap_s > 0:
                time.sleep(gap_s)
            if mode == "step":
                t0 = time.perf_counter()
                st = cache.begin_step(slots=slots, new_tokens=[1] * n_live)
                cache.end_step(st)
                samples.append(time.perf_counter() - t0)
            else:
                t0 = time.perf_counter()
                for s in slots:
                    cache.reserve(s, prompt + warmup + i + 1)
                samples.append(time.perf_counter() - t0)
                st = cache.begin_step(slots=slots, new_tokens=[1] * n_live)
                cache.end_step(st)
        s1 = cache.stats()
        lengths = cache.lengths
        if int(lengths[slots[0]]) != prompt + warmup + steps:
            raise AssertionError(
                f"length {int(lengths[slots[0]])} after {warmup}+{steps} steps, expected {prompt + warmup + steps}"
            )
        out = _summ(samples)
        pm0, pm1 = _stat(s0, "pages_mapped"), _stat(s1, "pages_mapped")
        out.update(
            {
                "n_live": n_live,
                "steps": steps,
                "mode": mode,
                "background": background,
                "pooled": pooled,
                "warmup": warmup,
                "pages_mapped_during": int(pm1 - pm0),
                "page_bytes": int(_stat(s1, "page_bytes")),
                "per_request_us": out["mean_us"] / max(n_live, 1),
            }
        )
        return out
    finally:
        del cache  # releases its reservation before the next configuration


_PAGE: Dict[str, int] = {}


def _page_bytes(device: str, model: str) -> int:
    if device not in _PAGE:
        _PAGE[device] = int(make_cache(device, model, 1, 64).page_bytes)
    return _PAGE[device]


def _token_bytes(model: str) -> int:
    import vattn

    _, hkv, d = bu.MODELS[model]
    return vattn.formats.token_bytes(MODEL_LAYERS[model], hkv, d, torch.bfloat16)


def page_map_unmap(device: str, model: str, reps: int, pooled: bool) -> Dict:
    """Map one page (reserve 1 token on an empty slot) and unmap it (shrink to 0), with the page
    coming from a pre-created pool (pooled) or created on demand and destroyed after (no pool,
    watermark 0)."""
    import vattn  # noqa: F401

    opts = {"reclaim_watermark_bytes": 0}
    probe = make_cache(device, model, 1, 64, **opts)
    page = int(_stat(probe.stats(), "page_bytes"))
    del probe
    if pooled:
        opts = {"prealloc_bytes": 4 * page, "reclaim_watermark_bytes": 8 * page}
    cache = make_cache(device, model, 2, 4096, **opts)
    slot = cache.alloc()
    maps, unmaps = [], []
    s0 = cache.stats()
    for _ in range(reps):
        t0 = time.perf_counter()
        cache.reserve(slot, 1)
        t1 = time.perf_counter()
        cache.shrink(slot, 0)
        t2 = time.perf_counter()
        maps.append(t1 - t0)
        unmaps.append(t2 - t1)
    s1 = cache.stats()
    m = _summ(maps)
    u = _summ(unmaps)
    return {
        "pooled": pooled,
        "page_bytes": page,
        "map": m,
        "unmap": u,
        "map_calls": int(_stat(s1, "map_calls") - _stat(s0, "map_calls")) if "map_calls" in _keys(s1) else None,
        "unmap_calls": int(_stat(s1, "unmap_calls") - _stat(s0, "unmap_calls")) if "unmap_calls" in _keys(s1) else None,
        "create_calls": int(_stat(s1, "create_calls") - _stat(s0, "create_calls"))
        if "create_calls" in _keys(s1)
        else None,
    }


def _keys(stats):
    return stats.keys() if isinstance(stats, dict) else [k for k in dir(stats) if not k.startswith("_")]


def decode_step_share(model: str, n_live: int, ctx: int, step_us: float, copy_GBps: float) -> Dict:
    """On CUDA: attention time of one decode step (all layers) for this batch, measured with vattn
    on ordinary tensors, and the manager's share of it and of a whole step's memory-bound time."""
    import vattn

    hq, hkv, d = bu.MODELS[model]
    case = bu.DecodeCase(model, n_live, ctx, torch.bfloat16)
    data = bu.make_decode(case, "cuda")
    fn = lambda: vattn.decode_attention(data.q, data.k_cache, data.v_cache, data.seqlens, max_seqlen_k=ctx)  # noqa: E731
    t = bu.time_cuda(fn, reps=30)
    layers = MODEL_LAYERS[model]
    attn_us = t["median_ms"] * 1e3 * layers
    kv_bytes = n_live * ctx * layers * 2 * hkv * d * 2
    step_est_us = (MODEL_WEIGHT_BYTES[model] + kv_bytes) / (copy_GBps * 1e9) * 1e6
    return {
        "n_live": n_live,
        "ctx": ctx,
        "attention_all_layers_us": attn_us,
        "share_of_attention": step_us / (step_us + attn_us),
        "step_estimate_us": step_est_us,
        "share_of_step_estimate": step_us / (step_us + step_est_us),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", choices=sorted(MODEL_LAYERS), default="llama3-8b")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument(
        "--gap-us",
        type=float,
        default=1000.0,
        help="untimed pause between decode steps (the model's forward pass), default 1000",
    )
    ap.add_argument(
        "--warmup",
        type=int,
        default=16,
        help="untimed decode steps before the timed ones (background thread's steady state), default 16",
    )
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run each configuration this many times and report the median of each statistic (a loaded machine)",
    )
    ap.add_argument("--json")
    ap.add_argument("--markdown")
    args = ap.parse_args(argv)
    try:
        import vattn  # noqa: F401

        vattn.KVCache  # noqa: B018
    except Exception as e:  # noqa: BLE001
        print(f"manager_latency.py: cannot use vattn.KVCache: {type(e).__name__}: {e}", file=sys.stderr)
        return 2

    t_start = time.perf_counter()
    lives = [1, 4, 16, 64, 256] if not args.quick else [1, 16, 64]
    steps = 64 if not args.quick else 24
    prompt = 32
    rows: List[Dict] = []
    errors: List[str] = []
    configs = [
        ("step", False, False),
        ("step", True, False),
        ("step", False, True),
        ("step", True, True),
        ("reserve", False, False),
    ]
    for mode, background, pooled in configs:
        for n in lives:
            try:
                runs = [
                    step_latency(
                        args.device,
                        args.model,
                        n,
                        steps,
                        prompt,
                        background,
                        mode,
                        args.gap_us * 1e-6,
                        pooled,
                        args.warmup,
                    )
                    for _ in range(max(1, args.repeat))
                ]
                rows.append(_median_run(runs))
            except Exception as e:  # noqa: BLE001
                errors.append(f"{mode} bg={background} pool={pooled} n={n}: {type(e).__name__}: {e}")
    pages = []
    for pooled in (True, False):
        try:
            pages.append(page_map_unmap(args.device, args.model, 50 if args.quick else 200, pooled))
        except Exception as e:  # noqa: BLE001
            errors.append(f"page map/unmap pooled={pooled}: {type(e).__name__}: {e}")
    shares = []
    if args.device == "cuda":
        try:
            bw = bu.gpu_copy_bandwidth()["GBps"]
            for r in rows:
                if r["mode"] == "step" and not r["background"] and not r["pooled"]:
                    s = decode_step_share(args.model, r["n_live"], 4096, r["mean_us"], bw)
                    shares.append(s)
        except Exception as e:  # noqa: BLE001
            errors.append(f"step share: {type(e).__name__}: {e}")

    lines = [
        f"cache geometry: {args.model} ({MODEL_LAYERS[args.model]} layers, kv heads/dim "
        f"{bu.MODELS[args.model][1]}x{bu.MODELS[args.model][2]}, bf16, token_major), device {args.device}; "
        f"prompt {prompt} tokens, {args.warmup} untimed warm-up decode steps, then {steps} timed decode steps, "
        f"{args.gap_us:.0f} us untimed pause between steps "
        "(stands in for the forward pass; the background thread maps during it); host time, no device sync; "
        f"each row the median over {max(1, args.repeat)} run(s)",
        "",
        "| path | live requests | median / step | mean / step | p99 / step | mean / request | pages mapped in loop |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        path = "begin_step+end_step" if r["mode"] == "step" else "reserve (per slot)"
        path += " (background" if r["background"] else " (sync"
        path += ", pages pre-created)" if r["pooled"] else ")"
        lines.append(
            f"| {path} | {r['n_live']} | {r['median_us']:.1f} us | {r['mean_us']:.1f} us | {r['p99_us']:.1f} us | "
            f"{r['per_request_us']:.2f} us | {r['pages_mapped_during']} |"
        )
    if pages:
        lines += [
            "",
            "| one page | page size | map median | map p99 | unmap median | unmap p99 |",
            "|---|---|---|---|---|---|",
        ]
        for p in pages:
            src = "from pool (pre-created)" if p["pooled"] else "created / destroyed"
            lines.append(
                f"| {src} | {p['page_bytes'] // 1024} KiB | {p['map']['median_us']:.1f} us | {p['map']['p99_us']:.1f} us | "
                f"{p['unmap']['median_us']:.1f} us | {p['unmap']['p99_us']:.1f} us |"
            )
    if shares:
        lines += [
            "",
            "| live requests | manager / step (mean) | vattn decode attention, all layers (ctx 4096) | share of attention | "
            "est. whole step (weights+KV at copy bw) | share of step |",
            "|---|---|---|---|---|---|",
        ]
        step_mean = {
            r["n_live"]: r["mean_us"] for r in rows if r["mode"] == "step" and not r["background"] and not r["pooled"]
        }
        for s in shares:
            lines.append(
                f"| {s['n_live']} | {step_mean[s['n_live']]:.1f} us | {s['attention_all_layers_us']:.1f} us | "
                f"{100 * s['share_of_attention']:.2f}% | {s['step_estimate_us']:.0f} us | {100 * s['share_of_step_estimate']:.2f}% |"
            )
    if errors:
        lines += ["", "Errors:"] + [f"- {e}" for e in errors]
    elapsed = time.perf_counter() - t_start
    cmd = "python bench/manager_latency.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = "\n".join(lines)
    print(text)
    print(f"({elapsed:.0f} s)")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "device": args.device,
                    "model": args.model,
                    "command": cmd,
                    "date": stamp,
                    "steps": rows,
                    "pages": pages,
                    "shares": shares,
                    "errors": errors,
                },
                f,
                indent=1,
            )
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(f"Command: `{cmd}` ({stamp}, {elapsed:.0f} s)\n\n{text}\n")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
