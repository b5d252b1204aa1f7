"""vattn.hf end to end on a tiny random Llama (no download, runs everywhere): VAttnCache must give
exactly the tokens of transformers' default cache, store no padding, release its memory, and fail
with clear errors."""

from __future__ import annotations

import gc
import subprocess
import sys
import weakref

import pytest
import torch

pytest.importorskip("transformers")

import vattn.hf as vhf  # noqa: E402
from vattn._models import tiny_llama  # noqa: E402

from hf_helpers import (  # noqa: E402,F401
    _one_thread,
    cache_kwarg,
    generate,
    max_logit_diff,
    teacher_forced_logits,
    token_bytes,
)

LAYOUTS = ["token_major", "layer_major"]
PROMPTS = [
    "Hi",
    "A considerably longer prompt, so that left padding matters for the other rows of the batch.",
    "Virtual memory, mapped on demand.",
    "x",
]
NEW_TOKENS = 128
LOGIT_STEPS = 4
LOGIT_TOL = 1e-4  # fp32: only the order of the sums differs


@pytest.fixture(scope="module")
def tiny():
    model, tok = tiny_llama(seed=0)
    return model, tok


def _enc(tok, prompts):
    return tok(prompts)


def _cache(model, batch, layout, **kw):
    kw.setdefault("max_seq_len", 512)
    return vhf.VAttnCache.for_model(model, max_batch=batch, layout=layout, **kw)


@pytest.fixture(scope="module")
def references(tiny):
    model, tok = tiny
    out = {}
    for batch in (1, 4):
        enc = _enc(tok, PROMPTS[:batch] if batch > 1 else PROMPTS[1:2])
        out[batch] = (enc, generate(model, enc, NEW_TOKENS))
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("batch", [1, 4])
def test_greedy_matches_default_cache(tiny, references, batch, layout):
    model, _ = tiny
    enc, ref = references[batch]
    # 4 KiB pages: every prompt spans several pages (a token of this model is 1.5 KiB).
    cache = _cache(model, batch, layout, page_bytes=4096)
    out = generate(model, enc, NEW_TOKENS, cache)
    diff = max_logit_diff(ref, out, LOGIT_STEPS)
    print(f"tiny llama batch={batch} layout={layout}: max |logits diff| over {LOGIT_STEPS} steps = {diff:.3g}")
    assert diff < LOGIT_TOL
    assert out.sequences.shape[1] - enc["input_ids"].shape[1] == NEW_TOKENS
    assert torch.equal(out.sequences, ref.sequences)
    # transformers' view: every position, padding included, minus the last token (not fed yet)
    assert cache.get_seq_length() == out.sequences.shape[1] - 1
    # vattn's view: only real tokens are stored, in several pages
    real = enc["attention_mask"].sum(1) + NEW_TOKENS - 1
    assert [cache.kv.length(s) for s in cache._slots] == real.tolist()
    stats = cache.stats()
    assert stats["used_bytes"] == int(real.sum()) * token_bytes(cache)
    assert stats["pages_mapped"] > batch
    assert stats["mapped_bytes"] < stats["reserved_bytes"]
    cache.release()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_teacher_forced_forward_loop(tiny, references, layout):
    """Prefill + one decode step per reference token through model(...) with explicit masks and
    positions: every step's logits match the reference (the path the GPU tests use)."""
    model, _ = tiny
    enc, ref = references[4]
    got = teacher_forced_logits(model, enc, ref.sequences, _cache(model, 4, layout))
    ref_logits = torch.stack(ref.logits).float()
    assert got.shape == ref_logits.shape
    assert (got - ref_logits).abs().max().item() < LOGIT_TOL


def test_padding_costs_no_memory_and_pad_rows_are_zero(tiny):
    """A row that is mostly padding stores only its real tokens; pad queries get zero outputs."""
    model, tok = tiny
    enc = _enc(tok, [PROMPTS[1], "ab"])
    cache = _cache(model, 2, "token_major")
    with torch.inference_mode():
        model(**enc, **{cache_kwarg(model): cache}, use_cache=True)
    assert [cache.kv.length(s) for s in cache._slots] == enc["attention_mask"].sum(1).tolist()
    assert cache.get_seq_length() == enc["input_ids"].shape[1]

    # attention function outputs at pad positions are exactly zero
    captured = []
    layer0 = model.model.layers[0].self_attn
    handle = layer0.o_proj.register_forward_hook(lambda m, args, out: captured.append(args[0].detach().clone()))
    cache2 = _cache(model, 2, "token_major")
    try:
        with torch.inference_mode():
            model(**enc, **{cache_kwarg(model): cache2}, use_cache=True)
    finally:
        handle.remove()
    attn_in = captured[0]  # [B, Q, Hq*D]
    pads = enc["attention_mask"] == 0
    assert pads.any()
    assert torch.count_nonzero(attn_in[pads]) == 0
    assert torch.isfinite(attn_in[~pads]).all() and torch.count_nonzero(attn_in[~pads]) > 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampling_matches_default_cache(tiny, seed):
    model, tok = tiny
    enc = _enc(tok, PROMPTS)
    ref = generate(model, enc, 48, sample=True, seed=seed, logits=False)
    cache = _cache(model, 4, "token_major")
    out = generate(model, enc, 48, cache, sample=True, seed=seed, logits=False)
    assert torch.equal(out.sequences, ref.sequences)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_continue_generation_on_same_cache(tiny, layout):
    """A second generate with the full sequence appends only the new tokens, like DynamicCache."""
    from transformers import DynamicCache

    model, tok = tiny
    enc = _enc(tok, PROMPTS)
    runs = {}
    for name in ("ref", "vattn"):
        cache = DynamicCache(config=model.config) if name == "ref" else _cache(model, 4, layout)
        if name == "ref":
            vhf.disable(model)
        kw = {cache_kwarg(model): cache}
        with torch.inference_mode():
            first = model.generate(**enc, max_new_tokens=20, min_new_tokens=20, do_sample=False, **kw)
            length_after_first = cache.get_seq_length()
            mask = torch.cat(
                [enc["attention_mask"], torch.ones(4, first.shape[1] - enc["input_ids"].shape[1], dtype=torch.long)],
                dim=1,
            )
            second = model.generate(
                input_ids=first, attention_mask=mask, max_new_tokens=20, min_new_tokens=20, do_sample=False, **kw
            )
        runs[name] = (first, second, length_after_first, cache.get_seq_length(), cache)
    (f_ref, s_ref, l1_ref, l2_ref, _), (f_v, s_v, l1_v, l2_v, vcache) = runs["ref"], runs["vattn"]
    assert torch.equal(f_ref, f_v) and torch.equal(s_ref, s_v)
    assert (l1_v, l2_v) == (l1_ref, l2_ref)
    real = mask.sum(1) + 20 - 1
    assert [vcache.kv.length(s) for s in vcache._slots] == real.tolist()


def test_prompt_lookup_decoding_crops_correctly(tiny):
    """Assisted (prompt-lookup) generation verifies several candidate tokens per step and crops the
    rejected ones: the result must equal plain greedy decoding."""
    model, tok = tiny
    enc = _enc(tok, ["abcabcabc abc abc abcabc the the the the cat the cat"])
    ref = generate(model, enc, 40, logits=False)
    cache = _cache(model, 1, "token_major")
    out = generate(model, enc, 40, cache, logits=False, prompt_lookup_num_tokens=4)
    assert torch.equal(out.sequences, ref.sequences)
    assert cache.get_seq_length() == out.sequences.shape[1] - 1
    assert cache.kv.length(cache._slots[0]) == out.sequences.shape[1] - 1
    with pytest.raises(ValueError):
        cache.crop(3)  # transformers' convention: a negative count


def _mistral(window):
    """A tiny Mistral-style model with a sliding window of `window` positions (None: none)."""
    from transformers import MistralConfig, MistralForCausalLM

    from vattn._models import ByteTokenizer

    cfg = MistralConfig(
        vocab_size=ByteTokenizer.vocab_size,
        hidden_size=192,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=3,
        num_key_value_heads=1,
        head_dim=64,
        sliding_window=window,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=None,
        attn_implementation="sdpa",
    )
    gen = torch.Generator().manual_seed(0)
    model = MistralForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                std = (3.0 if name.startswith("lm_head") else 1.0) / p.shape[1] ** 0.5
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def test_sliding_window_model_matches():
    """A Mistral-style model with a sliding window (8) shorter than the sequence: the window reaches
    vattn.attention (window_left) and the tokens equal transformers' own sliding-window cache."""
    from vattn._models import ByteTokenizer

    enc = ByteTokenizer()(["Hi there, a prompt longer than the window", "x"])
    model = _mistral(8)
    ref = generate(model, enc, 30)
    out = generate(model, enc, 30, _cache(model, 2, "token_major"))
    assert torch.equal(out.sequences, ref.sequences)
    assert max_logit_diff(ref, out, 30) < LOGIT_TOL
    unwindowed = generate(_mistral(None), enc, 30)
    assert max_logit_diff(ref, unwindowed, 1) > 1e-2  # the window does change the result


def test_sliding_window_with_holes_in_the_mask_is_a_clear_error():
    """Right padding puts pads after real tokens: vattn's window would count stored tokens where
    transformers counts positions, so a sliding-window model refuses such a mask (and the cache stays
    usable); without a window, or with left padding, the same cache works."""
    from vattn.generation import cache_kwarg

    model = _mistral(8)
    ids = torch.randint(3, 200, (2, 12))
    right = torch.ones(2, 12, dtype=torch.long)
    right[1, 9:] = 0  # row 1: three pads after its real tokens
    cache = _cache(model, 2, "token_major")
    with torch.inference_mode(), pytest.raises(ValueError, match="padding after real tokens"):
        model(input_ids=ids, attention_mask=right, use_cache=True, **{cache_kwarg(model): cache})
    left = torch.ones(2, 12, dtype=torch.long)
    left[1, :3] = 0
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=left, use_cache=True, **{cache_kwarg(model): cache})
    assert out.logits.shape == (2, 12, model.config.vocab_size)
    assert cache.get_seq_length() == 12


def test_plain_forward_loop(tiny):
    """A hand-written prefill + decode loop (no generate, no position_ids) matches DynamicCache."""
    from transformers import DynamicCache

    model, tok = tiny
    ids = _enc(tok, [PROMPTS[2]])["input_ids"]
    logits = {}
    for name in ("ref", "vattn"):
        if name == "ref":
            vhf.disable(model)
            cache = DynamicCache(config=model.config)
        else:
            cache = _cache(model, 1, "layer_major")
        kw = {cache_kwarg(model): cache}
        seq, steps = ids, []
        with torch.inference_mode():
            out = model(input_ids=seq, use_cache=True, **kw)
            for _ in range(10):
                steps.append(out.logits[:, -1])
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                out = model(input_ids=nxt, use_cache=True, **kw)
        logits[name] = torch.stack(steps)
    assert (logits["ref"] - logits["vattn"]).abs().max().item() < LOGIT_TOL


def test_model_without_cache_still_works_after_switch(tiny):
    """With attn_implementation='vattn' but no VAttnCache (use_cache=False, DynamicCache), the model
    falls back to dense attention with the same results as sdpa."""
    model, tok = tiny
    enc = _enc(tok, PROMPTS)
    vhf.disable(model)
    with torch.inference_mode():
        ref = model(**enc, use_cache=False).logits
    vhf.enable(model)
    assert model.config._attn_implementation == "vattn"
    with torch.inference_mode():
        got = model(**enc, use_cache=False).logits
    real = enc["attention_mask"].bool()
    assert (ref[real] - got[real]).abs().max().item() < LOGIT_TOL
    with torch.inference_mode():
        ref_gen = generate(model, enc, 16, logits=False)  # disables: sdpa + DynamicCache
        vhf.enable(model)
        got_gen = model.generate(**enc, max_new_tokens=16, min_new_tokens=16, do_sample=False)
    assert torch.equal(ref_gen.sequences, got_gen)
    vhf.disable(model)
    assert model.config._attn_implementation == "sdpa"


def test_memory_error_says_what_to_change(tiny):
    model, tok = tiny
    enc = _enc(tok, PROMPTS)
    cache = _cache(model, 4, "token_major", page_bytes=4096, max_physical_bytes=16 * 4096)
    with pytest.raises(MemoryError, match="max_physical_bytes"):
        generate(model, enc, 64, cache, logits=False)
    # the failed step left nothing behind: the cache is empty and takes a smaller batch within its cap
    assert cache.get_seq_length() == 0 and cache.stats()["used_bytes"] == 0
    enc1 = _enc(tok, ["x"])
    out = generate(model, enc1, 4, cache, logits=False)
    assert torch.equal(out.sequences, generate(model, enc1, 4, logits=False).sequences)
    cache.reset()
    assert cache.stats()["live_slots"] == 0


def test_too_long_and_too_wide_are_clear_errors(tiny):
    model, tok = tiny
    enc = _enc(tok, PROMPTS)
    with pytest.raises(ValueError, match="max_batch"):
        generate(model, enc, 4, _cache(model, 2, "token_major"), logits=False)
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, enc, 64, _cache(model, 4, "token_major", max_seq_len=100), logits=False)


def test_release_frees_physical_memory(tiny):
    model, tok = tiny
    enc = _enc(tok, PROMPTS)
    cache = _cache(model, 4, "token_major", page_bytes=4096)
    generate(model, enc, 8, cache, logits=False)
    assert cache.stats()["mapped_bytes"] > 0
    kv_ref = weakref.ref(cache.kv)
    cache.release()
    gc.collect()
    assert kv_ref() is None, "the vattn.KVCache (and its pages) outlived release()"
    with pytest.raises(RuntimeError, match="released"):
        generate(model, enc, 2, cache, logits=False)

    # dropping the last reference releases it too (no reference cycle keeps it alive)
    cache = _cache(model, 4, "token_major", page_bytes=4096)
    generate(model, enc, 8, cache, logits=False)
    kv_ref = weakref.ref(cache.kv)
    del cache
    gc.collect()
    assert kv_ref() is None


def test_crop_and_reset(tiny):
    model, tok = tiny
    enc = _enc(tok, PROMPTS)
    cache = _cache(model, 4, "layer_major")
    out = generate(model, enc, 12, cache, logits=False)
    before = [cache.kv.length(s) for s in cache._slots]
    seq_len = cache.get_seq_length()
    cache.crop(-5)
    assert cache.get_seq_length() == seq_len - 5
    assert [cache.kv.length(s) for s in cache._slots] == [n - 5 for n in before]
    # feeding the 5 dropped tokens again gives the same next-token logits as the uncropped path
    seq = out.sequences
    mask = torch.cat(
        [enc["attention_mask"], torch.ones(4, seq.shape[1] - enc["input_ids"].shape[1], dtype=torch.long)], dim=1
    )
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # the positions generate used
    vhf.disable(model)
    with torch.inference_mode():
        ref = model(input_ids=seq[:, :-1], attention_mask=mask[:, :-1], position_ids=pos[:, :-1]).logits[:, -1]
    vhf.enable(model)
    with torch.inference_mode():
        got = model(
            input_ids=seq[:, -6:-1],
            attention_mask=mask[:, :-1],
            position_ids=pos[:, -6:-1],
            **{cache_kwarg(model): cache},
            use_cache=True,
        ).logits[:, -1]
    assert (ref - got).abs().max().item() < LOGIT_TOL
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.stats()["live_slots"] == 0


def test_past_key_values_keyword_is_accepted(tiny):
    """The README's spelling `past_key_values=` works (transformers 5.x maps it to `cache`)."""
    model, tok = tiny
    enc = _enc(tok, PROMPTS[:2])
    ref = generate(model, enc, 8, logits=False)
    cache = _cache(model, 2, "token_major")
    with pytest.warns(FutureWarning) if cache_kwarg(model) == "cache" else _nullcontext():
        with torch.inference_mode():
            got = model.generate(**enc, max_new_tokens=8, min_new_tokens=8, do_sample=False, past_key_values=cache)
    assert torch.equal(ref.sequences, got)


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_vattn_imports_without_transformers():
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import vattn\n"
        "assert 'transformers' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "try:\n"
        "    import vattn.hf\n"
        "except ImportError as e:\n"
        "    assert 'transformers' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('vattn.hf imported without transformers')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
def test_tiny_bf16_cuda(layout):
    """bf16 on CUDA against transformers' sdpa + default cache: logits close and next-token argmax
    identical at a high rate (teacher-forced on the reference tokens, so one flip does not derail)."""
    model, tok = tiny_llama(seed=0, dtype=torch.bfloat16, device="cuda")
    enc = {k: v.cuda() for k, v in tok(PROMPTS).items()}
    ref = generate(model, enc, 64)
    ref_logits = torch.stack([x.float() for x in ref.logits])
    got = teacher_forced_logits(model, enc, ref.sequences, _cache(model, 4, layout))
    diff = (got - ref_logits).abs().max().item()
    scale = ref_logits.abs().max().item()
    same = (got.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
    print(
        f"tiny llama bf16 cuda layout={layout}: max |logits diff| {diff:.3g} (max |logit| {scale:.3g}), "
        f"identical next tokens {same:.3f}"
    )
    assert diff < 0.05 * scale
    assert same > 0.97
    # and free-running greedy generation through the cache agrees on most tokens
    out = generate(model, enc, 64, _cache(model, 4, layout), logits=False)
    assert (out.sequences == ref.sequences).float().mean().item() > 0.8


def test_softcapped_model_with_quantized_keys_turns_smoothing_off():
    """A Gemma-2-style model soft-caps its attention logits, which key smoothing (a shift of every
    logit by q . mean) would change: for_model leaves smoothing off there, so an int8 cache works
    and stays close to the default cache; asking for it explicitly still raises."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from vattn._models import ByteTokenizer

    cfg = Gemma2Config(
        vocab_size=ByteTokenizer.vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        attn_logit_softcapping=20.0,
        final_logit_softcapping=None,
        sliding_window=512,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=None,
        attn_implementation="eager",
    )
    cfg.layer_types = ["full_attention"] * cfg.num_hidden_layers
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(cfg).eval()
    enc = ByteTokenizer()(["a soft-capped prompt"])
    ref = generate(model, enc, 8)
    cache = vhf.VAttnCache.for_model(model, max_batch=1, max_seq_len=64, kv_format="int8")
    assert not cache.kv.smooth_keys
    out = generate(model, enc, 8, cache)
    assert max_logit_diff(ref, out, 8) < 0.5
    forced = vhf.VAttnCache.for_model(model, max_batch=1, max_seq_len=64, kv_format="int8", smooth_keys=True)
    with pytest.raises(ValueError, match="smooth_keys=False"):
        generate(model, enc, 2, forced)


@pytest.mark.parametrize("batch", [1, 4])
def test_decode_steps_take_the_short_path(tiny, references, monkeypatch, batch):
    """A plain greedy generation (left padding at batch 4) reaches vattn's decode and append kernels
    through the short path only: the general launchers fail if called, yet generation gives the
    reference tokens; with the short path off the same run does reach them."""
    from vattn import _fast, ops

    model, _ = tiny
    enc, ref = references[batch]

    def general(*a, **k):
        raise AssertionError("general path")

    monkeypatch.setattr(ops, "run_decode", general)
    monkeypatch.setattr(ops, "run_append", general)
    new = 8
    cache = _cache(model, batch, "token_major", page_bytes=4096)
    out = generate(model, enc, new, cache)
    assert torch.equal(out.sequences, ref.sequences[:, : out.sequences.shape[1]])
    assert out.sequences.shape[1] - enc["input_ids"].shape[1] == new
    cache.release()

    monkeypatch.setattr(_fast, "enabled", False)
    cache = _cache(model, batch, "token_major", page_bytes=4096)
    with pytest.raises(AssertionError, match="general path"):
        generate(model, enc, new, cache)
    cache.release()
