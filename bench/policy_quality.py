"""The vattn side of the KV-eviction quality comparison (issue 10): vattn.policies on SmolLM2-135M
(fp32, CPU) over the samples of bench/quality_samples.py, beside kvpress's presses on the same samples
(bench/kvpress_quality.py, run in its own venv, writes bench/results/kvpress_quality.json).

    python bench/policy_quality.py                       # 8 samples, budgets 0.5,0.25, all policies
    python bench/policy_quality.py --samples 2 --policies snapkv,h2o

Per sample: prefill the 1000-token context through a VAttnCache with the policy (it compresses each
layer's KV at the end of the prompt, from the scores the attention kernels emitted during that
prefill), then teacher-force the next 128 tokens (positions continue at 1000: get_seq_length() is the
logical length). Scores: mean NLL increase over the full cache and top-1 agreement with the full
cache's predictions (quality_samples.score / agreement), and the physical memory mapped for the
request right after compression (KVCache.stats()['mapped_bytes'], measured) against the full cache's.
Writes bench/results/policy_quality.json and prints a markdown table with kvpress's numbers beside.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quality_samples as qs  # noqa: E402

import vattn  # noqa: E402
import vattn.hf as vhf  # noqa: E402
from vattn import policies  # noqa: E402
from vattn._models import load_smollm2  # noqa: E402
from vattn.generation import cache_kwarg  # noqa: E402

ROOT = qs.ROOT
DEFAULT_JSON = os.path.join(ROOT, "bench", "results", "policy_quality.json")
KVPRESS_JSON = os.path.join(ROOT, "bench", "results", "kvpress_quality.json")

# vattn policy -> kvpress press of the same method (bench/kvpress_quality.py's names).
POLICIES = {
    "streamingllm": (lambda keep: policies.StreamingLLM(keep, sinks=4), "StreamingLLMPress"),
    "h2o": (lambda keep: policies.H2O(keep), "ObservedAttentionPress"),
    "tova": (lambda keep: policies.TOVA(keep), "TOVAPress"),
    "snapkv": (lambda keep: policies.SnapKV(keep, window=64, kernel=5), "SnapKVPress"),
    "pyramidkv": (lambda keep: policies.PyramidKV(keep, window=64, kernel=5, beta=20), "PyramidKVPress"),
    "adakv": (lambda keep: policies.AdaKV(policies.SnapKV(keep, window=64, kernel=5)), "AdaKVPress"),
}


def run_sample(model, sample, policy, layout, page_bytes=None, kv_format="auto"):
    """(score dict, mapped bytes after the prompt, stats) of one sample with one policy (None: full)."""
    ctx = torch.tensor([sample["context"]])
    cont = torch.tensor([sample["continuation"][:-1]])
    cache = vhf.VAttnCache.for_model(
        model,
        max_batch=1,
        max_seq_len=qs.SPAN + 8,
        policy=policy,
        layout=layout,
        reclaim_watermark_bytes=0,
        page_bytes=page_bytes,
        kv_format=kv_format,
    )
    try:
        with torch.inference_mode():
            out = model(input_ids=ctx, use_cache=True, **{cache_kwarg(model): cache})
            first = out.logits[0, -1]
            stats = cache.stats()
            assert cache.get_seq_length() == qs.CONTEXT
            out2 = model(input_ids=cont, use_cache=True, **{cache_kwarg(model): cache})
        scored = qs.score(first, out2.logits[0], sample["continuation"])
        return scored, stats
    finally:
        cache.release()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=qs.DEFAULT_SAMPLES)
    ap.add_argument("--budgets", default="0.5,0.25")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--layout", default="token_major", choices=["token_major", "layer_major", "head_major"])
    ap.add_argument("--text", default=qs.DEFAULT_TEXT)
    ap.add_argument("--page-bytes", type=int, default=None, help="KVCache page_bytes (default: the backend's)")
    ap.add_argument(
        "--kv-format", default="auto", help="KVCache kv_format (e.g. int8, int4: a policy on a quantized cache)"
    )
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=DEFAULT_JSON)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    budgets = [float(b) for b in args.budgets.split(",")]
    names = [n.strip() for n in args.policies.split(",") if n.strip()]
    model, tok = load_smollm2(dtype=torch.float32, device="cpu")
    model.eval()
    samples, spec = qs.make_samples(tok, qs.read_text(args.text), args.samples)
    t0 = time.time()
    kv_format = tuple(args.kv_format.split(",")) if "," in args.kv_format else args.kv_format
    full = [run_sample(model, s, None, args.layout, args.page_bytes, kv_format) for s in samples]
    rows = []
    for name in names:
        make, press = POLICIES[name]
        for keep in budgets:
            per = []
            for s, (ref, ref_stats) in zip(samples, full):
                got, st = run_sample(model, s, make(keep), args.layout, args.page_bytes, kv_format)
                per.append(
                    {
                        "nll_increase": got["nll"] - ref["nll"],
                        "agreement": qs.agreement(got["top1"], ref["top1"]),
                        "mapped_bytes": st["mapped_bytes"],
                        "full_mapped_bytes": ref_stats["mapped_bytes"],
                        "page_bytes": st["page_bytes"],
                        "tokens": st["tokens"],
                    }
                )
            n = len(per)
            row = {
                "policy": name,
                "press": press,
                "budget": keep,
                "nll_increase": sum(p["nll_increase"] for p in per) / n,
                "agreement": sum(p["agreement"] for p in per) / n,
                "mapped_bytes": sum(p["mapped_bytes"] for p in per) / n,
                "full_mapped_bytes": sum(p["full_mapped_bytes"] for p in per) / n,
                "memory_bound_met": all(
                    p["mapped_bytes"] <= keep * p["full_mapped_bytes"] + p["page_bytes"] for p in per
                ),
                "per_sample": per,
            }
            rows.append(row)
            print(
                f"{name:>12} keep={keep:<5} dNLL={row['nll_increase']:+.4f} agree={row['agreement']:.3f} "
                f"mapped={row['mapped_bytes'] / 2**20:.1f}/{row['full_mapped_bytes'] / 2**20:.1f} MiB",
                flush=True,
            )
    result = {
        "spec": spec,
        "layout": args.layout,
        "page_bytes": args.page_bytes,
        "kv_format": args.kv_format,
        "full_nll": [f[0]["nll"] for f in full],
        "rows": rows,
        "seconds": time.time() - t0,
        "versions": {"vattn": vattn.__version__, "torch": torch.__version__, "python": platform.python_version()},
        "machine": platform.machine() + " " + platform.processor(),
    }
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    print(table(result, KVPRESS_JSON))


def table(result, kvpress_path) -> str:
    kp = {}
    if os.path.exists(kvpress_path):
        with open(kvpress_path) as f:
            k = json.load(f)
        if k.get("spec", {}).get("ids_sha256") != result["spec"]["ids_sha256"]:
            return "kvpress results are for other samples (ids_sha256 differs); rerun both with the same --samples"
        for r in k.get("presses", []):
            summary = dict(r.get("summary") or {})
            if r.get("errors") and not summary.get("samples_ok"):
                summary["error"] = str(r["errors"][0])
            summary["kv_bytes"] = summary.get("kv_bytes_held")
            press = r["press"].split("(")[0]
            kp[(press, float(r["budget"]))] = summary
    lines = [
        "| policy | keep | vattn dNLL | kvpress dNLL | diff | vattn agree | kvpress agree | vattn mapped MiB | full MiB | kvpress held MiB | within 0.02 | memory bound |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        o = kp.get((r["press"], r["budget"]), {})
        k_nll = o.get("nll_increase")
        k_err = o.get("error")
        diff = None if k_nll is None else r["nll_increase"] - k_nll
        held = o.get("kv_bytes")
        lines.append(
            f"| {r['policy']} | {r['budget']} | {r['nll_increase']:+.4f} | "
            + (f"{k_nll:+.4f}" if k_nll is not None else (f"error: {k_err[:40]}" if k_err else "-"))
            + " | "
            + (f"{diff:+.4f}" if diff is not None else "-")
            + f" | {r['agreement']:.3f} | "
            + (f"{o['agreement']:.3f}" if o.get("agreement") is not None else "-")
            + f" | {r['mapped_bytes'] / 2**20:.1f} | {r['full_mapped_bytes'] / 2**20:.1f} | "
            + (f"{held / 2**20:.1f}" if held else "-")
            + " | "
            + ("-" if diff is None else ("yes" if diff <= 0.02 else "NO"))
            + f" | {'yes' if r['memory_bound_met'] else 'NO'} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
