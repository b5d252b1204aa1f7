"""pytest-benchmark versions of bench/manager_latency.py: one decode step of the memory manager
(begin_step + end_step) for several live requests, sync and background mapping, and one page
mapped + unmapped. Host (memfd) backend on CPU, CUDA driver backend on GPU. Each checks what the
manager did (lengths, pages mapped), so --benchmark-disable makes them correctness runs."""

import pytest
import torch

import bench_utils as bu

LAYERS, (HQ, HKV, D) = 32, bu.MODELS["llama3-8b"]


def _cache(device, max_batch, max_seq_len, **opts):
    import vattn

    return vattn.KVCache(
        num_layers=LAYERS,
        num_kv_heads=HKV,
        head_dim=D,
        max_batch=max_batch,
        max_seq_len=max_seq_len,
        dtype=torch.bfloat16,
        device=device,
        **opts,
    )


@pytest.mark.parametrize("background", [False, True], ids=["sync", "background"])
@pytest.mark.parametrize("n_live", [1, 16, 64])
@pytest.mark.parametrize("device", bu.devices())
def test_bench_decode_step(bench, device, n_live, background):
    rounds = 40  # benchmark rounds + warm-up stay below this many steps
    prompt = 13
    cache = _cache(device, n_live, prompt + rounds + 16, background=background)
    slots = [cache.alloc() for _ in range(n_live)]
    cache.end_step(cache.begin_step(slots=slots, new_tokens=[prompt] * n_live))
    steps = []

    def one_step():
        if len(steps) >= rounds:  # keep within max_seq_len whatever the plugin's round count
            return
        st = cache.begin_step(slots=slots, new_tokens=[1] * n_live)
        cache.end_step(st)
        steps.append(st)

    bench.benchmark.group = f"manager step {device} {'bg' if background else 'sync'}"
    bench.benchmark.pedantic(one_step, rounds=30, warmup_rounds=2, iterations=1)
    while len(steps) < rounds:  # the rest of the steps (all of them when benchmarks are disabled)
        one_step()
    n = len(steps)
    assert all(cache.length(s) == prompt + n for s in slots)
    assert int(cache.lengths[slots[-1]]) == prompt + n
    tokens_per_page = cache.page_bytes // (LAYERS * 2 * HKV * D * 2)
    pages_per_slot = -(-(prompt + n) // tokens_per_page)
    st = cache.stats()
    assert st["pages_mapped"] >= n_live * pages_per_slot
    assert st["used_bytes"] == n_live * (prompt + n) * LAYERS * 2 * HKV * D * 2


@pytest.mark.parametrize("pooled", [True, False], ids=["pool", "create"])
@pytest.mark.parametrize("device", bu.devices())
def test_bench_map_unmap_page(bench, device, pooled):
    import vattn  # noqa: F401

    probe = _cache(device, 1, 64)
    page = probe.page_bytes
    del probe
    opts = (
        {"prealloc_bytes": 2 * page, "reclaim_watermark_bytes": 4 * page} if pooled else {"reclaim_watermark_bytes": 0}
    )
    cache = _cache(device, 1, 1024, **opts)
    slot = cache.alloc()

    def map_unmap():
        cache.reserve(slot, 1)
        mapped = cache.stats()["pages_mapped"]
        cache.shrink(slot, 0)
        return mapped

    bench.benchmark.group = f"manager page {device}"
    mapped = bench(map_unmap, "cpu")  # host-side latency: nothing to synchronize
    assert mapped == 1  # token_major: one region, so one page holds every layer of the first token
    st = cache.stats()
    assert st["pages_mapped"] == 0
    if pooled:
        assert st["pages_pooled"] >= 1
