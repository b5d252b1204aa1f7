"""page_align (vattn.policies): in layout="head_major" every (layer, K|V, kv head) has its own pages,
so a policy rounds each evicting head's kept count to whole pages and hands the pages the request's
chosen tokens fill to the heads that were cut most. Checked against the same policy with
page_align=False on the same cache: no request keeps more tokens than the policy chose, the memory
after compaction is at most the chosen tokens' bytes (measured, resident included), each head keeps
its best tokens by the policy's scores (a subset or superset of the unaligned choice) and everything
it must keep; no effect in the other layouts or where pages are too big; batch > 1 with ragged
lengths, quantized formats and int4_ch groups, prefill and decode-time application."""

from __future__ import annotations

import pytest
import torch

import vattn
from vattn import policies

L, H, D, HQ = 3, 3, 64, 6
PAGE = 4096


def _cache(layout="head_major", page=PAGE, **kw):
    return vattn.KVCache(
        num_layers=L,
        num_kv_heads=H,
        head_dim=D,
        max_batch=3,
        max_seq_len=2048,
        dtype=torch.float32,
        layout=layout,
        device="cpu",
        page_bytes=page,
        reclaim_watermark_bytes=0,
        **kw,
    )


def _filled(pol, lens, seed=0, **kw):
    """A cache holding one prefill of lens[i] random tokens per slot, with pol's scores."""
    cache = _cache(**kw)
    cache.enable_scores()
    slots = [cache.alloc() for _ in lens]
    g = torch.Generator().manual_seed(seed)
    st = cache.begin_step(slots, lens)
    for layer in range(L):
        k = torch.randn(sum(lens), H, D, generator=g)
        v = torch.randn(sum(lens), H, D, generator=g)
        vattn.append_kv(cache, layer, st, k, v)
        vattn.attention(
            torch.randn(sum(lens), HQ, D, generator=g), cache, layer, st, **pol.attention_kwargs(cache, layer, st)
        )
    cache.end_step(st)
    return cache, slots


def _policies(align):
    return [
        policies.StreamingLLM(0.3, page_align=align),
        policies.H2O(0.25, recent=8, page_align=align),
        policies.TOVA(0.5, page_align=align),
        policies.SnapKV(0.25, window=16, page_align=align),
        policies.PyramidKV(0.5, window=16, page_align=align),
        policies.AdaKV(policies.SnapKV(0.25, window=16), page_align=align),
        policies.AdaKV(policies.H2O(0.4, recent=4), alpha_safeguard=0.5, page_align=align),
    ]


def _pages(tokens, record, group=1):
    tokens = -(-tokens // group) * group
    return -(-(tokens * record) // PAGE)


@pytest.mark.parametrize("fmt", ["auto", "int8", "int4"])  # int4: int4_ch keys, in groups of 32 tokens
@pytest.mark.parametrize("which", range(7))
def test_aligned_counts_memory_and_choice(which, fmt):
    lens = [1000, 613, 77]
    pol, plain = _policies(True)[which], _policies(False)[which]
    cache, slots = _filled(pol, lens, kv_format=fmt)
    record, group = cache._region_record, cache._group
    bound = 0
    for s in slots:
        n = cache.head_lengths(s)
        keep_a, lens_a = pol.select(cache, s)
        keep_p, lens_p = plain.select(cache, s)
        assert lens_a.sum() <= lens_p.sum(), "the request kept more tokens than the policy chose"
        aligned = not torch.equal(lens_a, lens_p)
        if s == slots[0]:  # the long request: its chosen counts are not all whole pages
            assert aligned
        for layer in range(L):
            for h in range(H):
                a, p, nh = int(lens_a[layer, h]), int(lens_p[layer, h]), int(n[layer, h])
                got = set(keep_a[layer, h, :a].tolist())
                chosen = set(keep_p[layer, h, :p].tolist())
                assert got <= chosen or chosen <= got, "not the head's best tokens"
                assert len(got) == a and max(got, default=0) < nh
                assert keep_a[layer, h, :a].tolist() == sorted(got)  # ascending, as compact wants
                if p == nh:  # keeps everything: left as chosen
                    assert a == nh
                elif aligned:
                    # whole pages (or everything); a request whose budget does not buy the pages its
                    # heads must keep (sinks, recent window) is left as chosen
                    assert a == nh or a == (_pages(a, record, group) * PAGE // record) // group * group
                # what the policy always keeps is kept: sinks, the recent window
                if pol.sinks:
                    assert set(range(min(pol.sinks, nh))) <= got
                if pol.recent:
                    assert set(range(max(0, nh - pol.recent), nh)) <= got
                bound += 2 * (p * record if p < nh and aligned else _pages(p, record, group) * PAGE)
    pol.apply(cache, slots)
    st = cache.stats()
    assert st["resident_bytes"] == st["mapped_bytes"] <= bound
    cache.close()


def test_memory_is_below_the_unaligned_and_attention_still_matches_reference():
    from vattn import reference

    pol, plain = (
        policies.AdaKV(policies.SnapKV(0.25, window=16)),
        policies.AdaKV(policies.SnapKV(0.25, window=16), page_align=False),
    )
    mapped = {}
    for p in (pol, plain):
        cache, slots = _filled(p, [1000, 700])
        p.apply(cache, slots)
        mapped[p.page_align] = cache.stats()["mapped_bytes"]
        # decode over per-head lengths after the aligned compaction equals the reference
        q = torch.randn(2, HQ, D, generator=torch.Generator().manual_seed(3))
        k1 = torch.randn(2, H, D)
        st = cache.begin_step(slots, [1, 1])
        vattn.append_kv(cache, 0, st, k1, k1)
        out = vattn.attention(q, cache, 0, st)
        kc, vc = cache.kv(0)
        heads = None if st.head_seqlens is None else st.head_seqlens[0]
        ref, _ = reference.attention(q, kc, vc, st.seqlens, None, st.slot_ids, heads)
        torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)
        cache.end_step(st)
        cache.close()
    assert mapped[True] < mapped[False]


@pytest.mark.parametrize("layout,page", [("token_major", PAGE), ("layer_major", PAGE), ("head_major", 2 << 20)])
def test_no_effect_where_pages_do_not_follow_one_head(layout, page):
    """token_major / layer_major pages follow the longest head; 2 MiB pages hold 8192 tokens of a head,
    more than any budget here: the choice is the unaligned one."""
    for a, p in zip(_policies(True), _policies(False)):
        cache, slots = _filled(a, [900, 400], layout=layout, page=page)
        for s in slots:
            ka, la = a.select(cache, s)
            kp, lp = p.select(cache, s)
            assert torch.equal(la, lp) and torch.equal(ka, kp)
        cache.close()


def test_decode_time_application_stays_aligned_and_bounded():
    pol = policies.SnapKV(64, window=16, every=8)
    cache, slots = _filled(pol, [300, 180])
    pol.apply(cache, slots)
    record = cache._region_record
    g = torch.Generator().manual_seed(9)
    for step_i in range(40):
        st = cache.begin_step(slots, [1, 1])
        for layer in range(L):
            k = torch.randn(2, H, D, generator=g)
            vattn.append_kv(cache, layer, st, k, k)
            vattn.attention(
                torch.randn(2, HQ, D, generator=g), cache, layer, st, **pol.attention_kwargs(cache, layer, st)
            )
        cache.end_step(st)
        if (step_i + 1) % pol.every == 0:
            pol.apply(cache, slots, only_over_budget=True)
            hl = cache.head_lengths()[slots]  # [2, L, H]
            assert (hl <= 64).all() and (hl % (PAGE // record) == 0).all()
            assert cache.stats()["mapped_bytes"] <= 2 * int(hl.sum()) * record
    cache.close()


def test_page_align_is_checked():
    with pytest.raises(TypeError, match="page_align"):
        policies.SnapKV(0.5, page_align=1)
    assert policies.AdaKV(policies.SnapKV(0.5, page_align=False)).page_align is False
    assert policies.DelayedEviction(lambda *a: None, 4).page_align is False
