"""The background thread keeps the pool filled ahead of demand, creating pages outside the
manager's mutex: the cap still counts every page (pages being created included), a foreground call
never fails for want of pages the thread is still creating, and a step inside the mapped-ahead
range maps nothing itself."""

import threading

import torch

import vattn

KIB = 1024
PAGE = 64 * KIB
L, H, D = 2, 2, 32  # token_major fp16: 512 bytes per token, 128 tokens per page


def make(**kw):
    kw.setdefault("page_bytes", PAGE)
    return vattn.KVCache(L, H, D, 8, 4096, dtype=torch.float16, device="cpu", background=True, **kw)


def test_pool_filled_and_mapped_ahead_without_prealloc():
    cache = make(lookahead_tokens=512)
    slots = [cache.alloc() for _ in range(4)]
    cache.end_step(cache.begin_step(slots, [100] * 4))
    cache.wait_background()
    for s in slots:
        assert cache._m.mapped_tokens(s) >= 100 + 512
    st = cache.stats()
    assert st["pages_pending"] == 0
    # the next steps up to the lookahead need no page: begin_step maps nothing itself
    creates, maps = st["create_calls"], st["map_calls"]
    for _ in range(3):
        cache.end_step(cache.begin_step(slots, [1] * 4))
    cache.wait_background()
    st = cache.stats()
    # whatever was created / mapped since, the thread did it (lookahead moved 3 tokens: <= 1 group a slot)
    assert st["map_calls"] - maps <= 4 and st["create_calls"] - creates <= 4


def test_prealloc_refilled_in_background():
    cache = make(prealloc_bytes=6 * PAGE, reclaim_watermark_bytes=6 * PAGE, lookahead_tokens=0)
    assert cache.stats()["pages_pooled"] == 6
    a = cache.alloc()
    cache.end_step(cache.begin_step([a], [128 * 4]))  # takes 4 pooled pages
    cache.wait_background()
    assert cache.stats()["pages_pooled"] == 6  # topped up by the thread


def test_cap_holds_and_no_spurious_memory_error_under_threads():
    # The cap fits exactly what the requests need; the thread's lookahead wants far more. Every
    # step must still succeed (the thread's pages give way), and the cap is never exceeded.
    cap_pages = 4 * 3
    cache = make(max_physical_bytes=cap_pages * PAGE, lookahead_tokens=2048, reclaim_watermark_bytes=0)
    stop = threading.Event()
    seen = []

    def watch():
        while not stop.is_set():
            st = cache.stats()
            seen.append(st["pages_created"] + st["pages_pending"])

    w = threading.Thread(target=watch)
    w.start()
    errors = []

    def request(i):
        try:
            for _ in range(6):
                s = cache.alloc()
                for n in (100, 100, 100, 84):  # 384 tokens: 3 pages
                    cache.end_step(cache.begin_step([s], [n]))
                cache.free(s)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=request, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    w.join()
    assert not errors, errors
    assert seen and max(seen) <= cap_pages
    cache.wait_background()
    st = cache.stats()
    assert st["pages_created"] <= cap_pages and st["pages_pending"] == 0


def test_injected_create_failure_in_the_thread_is_not_retried_in_a_loop():
    cache = make(lookahead_tokens=1024)
    cache._inject_failure("create", 1)
    a = cache.alloc()
    cache.wait_background()  # returns: the thread stopped trying until the state changed
    cache.end_step(cache.begin_step([a], [10]))
    cache.wait_background()
    assert cache._m.mapped_tokens(a) >= 10 + 1024
