"""Eviction on a vattn.KVCache: compact() keeps exactly the chosen tokens per (slot, layer, kv head),
in order, for every format and layout; lengths per head, logical positions, memory really released;
attention after compaction against the reference; policies' choices against a dense re-derivation of
their papers' / kvpress's scores; bad inputs raise and change nothing."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

import vattn
from vattn import formats, policies, reference

L, H, D, HQ = 2, 2, 64, 6
FORMATS = ["auto", "fp8_e4m3", "int8", "int4", ("int8", "int4")]


def _cache(fmt="auto", layout="token_major", max_batch=3, watermark=None, **kw):
    return vattn.KVCache(
        num_layers=L,
        num_kv_heads=H,
        head_dim=D,
        max_batch=max_batch,
        max_seq_len=2048,
        dtype=torch.float32,
        kv_format=fmt,
        layout=layout,
        device="cpu",
        page_bytes=16384,
        reclaim_watermark_bytes=watermark,
        smooth_keys=False,  # compare with the raw stored codes (tests/test_key_smoothing.py: smoothing)
        **kw,
    )


def _fill(cache, slots, n, *, scores=False, seed=0):
    """One prefill step of n[i] tokens per slot with random K/V/q; returns the per-layer K, V."""
    g = torch.Generator().manual_seed(seed)
    st = cache.begin_step(slots, n)
    ks, vs = [], []
    for layer in range(L):
        k = torch.randn(sum(n), H, D, generator=g)
        v = torch.randn(sum(n), H, D, generator=g)
        q = torch.randn(sum(n), HQ, D, generator=g)
        vattn.append_kv(cache, layer, st, k, v)
        kw = {"scores": cache.scores(layer), "score_mode": "add"} if scores else {}
        vattn.attention(q, cache, layer, st, **kw)
        ks.append(k)
        vs.append(v)
    cache.end_step(st)
    return ks, vs


def _random_keep(slots, n, seed=1, kmax=None):
    rnd = random.Random(seed)
    kmax = kmax or max(n)
    keep = torch.zeros(len(slots), L, H, kmax, dtype=torch.int64)
    lens = torch.zeros(len(slots), L, H, dtype=torch.int64)
    for i in range(len(slots)):
        for layer in range(L):
            for h in range(H):
                k = rnd.choice([0, 1, n[i], rnd.randint(1, n[i])]) if n[i] <= kmax else rnd.randint(0, kmax)
                k = min(k, kmax)
                idx = sorted(rnd.sample(range(n[i]), k))
                keep[i, layer, h, :k] = torch.tensor(idx, dtype=torch.int64)
                lens[i, layer, h] = k
    return keep, lens


def _raw(cache, layer):
    k, v = cache.kv(layer)
    ks, vs = cache.kv_scales(layer)
    return [t.clone() if t is not None else None for t in (k, v, ks, vs)]


@pytest.mark.parametrize("layout", ["token_major", "layer_major", "head_major"])
@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_compact_keeps_exactly_the_chosen_tokens(fmt, layout):
    cache = _cache(fmt, layout)
    cache.enable_scores()
    slots = [cache.alloc(), cache.alloc()]
    n = [150, 97]
    _fill(cache, slots, n, scores=True)
    before = [_raw(cache, layer) for layer in range(L)]
    scores_before = cache.scores().clone()
    keep, lens = _random_keep(slots, n)
    cache.compact(slots, keep, lens)
    grouped = cache.k_format.name == "int4_ch"  # int4 keys per channel are re-encoded, not moved
    if grouped:
        g = formats.group_tokens(cache.k_format, D)
        want_k = []
        for layer in range(L):
            k, v, ks, vs = (t.clone() for t in before[layer])
            reference.compact_kv(
                k, v, torch.tensor(slots), keep[:, layer], lens[:, layer], k_scale=ks, v_scale=vs, k_format="int4_ch"
            )
            want_k.append((k, ks))
    for i, s in enumerate(slots):
        assert cache.position(s) == n[i]  # logical length unchanged
        assert cache.length(s) == int(lens[i].max())
        assert torch.equal(cache.head_lengths(s), lens[i].to(torch.int32))
        for layer in range(L):
            after = _raw(cache, layer)
            for h in range(H):
                k = int(lens[i, layer, h])
                idx = keep[i, layer, h, :k]
                for which, (t_before, t_after) in enumerate(zip(before[layer], after)):
                    if t_before is None:
                        continue
                    if grouped and which in (0, 2):  # K codes / K words: the reference's re-encoding
                        want = want_k[layer][which // 2]
                        end = k if which == 0 else -(-k // g) * g
                        assert torch.equal(t_after[s, :end, h], want[s, :end, h]), (i, layer, h, which)
                        continue
                    assert torch.equal(t_after[s, :k, h].view(torch.uint8), t_before[s, idx, h].view(torch.uint8)), (
                        i,
                        layer,
                        h,
                    )
                sc = cache.scores(layer)[s, h]
                assert torch.equal(sc[:k], scores_before[s, layer, h, idx])
                assert not sc[k:].any(), "scores past the new length start from zero"


def _check_attention_after(cache, slots, new, seed=5):
    """A step of `new` tokens per slot after compaction equals the reference over each head's stored
    tokens (lengths per head)."""
    g = torch.Generator().manual_seed(seed)
    st = cache.begin_step(slots, new)
    for layer in range(L):
        k = torch.randn(sum(new), H, D, generator=g)
        v = torch.randn(sum(new), H, D, generator=g)
        q = torch.randn(sum(new), HQ, D, generator=g)
        vattn.append_kv(cache, layer, st, k, v)
        out = vattn.attention(q, cache, layer, st)
        kc, vc = cache.kv(layer)
        if cache.k_format.quantized or cache.v_format.quantized:
            ks, vs = cache.kv_scales(layer)
            kc = reference.dequantize(kc, ks, cache.k_format.name, D, torch.float32) if ks is not None else kc
            vc = reference.dequantize(vc, vs, cache.v_format.name, D, torch.float32) if vs is not None else vc
        ref, _ = reference.attention(
            q,
            kc,
            vc,
            st.seqlens,
            None if st.is_decode else st.cu_seqlens_q,
            st.slot_ids,
            None if st.head_seqlens is None else st.head_seqlens[layer],
        )
        torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)
    cache.end_step(st)


@pytest.mark.parametrize("layout", ["token_major", "layer_major", "head_major"])
@pytest.mark.parametrize("fmt", ["auto", "int8", ("int8", "int4"), "int4"], ids=str)
@pytest.mark.parametrize("new", [[1, 1], [7, 3]], ids=["decode", "prefill"])
def test_attention_after_compaction_uses_per_head_lengths(fmt, layout, new):
    cache = _cache(fmt, layout)
    slots = [cache.alloc(), cache.alloc()]
    n = [120, 61]
    _fill(cache, slots, n)
    keep, lens = _random_keep(slots, n, seed=3)
    cache.compact(slots, keep, lens)
    for i, s in enumerate(slots):
        assert cache.position(s) == n[i]
    assert cache.begin_step(slots, new).head_seqlens is not None  # ragged: per-head lengths
    cache.abort_step(cache._open[slots[0]])
    _check_attention_after(cache, slots, new)
    for i, s in enumerate(slots):
        assert cache.position(s) == n[i] + new[i]
        assert torch.equal(cache.head_lengths(s), (lens[i] + new[i]).to(torch.int32))


def test_compaction_releases_memory_at_once():
    cache = _cache("auto", "token_major", watermark=0, max_batch=2)
    slot = cache.alloc()
    _fill(cache, [slot], [1500])
    full = cache.stats()
    keep = torch.arange(1100, 1500).expand(1, L, H, 400).contiguous()
    cache.compact([slot], keep, torch.full((1, L, H), 400))
    after = cache.stats()
    page = full["page_bytes"]
    per_tok = cache.token_bytes
    assert after["mapped_bytes"] <= -(-400 * per_tok // page) * page
    assert after["mapped_bytes"] < full["mapped_bytes"] * 0.3
    assert after["resident_bytes"] < full["resident_bytes"] * 0.3  # measured (memfd blocks), not inferred
    assert after["used_bytes"] == 400 * per_tok


def test_compact_bad_inputs_change_nothing():
    cache = _cache("int8")
    slots = [cache.alloc()]
    _fill(cache, slots, [40])
    before = [_raw(cache, layer) for layer in range(L)]
    good = torch.arange(10).expand(1, L, H, 10).contiguous()
    ten = torch.full((1, L, H), 10)
    bad_cases = [
        (good.flip(-1).contiguous(), ten, ValueError),  # decreasing
        (good + 35, ten, ValueError),  # past the length
        (good - 1, ten, ValueError),  # negative
        (good, ten + 1, ValueError),  # keep_lens > max_keep
        (good, torch.full((1, L, H), -1), ValueError),
        (good[:, :1], ten, ValueError),  # wrong shape
        (good.float(), ten, TypeError),
    ]
    for keep, lens, exc in bad_cases:
        with pytest.raises(exc):
            cache.compact(slots, keep, lens)
    with pytest.raises(ValueError):
        cache.compact([2], good, ten)  # not a live slot
    st = cache.begin_step(slots, [1])
    with pytest.raises(RuntimeError):
        cache.compact(slots, good, ten)  # open step
    cache.abort_step(st)
    for layer in range(L):
        for a, b in zip(before[layer], _raw(cache, layer)):
            if a is not None:
                assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    assert cache.length(slots[0]) == 40 and cache.position(slots[0]) == 40


def test_shrink_after_compaction_and_free_reset():
    cache = _cache()
    s = cache.alloc()
    _fill(cache, [s], [50])
    lens = torch.tensor([[[30, 20], [10, 25]]])
    keep = torch.arange(30).expand(1, L, H, 30).contiguous()
    cache.compact([s], keep, lens)
    assert cache.length(s) == 30
    cache.shrink(s, 22)
    assert cache.head_lengths(s).tolist() == [[22, 20], [10, 22]]
    assert cache.position(s) == 42
    cache.free(s)
    s2 = cache.alloc()
    assert cache.head_lengths(s2).tolist() == [[0, 0], [0, 0]] and cache.position(s2) == 0


# ------------------------------------------------------------------------------------------ policies


def _dense_probs(cache, slot, layer, queries):
    """float64 softmax probabilities [HQ, nq, n] of the given queries [nq, HQ, D] (the last nq
    positions of the slot) over its stored keys, causal."""
    k, _ = cache.kv(layer)
    n = cache.length(slot)
    kk = k[slot, :n].double().repeat_interleave(HQ // H, dim=1)  # [n, HQ, D]
    logits = torch.einsum("qhd,khd->hqk", queries.double(), kk) * D**-0.5
    nq = queries.shape[0]
    qpos = torch.arange(n - nq, n)[:, None]
    logits = logits.masked_fill(torch.arange(n)[None, :] > qpos, float("-inf"))
    return torch.softmax(logits, dim=-1)


def _prefill_with_policy(policy, n=200, seed=0):
    cache = _cache()
    cache.enable_scores()
    s = cache.alloc()
    g = torch.Generator().manual_seed(seed)
    st = cache.begin_step([s], [n])
    qs = []
    for layer in range(L):
        # Keys with a structure (some much louder tokens) so that the choice is not a tie-break.
        k = torch.randn(n, H, D, generator=g) * (1 + 3 * (torch.rand(n, 1, 1, generator=g) > 0.9))
        v = torch.randn(n, H, D, generator=g)
        q = torch.randn(n, HQ, D, generator=g)
        vattn.append_kv(cache, layer, st, k, v)
        vattn.attention(q, cache, layer, st, **policy.attention_kwargs(cache, layer, st))
        qs.append(q)
    cache.end_step(st)
    return cache, s, qs


def _kept_sets(cache, s, qs, policy, expected_scores):
    """Compacts with policy and checks that each (layer, head) kept the top tokens of the dense score."""
    n = cache.length(s)
    keep, lens = policy.select(cache, s)
    for layer in range(L):
        dense = expected_scores(cache, s, layer, qs[layer], n)  # [H, n]
        budget = policy.layer_budget(layer, L, n)
        for h in range(H):
            got = set(keep[layer, h, : int(lens[layer, h])].tolist())
            want = set(dense[h].topk(budget).indices.tolist())
            # allow ties at the boundary only
            assert len(got) == budget == len(want)
            if got != want:
                thr = dense[h].topk(budget).values[-1]
                assert all(abs(dense[h, j] - thr) < 1e-9 * max(1.0, abs(float(thr))) for j in got ^ want)
    policy.apply(cache, [s])
    assert torch.equal(cache.head_lengths(s).to(torch.int64), lens)


def test_snapkv_matches_dense_window_scores():
    pol = policies.SnapKV(keep=0.25, window=16, kernel=5)

    def dense(cache, s, layer, q, n):
        p = _dense_probs(cache, s, layer, q[-16:])  # [HQ, 16, n]
        sc = p.mean(1)[:, : n - 16]
        sc = F.avg_pool1d(sc[:, None], kernel_size=5, padding=2, stride=1)[:, 0]
        sc = sc.view(H, HQ // H, -1).mean(1)
        return torch.cat([sc, torch.full((H, 16), 1e9, dtype=sc.dtype)], dim=1)

    cache, s, qs = _prefill_with_policy(pol)
    _kept_sets(cache, s, qs, pol, dense)


def test_h2o_matches_observed_attention():
    pol = policies.H2O(keep=0.3)

    def dense(cache, s, layer, q, n):
        p = _dense_probs(cache, s, layer, q)  # all queries
        sc = p.sum(1) / torch.arange(n, 0, -1, dtype=p.dtype)
        return sc.view(H, HQ // H, n).mean(1)

    cache, s, qs = _prefill_with_policy(pol)
    _kept_sets(cache, s, qs, pol, dense)


def test_tova_matches_last_query_mean_over_heads():
    pol = policies.TOVA(keep=0.5)

    def dense(cache, s, layer, q, n):
        p = _dense_probs(cache, s, layer, q[-1:])[:, 0]  # [HQ, n]
        sc = p.mean(0).clone()
        sc[-1] = 1e9
        return sc.expand(H, n)

    cache, s, qs = _prefill_with_policy(pol)
    _kept_sets(cache, s, qs, pol, dense)


def test_streaming_llm_keeps_sinks_and_recent():
    pol = policies.StreamingLLM(keep=0.25, sinks=4)
    cache = _cache()
    s = cache.alloc()
    _fill(cache, [s], [200])
    pol.apply(cache, [s])
    keep_n = 50
    assert cache.length(s) == keep_n and cache.position(s) == 200


def test_pyramidkv_budgets_shrink_with_depth_and_adakv_shares_a_layer_budget():
    pyr = policies.PyramidKV(keep=0.25, window=8)
    budgets = [pyr.layer_budget(layer, 30, 1000) for layer in range(30)]
    assert budgets == sorted(budgets, reverse=True) and budgets[0] > budgets[-1]
    assert abs(sum(budgets) / 30 - 250) <= 2  # same total as a flat budget
    ada = policies.AdaKV(policies.SnapKV(keep=0.25, window=16))
    cache, s, qs = _prefill_with_policy(ada)
    keep, lens = ada.select(cache, s)
    n = cache.length(s)
    for layer in range(L):
        assert int(lens[layer].sum()) == H * ada.layer_budget(layer, L, n)
        assert int(lens[layer].min()) >= int(ada.layer_budget(layer, L, n) * 0.2)
    ada.apply(cache, [s])
    assert torch.equal(cache.head_lengths(s).to(torch.int64), lens)


def test_policies_at_batch_above_one_with_ragged_lengths_and_during_decode():
    pol = policies.H2O(keep=64, recent=8, every=4)
    cache = _cache(max_batch=3)
    cache.enable_scores()
    slots = [cache.alloc() for _ in range(3)]
    _fill(cache, slots, [130, 40, 90], scores=True)
    done = pol.apply(cache, slots)
    assert sorted(done) == [slots[0], slots[2]]  # the 40-token request is within budget
    assert [cache.length(s) for s in slots] == [64, 40, 64]
    g = torch.Generator().manual_seed(9)
    for step_i in range(12):
        st = cache.begin_step(slots, [1, 1, 1])
        for layer in range(L):
            vattn.append_kv(cache, layer, st, torch.randn(3, H, D, generator=g), torch.randn(3, H, D, generator=g))
            vattn.attention(
                torch.randn(3, HQ, D, generator=g), cache, layer, st, **pol.attention_kwargs(cache, layer, st)
            )
        cache.end_step(st)
        if (step_i + 1) % pol.every == 0:
            pol.apply(cache, slots, only_over_budget=True)
    assert [cache.position(s) for s in slots] == [142, 52, 102]
    assert cache.length(slots[0]) <= 64 + 4 and cache.length(slots[2]) <= 64 + 4
    assert cache.length(slots[1]) == 52  # never over budget


@pytest.mark.parametrize("fmt", [("int8", "int4"), "int4"], ids=str)
def test_policy_on_a_quantized_cache(fmt):
    cache = _cache(fmt)
    cache.enable_scores()
    s = cache.alloc()
    _fill(cache, [s], [120], scores=True)
    policies.SnapKV(keep=0.5, window=8).apply(cache, [s])
    assert cache.length(s) == 60
    _check_attention_after(cache, [s], [1])


@pytest.mark.parametrize(
    "make, exc",
    [
        (lambda: policies.SnapKV(keep=0), ValueError),
        (lambda: policies.SnapKV(keep="half"), TypeError),
        (lambda: policies.SnapKV(keep=0.0), ValueError),
        (lambda: policies.SnapKV(keep=1.5), ValueError),
        (lambda: policies.SnapKV(keep=-3), ValueError),
        (lambda: policies.StreamingLLM(keep=3, sinks=4), ValueError),
        (lambda: policies.H2O(keep=8, recent=9), ValueError),
        (lambda: policies.SnapKV(keep=0.5, kernel=4), ValueError),
        (lambda: policies.SnapKV(keep=0.5, every=0), ValueError),
        (lambda: policies.AdaKV(policies.SnapKV(keep=0.5), alpha_safeguard=2.0), ValueError),
        (lambda: policies.AdaKV("snapkv"), TypeError),
    ],
)
def test_bad_policy_arguments(make, exc):
    with pytest.raises(exc):
        make()


def test_more_sinks_than_a_fractional_budget_keeps_the_sinks():
    """A fraction too small for the sinks keeps the sinks (it used to raise, failing the whole
    batch's apply, and so generate(), for one short prompt)."""
    cache = _cache()
    s, other = cache.alloc(), cache.alloc()
    k, _ = _fill(cache, [s, other], [40, 200])
    policies.StreamingLLM(keep=0.05, sinks=4).apply(cache, [s, other])  # budgets 2 < 4 sinks, and 10
    assert cache.length(s) == 4 and cache.length(other) == 10
    stored, _ = cache.kv(0)
    assert torch.equal(stored[s, :4], k[0][:4])


@pytest.mark.parametrize(
    "make,n,budget",
    [
        (lambda: policies.SnapKV(0.25), 37, 9),  # the default window of 64 > the budget
        (lambda: policies.SnapKV(8), 30, 8),
        (lambda: policies.H2O(0.2, recent=8), 20, 4),
        (lambda: policies.AdaKV(policies.SnapKV(0.25, window=16)), 40, 10),
    ],
)
def test_always_kept_tokens_beyond_the_budget_keep_the_newest(make, n, budget):
    """When the recent window (SnapKV's window, H2O's recent) holds more tokens than the budget,
    each head keeps the newest `budget` of them, the last prompt token included, without holes (the
    choice among equally forced scores used to be arbitrary)."""
    pol = make()
    cache, s, _ = _prefill_with_policy(pol, n=n)
    k_before = cache.kv(0)[0][s, :n].clone()
    pol.apply(cache, [s])
    heads = cache.head_lengths(s)
    assert bool((heads == budget).all()), heads
    # The kept keys are the last `budget` appended ones, in order.
    assert torch.equal(cache.kv(0)[0][s, :budget], k_before[n - budget :])


def test_fractional_keep_during_decode_cuts_to_the_logical_budget():
    """every=N with a fractional keep: a row over its decode budget int(position * keep) is cut back
    to that budget, not to a fraction of what it still stores (it lost about half each time)."""
    pol = policies.StreamingLLM(0.5, sinks=1, every=1)
    cache = _cache()
    s = cache.alloc()
    _fill(cache, [s], [20])
    pol.apply(cache, [s])
    assert cache.length(s) == 10
    for step in range(6):
        _fill(cache, [s], [1], seed=step + 1)
        pol.apply(cache, [s], only_over_budget=True)
        assert cache.length(s) == max(10, int(cache.position(s) * 0.5)), step
    # keep=0.3, sinks=2 on 7 tokens: a decode-time cut must not fall below the sinks either.
    pol = policies.StreamingLLM(0.3, sinks=2, every=1)
    t = cache.alloc()
    _fill(cache, [t], [7])
    pol.apply(cache, [t])
    for step in range(4):
        _fill(cache, [t], [1], seed=step + 10)
        pol.apply(cache, [t], only_over_budget=True)
        assert cache.length(t) >= 2


@pytest.mark.parametrize("keep", [64, 0.5])
def test_request_shorter_than_its_sinks_keeps_everything(keep):
    """A request holding no more tokens than the sinks keeps them all, beside longer requests of the
    same batch that do evict (it used to fail the whole apply: '4 sinks exceed the budget of 3')."""
    cache = _cache()
    short, other, longer = cache.alloc(), cache.alloc(), cache.alloc()
    _fill(cache, [short, other, longer], [3, 4, 200])
    policies.StreamingLLM(keep=keep, sinks=4).apply(cache, [short, other, longer])
    assert cache.length(short) == 3 and cache.length(other) == 4
    assert cache.length(longer) == (64 if keep == 64 else 100)


def test_budget_larger_than_length_keeps_everything():
    cache = _cache()
    s = cache.alloc()
    _fill(cache, [s], [30])
    assert policies.StreamingLLM(keep=100).apply(cache, [s]) == []
    assert cache.length(s) == 30


def test_parse_specs():
    assert isinstance(policies.parse("snapkv:0.25"), policies.SnapKV)
    p = policies.parse("h2o:512:recent=32")
    assert isinstance(p, policies.H2O) and p.keep == 512 and p.recent == 32
    with pytest.raises(ValueError):
        policies.parse("nope:0.5")


def test_delayed_eviction_evicts_marked_tokens_only_after_the_window():
    # decide: evict every even logical position (all heads of layer 0, head 1 only in layer 1).
    def decide(layer, k, v, positions):
        even = (positions % 2 == 0)[:, None].expand(-1, H).clone()
        if layer == 1:
            even[:, 0] = False
        return even

    pol = policies.DelayedEviction(decide, window=8)
    cache = _cache()
    cache.enable_scores()
    s = cache.alloc()
    g = torch.Generator().manual_seed(4)
    keys = {layer: [] for layer in range(L)}

    def step(n):
        st = cache.begin_step([s], [n])
        for layer in range(L):
            k = torch.randn(n, H, D, generator=g)
            v = torch.randn(n, H, D, generator=g)
            vattn.append_kv(cache, layer, st, k, v)
            pol.on_append(cache, layer, st, k, v)
            vattn.attention(torch.randn(n, HQ, D, generator=g), cache, layer, st)
            keys[layer].append(k)
        cache.end_step(st)
        pol.apply(cache, [s])

    step(40)
    for _ in range(5):
        step(1)
    n = cache.position(s)
    assert n == 45
    for layer in range(L):
        allk = torch.cat(keys[layer])
        kc, _ = cache.kv(layer)
        for h in range(H):
            marked = layer == 0 or h == 1
            want = [p for p in range(n) if not (marked and p % 2 == 0 and p < n - 8)]
            got_n = int(cache.head_lengths(s)[layer, h])
            assert got_n == len(want), (layer, h)
            assert torch.equal(kc[s, :got_n, h], allk[want, h])
