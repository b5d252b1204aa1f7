"""Quest on a vattn.KVCache: block metadata kept up to date by vattn.append_kv and compact(),
vattn.attention(..., token_budget=N) equal to the reference over the chosen blocks, at batch > 1 with
ragged lengths, with quantized and compacted caches; policies.Quest through transformers."""

from __future__ import annotations

import pytest
import torch

import vattn
from vattn import policies, reference

L, H, D, HQ, B = 2, 2, 64, 6, 16


def _cache(fmt="auto", **kw):
    return vattn.KVCache(
        num_layers=L, num_kv_heads=H, head_dim=D, max_batch=3, max_seq_len=1024, dtype=torch.float32,
        kv_format=fmt, device="cpu", page_bytes=16384, smooth_keys=False, **kw,
    )  # fmt: skip


def _step(cache, slots, new, g):
    st = cache.begin_step(slots, new)
    for layer in range(L):
        vattn.append_kv(
            cache, layer, st, torch.randn(sum(new), H, D, generator=g), torch.randn(sum(new), H, D, generator=g)
        )
    return st


def _dense_keys(cache, layer):
    k, _ = cache.kv(layer)
    if not cache.k_format.quantized:
        return k
    ks, _ = cache.kv_scales(layer)
    return reference.dequantize(k, ks, cache.k_format.name, D, torch.float32)


def _check_meta(cache, slots):
    for layer in range(L):
        want = torch.zeros_like(cache.quest_meta(layer))
        rows = torch.tensor(slots)
        heads = cache.head_lengths()[slots][:, layer].contiguous()
        lengths = torch.tensor([cache.length(s) for s in slots], dtype=torch.int32)
        reference.block_minmax(_dense_keys(cache, layer), want, rows, lengths, torch.zeros_like(rows), B,
                               head_lengths=heads)  # fmt: skip
        for i, s in enumerate(slots):
            for h in range(H):
                nb = -(-int(heads[i, h]) // B)
                torch.testing.assert_close(cache.quest_meta(layer)[s, :nb, h], want[s, :nb, h])


# int4 keys (int4_ch, groups of D / 2 = 32 tokens = 2 Quest blocks): an append into a partial group
# re-encodes the group's earlier tokens, so their blocks' bounds move too.
@pytest.mark.parametrize("fmt", ["auto", "int8", "int4"])
def test_metadata_follows_appends_and_compaction(fmt):
    g = torch.Generator().manual_seed(0)
    cache = _cache(fmt)
    cache.enable_quest(B)
    slots = [cache.alloc(), cache.alloc()]
    cache.end_step(_step(cache, slots, [100, 37], g))
    for _ in range(20):
        cache.end_step(_step(cache, slots, [1, 1], g))
    _check_meta(cache, slots)
    keep = torch.arange(0, 120, 2)[:50].expand(2, L, H, 50).contiguous()
    lens = torch.tensor([[[50, 40], [30, 50]], [[20, 25], [28, 10]]])
    cache.compact(slots, keep, lens)
    _check_meta(cache, slots)
    cache.end_step(_step(cache, slots, [3, 1], g))
    _check_meta(cache, slots)


@pytest.mark.parametrize("fmt", ["auto", ("int8", "int4")], ids=str)
def test_token_budget_decode_equals_the_reference_over_the_chosen_blocks(fmt):
    g = torch.Generator().manual_seed(1)
    cache = _cache(fmt)
    cache.enable_quest(B)
    slots = [cache.alloc(), cache.alloc(), cache.alloc()]
    cache.end_step(_step(cache, slots, [300, 40, 129], g))
    st = _step(cache, slots, [1, 1, 1], g)
    budget = 64
    for layer in range(L):
        q = torch.randn(3, HQ, D, generator=g)
        out = vattn.attention(q, cache, layer, st, token_budget=budget)
        dense = vattn.attention(q, cache, layer, st)
        kd = _dense_keys(cache, layer)
        _, vv = cache.kv(layer)
        if cache.v_format.quantized:
            vv = reference.dequantize(vv, cache.kv_scales(layer)[1], cache.v_format.name, D, torch.float32)
        ids, counts, _ = reference.quest_select(q, cache.quest_meta(layer), st.slot_ids, st.seqlens, B, budget, 4)
        want, _ = reference.sparse_decode_attention(q, kd, vv, st.slot_ids, st.seqlens, ids, counts, B)
        torch.testing.assert_close(out.double(), want, atol=3e-5, rtol=3e-5)
        # Row 1 (41 tokens) is within the budget: its blocks are all chosen, so it is dense attention.
        torch.testing.assert_close(out[1], dense[1], atol=3e-5, rtol=3e-5)
        assert (out[0] - dense[0]).abs().max() > 1e-6  # row 0 really attended to fewer tokens
    cache.end_step(st)


def test_token_budget_needs_enable_quest_and_a_positive_budget():
    g = torch.Generator().manual_seed(2)
    cache = _cache()
    s = cache.alloc()
    cache.end_step(_step(cache, [s], [100], g))
    st = _step(cache, [s], [1], g)
    with pytest.raises(ValueError, match="enable_quest"):
        vattn.attention(torch.randn(1, HQ, D), cache, 0, st, token_budget=32)
    cache.enable_quest(B)  # metadata of the 100 stored tokens is built now
    with pytest.raises(ValueError):
        vattn.attention(torch.randn(1, HQ, D), cache, 0, st, token_budget=0)
    out = vattn.attention(torch.randn(1, HQ, D), cache, 0, st, token_budget=32)
    assert torch.isfinite(out).all()
    cache.abort_step(st)
    with pytest.raises(ValueError):
        policies.Quest(0)
    assert isinstance(policies.parse("quest:256"), policies.Quest)


def test_quest_policy_in_transformers_generates_and_keeps_all_tokens():
    pytest.importorskip("transformers")
    import vattn.hf as vhf
    from vattn._models import tiny_llama
    from vattn.generation import cache_kwarg

    model, _ = tiny_llama(num_layers=2)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 250, (2, 100), generator=g)
    outs = []
    for pol in (None, policies.Quest(token_budget=1024), policies.Quest(token_budget=32)):
        cache = vhf.VAttnCache.for_model(model, max_batch=2, max_seq_len=160, policy=pol)
        with torch.inference_mode():
            o = model.generate(input_ids=ids, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                               output_logits=True, return_dict_in_generate=True, **{cache_kwarg(model): cache})  # fmt: skip
        assert cache.kv.length(cache._slots[0]) == 107  # Quest never evicts
        outs.append(o)
        cache.release()
    # A budget above the length is dense attention: the same logits as no policy.
    for a, b in zip(outs[0].logits, outs[1].logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert outs[2].sequences.shape == (2, 108)


def test_a_refused_quest_block_leaves_the_cache_as_it_was():
    """enable_quest with a block past int32 is refused before any metadata is kept (it was kept, and
    every later append failed)."""
    cache = _cache()
    g = torch.Generator().manual_seed(5)
    s = cache.alloc()
    cache.end_step(_step(cache, [s], [20], g))
    with pytest.raises(ValueError, match="int32"):
        cache.enable_quest(2**31)
    assert cache.quest_meta(0) is None
    cache.end_step(_step(cache, [s], [3], g))  # appends still work
    cache.enable_quest(B)
    _check_meta(cache, [s])
