"""Per-call cost of vattn.append_kv / vattn.attention in a decode step, general path against the short
path (vattn/_fast.py), hot and with the CPU caches flushed before every call (as in a model, whose
weights stream through the caches between two layers).

    python bench/call_overhead.py                          # SmolLM2 heads, b=1, 16-token context, hot
    python bench/call_overhead.py --context 1024 --flush-mb 16

Prints the median time per call of each path over `--steps` decode steps of every layer, in
alternating rounds (the VM is noisy: compare rows of the same run only).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import vattn
from vattn import _fast


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, default=16, help="tokens each slot holds before the step")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--flush-mb", type=int, default=0, help="MiB written before every call (0: hot)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    layers, hkv, hq, dim = 30, 3, 9, 64  # SmolLM2-135M
    cache = vattn.KVCache(layers, hkv, dim, max_batch=a.batch, max_seq_len=a.context + a.steps + 1,
                          dtype=torch.float32, device="cpu", page_bytes=65536)  # fmt: skip
    slots = [cache.alloc() for _ in range(a.batch)]
    step = cache.begin_step(slots, [a.context] * a.batch)
    for layer in range(layers):
        kv = torch.randn(a.context * a.batch, hkv, dim)
        vattn.append_kv(cache, layer, step, kv, kv)
    cache.end_step(step)
    junk = torch.empty(a.flush_mb << 18)  # floats
    q, k = torch.randn(a.batch, hq, dim), torch.randn(a.batch, hkv, dim)

    def flush():
        if a.flush_mb:
            junk.add_(1.0)

    def run(short: bool):
        _fast.enabled = short
        ta, tb = [], []
        try:
            for _ in range(a.steps):
                step = cache.begin_step(slots, [1] * a.batch)
                for layer in range(layers):
                    flush()
                    t0 = time.perf_counter()
                    vattn.append_kv(cache, layer, step, k, k)
                    t1 = time.perf_counter()
                    flush()
                    t2 = time.perf_counter()
                    vattn.attention(q, cache, layer, step)
                    t3 = time.perf_counter()
                    ta.append(t1 - t0)
                    tb.append(t3 - t2)
                cache.abort_step(step)
        finally:
            _fast.enabled = True
        return statistics.median(ta) * 1e6, statistics.median(tb) * 1e6

    print(f"b={a.batch} context={a.context} flush={a.flush_mb} MiB threads={a.threads} (SmolLM2 heads, fp32)")
    print("| round | path | append_kv us | attention us |\n|---:|---|---:|---:|")
    for r in range(a.rounds):
        for short in (False, True):
            ap, at = run(short)
            print(f"| {r} | {'short' if short else 'general'} | {ap:.1f} | {at:.1f} |")


if __name__ == "__main__":
    main()
