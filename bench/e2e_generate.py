"""End-to-end generation speed: transformers' default cache (DynamicCache + sdpa) against VAttnCache
(vattn kernels), same model, same prompts, same run, runs interleaved.

    python bench/e2e_generate.py                      # SmolLM2-135M-Instruct if installed, else tiny Llama
    python bench/e2e_generate.py --tiny --device cpu --max-new-tokens 64 --batches 1 4 --repeats 3

Prints a markdown table: tokens/s (batch x new tokens / wall time of generate, prefill included) of
each cache, their ratio, whether the greedy tokens are identical, and the KV memory each one held at
the end (DynamicCache: batch x positions, padding included; vattn: physical pages mapped).

With --split, one more run of each cache per batch measures where the time goes, by wall-clock
timers around the functions each cache's forward calls (no profiler): attention (vattn.attention;
torch's scaled_dot_product_attention for the default cache), append (vattn.append_kv; DynamicLayer.update),
cache bookkeeping (VAttnCache's per-forward step open / commit and the packing of padded rows; none
for the default cache) and the model (everything else: wall time minus the three).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

import torch
import transformers.cache_utils as hf_cache_utils

import vattn
import vattn.hf as vhf
from vattn import _fast, _models
from vattn.generation import DEMO_PROMPTS, DTYPES, LAYOUTS, cache_kwarg, encode_prompts, resolve_device, resolve_dtype

PROMPTS = list(DEMO_PROMPTS) * 4


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_once(model, enc, new_tokens, device, cache):
    # Both caches eager (VAttnCache is compileable: on CUDA generate would compile its decode forward).
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, disable_compile=True)
    if cache is None:
        vhf.disable(model)
    else:
        kw[cache_kwarg(model)] = cache
    _sync(device)
    t = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**enc, **kw)
    _sync(device)
    return out, time.perf_counter() - t


# (owner, attribute, category) of the functions the --split run times, per cache.
_SPLIT_TARGETS = {
    "vattn": [
        (vattn, "attention", "attention"),
        (vattn, "append_kv", "append"),
        (_fast, "decode", "attention"),  # vattn.hf calls the short path directly for decode steps
        (_fast, "append_kv", "append"),
        (vhf.VAttnCache, "_begin_forward", "bookkeeping"),
        (vhf.VAttnCache, "_end_forward", "bookkeeping"),
        (vhf.VAttnCache, "_abort_forward", "bookkeeping"),
        (vhf.VAttnCache, "_pack", "bookkeeping"),
    ],
    "default": [
        (torch.nn.functional, "scaled_dot_product_attention", "attention"),
        (hf_cache_utils.DynamicLayer, "update", "append"),
    ],
}
SPLIT_KEYS = ("attention", "append", "bookkeeping")


@contextlib.contextmanager
def timed_calls(which, device, acc):
    """Wraps the functions of _SPLIT_TARGETS[which] with wall-clock timers adding into acc[category]
    (outermost call only, so nested timed calls are not counted twice; CUDA synchronized around each)."""
    depth = [0]
    saved = []

    def wrap(fn, cat):
        def timed(*a, **k):
            if depth[0]:
                return fn(*a, **k)
            depth[0] += 1
            _sync(device)
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                _sync(device)
                acc[cat] += time.perf_counter() - t
                depth[0] -= 1

        return timed

    for owner, name, cat in _SPLIT_TARGETS[which]:
        fn = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
        saved.append((owner, name, fn))
        setattr(owner, name, wrap(fn, cat))
    try:
        yield
    finally:
        for owner, name, fn in reversed(saved):
            setattr(owner, name, fn)


def text_prompts(tok, batch: int, n: int) -> dict:
    """batch prompts of exactly n tokens each: consecutive excerpts of the shared Shakespeare text."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "tinyshakespeare.txt")
    if not os.path.exists(path):
        raise SystemExit(f"--prompt-tokens needs {os.path.normpath(path)} (see ../shared/data/README.md)")
    with open(path, encoding="utf-8") as f:
        ids = tok(f.read(400_000), return_tensors="pt")["input_ids"][0]
    if ids.numel() < batch * n:
        raise SystemExit(f"--prompt-tokens {n} x batch {batch} is more text than the excerpt read")
    input_ids = ids[: batch * n].view(batch, n).clone()
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny random Llama instead of SmolLM2")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=DTYPES)
    p.add_argument("--layout", default="token_major", choices=LAYOUTS)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    p.add_argument("--repeats", type=int, default=3, help="timed runs per cache (median reported)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--split", action="store_true", help="one more timed run per cache: where the time goes")
    p.add_argument(
        "--prompt-tokens",
        type=int,
        default=None,
        help="long prompts instead of the demo's: each row N tokens of ../shared/data/tinyshakespeare.txt "
        "(a different excerpt per row, no chat template, no padding)",
    )
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)

    found = None if args.tiny else _models.find_smollm2()
    if found is None:
        model, tok = _models.tiny_llama(dtype=dtype, device=device)
        name, chat = "tiny random Llama", False
    else:
        print(f"loading SmolLM2-135M-Instruct ({device}, {dtype}) ...", file=sys.stderr)
        model, tok = _models.load_pretrained(found[0], found[1], dtype=dtype, device=device)
        name, chat = "SmolLM2-135M-Instruct", True

    rows = []
    splits = []
    for batch in args.batches:
        if args.prompt_tokens:
            enc = text_prompts(tok, batch, args.prompt_tokens)
        else:
            enc = encode_prompts(tok, PROMPTS[:batch], chat)
        enc = {k: v.to(device) for k, v in enc.items()}
        width = enc["input_ids"].shape[1]
        max_seq = width + args.max_new_tokens

        def fresh_cache():
            return vhf.VAttnCache.for_model(model, max_batch=batch, max_seq_len=max_seq, layout=args.layout)

        # warm-up both paths (allocator, OpenMP pools, lazy imports)
        run_once(model, enc, 4, device, None)
        run_once(model, enc, 4, device, fresh_cache())
        times = {"default": [], "vattn": []}
        outs = {}
        mem = {}
        for r in range(args.repeats):
            for which in ("default", "vattn") if r % 2 == 0 else ("vattn", "default"):
                cache = fresh_cache() if which == "vattn" else None
                out, dt = run_once(model, enc, args.max_new_tokens, device, cache)
                times[which].append(dt)
                outs[which] = out
                if cache is not None:
                    mem["vattn"] = cache.stats()["mapped_bytes"]
                    mem["static"] = cache.static_bytes(batch, width + args.max_new_tokens)
                    cache.release()
                print(f"batch {batch} {which:>7} run {r}: {dt:.2f} s", file=sys.stderr)
        new = batch * args.max_new_tokens
        tps = {k: new / statistics.median(v) for k, v in times.items()}
        same = torch.equal(outs["default"], outs["vattn"])
        positions = width + args.max_new_tokens - 1
        cfg = model.config
        kvh = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        mem["default"] = batch * positions * vattn.formats.token_bytes(cfg.num_hidden_layers, kvh, hd, dtype)
        rows.append((batch, width, tps["default"], tps["vattn"], same, mem["default"], mem["vattn"]))
        if args.split:
            for which in ("default", "vattn"):
                acc = dict.fromkeys(SPLIT_KEYS, 0.0)
                cache = fresh_cache() if which == "vattn" else None
                with timed_calls(which, device, acc):
                    _, dt = run_once(model, enc, args.max_new_tokens, device, cache)
                if cache is not None:
                    cache.release()
                splits.append((batch, which, dt, acc))

    info = vattn.info()
    print()
    print(
        f"model: {name}; device: {device}; dtype: {str(dtype).replace('torch.', '')}; layout: {args.layout}; "
        f"new tokens: {args.max_new_tokens}; torch threads: {torch.get_num_threads()}; "
        f"vattn {info.get('version')} ({'CUDA' if info.get('built_with_cuda') else 'CPU'} build); "
        f"median of {args.repeats} interleaved runs"
    )
    print()
    print(
        "| batch | prompt width | default cache tok/s | VAttnCache tok/s | vattn / default | same tokens "
        "| DynamicCache KV bytes | vattn mapped bytes |"
    )
    print("|---:|---:|---:|---:|---:|:---:|---:|---:|")
    for batch, width, d, v, same, md, mv in rows:
        print(
            f"| {batch} | {width} | {d:.1f} | {v:.1f} | {v / d:.2f} | {'yes' if same else 'NO'} "
            f"| {md / 2**20:.1f} MiB | {mv / 2**20:.1f} MiB |"
        )
    if splits:
        print()
        print("Where the time goes (one more run per cache; ms per generated token of the batch, share of the run):")
        print()
        print("| batch | cache | wall s | attention | append | cache bookkeeping | model |")
        print("|---:|---|---:|---:|---:|---:|---:|")
        for batch, which, dt, acc in splits:
            model_t = dt - sum(acc.values())
            per = 1e3 / (batch * args.max_new_tokens)
            cells = [f"{t * per:.2f} ms ({100 * t / dt:.0f}%)" for t in [*(acc[k] for k in SPLIT_KEYS), model_t]]
            print(f"| {batch} | {which} | {dt:.2f} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
