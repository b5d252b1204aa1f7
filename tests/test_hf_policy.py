"""Eviction policies inside transformers (vattn.hf.VAttnCache(policy=...)) on a tiny random Llama.

The decisive check: after the cache evicted tokens at the end of the prompt, the model's logits for
the next tokens equal those of transformers' own attention over the full sequence with the evicted
keys masked out (same RoPE positions), so eviction, per-head lengths and the logical positions
(get_seq_length) are all right together."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import vattn.hf as vhf  # noqa: E402
from vattn import policies  # noqa: E402
from vattn._models import tiny_llama  # noqa: E402
from vattn.generation import cache_kwarg  # noqa: E402


@pytest.fixture(scope="module")
def model():
    m, _ = tiny_llama(num_layers=2)
    return m


def _masked_reference(model, ids, cont, kept_per_layer_head):
    """Logits of cont under sdpa with each (layer, kv head)'s evicted prompt keys masked for the
    continuation queries. Only policies that keep the same tokens in every layer and head are
    expressible with one mask; kept_per_layer_head is that one set."""
    vhf.disable(model)
    n, m = ids.shape[1], cont.shape[1]
    full = torch.cat([ids, cont], dim=1)
    allowed = torch.ones(n + m, n + m, dtype=torch.bool).tril()
    evicted = torch.ones(n, dtype=torch.bool)
    evicted[list(kept_per_layer_head)] = False
    allowed[n:, :n] &= ~evicted
    mask = torch.zeros(1, 1, n + m, n + m).masked_fill(~allowed, float("-inf"))
    with torch.inference_mode():
        return model(full, attention_mask=mask).logits[:, n:]


def test_streaming_llm_in_hf_equals_masked_full_attention(model):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 250, (1, 40), generator=g)
    cont = torch.randint(3, 250, (1, 8), generator=g)
    pol = policies.StreamingLLM(keep=16, sinks=4)
    cache = vhf.VAttnCache.for_model(model, max_batch=1, max_seq_len=64, policy=pol)
    with torch.inference_mode():
        model(ids, use_cache=True, **{cache_kwarg(model): cache})
        assert cache.get_seq_length() == 40  # logical, not the 16 stored
        assert cache.kv.length(cache._slots[0]) == 16
        got = model(cont, use_cache=True, **{cache_kwarg(model): cache}).logits
    assert cache.get_seq_length() == 48
    cache.release()
    kept = list(range(4)) + list(range(40 - 12, 40))
    ref = _masked_reference(model, ids, cont, kept)
    torch.testing.assert_close(got, ref, atol=2e-4, rtol=2e-4)


def test_nothing_evicted_when_the_budget_covers_the_prompt(model):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 250, (1, 20), generator=g)
    cont = torch.randint(3, 250, (1, 5), generator=g)
    outs = []
    for pol in (None, policies.SnapKV(keep=64, window=4)):
        cache = vhf.VAttnCache.for_model(model, max_batch=1, max_seq_len=64, policy=pol)
        with torch.inference_mode():
            model(ids, use_cache=True, **{cache_kwarg(model): cache})
            outs.append(model(cont, use_cache=True, **{cache_kwarg(model): cache}).logits)
        cache.release()
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "pol",
    [
        policies.SnapKV(keep=0.5, window=4),
        policies.H2O(keep=0.5, recent=2, every=3),
        policies.TOVA(keep=0.5, every=2),
        policies.PyramidKV(keep=0.5, window=4),
        policies.AdaKV(policies.SnapKV(keep=0.5, window=4)),
        policies.DelayedEviction(lambda layer, k, v, pos: (pos % 3 == 0)[:, None].expand(-1, k.shape[1]), window=4),
    ],
    ids=repr,
)
def test_generate_with_a_policy_on_a_left_padded_batch(model, pol):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 250, (2, 30), generator=g)
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[1, :10] = 0  # row 1 is left-padded: 20 real tokens
    ids[1, :10] = 0
    cache = vhf.VAttnCache.for_model(model, max_batch=2, max_seq_len=96, policy=pol)
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=12,
            min_new_tokens=12,
            do_sample=False,
            **{cache_kwarg(model): cache},
        )
    assert out.shape == (2, 42)
    assert cache.get_seq_length() == 41  # the last generated token is not fed back
    assert cache.compressions, "the prompt was compressed"
    ub, ua = cache.compressions[0]["used_bytes"]
    assert ua < ub
    slots = cache._slots
    stored = [cache.kv.length(s) for s in slots]
    # At the end of the prompt each row kept about half of its real tokens (15 and 10), then grew.
    assert stored[0] < 30 + 12 and stored[1] < 20 + 12
    if pol.every is not None:  # decode-time eviction keeps rows near their budget
        assert all(cache.kv.length(s) <= cache.kv.position(s) for s in slots)
    cache.release()


def test_policy_argument_is_checked(model):
    with pytest.raises(TypeError):
        vhf.VAttnCache.for_model(model, max_batch=1, max_seq_len=32, policy="snapkv")


def test_adakv_in_head_major_maps_each_heads_own_pages():
    """AdaKV gives the kv heads of a layer different budgets. In layout="head_major" each (layer,
    K|V, head) is a region of its own, so after the prompt's compaction the mapped pages are exactly
    those of every head's own length (measured against stats(), resident bytes included), fewer than
    layer_major's (pages of each layer's longest head); without page alignment the logits are the
    same in both layouts. With it (the default), every head that evicts keeps whole pages, the request
    keeps no more tokens than AdaKV chose, and the memory is at most those chosen tokens' bytes."""
    m, _ = tiny_llama(num_layers=2, num_heads=4, num_kv_heads=2, hidden_size=256, head_dim=64)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 250, (1, 1200), generator=g)
    cont = torch.randint(3, 250, (1, 4), generator=g)
    page = 4096
    rec = 64 * 4  # one head's fp32 record
    got, mapped, counts = {}, {}, {}
    for layout, align in (("layer_major", True), ("head_major", False), ("head_major", True)):
        pol = policies.AdaKV(policies.SnapKV(keep=0.25, window=8), page_align=align)
        cache = vhf.VAttnCache.for_model(
            m, max_batch=1, max_seq_len=1280, policy=pol, layout=layout, page_bytes=page, reclaim_watermark_bytes=0
        )
        with torch.inference_mode():
            m(ids, use_cache=True, **{cache_kwarg(m): cache})
            kv, slot = cache.kv, cache._slots[0]
            heads = kv.head_lengths(slot).numpy()  # [layers, kv heads]
            assert heads.min() < heads.max(), "AdaKV gave the heads of some layer different budgets"
            st = kv.stats()
            if layout == "head_major":
                want = sum(2 * -(-int(n) * rec // page) for n in heads.reshape(-1))
            else:
                want = sum(2 * -(-int(n) * 2 * rec // page) for n in heads.max(axis=1))
            assert st["pages_mapped"] == want
            assert st["resident_bytes"] == st["mapped_bytes"] == want * page
            mapped[layout, align] = st["mapped_bytes"]
            counts[layout, align] = heads
            got[layout, align] = m(cont, use_cache=True, **{cache_kwarg(m): cache}).logits
        cache.release()
    assert mapped["head_major", False] < mapped["layer_major", True]
    torch.testing.assert_close(got["head_major", False], got["layer_major", True], atol=1e-5, rtol=1e-5)
    chosen, aligned = counts["head_major", False], counts["head_major", True]
    assert (aligned % (page // rec) == 0).all()  # whole pages (no head here keeps all 1200 tokens)
    assert aligned.sum() <= chosen.sum()
    assert mapped["head_major", True] <= 2 * int(chosen.sum()) * rec < mapped["head_major", False]
    assert torch.isfinite(got["head_major", True]).all()
