"""Greedy tokens of vLLM serving SmolLM2 through vattn with each quantized kv_cache_dtype vattn's
backend declares, against vattn with kv_cache_dtype="auto" (float32; its tokens equal vLLM's own
CPU backend's, tests/test_vllm_e2e.py). Runs in the vLLM venv (bash bench/vllm_env.sh):

    bench/.venv-vllm/bin/python bench/vllm_kv_dtypes.py [--max-tokens 32]

Per dtype: prompts and positions identical to the float run, the first parting per prompt, and
whether each parting is at a near-tie of the float run (our token its second choice, and the gap
between its top two log-probabilities)."""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import test_vllm_e2e as te  # noqa: E402  (the e2e engine settings)
import vllm_helpers as vh  # noqa: E402

DTYPES = ("auto", "int8_per_token_head", "fp8_per_token_head", "int4_per_token_head")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args(argv)
    runs = {}
    for kvd in DTYPES:
        spec = te._smollm2_spec(phases=[dict(prompts=vh.PROMPTS, max_tokens=args.max_tokens, logprobs=2)])
        spec["engine"]["kv_cache_dtype"] = kvd
        t = time.time()
        runs[kvd] = vh.run_engine(spec, "vattn")["phases"][0]
        print(f"{kvd}: engine run {time.time() - t:.0f} s", file=sys.stderr, flush=True)
    ref = runs["auto"]
    n = args.max_tokens
    print("| kv_cache_dtype | prompts identical | positions identical | first parting | partings at a near-tie |")
    print("|---|---:|---:|---|---|")
    for kvd, run in runs.items():
        first, ties = [], []
        same = 0
        for i, (a, b) in enumerate(zip(ref["tokens"], run["tokens"])):
            same += sum(x == y for x, y in zip(a, b))
            t = next((j for j in range(len(a)) if a[j] != b[j]), None)
            if t is None:
                continue
            first.append(t)
            top = ref["logprobs"][i][t]
            ties.append(f"{top[str(a[t])] - top[str(b[t])]:.3f}" if str(b[t]) in top else "not top 2")
        whole = len(ref["tokens"]) - len(first)
        print(
            f"| {kvd} | {whole} / {len(ref['tokens'])} | {same} / {n * len(ref['tokens'])} | "
            f"{', '.join(map(str, first)) or '-'} | {', '.join(ties) or '-'} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
