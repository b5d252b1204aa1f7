"""Per-region pages after eviction (issue 10): in layout="layer_major" compact() unmaps, per layer,
every page beyond what that layer's longest head needs, so a PyramidKV-style compaction (a different
budget per layer) drops physical memory to what each layer keeps. Growth afterwards maps exactly the
missing pages of each region; shrink, free, stealing, the background thread and failures stay
consistent. Expectations are computed from page_bytes and the region token bytes, and memory is
measured (stats()["mapped_bytes"], ["resident_bytes"]), not inferred."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import vattn

L, H, D = 4, 2, 64
PAGE = 64 * 1024


# Every test runs in layer_major (a region per layer side) and head_major (a region per (layer
# side, kv head)); tests that ask for a layout by name keep it.
_layout = "layer_major"


@pytest.fixture(autouse=True, params=["layer_major", "head_major"])
def region_layout(request):
    global _layout
    _layout = request.param
    yield request.param
    _layout = "layer_major"


def make(layout=None, kv_format="auto", **kw):
    layout = layout or _layout
    kw.setdefault("reclaim_watermark_bytes", 0)
    return vattn.KVCache(
        num_layers=L,
        num_kv_heads=H,
        head_dim=D,
        max_batch=3,
        max_seq_len=4096,
        dtype=torch.float32,
        kv_format=kv_format,
        layout=layout,
        device="cpu",
        page_bytes=PAGE,
        **kw,
    )


def region_token_bytes(c) -> int:
    heads = 1 if c.layout == "head_major" else c.num_kv_heads
    k = c.k_format.record_bytes(heads, c.head_dim)
    v = c.v_format.record_bytes(heads, c.head_dim)
    return c.num_layers * (k + v) if c.layout == "token_major" else max(k, v)


def regions(c) -> int:
    n = c._m.num_regions
    c.close()
    return n


def pages_for(c, tokens: int) -> int:
    return math.ceil(tokens * region_token_bytes(c) / c.page_bytes)


def expected_region_pages(c, heads) -> list:
    """Pages each region needs for per-(layer, head) stored counts [L, H]."""
    heads = np.asarray(heads)
    if c.layout == "token_major":
        return [pages_for(c, int(heads.max()))]
    if c.layout == "head_major":  # region (2l + side) H + h
        return [pages_for(c, int(n)) for layer in heads for n in np.concatenate([layer, layer])]
    return [pages_for(c, int(n)) for n in np.repeat(heads.max(axis=1), 2)]


def fill(c, slot, n, seed=0):
    """One prefill step of n random tokens; returns per layer the (k, v) appended."""
    g = torch.Generator().manual_seed(seed)
    st = c.begin_step([slot], [n])
    data = []
    for layer in range(c.num_layers):
        k = torch.randn(n, H, D, generator=g)
        v = torch.randn(n, H, D, generator=g)
        vattn.append_kv(c, layer, st, k, v)
        data.append((k, v))
    c.end_step(st)
    return data


def raw_heads(c, slot):
    """Per (layer, head) the stored codes (and scale words) of its first head_lengths tokens."""
    hl = c.head_lengths(slot)
    out = {}
    for layer in range(c.num_layers):
        k, v = c.kv(layer)
        ks, vs = c.kv_scales(layer)
        for h in range(c.num_kv_heads):
            n = int(hl[layer, h])
            parts = [k[slot, :n, h].clone(), v[slot, :n, h].clone()]
            for sc in (ks, vs):
                if sc is not None:
                    parts.append(sc[slot, :n, h].clone())
            out[layer, h] = parts
    return out


def pyramid_keep(n, per_layer, seed=1, stored=None):
    """keep / keep_lens for one slot: layer l keeps per_layer[l] tokens (head h 3*h fewer), random
    ascending indices into the n tokens each head stores (or stored[l, h])."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.zeros(1, L, H, n, dtype=torch.int64)
    lens = torch.zeros(1, L, H, dtype=torch.int64)
    for layer in range(L):
        for h in range(H):
            have = n if stored is None else int(stored[layer, h])
            m = max(0, min(have, per_layer[layer] - 3 * h))
            idx = torch.sort(torch.randperm(have, generator=g)[:m]).values
            keep[0, layer, h, :m] = idx
            lens[0, layer, h] = m
    return keep, lens


def check_pages(c, slot, heads):
    want = expected_region_pages(c, heads)
    assert list(c._m.region_pages(slot)) == want
    return want


@pytest.mark.parametrize("kv_format", ["auto", ("int8", "int4")], ids=["fp32", "int8-int4"])
def test_compact_unmaps_per_layer(kv_format):
    c = make(kv_format=kv_format)
    s = c.alloc()
    n = 1500
    fill(c, s, n)
    before = c.stats()
    assert before["mapped_bytes"] == c._m.num_regions * pages_for(c, n) * c.page_bytes
    raw = raw_heads(c, s)
    keep, lens = pyramid_keep(n, [1500, 700, 300, 90])
    c.compact([s], keep, lens)
    heads = lens[0].numpy()
    want = check_pages(c, s, heads)
    st = c.stats()
    assert st["pages_mapped"] == sum(want)
    assert st["mapped_bytes"] == sum(want) * c.page_bytes
    assert st["mapped_bytes"] < before["mapped_bytes"]
    # measured: the memfd blocks of the unmapped pages were punched (watermark 0)
    assert st["resident_bytes"] < before["resident_bytes"]
    assert st["resident_bytes"] == st["mapped_bytes"]
    assert c.length(s) == 1500 and c.position(s) == n
    # the kept tokens, in order, with their scales
    after = raw_heads(c, s)
    for layer in range(L):
        for h in range(H):
            m = int(lens[0, layer, h])
            idx = keep[0, layer, h, :m]
            for got, old in zip(after[layer, h], raw[layer, h]):
                assert torch.equal(got[:m], old[idx])
    c.free(s)
    assert c.stats()["pages_created"] == 0 and c.stats()["resident_bytes"] == 0
    c.close()


def test_token_major_keeps_longest_head():
    c = make(layout="token_major")
    s = c.alloc()
    fill(c, s, 1500)
    keep, lens = pyramid_keep(1500, [1200, 700, 300, 90])
    c.compact([s], keep, lens)
    check_pages(c, s, lens[0].numpy())
    assert c._m.region_pages(s) == [pages_for(c, 1200)]
    assert c.stats()["mapped_bytes"] == pages_for(c, 1200) * c.page_bytes
    c.close()


def test_decode_after_compaction_grows_each_layer():
    c = make()
    s = c.alloc()
    n = 1000
    fill(c, s, n)
    keep, lens = pyramid_keep(n, [1000, 500, 250, 100])
    c.compact([s], keep, lens)
    heads0 = lens[0].numpy().copy()
    raw = raw_heads(c, s)
    g = torch.Generator().manual_seed(7)
    new = []
    steps = 300
    for _ in range(steps):
        st = c.begin_step([s], [1])
        toks = []
        for layer in range(L):
            k, v = torch.randn(1, H, D, generator=g), torch.randn(1, H, D, generator=g)
            vattn.append_kv(c, layer, st, k, v)
            toks.append((k, v))
        c.end_step(st)
        new.append(toks)
    heads = heads0 + steps
    assert (c.head_lengths(s).numpy() == heads).all()
    want = check_pages(c, s, heads)
    assert c.stats()["mapped_bytes"] == sum(want) * c.page_bytes
    # the layer that kept 100 tokens needs 2 pages of 128 tokens for 400, not the 11 of the longest
    k3 = 6 if c.layout == "layer_major" else 6 * H  # the K region (of head 0) of layer 3
    assert want[k3] == pages_for(c, 400) < want[0]
    for layer in range(L):
        k, v = c.kv(layer)
        for h in range(H):
            m = int(heads0[layer, h])
            assert torch.equal(k[s, :m, h], raw[layer, h][0])
            assert torch.equal(v[s, :m, h], raw[layer, h][1])
            got_k = k[s, m : m + steps, h]
            got_v = v[s, m : m + steps, h]
            assert torch.equal(got_k, torch.stack([t[layer][0][0, h] for t in new]))
            assert torch.equal(got_v, torch.stack([t[layer][1][0, h] for t in new]))
    # attention over the ragged slot agrees with the reference on each head's stored tokens
    q = torch.randn(1, 2 * H, D, generator=g)
    st = c.begin_step([s], [1])
    k1, v1 = torch.randn(1, H, D, generator=g), torch.randn(1, H, D, generator=g)
    outs = []
    for layer in range(L):
        vattn.append_kv(c, layer, st, k1, v1)
        outs.append(vattn.attention(q, c, layer, st))
    c.end_step(st)
    hl = c.head_lengths(s)
    for layer in range(L):
        k, v = c.kv(layer)
        for qh in range(2 * H):
            h = qh // 2
            m = int(hl[layer, h])
            kk, vv = k[s, :m, h].double(), v[s, :m, h].double()
            p = torch.softmax(kk @ q[0, qh].double() / math.sqrt(D), dim=0)
            torch.testing.assert_close(outs[layer][0, qh].double(), p @ vv, atol=1e-5, rtol=1e-5)
    c.free(s)
    assert c.stats()["pages_mapped"] == 0 and c.stats()["pages_created"] == 0
    c.close()


def test_reserve_maps_missing_pages_per_region():
    c = make()
    s = c.alloc()
    fill(c, s, 1000)
    keep, lens = pyramid_keep(1000, [1000, 500, 250, 100])
    c.compact([s], keep, lens)
    heads = lens[0].numpy()
    calls = c.stats()["map_calls"]
    c.reserve(s, 1200)  # 200 more tokens of the slot: each region its own missing pages
    check_pages(c, s, heads + 200)
    assert c.stats()["map_calls"] - calls == sum(expected_region_pages(c, heads + 200)) - sum(
        expected_region_pages(c, heads)
    )
    assert c.length(s) == 1000  # reserve does not change lengths
    # shrink drops those again, then keeps min(stored, n) per head
    c.shrink(s, 300)
    hs = np.minimum(heads, 300)
    assert (c.head_lengths(s).numpy() == hs).all()
    check_pages(c, s, hs)
    assert c.stats()["mapped_bytes"] == sum(expected_region_pages(c, hs)) * c.page_bytes
    c.shrink(s, 0)
    assert c._m.region_pages(s) == [0] * c._m.num_regions
    fill(c, s, 10)  # an emptied slot is plain again
    check_pages(c, s, np.full((L, H), 10))
    c.close()


def test_shrink_keeps_ragged_data():
    c = make()
    s = c.alloc()
    fill(c, s, 900)
    keep, lens = pyramid_keep(900, [900, 600, 200, 50])
    c.compact([s], keep, lens)
    raw = raw_heads(c, s)
    c.shrink(s, 400)
    hl = c.head_lengths(s).numpy()
    assert (hl == np.minimum(lens[0].numpy(), 400)).all()
    check_pages(c, s, hl)
    after = raw_heads(c, s)
    for key, parts in after.items():
        for got, old in zip(parts, raw[key]):
            assert torch.equal(got, old[: got.shape[0]])
    c.close()


def test_second_compaction_and_free_slot_reuse():
    c = make(reclaim_watermark_bytes=1 << 30)  # freed pages stay with the slot
    s = c.alloc()
    fill(c, s, 1000)
    keep, lens = pyramid_keep(1000, [800, 500, 250, 100])
    c.compact([s], keep, lens)
    keep2, lens2 = pyramid_keep(800, [100, 500, 40, 100], seed=3, stored=lens[0])
    c.compact([s], keep2, lens2)
    heads = lens2[0].numpy()
    check_pages(c, s, heads)
    mapped = c.stats()["mapped_bytes"]
    c.free(s)
    st = c.stats()
    # kept under the watermark: the free slot's pages and the pooled ones compaction unmapped
    assert st["mapped_bytes"] == mapped and st["idle_bytes"] == mapped + st["pages_pooled"] * PAGE
    assert st["pages_pooled"] == c._m.num_regions * pages_for(c, 1000) - mapped // PAGE
    t = c.alloc()
    assert t == s  # the free slot holding pages is reused, ragged as it is
    fill(c, t, 700, seed=5)
    check_pages(c, t, np.full((L, H), 700))  # each region got exactly its missing pages
    st = c.stats()
    assert st["pages_created"] == st["pages_mapped"] + st["pages_pooled"]
    assert st["create_calls"] - st["destroy_calls"] == st["pages_created"]
    c.free(t)
    c.close()


def test_steal_from_ragged_free_slot_and_undo():
    # Cap: all regions x 8 pages. Slot a is compacted ragged and freed (pages kept), then slot b
    # needs pages that only a's idle pages can give.
    cap = regions(make()) * 8 * PAGE
    c = make(max_physical_bytes=cap, reclaim_watermark_bytes=cap)
    a = c.alloc()
    fill(c, a, 1000)  # 8 pages per region: the whole cap
    keep, lens = pyramid_keep(1000, [1000, 600, 300, 100])
    c.compact([a], keep, lens)
    b = c.alloc()
    assert b != a
    c.free(a)
    idle_pages = c._m.region_pages(a)
    st0 = c.stats()
    # a failed map while stealing: everything (a's pages, the pool) as it was
    c._inject_failure("map", 3)
    with pytest.raises(RuntimeError):
        c.reserve(b, 900)
    c._inject_failure("none", 0)
    assert c._m.region_pages(a) == idle_pages and c._m.region_pages(b) == [0] * c._m.num_regions
    st1 = c.stats()
    for key in ("pages_mapped", "pages_pooled", "pages_created", "mapped_bytes"):
        assert st1[key] == st0[key], key
    c.reserve(b, 900)
    assert c._m.region_pages(b) == [pages_for(c, 900)] * c._m.num_regions
    st = c.stats()
    assert st["pages_created"] * PAGE <= cap
    assert st["pages_mapped"] == sum(c._m.region_pages(a)) + sum(c._m.region_pages(b))
    # over the cap: MemoryError, nothing of b lost or changed
    data = fill(c, b, 900)
    before = raw_heads(c, b)
    with pytest.raises(MemoryError):
        c.reserve(b, 4096)
    assert c._m.region_pages(b) == [pages_for(c, 900)] * c._m.num_regions
    after = raw_heads(c, b)
    for key, parts in after.items():
        for x, y in zip(parts, before[key]):
            assert torch.equal(x, y)
    assert torch.equal(c.kv(0)[0][b, :900], data[0][0])
    c.close()


def test_memory_error_after_compaction_loses_nothing():
    cap = regions(make()) * 8 * PAGE
    c = make(max_physical_bytes=cap)
    s = c.alloc()
    fill(c, s, 1000)
    keep, lens = pyramid_keep(1000, [1000, 400, 200, 100])
    c.compact([s], keep, lens)
    pages = c._m.region_pages(s)
    raw = raw_heads(c, s)
    with pytest.raises(MemoryError):
        c.begin_step([s], [3000])
    assert c._m.region_pages(s) == pages
    assert c.length(s) == 1000
    after = raw_heads(c, s)
    for key, parts in after.items():
        for x, y in zip(parts, raw[key]):
            assert torch.equal(x, y)
    # the freed pages of the short layers pay for growth that fits
    heads = lens[0].numpy()
    st = c.begin_step([s], [24])
    for layer in range(L):
        vattn.append_kv(c, layer, st, torch.randn(24, H, D), torch.randn(24, H, D))
    c.end_step(st)
    check_pages(c, s, heads + 24)
    c.close()


def test_shrink_regions_validation_changes_nothing():
    c = make()
    s = c.alloc()
    fill(c, s, 500)
    m = c._m
    pages = m.region_pages(s)
    R = m.num_regions
    bad = [
        (s, 600, [500] * R),  # n > length
        (s, 500, [500] * (R - 1)),  # wrong count
        (s, 400, [500] * R),  # region keeps more than n
        (s, 500, [-1] + [500] * (R - 1)),
    ]
    for args in bad:
        with pytest.raises(ValueError):
            m.shrink_regions(*args)
        assert m.region_pages(s) == pages and m.length(s) == 500
    keep = [500] * R
    keep[2] = keep[3] = 100
    m.shrink_regions(s, 500, keep)
    with pytest.raises(ValueError):  # a region cannot keep more than it stores
        m.shrink_regions(s, 500, keep[:2] + [200] + keep[3:])
    assert m.region_tokens(s) == keep
    with pytest.raises(ValueError):
        m.shrink_regions(c.alloc() + 1, 0, [0] * R)  # not allocated
    c.close()


def test_raw_write_into_unmapped_short_layer_refused():
    c = make()
    s = c.alloc()
    fill(c, s, 1000)
    keep, lens = pyramid_keep(1000, [1000, 500, 250, 100])
    c.compact([s], keep, lens)
    k3, v3 = c.kv(3)  # layer 3 keeps 100 tokens: one page of 128
    vattn.ops.append_kv_raw(k3, v3, torch.randn(1, H, D), torch.randn(1, H, D), [s], [127])
    with pytest.raises(ValueError, match="unmapped"):
        vattn.ops.append_kv_raw(k3, v3, torch.randn(1, H, D), torch.randn(1, H, D), [s], [500])
    k0, v0 = c.kv(0)  # layer 0 keeps all its pages
    vattn.ops.append_kv_raw(k0, v0, torch.randn(1, H, D), torch.randn(1, H, D), [s], [999])
    # reading past a short layer's pages reads zeros
    assert float(k3[s, 500:1000].abs().sum()) == 0.0
    c.close()


def test_background_maps_ahead_per_region():
    c = make(background=True, lookahead_tokens=200, prealloc_bytes=0)
    s = c.alloc()
    fill(c, s, 1000)
    c.wait_background()
    assert c._m.region_pages(s) == [pages_for(c, 1200)] * c._m.num_regions
    keep, lens = pyramid_keep(1000, [1000, 500, 250, 100])
    c.compact([s], keep, lens)
    c.wait_background()
    heads = lens[0].numpy()
    check_pages(c, s, heads + 200)  # each region: its own tokens plus the lookahead
    for _ in range(50):
        st = c.begin_step([s], [4])
        for layer in range(L):
            vattn.append_kv(c, layer, st, torch.randn(4, H, D), torch.randn(4, H, D))
        c.end_step(st)
    c.wait_background()
    check_pages(c, s, heads + 200 + 200)
    c.free(s)
    c.wait_background()
    assert c.stats()["pages_mapped"] == 0
    c.close()


# ---------------------------------------------------------------- random sequences vs a model

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

SL, SH, SD, SPAGE, SMAX = 3, 2, 16, 4096, 512  # fp32: 128 bytes per region token, 32 tokens a page


class _Model:
    """Pure-Python model: per live slot the token ids each (layer, head) stores, and the pages of
    each region (watermark 0 and no cap: pages of freed slots and shrunk tails go back at once)."""

    def __init__(self):
        self.heads = {}  # slot -> [L][H] list of token ids
        self.pages = {}  # slot -> [2L]

    @staticmethod
    def need(tokens):
        return -(-tokens * SH * SD * 4 // SPAGE)

    def region_tokens(self, slot):
        return [max(len(h) for h in layer) for layer in self.heads[slot] for _ in (0, 1)]

    def settle(self, slot, grow=False):
        want = [self.need(t) for t in self.region_tokens(slot)]
        old = self.pages[slot]
        self.pages[slot] = [max(a, b) for a, b in zip(old, want)] if grow else want


def _values(ids, layer, head):
    ids = torch.tensor(ids, dtype=torch.float32)
    base = ids * 16 + layer * 4 + head
    return base[:, None] + torch.arange(SD, dtype=torch.float32)[None, :] / 64


_ops = st.lists(
    st.tuples(
        st.sampled_from(["grow", "compact", "shrink", "free", "alloc"]), st.integers(0, 1), st.integers(0, 10**6)
    ),
    min_size=1,
    max_size=25,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=_ops)
def test_random_grow_compact_shrink_free(ops):
    c = vattn.KVCache(
        num_layers=SL,
        num_kv_heads=SH,
        head_dim=SD,
        max_batch=2,
        max_seq_len=SMAX,
        dtype=torch.float32,
        layout="layer_major",
        device="cpu",
        page_bytes=SPAGE,
        reclaim_watermark_bytes=0,
    )
    model = _Model()
    next_id = [0]
    rng = np.random.default_rng(0)
    try:
        for op, which, arg in ops:
            live = sorted(model.heads)
            if op == "alloc" or not live:
                if len(live) < 2:
                    s = c.alloc()
                    model.heads[s] = [[[] for _ in range(SH)] for _ in range(SL)]
                    model.pages[s] = [0] * (2 * SL)
                continue
            s = live[which % len(live)]
            length = c.length(s)
            if op == "grow":
                n = min(arg % 70 + 1, SMAX - length)
                if n == 0:
                    continue
                ids = list(range(next_id[0], next_id[0] + n))
                next_id[0] += n
                step = c.begin_step([s], [n])
                for layer in range(SL):
                    k = torch.stack([_values(ids, layer, h) for h in range(SH)], dim=1)
                    vattn.append_kv(c, layer, step, k, -k)
                c.end_step(step)
                for layer in range(SL):
                    for h in range(SH):
                        model.heads[s][layer][h] += ids
                model.settle(s, grow=True)
            elif op == "compact":
                lens = torch.zeros(1, SL, SH, dtype=torch.int64)
                kmax = max(1, max(len(h) for layer in model.heads[s] for h in layer))
                keep = torch.zeros(1, SL, SH, kmax, dtype=torch.int64)
                for layer in range(SL):
                    for h in range(SH):
                        stored = len(model.heads[s][layer][h])
                        m = int(rng.integers(0, stored + 1))
                        idx = np.sort(rng.choice(stored, m, replace=False))
                        keep[0, layer, h, :m] = torch.from_numpy(idx)
                        lens[0, layer, h] = m
                        model.heads[s][layer][h] = [model.heads[s][layer][h][i] for i in idx]
                c.compact([s], keep, lens)
                model.settle(s)
            elif op == "shrink":
                n = arg % (length + 1)
                c.shrink(s, n)
                for layer in range(SL):
                    for h in range(SH):
                        model.heads[s][layer][h] = model.heads[s][layer][h][:n]
                model.settle(s)
            elif op == "free":
                c.free(s)
                del model.heads[s]
                del model.pages[s]
            # invariants
            st_ = c.stats()
            total = 0
            for t in sorted(model.heads):
                assert list(c._m.region_pages(t)) == model.pages[t], (t, op)
                assert list(c._m.region_tokens(t)) == model.region_tokens(t)
                total += sum(model.pages[t])
                hl = c.head_lengths(t)
                for layer in range(SL):
                    k, v = c.kv(layer)
                    for h in range(SH):
                        ids = model.heads[t][layer][h]
                        assert int(hl[layer, h]) == len(ids)
                        if ids:
                            want = _values(ids, layer, h)
                            assert torch.equal(k[t, : len(ids), h], want)
                            assert torch.equal(v[t, : len(ids), h], -want)
            assert st_["pages_mapped"] == total
            assert st_["mapped_bytes"] == total * SPAGE
            assert st_["pages_created"] == total and st_["pages_pooled"] == 0
            assert st_["resident_bytes"] == total * SPAGE
        for t in sorted(model.heads):
            c.free(t)
        assert c.stats()["pages_created"] == 0 and c.stats()["resident_bytes"] == 0
    finally:
        c.close()
