"""Mapping arithmetic, view geometry and Step tensors of vattn.KVCache (host backend)."""

import math

import pytest
import torch

import vattn

KIB = 1024
MIB = 1024 * 1024

GEOMETRIES = {"smollm2": (30, 3, 64), "llama3-8b": (32, 8, 128)}
ELEM = {torch.float16: 2, torch.bfloat16: 2, torch.float32: 4}


def expected_mapped(layout, L, H, D, elem, n, page):
    if layout == "token_major":
        return math.ceil(n * L * 2 * H * D * elem / page) * page
    return 2 * L * math.ceil(n * H * D * elem / page) * page


def make(L, H, D, dtype, layout, page, S=2048, B=2, **kw):
    # _host_commit=False: pages are sparse until touched, so huge geometries cost no memory here.
    return vattn.KVCache(
        L, H, D, B, S, dtype=dtype, layout=layout, device="cpu", page_bytes=page, _host_commit=False, **kw
    )


@pytest.mark.parametrize("geom", sorted(GEOMETRIES))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("layout", ["token_major", "layer_major"])
@pytest.mark.parametrize("page", [64 * KIB, 2 * MIB])
def test_mapped_bytes_after_reserve(geom, dtype, layout, page):
    L, H, D = GEOMETRIES[geom]
    S = 2048
    cache = make(L, H, D, dtype, layout, page, S=S)
    e = ELEM[dtype]
    per_slot_region = math.ceil(S * (L * 2 * H * D * e if layout == "token_major" else H * D * e) / page) * page
    regions = 1 if layout == "token_major" else 2 * L
    st = cache.stats()
    assert st["reserved_bytes"] == 2 * per_slot_region * regions
    assert st["mapped_bytes"] == 0 and st["page_bytes"] == page
    a, b = cache.alloc(), cache.alloc()
    grown = 0
    for n in [0, 1, 15, 16, 17, 333, 1000, 1024, 1025, S]:
        cache.reserve(a, n)
        grown = max(grown, n)
        cache.reserve(b, 7)
        want = expected_mapped(layout, L, H, D, e, grown, page) + expected_mapped(layout, L, H, D, e, 7, page)
        st = cache.stats()
        assert st["mapped_bytes"] == want, (n, st)
        assert st["pages_mapped"] * page == want
        assert st["used_bytes"] == 0  # reserve maps, it stores nothing
    # reserve never shrinks: a smaller request keeps what is mapped
    cache.reserve(a, 1)
    assert cache.stats()["mapped_bytes"] == want


@pytest.mark.parametrize("layout", ["token_major", "layer_major"])
def test_used_bytes_and_shrink_arithmetic(layout):
    L, H, D = GEOMETRIES["smollm2"]
    page = 64 * KIB
    cache = make(L, H, D, torch.float16, layout, page, S=4096, B=3, reclaim_watermark_bytes=0)
    slots = [cache.alloc() for _ in range(3)]
    lens = [700, 1, 2500]
    st = cache.begin_step(slots=slots, new_tokens=lens)
    cache.end_step(st)
    s = cache.stats()
    assert s["used_bytes"] == sum(lens) * L * 2 * H * D * 2
    assert s["mapped_bytes"] == sum(expected_mapped(layout, L, H, D, 2, n, page) for n in lens)
    cache.shrink(slots[2], 100)
    lens[2] = 100
    s = cache.stats()
    assert s["mapped_bytes"] == sum(expected_mapped(layout, L, H, D, 2, n, page) for n in lens)
    assert s["pages_pooled"] == 0  # watermark 0: unmapped pages are destroyed
    assert s["pages_created"] == s["pages_mapped"]


@pytest.mark.parametrize("layout", ["token_major", "layer_major"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_views_geometry(layout, dtype):
    L, H, D, B, S = 3, 2, 16, 3, 100
    page = 64 * KIB
    cache = make(L, H, D, dtype, layout, page, S=S, B=B)
    e = ELEM[dtype]
    seen = set()
    for layer in range(L):
        k, v = cache.kv(layer)
        for t in (k, v):
            assert t.shape == (B, S, H, D) and t.dtype == dtype and t.device.type == "cpu"
            assert t.stride(-1) == 1 and t.stride(2) == D
        if layout == "token_major":
            assert k.stride(1) == L * 2 * H * D
            assert v.data_ptr() - k.data_ptr() == H * D * e
        else:
            assert k.stride(1) == H * D
        assert k.stride(0) * e % page == 0  # slots are padded to whole pages
        # element (slot, token) of every layer's K and V are distinct addresses
        for t in (k, v):
            addr = t[1, 5].data_ptr()
            assert addr not in seen
            seen.add(addr)
        assert cache.kv(layer)[0] is k  # views are built once (addresses never move)
    with pytest.raises(IndexError):
        cache.kv(L)
    with pytest.raises(IndexError):
        cache.kv(-1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_step_tensors(seed):
    g = torch.Generator().manual_seed(seed)
    cache = make(2, 2, 8, torch.float32, "token_major", 64 * KIB, S=64, B=6)
    slots = [cache.alloc() for _ in range(6)]
    order = [slots[i] for i in torch.randperm(6, generator=g).tolist()][:4]
    for s in order:  # give the slots different starting lengths
        n = int(torch.randint(0, 20, (1,), generator=g))
        cache.end_step(cache.begin_step([s], [n]))
    new = [int(x) for x in torch.randint(0, 9, (4,), generator=g)]
    new[0] = max(new[0], 1)
    start = [cache.length(s) for s in order]
    step = cache.begin_step(slots=order, new_tokens=new)
    assert step.slots == order and step.new_tokens == new and step.start == start
    assert step.slot_ids.tolist() == order
    assert step.seqlens.tolist() == [a + n for a, n in zip(start, new)]
    cu = [0]
    for n in new:
        cu.append(cu[-1] + n)
    assert step.cu_seqlens_q.tolist() == cu
    assert step.token_slots.tolist() == [s for s, n in zip(order, new) for _ in range(n)]
    assert step.positions.tolist() == [a + i for a, n in zip(start, new) for i in range(n)]
    for t in (step.slot_ids, step.seqlens, step.cu_seqlens_q, step.token_slots, step.positions):
        assert t.dtype == torch.int32
    assert step.total_new == sum(new) and step.max_seqlen_q == max(new)
    assert step.max_seqlen_k == max(a + n for a, n in zip(start, new))
    assert step.is_decode == all(n == 1 for n in new)
    assert [cache.length(s) for s in order] == start  # begin_step changes no length
    cache.end_step(step)
    assert [cache.length(s) for s in order] == [a + n for a, n in zip(start, new)]
    want = [0] * 6
    for s in slots:
        want[s] = cache.length(s)
    assert cache.lengths.tolist() == want
    dec = cache.begin_step(order, [1] * 4)
    assert dec.is_decode
    cache.end_step(dec)


def test_attributes():
    cache = make(2, 2, 8, torch.bfloat16, "layer_major", 64 * KIB, S=64, B=2)
    assert (cache.num_layers, cache.num_kv_heads, cache.head_dim, cache.max_batch, cache.max_seq_len) == (
        2,
        2,
        8,
        2,
        64,
    )
    assert cache.dtype == torch.bfloat16 and cache.kv_format == "auto" and cache.layout == "layer_major"
    assert cache.device == torch.device("cpu")
    a = cache.alloc()
    assert cache.live_slots() == [a]
    assert cache.lengths.dtype == torch.int32 and cache.lengths.shape == (2,)
    for key in ("reserved_bytes", "mapped_bytes", "used_bytes", "page_bytes", "pages_mapped", "pages_pooled"):
        assert key in cache.stats()


def test_stats_fields_read_as_keys_and_attributes():
    cache = make(2, 2, 16, torch.float32, "token_major", 64 * KIB, S=256)
    slot = cache.alloc()
    cache.reserve(slot, 100)
    st = cache.stats()
    for name in ("reserved_bytes", "mapped_bytes", "used_bytes", "page_bytes", "pages_mapped", "pages_pooled"):
        assert getattr(st, name) == st[name]
    assert st.mapped_bytes == st.pages_mapped * st.page_bytes > 0
    assert isinstance(st, dict) and dict(st) == st
    with pytest.raises(AttributeError, match="no field 'mapped'"):
        st.mapped
    cache.free(slot)
    assert st.mapped_bytes > 0  # a snapshot: the free does not change it


@pytest.mark.parametrize("layout", ["token_major", "layer_major", "head_major"])
@pytest.mark.parametrize("kv_format", ["auto", "int8"])
def test_used_bytes_count_what_each_head_stores_after_compaction(layout, kv_format):
    """used_bytes after compaction with different counts per (layer, kv head): the bytes those
    heads store (it counted every head at the slot's longest, above mapped_bytes in layer_major)."""
    L, H, D = 2, 2, 16
    c = vattn.KVCache(L, H, D, 2, 256, dtype=torch.float32, layout=layout, kv_format=kv_format, device="cpu",
                      page_bytes=4096, reclaim_watermark_bytes=0)  # fmt: skip
    s = c.alloc()
    st = c.begin_step([s], [200])
    for layer in range(L):
        vattn.append_kv(c, layer, st, torch.randn(200, H, D), torch.randn(200, H, D))
    c.end_step(st)
    keep = torch.zeros(1, L, H, 200, dtype=torch.int64)
    lens = torch.tensor([[[200, 10], [5, 5]]])
    for layer in range(L):
        for h in range(H):
            keep[0, layer, h, : lens[0, layer, h]] = torch.arange(int(lens[0, layer, h]))
    c.compact([s], keep, lens)
    assert c.head_lengths(s).tolist() == lens[0].tolist()
    rh = 1 if layout == "head_major" else H  # heads in one record (scales padded per record)
    per_head = sum(f.record_bytes(rh, D) for f in (c.k_format, c.v_format)) // rh
    st = c.stats()
    assert st.used_bytes == int(lens.sum()) * per_head
    assert c.token_bytes == L * H * per_head  # the same share as an uncompacted slot's
    assert st.used_bytes <= st.mapped_bytes


def _rss_shmem():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssShmem:"):
                return int(line.split()[1]) * KIB
    pytest.skip("no RssShmem in /proc/self/status")


def test_committed_pages_are_mapped_with_their_page_table_filled():
    # host_backend.cpp do_map: committed pages are mapped with MAP_POPULATE, so the first writes of
    # an append do not fault one 4 KiB at a time. The page-table entries count in RssShmem at once,
    # before anything touches the memory; uncommitted (sparse) pages stay out until touched.
    for commit, want_in in ((True, True), (False, False)):
        cache = vattn.KVCache(4, 4, 128, 2, 8192, dtype=torch.float32, device="cpu", _host_commit=commit)
        slot = cache.alloc()
        before = _rss_shmem()
        cache.reserve(slot, 8192)  # 4 layers x K|V x 4 x 128 x 4 B x 8192 = 128 MiB
        grown = _rss_shmem() - before
        mapped = cache.stats().mapped_bytes
        assert mapped >= 128 * MIB
        if want_in:
            assert grown >= mapped * 0.9, (grown, mapped)
        else:
            assert grown < mapped * 0.1, (grown, mapped)
        cache.free(slot)
        del cache
