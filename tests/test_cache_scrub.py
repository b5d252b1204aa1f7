"""scrub_freed=True: a new request never sees a finished request's bytes, whichever way its pages
come back (the freed slot itself, the pool after shrink, pages stolen from a free slot, the
background thread's lookahead). Without it (the default) the bytes stay, which these tests also
pin down so that the default is a choice, not an accident."""

import pytest
import torch

import vattn

KIB = 1024
PAGE = 64 * KIB
L, H, D = 2, 2, 32  # token_major fp16: 512 bytes per token, 128 tokens per page


def make(scrub, **kw):
    kw.setdefault("page_bytes", PAGE)
    return vattn.KVCache(L, H, D, 3, 1024, dtype=torch.float16, device="cpu", scrub_freed=scrub, **kw)


def write(cache, slot, n, value=7.0):
    step = cache.begin_step([slot], [n])
    for layer in range(L):
        k, v = cache.kv(layer)
        k[slot, step.start[0] : step.start[0] + n] = value
        v[slot, step.start[0] : step.start[0] + n] = value
    cache.end_step(step)


def mapped_bytes_nonzero(cache, slot):
    """Whether any mapped byte of the slot (all layers, K and V) is non-zero."""
    n = cache._m.mapped_tokens(slot)
    return any(bool(t[slot, :n].ne(0).any()) for layer in range(L) for t in cache.kv(layer))


@pytest.mark.parametrize("scrub", [False, True])
def test_reused_slot(scrub):
    cache = make(scrub)
    a = cache.alloc()
    write(cache, a, 300)
    cache.free(a)
    b = cache.alloc()
    assert b == a  # the free slot holding pages is handed out again, pages still mapped
    assert cache._m.mapped_tokens(b) >= 300
    assert mapped_bytes_nonzero(cache, b) == (not scrub)
    assert (cache.stats()["scrubbed_bytes"] > 0) == scrub


@pytest.mark.parametrize("scrub", [False, True])
def test_pages_through_the_pool(scrub):
    cache = make(scrub, reclaim_watermark_bytes=16 * PAGE)
    a, b = cache.alloc(), cache.alloc()
    write(cache, a, 600)
    cache.shrink(a, 0)  # a's pages go to the pool
    assert cache.stats()["pages_pooled"] >= 4
    write(cache, b, 1, 0.0)  # b's first page may come from the pool...
    cache.reserve(b, 600)  # ...and so do the rest
    assert mapped_bytes_nonzero(cache, b) == (not scrub)


@pytest.mark.parametrize("scrub", [False, True])
def test_pages_stolen_from_a_free_slot(scrub):
    # The cap leaves no new pages: b's growth takes the pages a's finished request left mapped.
    cache = make(scrub, max_physical_bytes=5 * PAGE, reclaim_watermark_bytes=16 * PAGE)
    a, b = cache.alloc(), cache.alloc()
    write(cache, a, 5 * 128)
    cache.free(a)
    cache.reserve(b, 5 * 128)
    assert cache.stats()["pages_created"] == 5
    assert mapped_bytes_nonzero(cache, b) == (not scrub)


def test_background_lookahead_pages_are_scrubbed():
    cache = make(True, background=True, lookahead_tokens=400, reclaim_watermark_bytes=16 * PAGE)
    a = cache.alloc()
    write(cache, a, 700)
    cache.shrink(a, 0)
    cache.free(a)
    b, c = cache.alloc(), cache.alloc()
    cache.wait_background()  # maps >= 400 tokens ahead of b and c, partly from a's dirty pages
    for s in (b, c):
        assert cache._m.mapped_tokens(s) >= 400
        assert not mapped_bytes_nonzero(cache, s)


def test_own_data_is_kept_and_steps_work():
    # Scrubbing never touches a live request's tokens.
    cache = make(True, reclaim_watermark_bytes=16 * PAGE)
    a, b = cache.alloc(), cache.alloc()
    write(cache, a, 200, 3.0)
    write(cache, b, 200, 5.0)
    cache.free(b)
    c = cache.alloc()
    write(cache, c, 100, 1.0)
    write(cache, a, 300, 3.0)
    for layer in range(L):
        k, v = cache.kv(layer)
        assert bool((k[a, :500] == 3).all()) and bool((v[a, :500] == 3).all())
        assert bool((k[c, :100] == 1).all())
        assert not bool(k[c, 100 : cache._m.mapped_tokens(c)].ne(0).any())
