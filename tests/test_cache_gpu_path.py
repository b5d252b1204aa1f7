"""Issue 11, "GPU path ready for its first run": the parts that can be checked on CPU (support table,
driver check, views built from the always-mapped guard page), and gpu-marked tests of the same on a
CUDA device (fp32 prefill, views with slot 0 unmapped, event-based unmapping on a side stream,
driver calls from a thread while another captures a CUDA graph)."""

import threading

import pytest
import torch

import vattn
from vattn import _C
from vattn._support import check_cache_supported, supported

L, H, D = 2, 2, 64
KIB = 1024


# ---------------------------------------------------------------- CPU: support table, driver check


def test_fp32_prefill_is_in_the_cuda_support_table():
    # float32 runs through the plain prefill kernel on CUDA, so a float32 CUDA cache can prefill.
    for dim in (64, 128, 96):
        assert supported("prefill", "cuda", torch.float32, dim)
    assert not supported("prefill", "cuda", torch.float32, 257)
    fmt = vattn.formats.resolve("auto", torch.float32)
    check_cache_supported("cuda", torch.float32, fmt[0], fmt[1], 64)  # does not raise


def test_driver_status_fields():
    st = _C.cuda_driver_status()
    assert set(st) >= {"driver_version", "runtime_version", "required_driver_version", "ok", "message"}
    info = vattn.info()
    assert "cuda_driver_ok" in info and "cuda_driver_version" in info
    if _C.built_with_cuda:
        assert st["runtime_version"] == _C.cuda_runtime_version
        assert st["required_driver_version"] == st["runtime_version"] // 1000 * 1000
        assert st["ok"] == (st["driver_version"] >= st["required_driver_version"])
        assert (st["message"] == "") == st["ok"]
        if not st["ok"]:
            assert "driver" in info["cuda_driver_problem"]


def test_cuda_cache_names_the_driver_it_needs(monkeypatch):
    # A driver older than the runtime vattn links statically: the cache says what is needed
    # instead of failing later with "CUDA driver not available".
    msg = (
        "vattn was built with the CUDA 13.0 runtime (linked statically), which needs an NVIDIA driver "
        "supporting CUDA 13.0 or newer (Linux driver 580 or newer); this machine's driver supports CUDA 12.8"
    )
    fake = {"driver_version": 12080, "runtime_version": 13000, "required_driver_version": 13000, "ok": False}
    fake["message"] = msg
    monkeypatch.setattr(_C, "built_with_cuda", True)
    monkeypatch.setattr(_C, "cuda_driver_status", lambda: fake)
    with pytest.raises(RuntimeError, match="Linux driver 580 or newer"):
        vattn.KVCache(L, H, D, 2, 64, dtype=torch.float16, device="cuda")
    info = vattn.info()
    assert info["cuda_driver_ok"] is False and "580" in info["cuda_driver_problem"]


# ---------------------------------------------------------------- CPU: views from the guard page


def _host_cache(**kw):
    return vattn.KVCache(L, H, D, 3, 256, dtype=torch.float16, device="cpu", page_bytes=64 * KIB, **kw)


@pytest.mark.parametrize("layout", ["token_major", "layer_major"])
def test_views_start_at_the_guard_page_not_at_slot_0(layout):
    cache = _host_cache(layout=layout, reclaim_watermark_bytes=0)
    m = cache._m
    for r in range(m.num_regions):
        assert m.region_guard_base(r) == m.region_base(r) - m.guard_bytes
    # slot 0 never used: views build, read as zeros, and point where the layout says
    a, b = cache.alloc(), cache.alloc()
    cache.free(a)  # slot a (0) free, nothing mapped there
    cache.end_step(cache.begin_step([b], [10]))
    k, v = cache.kv(1)
    lv = m.layer_view(1)
    region = cache._region(lv["k_region"])
    assert region.data_ptr() == m.region_guard_base(lv["k_region"])
    assert k.data_ptr() == m.region_base(lv["k_region"]) + lv["k_offset_bytes"]
    assert v.data_ptr() == m.region_base(lv["v_region"]) + lv["v_offset_bytes"]
    assert float(k[0].float().abs().sum()) == 0.0  # unmapped slot 0 reads as zeros
    k[b, :10] = 1.0
    assert bool((cache.kv(1)[0][b, :10] == 1).all())
    # the first bytes of the region tensor are the guard, not slot 0's token 0
    assert float(region[: m.guard_bytes].float().abs().sum()) == 0.0


def test_guard_page_mapped_on_request_host():
    # Device backends map one physical page at every region's guard (map_guard=-1: device only);
    # the host backend can be asked to, which exercises the same create / map / unmap / destroy.
    kw = dict(page_bytes=64 * KIB, reclaim_watermark_bytes=0)
    for layout, regions in (("token_major", 1), ("layer_major", 2 * L)):
        m = _C.CacheManager("host", 0, L, 256, 256, 2, 128, layout, map_guard=1, **kw)
        st = m.stats()
        assert m.guard_mapped and st["guard_bytes"] == 64 * KIB
        assert st["pages_created"] == 0 and st["resident_bytes"] == 64 * KIB  # one page, outside the cap
        assert st["map_calls"] == regions
        buf = torch.frombuffer(m.region_buffer(0), dtype=torch.uint8)
        assert float(buf[: 64 * KIB].float().sum()) == 0.0
        del buf, m
    m = _C.CacheManager("host", 0, L, 256, 256, 2, 128, map_guard=0, **kw)
    assert not m.guard_mapped and m.stats()["guard_bytes"] == 0 and m.stats()["resident_bytes"] == 0


def test_guard_page_counts_nothing_against_the_cap():
    m = _C.CacheManager("host", 0, L, 256, 256, 2, 512, map_guard=1, page_bytes=64 * KIB, max_physical_bytes=64 * KIB)
    a = m.alloc()
    m.reserve([a], [64])  # one page: exactly the cap
    with pytest.raises(MemoryError):
        m.reserve([a], [200])


# ---------------------------------------------------------------- GPU


def _cuda_cache(dtype=torch.float16, **kw):
    return vattn.KVCache(L, H, D, 4, 4096, dtype=dtype, device="cuda", **kw)


@pytest.mark.gpu
def test_fp32_cuda_cache_prefill_and_decode():
    from vattn import reference

    cache = _cuda_cache(torch.float32)
    a = cache.alloc()
    g = torch.Generator(device="cuda").manual_seed(0)
    n = 37
    q = torch.randn(n, 2 * H, D, device="cuda", generator=g)
    k = torch.randn(n, H, D, device="cuda", generator=g)
    v = torch.randn(n, H, D, device="cuda", generator=g)
    step = cache.begin_step([a], [n])
    vattn.append_kv(cache, 0, step, k, v)
    out = vattn.attention(q, cache, 0, step)
    cache.end_step(step)
    ref, _ = reference.attention(
        q.double().cpu(),
        k.double().cpu()[None],
        v.double().cpu()[None],
        torch.tensor([n], dtype=torch.int32),
        cu_seqlens_q=torch.tensor([0, n], dtype=torch.int32),
    )
    torch.testing.assert_close(out.double().cpu(), ref, atol=2e-5, rtol=2e-5)
    # one decode step on top
    step = cache.begin_step([a], [1])
    k1, v1, q1 = (torch.randn(1, hh, D, device="cuda", generator=g) for hh in (H, H, 2 * H))
    vattn.append_kv(cache, 0, step, k1, v1)
    out1 = vattn.attention(q1, cache, 0, step)
    cache.end_step(step)
    kk, vv = torch.cat([k, k1]), torch.cat([v, v1])
    ref1, _ = reference.attention(
        q1.double().cpu(), kk.double().cpu()[None], vv.double().cpu()[None], torch.tensor([n + 1], dtype=torch.int32)
    )
    torch.testing.assert_close(out1.double().cpu(), ref1, atol=2e-5, rtol=2e-5)


@pytest.mark.gpu
def test_cuda_views_with_slot_0_unmapped():
    cache = _cuda_cache(reclaim_watermark_bytes=0)
    assert cache.stats()["guard_bytes"] == cache.page_bytes
    a, b = cache.alloc(), cache.alloc()
    assert a == 0
    cache.end_step(cache.begin_step([b], [100]))
    k, _ = cache.kv(0)  # slot 0 never mapped: building the view must not ask the driver about it
    k[b, :100] = 2.0
    cache.end_step(cache.begin_step([a], [10]))
    cache.free(a)  # and freed (unmapped) again
    cache._regions, cache._views = {}, [None] * L  # rebuild from scratch
    k, _ = cache.kv(0)
    assert bool((k[b, :100] == 2).all())


@pytest.mark.gpu
def test_unmap_waits_for_work_on_a_side_stream():
    cache = _cuda_cache(reclaim_watermark_bytes=0)
    a = cache.alloc()
    cache.end_step(cache.begin_step([a], [4000]))
    k, _ = cache.kv(0)
    k[a, :4000] = 1.0
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    acc = torch.zeros((), device="cuda")
    with torch.cuda.stream(side):
        for _ in range(50):
            acc += k[a, :4000].float().sum()
        cache.shrink(a, 0)  # records an event on `side`, waits for it, unmaps
    torch.cuda.synchronize()
    assert float(acc) == 50 * 4000 * H * D


@pytest.mark.gpu
def test_driver_calls_while_another_thread_captures_a_graph():
    cache = _cuda_cache(background=True, lookahead_tokens=512)
    a = cache.alloc()
    errors = []

    def grow():
        try:
            for n in (300, 1500, 3000):
                cache.reserve(a, n)  # cuMemCreate / cuMemMap / cuMemSetAccess in relaxed capture mode
            cache.wait_background()
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    x = torch.zeros(4, device="cuda")
    g = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(g):  # global capture mode
        x += 1
        t = threading.Thread(target=grow)
        t.start()
        t.join()
        x += 1
    g.replay()
    torch.cuda.synchronize()
    assert not errors, errors
    assert float(x.sum()) == 8.0 and cache._m.mapped_tokens(a) >= 3000
