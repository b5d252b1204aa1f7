"""Stored data, stable addresses, memory that really goes back, MemoryError and rollback of
vattn.KVCache on the host (memfd) backend. Data is written directly through the kv() views."""

import pytest
import torch

import vattn

KIB = 1024
PAGE = 64 * KIB
L, H, D = 3, 2, 32  # token_major: 768 bytes per fp16 token -> 85 tokens per 64 KiB page


def make(layout="token_major", dtype=torch.float16, B=4, S=1000, page=PAGE, **kw):
    return vattn.KVCache(L, H, D, B, S, dtype=dtype, layout=layout, device="cpu", page_bytes=page, **kw)


def fill(cache, slot, start, end, seed):
    """Writes random tokens [start, end) of slot in every layer (K and V); returns what it wrote."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for layer in range(cache.num_layers):
        k, v = cache.kv(layer)
        kd = torch.randn(end - start, cache.num_kv_heads, cache.head_dim, generator=g).to(cache.dtype)
        vd = torch.randn(end - start, cache.num_kv_heads, cache.head_dim, generator=g).to(cache.dtype)
        k[slot, start:end] = kd
        v[slot, start:end] = vd
        out.append((kd, vd))
    return out


def read(cache, slot, start, end):
    return [
        (k[slot, start:end].clone(), v[slot, start:end].clone())
        for k, v in (cache.kv(i) for i in range(cache.num_layers))
    ]


def same(a, b):
    return all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


def grow(cache, slot, n, seed):
    """A step of n new tokens for slot, written through the views; returns the data."""
    st = cache.begin_step([slot], [n])
    data = fill(cache, slot, st.start[0], st.start[0] + n, seed)
    cache.end_step(st)
    return data


@pytest.mark.parametrize("layout", ["token_major", "layer_major"])
@pytest.mark.parametrize("seed", [0, 1])
def test_data_survives_other_slots(layout, seed):
    cache = make(layout, reclaim_watermark_bytes=2 * PAGE)
    a = cache.alloc()
    keep = grow(cache, a, 300, seed)
    addr = [cache.kv(i)[0][a, 0].data_ptr() for i in range(L)]
    g = torch.Generator().manual_seed(seed + 100)
    live = []
    for it in range(25):
        op = int(torch.randint(0, 4, (1,), generator=g))
        if op == 0 and len(live) < 3:
            live.append(cache.alloc())
        elif op == 1 and live:
            s = live[int(torch.randint(0, len(live), (1,), generator=g))]
            n = int(torch.randint(1, 200, (1,), generator=g))
            if cache.length(s) + n <= cache.max_seq_len:
                grow(cache, s, n, seed * 1000 + it)
        elif op == 2 and live:
            s = live[int(torch.randint(0, len(live), (1,), generator=g))]
            cache.shrink(s, cache.length(s) // 2)
        elif op == 3 and live:
            cache.free(live.pop(0))
        assert same(read(cache, a, 0, 300), keep)
        assert [cache.kv(i)[0][a, 0].data_ptr() for i in range(L)] == addr
    # growing a itself keeps its old tokens and addresses
    more = grow(cache, a, 500, seed + 7)
    assert same(read(cache, a, 0, 300), keep)
    assert same(read(cache, a, 300, 800), more)
    cache.shrink(a, 120)
    assert same(read(cache, a, 0, 120), [(k[:120], v[:120]) for k, v in keep])


@pytest.mark.parametrize("layout", ["token_major", "layer_major"])
def test_memory_really_goes_back(layout):
    cache = make(layout, reclaim_watermark_bytes=0)
    a, b = cache.alloc(), cache.alloc()
    grow(cache, a, 900, 1)
    grow(cache, b, 900, 2)
    full = cache.stats()
    assert full["resident_bytes"] == full["mapped_bytes"] > 0
    cache.shrink(a, 10)
    after_shrink = cache.stats()
    assert after_shrink["resident_bytes"] < full["resident_bytes"]
    assert after_shrink["resident_bytes"] == after_shrink["mapped_bytes"]
    cache.free(b)
    after_free = cache.stats()
    assert after_free["resident_bytes"] == after_free["mapped_bytes"] < after_shrink["mapped_bytes"]
    cache.free(a)
    assert cache.stats()["resident_bytes"] == 0 and cache.stats()["pages_created"] == 0


def test_two_mib_pages_memory_goes_back():
    cache = make("token_major", page=2 * 1024 * KIB, S=4096, reclaim_watermark_bytes=0)
    a = cache.alloc()
    grow(cache, a, 4000, 3)  # 4000 * 768 bytes -> 2 pages of 2 MiB
    assert cache.stats()["resident_bytes"] == 2 * 2 * 1024 * KIB
    cache.shrink(a, 100)
    assert cache.stats()["resident_bytes"] == 2 * 1024 * KIB
    cache.free(a)
    assert cache.stats()["resident_bytes"] == 0


def test_deferred_reclamation_reuses_pages():
    cache = make("token_major", reclaim_watermark_bytes=100 * PAGE)
    a, b = cache.alloc(), cache.alloc()
    grow(cache, a, 100, 1)  # 2 pages
    grow(cache, b, 500, 2)  # 6 pages
    before = cache.stats()
    cache.free(a)
    cache.free(b)
    st = cache.stats()
    assert st["mapped_bytes"] == before["mapped_bytes"]  # kept under the watermark
    assert st["idle_bytes"] == st["mapped_bytes"] and st["used_bytes"] == 0
    c = cache.alloc()
    assert c == b  # the free slot holding the most pages
    creates = st["create_calls"]
    maps = st["map_calls"]
    grow(cache, c, 400, 3)
    st = cache.stats()
    assert st["create_calls"] == creates and st["map_calls"] == maps  # nothing new mapped
    assert cache.length(c) == 400 and cache.lengths[c] == 400


def test_watermark_limits_idle_pages():
    cache = make("token_major", reclaim_watermark_bytes=3 * PAGE)
    slots = [cache.alloc() for _ in range(3)]
    for i, s in enumerate(slots):
        grow(cache, s, 300, i)  # 4 pages each
    for s in slots:
        cache.free(s)
    st = cache.stats()
    assert st["idle_bytes"] <= 3 * PAGE
    assert st["resident_bytes"] == st["physical_bytes"] <= 3 * PAGE


def test_prealloc_pool():
    cache = make("token_major", prealloc_bytes=5 * PAGE, reclaim_watermark_bytes=0)
    st = cache.stats()
    assert st["pages_pooled"] == 5 and st["pages_created"] == 5 and st["mapped_bytes"] == 0
    a = cache.alloc()
    grow(cache, a, 200, 0)  # 3 pages from the pool, nothing created
    st = cache.stats()
    assert st["pages_pooled"] == 2 and st["create_calls"] == 5 and st["pages_mapped"] == 3
    cache.free(a)  # idle = 5 pages <= max(watermark, prealloc): all kept
    assert cache.stats()["pages_created"] == 5


@pytest.mark.parametrize("layout", ["token_major", "layer_major"])
def test_max_physical_bytes(layout):
    # token_major: 85 tokens per page, cap 6 pages; layer_major: 512 tokens per page, cap 2 groups of 6
    cap = 6 * PAGE if layout == "token_major" else 2 * 2 * L * PAGE
    cache = make(layout, max_physical_bytes=cap, reclaim_watermark_bytes=0)
    a, b = cache.alloc(), cache.alloc()
    data = grow(cache, a, 300, 5)
    before = cache.stats()
    with pytest.raises(MemoryError):
        cache.reserve(b, 1000)
    with pytest.raises(MemoryError):
        cache.begin_step([a, b], [1, 999])
    assert isinstance(vattn._C.OutOfMemoryError("x"), MemoryError)
    after = cache.stats()
    for key in ("mapped_bytes", "pages_mapped", "pages_pooled", "pages_created", "used_bytes", "resident_bytes"):
        assert after[key] == before[key], key
    assert same(read(cache, a, 0, 300), data)
    assert cache.length(b) == 0
    # what fits still works, and the failed step left no open step behind
    cache.end_step(cache.begin_step([a, b], [1, 1]))


def test_oom_takes_idle_pages_of_free_slots():
    cache = make("token_major", max_physical_bytes=6 * PAGE, reclaim_watermark_bytes=100 * PAGE)
    a, b = cache.alloc(), cache.alloc()
    grow(cache, a, 250, 1)  # 3 pages
    grow(cache, b, 250, 2)  # 3 pages: cap reached
    cache.free(a)  # a keeps its 3 pages (deferred)
    keep = read(cache, b, 0, 250)
    cache.reserve(b, 500)  # needs 3 more: taken from free slot a
    assert cache.stats()["pages_created"] == 6 and cache.stats()["pages_mapped"] == 6
    assert same(read(cache, b, 0, 250), keep)


@pytest.mark.parametrize("kind", ["create", "map"])
@pytest.mark.parametrize("nth", [1, 2, 4])
@pytest.mark.parametrize("layout", ["token_major", "layer_major"])
def test_injected_failure_rolls_back(kind, nth, layout):
    cache = make(layout, prealloc_bytes=2 * PAGE, reclaim_watermark_bytes=4 * PAGE)
    a, b, c = cache.alloc(), cache.alloc(), cache.alloc()
    data = grow(cache, a, 200, 9)
    grow(cache, c, 150, 10)
    cache.free(c)  # idle pages in a free slot
    before = cache.stats()
    cache._m._inject_failure(kind, nth)
    with pytest.raises(RuntimeError, match="injected"):
        cache.begin_step([a, b], [400, 600])
    after = cache.stats()
    for key in (
        "mapped_bytes",
        "pages_mapped",
        "pages_pooled",
        "pages_created",
        "used_bytes",
        "resident_bytes",
        "idle_bytes",
        "live_mapped_bytes",
    ):
        assert after[key] == before[key], key
    assert [cache.length(s) for s in (a, b)] == [200, 0]
    assert same(read(cache, a, 0, 200), data)
    # the failure is spent: the same step now succeeds
    st = cache.begin_step([a, b], [400, 600])
    cache.end_step(st)
    assert cache.length(a) == 600 and cache.length(b) == 600


def test_injected_failure_while_taking_free_slot_pages():
    cache = make("token_major", max_physical_bytes=6 * PAGE, reclaim_watermark_bytes=100 * PAGE)
    a, b = cache.alloc(), cache.alloc()
    grow(cache, a, 250, 1)
    grow(cache, b, 250, 2)
    cache.free(a)
    before = cache.stats()
    cache._m._inject_failure("map", 2)
    with pytest.raises(RuntimeError, match="injected"):
        cache.reserve(b, 500)
    after = cache.stats()
    for key in ("mapped_bytes", "pages_mapped", "pages_pooled", "pages_created", "idle_bytes"):
        assert after[key] == before[key], key
    assert cache._m.mapped_tokens(a) == before["idle_bytes"] // 768


def test_views_keep_the_cache_alive():
    cache = make("token_major")
    a = cache.alloc()
    data = grow(cache, a, 50, 4)
    k, v = cache.kv(0)
    del cache
    import gc

    gc.collect()
    assert torch.equal(k[a, :50], data[0][0]) and torch.equal(v[a, :50], data[0][1])


def test_several_caches_in_one_process():
    caches = [make(layout, reclaim_watermark_bytes=0) for layout in ("token_major", "layer_major", "token_major")]
    stored = []
    for i, c in enumerate(caches):
        s = c.alloc()
        stored.append((s, grow(c, s, 100 + 50 * i, i)))
    for c, (s, d) in zip(caches, stored):
        assert same(read(c, s, 0, c.length(s)), d)
    caches[0].free(stored[0][0])
    assert caches[0].stats()["mapped_bytes"] == 0 and caches[1].stats()["mapped_bytes"] > 0
