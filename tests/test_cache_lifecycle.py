"""abort_step (a failed forward leaves lengths as they were) and close()."""

import pytest
import torch

import vattn

PAGE = 64 * 1024


def make(**kw):
    return vattn.KVCache(2, 2, 16, 3, 500, dtype=torch.float32, device="cpu", page_bytes=PAGE, **kw)


def test_abort_step_keeps_lengths_and_frees_the_slots_for_a_new_step():
    cache = make()
    a, b = cache.alloc(), cache.alloc()
    cache.end_step(cache.begin_step([a], [7]))
    k, _ = cache.kv(0)
    kept = torch.randn(7, 2, 16)
    k[a, :7] = kept
    step = cache.begin_step([a, b], [5, 3])
    cache.abort_step(step)
    assert cache.length(a) == 7 and cache.length(b) == 0
    assert cache.lengths.tolist()[a] == 7
    assert torch.equal(cache.kv(0)[0][a, :7], kept)
    with pytest.raises(ValueError):
        cache.end_step(step)  # an aborted step cannot be committed
    with pytest.raises(ValueError):
        cache.abort_step(step)
    step = cache.begin_step([a, b], [1, 1])  # the slots are usable again
    assert step.start == [7, 0]
    cache.end_step(step)
    assert cache.length(a) == 8 and cache.length(b) == 1
    cache.free(a)


def test_close_makes_later_calls_fail_and_keeps_existing_views_valid():
    cache = make()
    s = cache.alloc()
    cache.end_step(cache.begin_step([s], [40]))
    k, v = cache.kv(1)
    data = torch.randn(40, 2, 16)
    v[s, :40] = data
    cache.close()
    assert cache.closed
    for call in (cache.alloc, cache.stats, lambda: cache.kv(0), lambda: cache.begin_step([s], [1])):
        with pytest.raises(RuntimeError, match="closed"):
            call()
    # a view taken before close keeps the memory alive until it is dropped
    assert torch.equal(v[s, :40], data)
