"""Bad inputs to vattn.KVCache give clear exceptions and change nothing."""

import pytest
import torch

import vattn

KIB = 1024


def make(**kw):
    args = dict(dtype=torch.float16, device="cpu", page_bytes=64 * KIB, reclaim_watermark_bytes=0)
    args.update(kw)
    return vattn.KVCache(2, 2, 16, 3, 100, **args)


def snapshot(cache):
    return cache.stats(), cache.lengths.tolist(), cache.live_slots()


@pytest.mark.parametrize(
    "kw, exc",
    [
        (dict(dtype=torch.int32), TypeError),
        (dict(dtype="float16"), TypeError),
        (dict(kv_format="int3"), ValueError),  # no such format
        (dict(layout="paged"), ValueError),
        (dict(device="meta"), ValueError),
        (dict(max_physical_bytes=0), ValueError),
        (dict(max_physical_bytes=-5), ValueError),
        (dict(max_physical_bytes=1000), ValueError),  # smaller than one page
        (dict(page_bytes=1000), ValueError),  # not a multiple of the OS page
        (dict(page_bytes=2**50), ValueError),  # more than the machine's memory: the first step would be OOM-killed
        (dict(prealloc_bytes=-1), ValueError),
        (dict(prealloc_bytes=10 * 64 * KIB, max_physical_bytes=2 * 64 * KIB), ValueError),
        (dict(reclaim_watermark_bytes=-1), ValueError),
        (dict(lookahead_tokens=-1), ValueError),
    ],
)
def test_bad_constructor_options(kw, exc):
    with pytest.raises(exc):
        make(**kw)


@pytest.mark.parametrize(
    "args, exc",
    [
        ((0, 2, 16, 3, 100), ValueError),
        ((2, -1, 16, 3, 100), ValueError),
        ((2, 2, 16, 0, 100), ValueError),
        ((2, 2, 16, 3, -100), ValueError),
        ((2.5, 2, 16, 3, 100), TypeError),
        ((True, 2, 16, 3, 100), TypeError),
    ],
)
def test_bad_geometry(args, exc):
    with pytest.raises(exc):
        vattn.KVCache(*args, dtype=torch.float16, device="cpu")


def test_cuda_without_gpu_is_a_clear_runtime_error():
    if vattn._C.built_with_cuda and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(RuntimeError, match="cuda"):
        vattn.KVCache(2, 2, 16, 3, 100, device="cuda")


def test_slot_errors():
    cache = make()
    a = cache.alloc()
    cache.end_step(cache.begin_step([a], [10]))
    before = snapshot(cache)
    with pytest.raises(IndexError):
        cache.reserve(7, 1)
    with pytest.raises(IndexError):
        cache.free(-1)
    with pytest.raises(ValueError, match="not allocated"):
        cache.reserve(1 if a != 1 else 2, 5)  # never allocated
    with pytest.raises(TypeError):
        cache.reserve("0", 1)
    with pytest.raises(TypeError):
        cache.reserve(a, 1.5)
    with pytest.raises(ValueError):
        cache.reserve(a, 101)
    with pytest.raises(ValueError):
        cache.reserve(a, -1)
    with pytest.raises(ValueError):
        cache.shrink(a, 11)
    with pytest.raises(ValueError):
        cache.shrink(a, -1)
    assert snapshot(cache) == before
    cache.free(a)
    with pytest.raises(ValueError, match="not allocated"):
        cache.free(a)  # double free
    with pytest.raises(ValueError, match="not allocated"):
        cache.begin_step([a], [1])
    with pytest.raises(ValueError):
        cache.shrink(a, 0)


def test_more_slots_than_max_batch():
    cache = make()
    slots = [cache.alloc() for _ in range(3)]
    assert sorted(slots) == [0, 1, 2]
    with pytest.raises(RuntimeError, match="max_batch"):
        cache.alloc()
    cache.free(slots[1])
    assert cache.alloc() == slots[1]


def test_step_errors():
    cache = make()
    a, b = cache.alloc(), cache.alloc()
    cache.end_step(cache.begin_step([a, b], [90, 5]))
    before = snapshot(cache)
    bad = [
        (([a, a], [1, 1]), ValueError),  # slot twice
        (([a, b], [1]), ValueError),  # mismatched lengths
        (([], []), ValueError),
        (([a], [-1]), ValueError),
        (([a, b], [11, 1]), ValueError),  # exceeds max_seq_len
        (([a, 9], [1, 1]), IndexError),
        (([a, 2], [1, 1]), ValueError),  # free slot
        (([a], [1.0]), TypeError),
    ]
    for args, exc in bad:
        with pytest.raises(exc):
            cache.begin_step(*args)
        assert snapshot(cache) == before, args
    step = cache.begin_step([a], [1])
    with pytest.raises(RuntimeError, match="open step"):
        cache.begin_step([b, a], [1, 1])
    with pytest.raises(RuntimeError, match="open step"):
        cache.free(a)
    with pytest.raises(RuntimeError, match="open step"):
        cache.shrink(a, 0)
    cache.end_step(step)
    with pytest.raises(ValueError, match="not open"):
        cache.end_step(step)  # a step ends once
    with pytest.raises(TypeError):
        cache.end_step("step")
    other = make()
    o = other.alloc()
    foreign = other.begin_step([o], [1])
    with pytest.raises(ValueError, match="not open"):
        cache.end_step(foreign)
    assert cache.length(a) == 91


def test_kv_errors():
    cache = make()
    with pytest.raises(IndexError):
        cache.kv(2)
    with pytest.raises(TypeError):
        cache.kv(0.0)
    with pytest.raises(ValueError):
        cache.kv(0, like="jax")
    with pytest.raises(ValueError, match="CUDA"):
        cache.kv(0, like="cupy")


def test_append_kv_checks_through_real_cache():
    cache = make()
    a = cache.alloc()
    step = cache.begin_step([a], [3])
    with pytest.raises(TypeError):
        vattn.append_kv(cache, 0, step, torch.randn(3, 2, 16), torch.randn(3, 2, 16))  # float32 into fp16
    with pytest.raises(ValueError):
        vattn.append_kv(cache, 0, step, torch.randn(4, 2, 16).half(), torch.randn(4, 2, 16).half())
    with pytest.raises((ValueError, IndexError)):
        vattn.append_kv(cache, 5, step, torch.randn(3, 2, 16).half(), torch.randn(3, 2, 16).half())
    k, v = torch.randn(3, 2, 16).half(), torch.randn(3, 2, 16).half()
    vattn.append_kv(cache, 1, step, k, v)
    cache.end_step(step)
    kv = cache.kv(1)
    assert torch.equal(kv[0][a, :3], k) and torch.equal(kv[1][a, :3], v)


def test_out_of_range_indices_are_value_errors_too():
    """Out-of-range slots and layers raise an IndexError that is also a ValueError (the kind of
    every other bad argument), with the range in the message."""
    cache = make()
    for call in (lambda: cache.free(99), lambda: cache.reserve(-1, 4), lambda: cache.kv(7), lambda: cache.length(99)):
        with pytest.raises(ValueError, match="out of range"):
            call()
        with pytest.raises(IndexError):
            call()


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(max_physical_bytes=2**70), "max_physical_bytes"),
        (dict(reclaim_watermark_bytes=2**70), "reclaim_watermark_bytes"),
        (dict(prealloc_bytes=2**64), "prealloc_bytes"),
        (dict(page_bytes=2**64), "page_bytes"),
    ],
)
def test_constructor_sizes_beyond_memory_are_refused(kw, match):
    # prealloc_bytes past the machine's memory was accepted and pre-created: the OOM killer
    with pytest.raises(ValueError, match=match):
        make(**kw)


def test_lookahead_beyond_the_row_is_the_whole_row():
    cache = make(lookahead_tokens=2**64)
    slot = cache.alloc()
    step = cache.begin_step([slot], [3])
    cache.end_step(step)
    assert cache.length(slot) == 3
