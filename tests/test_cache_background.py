"""The background mapping thread: two caches at once, several Python threads, same results as
without it, lookahead really mapped, and its pages never cause a MemoryError."""

import threading

import pytest
import torch

import vattn

KIB = 1024
PAGE = 64 * KIB
L, H, D = 3, 2, 32  # token_major fp16: 768 bytes per token


def make(background, layout="token_major", **kw):
    return vattn.KVCache(
        L, H, D, 4, 2000, dtype=torch.float16, layout=layout, device="cpu", page_bytes=PAGE, background=background, **kw
    )


def run_trace(cache, seed, steps=60):
    """Random prefill / decode / shrink / free on a cache, writing through the views. Requests are
    named by arrival order, not by slot: which free slot alloc() hands out depends on the pages
    each free slot still holds, which background mapping changes. Returns {request: (slot, data)}
    for the live requests at the end, and their lengths."""
    g = torch.Generator().manual_seed(seed)
    data = {}  # request id -> list of 2L tensors
    slot_of = {}
    next_id = 0
    for i in range(steps):
        live = sorted(data)
        r = float(torch.rand(1, generator=g))
        if (r < 0.2 or not live) and len(live) < cache.max_batch:
            slot_of[next_id] = cache.alloc()
            data[next_id] = [torch.empty(0, H, D, dtype=cache.dtype) for _ in range(2 * L)]
            next_id += 1
            continue
        if r < 0.3 and live:
            q = live[int(torch.randint(0, len(live), (1,), generator=g))]
            n = cache.length(slot_of[q]) // 2
            cache.shrink(slot_of[q], n)
            data[q] = [t[:n] for t in data[q]]
            continue
        if r < 0.35 and live:
            q = live[0]
            cache.free(slot_of.pop(q))
            del data[q]
            continue
        slots = [slot_of[q] for q in live]
        new = [
            int(torch.randint(1, 4, (1,), generator=g)) if i % 3 else int(torch.randint(1, 120, (1,), generator=g))
            for _ in slots
        ]
        new = [min(n, cache.max_seq_len - cache.length(s)) for s, n in zip(slots, new)]
        step = cache.begin_step(slots, new)
        for q, s, a, n in zip(live, slots, step.start, new):
            for layer in range(L):
                k, v = cache.kv(layer)
                kd = torch.randn(n, H, D, generator=g).to(cache.dtype)
                vd = torch.randn(n, H, D, generator=g).to(cache.dtype)
                k[s, a : a + n] = kd
                v[s, a : a + n] = vd
                data[q][2 * layer] = torch.cat([data[q][2 * layer], kd])
                data[q][2 * layer + 1] = torch.cat([data[q][2 * layer + 1], vd])
        cache.end_step(step)
    lengths = {q: cache.length(slot_of[q]) for q in data}
    return {q: (slot_of[q], ts) for q, ts in data.items()}, lengths


def check(cache, data):
    for s, ts in data.values():
        for layer in range(L):
            k, v = cache.kv(layer)
            n = cache.length(s)
            assert torch.equal(k[s, :n], ts[2 * layer]) and torch.equal(v[s, :n], ts[2 * layer + 1])


@pytest.mark.parametrize("layout", ["token_major", "layer_major"])
def test_two_caches_background_same_results(layout):
    results = {}

    def worker(name, bg, seed):
        cache = make(bg, layout, lookahead_tokens=200, prealloc_bytes=4 * PAGE, reclaim_watermark_bytes=8 * PAGE)
        data, lengths = run_trace(cache, seed)
        check(cache, data)
        cache.wait_background()
        results[name] = (lengths, {q: [t.clone() for t in ts] for q, (_, ts) in data.items()}, cache.stats(), cache)

    threads = [threading.Thread(target=worker, args=(f"bg{i}", True, i)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(2):
        worker(f"sync{i}", False, i)
    for i in range(2):
        lb, db, sb, cb = results[f"bg{i}"]
        ls, ds, ss, cs = results[f"sync{i}"]
        assert lb == ls and sb["used_bytes"] == ss["used_bytes"]
        assert db.keys() == ds.keys()
        for s in db:
            assert all(torch.equal(x, y) for x, y in zip(db[s], ds[s]))
        # the thread mapped ahead: every live slot holds >= length + lookahead tokens
        for s in cb.live_slots():
            assert cb._m.mapped_tokens(s) >= min(cb.max_seq_len, cb.length(s) + 200)
        assert sb["live_mapped_bytes"] >= ss["live_mapped_bytes"]


def test_background_refills_pool_and_maps_ahead():
    cache = make(True, lookahead_tokens=300, prealloc_bytes=3 * PAGE, reclaim_watermark_bytes=3 * PAGE)
    cache.wait_background()
    assert cache.stats()["pages_pooled"] == 3
    a = cache.alloc()
    cache.wait_background()
    assert cache._m.mapped_tokens(a) >= 300
    cache.end_step(cache.begin_step([a], [500]))
    cache.wait_background()
    assert cache._m.mapped_tokens(a) >= 800
    assert cache.stats()["pages_pooled"] == 3  # topped up again


def test_background_pages_never_cause_memory_error():
    # The cap fits exactly what the trace needs; lookahead pages must give way.
    cap = 6 * PAGE
    cache = make(True, lookahead_tokens=2000, max_physical_bytes=cap, reclaim_watermark_bytes=0)
    a, b = cache.alloc(), cache.alloc()
    cache.wait_background()
    assert cache.stats()["pages_created"] <= 6
    cache.end_step(cache.begin_step([a], [250]))  # 3 pages
    cache.end_step(cache.begin_step([b], [250]))  # 3 pages: the cap, a's lookahead had to go
    assert cache.stats()["pages_mapped"] == 6
    with pytest.raises(MemoryError):
        cache.begin_step([a], [100])
    cache.free(a)
    cache.end_step(cache.begin_step([b], [250]))


def test_close_with_busy_thread():
    for _ in range(5):
        cache = make(True, lookahead_tokens=2000, prealloc_bytes=10 * PAGE, reclaim_watermark_bytes=10 * PAGE)
        for _ in range(4):
            cache.alloc()
        del cache  # joins the thread while it may still be mapping
