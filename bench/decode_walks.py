"""CPU decode: the streaming walks (token order for GQA groups 1-2, token pieces for groups of 3+
at head dims a multiple of 16, the prefetched head walk for the others) against the in-cache walk
on the same data, in turn in one process (VATTN_CPU_TOKEN_ORDER_MIN_BYTES=0 takes the streaming
walks wherever they apply, -1 never), so machine drift cancels pair by pair: the measurement behind
the size gate in cuda/cpu/attention_cpu.cpp. The in-cache walk is the plain head-at-a-time walk,
except for groups of 4+ at those head dims, where it is the pieces too (their AVX-512 copy on a CPU
with AVX-512F): there the pair times the AVX-512 copy against the AVX2 one, or the AVX2 pieces
against themselves. They apply to fp32 caches whose row is one [tokens, heads, dim] block, as the
[batch, context, heads, dim] tensors here.

    python bench/decode_walks.py                       # the default shapes, 2 threads
    python bench/decode_walks.py --threads 1 --shapes smollm2:16:2048 16/8/64:8:2048

Shapes are model:batch:context with bench_utils.MODELS heads, or hq/hkv/dim:batch:context. Prints
the median time of each walk, the achieved GB/s, and the median of the per-pair ratios (head walk
time / token order time: > 1 means the token order is faster). Speed only; the tests check the values.
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_utils as bu  # noqa: E402

import vattn  # noqa: E402

KNOB = "VATTN_CPU_TOKEN_ORDER_MIN_BYTES"
DEFAULT_SHAPES = [
    "smollm2:1:8192",
    "smollm2:1:16384",
    "smollm2:16:2048",
    "smollm2:64:512",
    "llama2-7b:8:512",
    "16/8/64:16:2048",
    "llama3-8b:1:2048",
    "llama3-8b:8:2048",
    "llama3-8b:64:512",
    "llama3-70b:8:2048",
]


def heads_of(name: str):
    if name in bu.MODELS:
        return bu.MODELS[name]
    hq, hkv, d = (int(x) for x in name.split("/"))
    return hq, hkv, d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="*", default=DEFAULT_SHAPES)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads {args.threads}, K / V [batch, context, kv heads, dim] fp32, {args.pairs} pairs per shape")
    print(f"{'shape':32} {'KV MB':>7} {'head walk':>10} {'token order':>12} {'GB/s':>11}  ratio (min-max)")
    for spec in args.shapes:
        name, b, ctx = spec.rsplit(":", 2)
        b, ctx = int(b), int(ctx)
        hq, hkv, d = heads_of(name)
        k, v = torch.randn(b, ctx, hkv, d), torch.randn(b, ctx, hkv, d)
        q = torch.randn(b, hq, d)
        lens = torch.full((b,), ctx, dtype=torch.int32)
        nbytes = 2 * b * ctx * hkv * d * 4

        def call():
            vattn.ops.decode_attention(q, k, v, lens)

        t = {"-1": [], "0": []}
        for knob in t:
            os.environ[KNOB] = knob
            call()
        for i in range(args.pairs):
            for knob in ("-1", "0") if i % 2 == 0 else ("0", "-1"):
                os.environ[KNOB] = knob
                a = time.perf_counter()
                call()
                t[knob].append(time.perf_counter() - a)
        os.environ.pop(KNOB, None)
        ratios = [h / o for h, o in zip(t["-1"], t["0"])]
        hw, to = statistics.median(t["-1"]), statistics.median(t["0"])
        qs = statistics.quantiles(ratios, n=10)
        print(
            f"{f'{name} b={b} ctx={ctx} ({hq}/{hkv}x{d})':32} {nbytes / 1e6:7.1f} {hw * 1e3:8.3f}ms {to * 1e3:10.3f}ms "
            f"{nbytes / hw / 1e9:5.1f}/{nbytes / to / 1e9:5.1f}  {statistics.median(ratios):.2f} ({qs[0]:.2f}-{qs[-1]:.2f})"
        )


if __name__ == "__main__":
    main()
