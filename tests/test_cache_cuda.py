"""vattn.KVCache on the CUDA driver backend (gpu-marked: skipped without a device)."""

import math

import pytest
import torch

import vattn

pytestmark = pytest.mark.gpu
L, H, D = 3, 2, 64


def make(layout="token_major", dtype=torch.float16, **kw):
    return vattn.KVCache(L, H, D, 4, 4096, dtype=dtype, layout=layout, device="cuda", **kw)


def fill(cache, slot, start, end, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    out = []
    for layer in range(L):
        k, v = cache.kv(layer)
        kd = torch.randn(end - start, H, D, device="cuda", generator=g).to(cache.dtype)
        vd = torch.randn(end - start, H, D, device="cuda", generator=g).to(cache.dtype)
        k[slot, start:end] = kd
        v[slot, start:end] = vd
        out.append((kd, vd))
    return out


def grow(cache, slot, n, seed):
    st = cache.begin_step([slot], [n])
    d = fill(cache, slot, st.start[0], st.start[0] + n, seed)
    cache.end_step(st)
    return d


def same(cache, slot, data, n):
    return all(
        torch.equal(cache.kv(i)[0][slot, :n], data[i][0][:n]) and torch.equal(cache.kv(i)[1][slot, :n], data[i][1][:n])
        for i in range(L)
    )


def test_granularity_is_queried():
    g = vattn._C.page_granularity(torch.cuda.current_device())
    assert g and g > 0
    cache = make()
    assert cache.stats()["page_bytes"] % g == 0
    assert vattn.info()["page_granularity"]["cuda"][0] == vattn._C.page_granularity(0)


@pytest.mark.parametrize("layout", ["token_major", "layer_major"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mapping_arithmetic_and_views(layout, dtype):
    cache = make(layout, dtype, reclaim_watermark_bytes=0)
    page = cache.stats()["page_bytes"]
    a = cache.alloc()
    for n in [1, 100, 1000, 4096]:
        cache.reserve(a, n)
        vec = H * D * 2
        want = (
            math.ceil(n * 2 * L * vec / page) if layout == "token_major" else 2 * L * math.ceil(n * vec / page)
        ) * page
        assert cache.stats()["mapped_bytes"] == want
    k, v = cache.kv(1)
    assert k.is_cuda and k.dtype == dtype and k.shape == (4, 4096, H, D)


@pytest.mark.parametrize("layout", ["token_major", "layer_major"])
def test_data_survives_and_addresses_stay(layout):
    cache = make(layout, reclaim_watermark_bytes=0)
    a, b = cache.alloc(), cache.alloc()
    keep = grow(cache, a, 3000, 1)
    addr = cache.kv(0)[0][a].data_ptr()
    for i in range(4):
        grow(cache, b, 900, 10 + i)
        cache.shrink(b, 100)
        cache.free(b)
        b = cache.alloc()
        assert same(cache, a, keep, 3000)
        assert cache.kv(0)[0][a].data_ptr() == addr
    torch.cuda.synchronize()


def test_memory_goes_back_and_oom():
    cache = make(reclaim_watermark_bytes=0)
    page = cache.stats()["page_bytes"]
    a = cache.alloc()
    grow(cache, a, 4000, 2)
    full = cache.stats()["resident_bytes"]
    free_before = torch.cuda.mem_get_info()[0]
    cache.shrink(a, 10)
    assert cache.stats()["resident_bytes"] < full
    assert torch.cuda.mem_get_info()[0] > free_before  # the driver got the pages back
    capped = make(max_physical_bytes=2 * page, reclaim_watermark_bytes=0)
    s = capped.alloc()
    d = grow(capped, s, 10, 3)
    before = capped.stats()
    with pytest.raises(MemoryError):
        capped.reserve(s, 4096)
    assert capped.stats() == before
    assert same(capped, s, d, 10)


@pytest.mark.parametrize("kind", ["create", "map"])
def test_injected_failure_rolls_back(kind):
    cache = make(reclaim_watermark_bytes=0)
    a = cache.alloc()
    d = grow(cache, a, 100, 4)
    before = cache.stats()
    cache._m._inject_failure(kind, 2)
    with pytest.raises(RuntimeError, match="injected"):
        cache.reserve(a, 4096)
    after = cache.stats()
    for key in ("mapped_bytes", "pages_created", "pages_pooled", "resident_bytes"):
        assert after[key] == before[key]
    assert same(cache, a, d, 100)


def test_unmap_waits_for_kernels():
    # A long kernel reads pages that shrink then unmaps: the manager synchronizes first.
    cache = make(reclaim_watermark_bytes=0)
    a = cache.alloc()
    grow(cache, a, 4000, 5)
    k, _ = cache.kv(0)
    acc = torch.zeros((), device="cuda", dtype=torch.float32)
    for _ in range(50):
        acc += k[a, :4000].float().sum()
    cache.shrink(a, 0)
    torch.cuda.synchronize()
    assert torch.isfinite(acc)


def test_background_two_caches():
    caches = [make(background=True, lookahead_tokens=256, prealloc_bytes=0) for _ in range(2)]
    data = []
    for i, c in enumerate(caches):
        s = c.alloc()
        data.append((s, grow(c, s, 700 + i, 20 + i)))
    for c, (s, d) in zip(caches, data):
        c.wait_background()
        assert c._m.mapped_tokens(s) >= c.length(s) + 256
        assert same(c, s, d, c.length(s))


def test_cupy_views():
    cupy = pytest.importorskip("cupy")
    cache = make(dtype=torch.float16)
    a = cache.alloc()
    d = grow(cache, a, 50, 6)
    ck, cv = cache.kv(1, like="cupy")
    assert ck.shape == (4, 4096, H, D) and ck.dtype == cupy.float16
    torch.cuda.synchronize()
    back = torch.as_tensor(ck[a, :50], device="cuda")
    assert torch.equal(back, d[1][0])
    cv[a, :50] = 1.5  # writes land in the torch view
    torch.cuda.synchronize()
    assert bool((cache.kv(1)[1][a, :50] == 1.5).all())


def test_ops_on_the_cache():
    cache = make(dtype=torch.bfloat16)
    a = cache.alloc()
    step = cache.begin_step([a], [64])
    k = torch.randn(64, H, D, device="cuda", dtype=torch.bfloat16)
    vattn.append_kv(cache, 0, step, k, k * 2)
    cache.end_step(step)
    assert torch.equal(cache.kv(0)[0][a, :64], k)
    assert cache.lengths.is_cuda and cache.lengths[a].item() == 64


def test_page_size_not_a_power_of_two():
    # cuMemAddressReserve wants a power-of-two alignment; a page of 3 x granularity must still work.
    g = vattn._C.page_granularity(torch.cuda.current_device())
    cache = make(page_bytes=3 * g)
    s = cache.alloc()
    d = grow(cache, s, 700, seed=5)
    assert same(cache, s, d, 700)
    q = torch.randn(1, 2 * H, D, device="cuda", dtype=cache.dtype)
    step = cache.begin_step([s], [1])
    k = torch.randn(1, H, D, device="cuda", dtype=cache.dtype)
    vattn.append_kv(cache, 0, step, k, k)
    out = vattn.attention(q, cache, 0, step)
    cache.end_step(step)
    kc, vc = cache.kv(0)
    from vattn import reference

    ref, _ = reference.attention(
        q.double().cpu(),
        kc[s : s + 1, :701].double().cpu(),
        vc[s : s + 1, :701].double().cpu(),
        torch.tensor([701], dtype=torch.int32),
    )
    assert torch.allclose(out.double().cpu(), ref, atol=2e-2, rtol=0)
