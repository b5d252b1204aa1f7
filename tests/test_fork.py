"""Prefix sharing by aliasing physical pages (issue 13): KVCache.fork / share_prefix map a request's
full pages into another slot instead of copying them, pages are reference-counted by their
mappings, and every write below a slot's end (appends after shrink, compaction) first gives the
writer a private copy.

The strongest check is a replay: random sequences of appends, forks, prefix shares, shrinks,
compactions and frees run on one cache, and every live slot must then hold exactly what a fresh
cache holds after replaying that slot's own history (its ancestors' operations up to each fork,
then its own) with no sharing at all. Memory is measured (mapped / resident bytes), not inferred."""

from __future__ import annotations

import random

import pytest
import torch

import vattn

L, H, D = 2, 2, 64
PAGE = 4096


def make(layout="token_major", kv_format="auto", device="cpu", max_batch=6, max_seq_len=512, **kw):
    if device == "cpu":
        kw.setdefault("page_bytes", PAGE)
    kw.setdefault("reclaim_watermark_bytes", 0)
    return vattn.KVCache(
        num_layers=L,
        num_kv_heads=H,
        head_dim=D,
        max_batch=max_batch,
        max_seq_len=max_seq_len,
        dtype=torch.float32,
        kv_format=kv_format,
        layout=layout,
        device=device,
        **kw,
    )


def append(cache, slot, kvs):
    """One step of len(kvs[0][0]) tokens for slot; kvs: per layer (k, v)."""
    n = kvs[0][0].shape[0]
    st = cache.begin_step([slot], [n])
    for layer, (k, v) in enumerate(kvs):
        vattn.append_kv(cache, layer, st, k.to(cache.device), v.to(cache.device))
    cache.end_step(st)


def chunk(rng: torch.Generator, n: int):
    return [(torch.randn(n, H, D, generator=rng), torch.randn(n, H, D, generator=rng)) for _ in range(L)]


def content(cache, slot):
    """What a slot stores: per-(layer, head) lengths, position, and the dequantized K / V of every
    head up to its own length."""
    heads = cache.head_lengths(slot)
    out = {"heads": heads.clone(), "position": cache.position(slot), "length": cache.length(slot), "kv": []}
    for layer in range(L):
        k, v = cache.kv(layer, dequantize=True)
        for h in range(H):
            n = int(heads[layer, h])
            out["kv"].append((k[slot, :n, h].cpu().clone(), v[slot, :n, h].cpu().clone()))
    return out


def assert_same_content(got, want, what):
    assert torch.equal(got["heads"], want["heads"]), f"{what}: head lengths {got['heads']} != {want['heads']}"
    assert got["position"] == want["position"] and got["length"] == want["length"], what
    for i, ((kg, vg), (kw, vw)) in enumerate(zip(got["kv"], want["kv"])):
        assert torch.equal(kg, kw), f"{what}: K of (layer, head) #{i} differs"
        assert torch.equal(vg, vw), f"{what}: V of (layer, head) #{i} differs"


def random_keep(r: random.Random, heads: torch.Tensor):
    """A random compaction of each (layer, head): keep a random subset (order preserved)."""
    kmax = int(heads.max())
    keep = torch.zeros((1, L, H, max(kmax, 1)), dtype=torch.int64)
    lens = torch.zeros((1, L, H), dtype=torch.int64)
    for layer in range(L):
        for h in range(H):
            n = int(heads[layer, h])
            m = r.randint(0, n)
            idx = sorted(r.sample(range(n), m))
            keep[0, layer, h, :m] = torch.tensor(idx, dtype=torch.int64)
            lens[0, layer, h] = m
    return keep, lens


def replay(history, layout, kv_format, device, max_seq_len=512):
    c = make(layout, kv_format, device=device, max_batch=1, max_seq_len=max_seq_len)
    s = c.alloc()
    for op in history:
        if op[0] == "append":
            append(c, s, op[1])
        elif op[0] == "shrink":
            c.shrink(s, op[1])
        elif op[0] == "compact":
            c.compact([s], op[1], op[2])
    out = content(c, s)
    c.close()
    return out


@pytest.mark.parametrize("layout", ["token_major", "layer_major", "head_major"])
@pytest.mark.parametrize("kv_format", ["auto", "fp8_e4m3", "int8", "int4"])
@pytest.mark.parametrize("seed", range(4))
def test_random_sharing_matches_replay(layout, kv_format, seed):
    _random_sharing(layout, kv_format, seed, {})


@pytest.mark.parametrize(
    "options",
    [
        dict(background=True, lookahead_tokens=64),
        dict(scrub_freed=True),
        dict(reclaim_watermark_bytes=1 << 20, max_physical_bytes=1 << 20),
    ],
    ids=["background", "scrub", "watermark-cap"],
)
@pytest.mark.parametrize("kv_format", ["auto", "int4"])
def test_random_sharing_with_manager_options(options, kv_format):
    _random_sharing("token_major", kv_format, 11, dict(options))


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["token_major", "layer_major", "head_major"])
@pytest.mark.parametrize("kv_format", ["auto", "int8", "int4"])
def test_random_sharing_matches_replay_cuda(layout, kv_format):
    """The same on the CUDA driver backend: one physical page cuMemMap-ed at several addresses,
    copies with cuMemcpyDtoDAsync; pages of the device granularity (2 MiB, 1000-4000 tokens of these
    rows), so rows are longer."""
    _random_sharing(layout, kv_format, 21, {}, device="cuda", scale=24)


def _random_sharing(layout, kv_format, seed, options, device="cpu", scale=1):
    r = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    c = make(layout, kv_format, device=device, max_seq_len=512 * scale, **options)
    hist = {}
    s = c.alloc()
    hist[s] = []
    for _ in range(24):
        live = list(hist)
        op = r.choice(["append", "append", "fork", "share", "shrink", "compact", "free"])
        s = r.choice(live)
        n = c.length(s)
        if op == "append" and n < 400 * scale:
            kv = chunk(g, r.choice([1, 1, 3, 17, 40]) * (1 if r.random() < 0.5 else scale))
            append(c, s, kv)
            hist[s].append(("append", kv))
        elif op == "fork" and len(live) < c.max_batch:
            t = c.fork(s)
            hist[t] = list(hist[s])
        elif op == "share" and len(live) < c.max_batch and all(o[0] != "compact" for o in hist[s]):
            if c.position(s) != n:
                continue
            m = r.randint(0, n)
            t = c.alloc()
            c.share_prefix(s, t, m)
            hist[t] = list(hist[s]) + [("shrink", m)]
        elif op == "shrink" and n:
            m = r.randint(0, n)
            c.shrink(s, m)
            hist[s].append(("shrink", m))
        elif op == "compact" and n:
            keep, lens = random_keep(r, c.head_lengths(s))
            c.compact([s], keep, lens)
            hist[s].append(("compact", keep, lens))
        elif op == "free" and len(live) > 1:
            c.free(s)
            del hist[s]
        for t, h in hist.items():
            want = replay(h, layout, kv_format, device, 512 * scale)
            assert_same_content(content(c, t), want, f"slot {t} after {op}")
    st = c.stats()
    assert st["pages_mapped"] * st["page_bytes"] == st["mapped_bytes"]
    c.wait_background()
    for t in list(hist):
        c.free(t)
    st = c.stats()
    assert st["pages_shared"] == 0 and st["shared_mappings"] == 0 and st["live_mapped_bytes"] == 0
    c.close()


def test_fork_shares_full_pages_and_copies_the_last():
    c = make(kv_format="auto")
    g = torch.Generator().manual_seed(0)
    a = c.alloc()
    append(c, a, chunk(g, 101))
    tok = c.token_bytes
    before = c.stats()
    b = c.fork(a)
    after = c.stats()
    full = 101 * tok // PAGE  # pages wholly inside the 101 tokens
    total = -(-101 * tok // PAGE)
    assert c.shared_pages(a) == c.shared_pages(b) == full == after["pages_shared"]
    assert after["shared_mappings"] == full
    # Physical memory grows by the copied partial page only, measured by the host backend.
    assert after["mapped_bytes"] - before["mapped_bytes"] == (total - full) * PAGE
    assert after["resident_bytes"] - before["resident_bytes"] == (total - full) * PAGE
    assert_same_content(content(c, b), content(c, a), "fork")
    # The fork attends exactly like its source.
    q = torch.randn(2, 2 * H, D, generator=g)
    st = c.begin_step([a, b], [1, 1])
    outs = []
    kv = chunk(g, 1)
    for layer in range(L):
        k, v = kv[layer]
        vattn.append_kv(c, layer, st, torch.cat([k, k]), torch.cat([v, v]))
        outs.append(vattn.attention(q[[0, 0]], c, layer, st))
    c.end_step(st)
    for o in outs:
        assert torch.equal(o[0], o[1])
    # Freeing one keeps the other intact; pages go only with their last mapping.
    want = content(c, b)
    c.free(a)
    assert c.stats()["pages_shared"] == 0 and c.shared_pages(b) == 0
    assert_same_content(content(c, b), want, "after freeing the source")
    c.free(b)
    assert c.stats()["live_mapped_bytes"] == 0
    c.close()


def test_share_prefix_on_page_boundary_copies_nothing():
    c = make(kv_format="auto")
    g = torch.Generator().manual_seed(1)
    a = c.alloc()
    append(c, a, chunk(g, 200))
    per_page = PAGE // c.token_bytes
    n = 3 * per_page
    d = c.alloc()
    before = c.stats()
    c.share_prefix(a, d, n)
    after = c.stats()
    assert after["mapped_bytes"] == before["mapped_bytes"]  # three whole shared pages, no copy
    assert c.shared_pages(d) == 3 and c.length(d) == n and c.position(d) == n
    append(c, d, chunk(g, 5))  # lands on a fresh page of d's own
    assert c.shared_pages(d) == 3
    k0, _ = c.kv(0)
    assert torch.equal(k0[d, :n], k0[a, :n])


def test_share_prefix_refusals():
    c = make()
    g = torch.Generator().manual_seed(2)
    a, b = c.alloc(), c.alloc()
    append(c, a, chunk(g, 50))
    append(c, b, chunk(g, 3))
    free = c.alloc()
    with pytest.raises(ValueError, match="must be empty"):
        c.share_prefix(a, b, 10)
    with pytest.raises(ValueError, match="must be in"):
        c.share_prefix(a, free, 51)
    with pytest.raises(ValueError, match="same slot"):
        c.share_prefix(a, a, 1)
    keep = torch.arange(50).repeat(1, L, H, 1)
    lens = torch.full((1, L, H), 40)
    c.compact([a], keep, lens)
    with pytest.raises(ValueError, match="compacted"):
        c.share_prefix(a, free, 10)
    st = c.begin_step([a], [1])
    with pytest.raises(RuntimeError, match="open step"):
        c.fork(a)
    c.abort_step(st)
    assert c.length(free) == 0 and c.shared_pages(free) == 0


def test_fork_out_of_memory_leaves_nothing_behind():
    tok_pages = 3
    c = make(max_physical_bytes=PAGE * 8)
    g = torch.Generator().manual_seed(3)
    a = c.alloc()
    n = (tok_pages * PAGE) // c.token_bytes + 1  # 3 full pages and a partial one
    append(c, a, chunk(g, n))
    b = c.alloc()
    append(c, b, chunk(g, n))  # 8 pages in use: nothing left for the copy of a's partial page
    want = content(c, a)
    before = c.stats()
    live = sorted(c.live_slots())
    with pytest.raises(MemoryError):
        c.fork(a)
    assert sorted(c.live_slots()) == live
    after = c.stats()
    assert after["mapped_bytes"] == before["mapped_bytes"] and after["pages_shared"] == 0
    assert_same_content(content(c, a), want, "source after a failed fork")
    c.free(b)
    t = c.fork(a)  # now it fits
    assert_same_content(content(c, t), want, "fork")


@pytest.mark.parametrize("layout", ["token_major", "layer_major", "head_major"])
def test_fork_map_failure_leaves_nothing_behind(layout):
    c = make(layout)
    g = torch.Generator().manual_seed(4)
    a = c.alloc()
    append(c, a, chunk(g, 150))
    want = content(c, a)
    before = c.stats()
    c._inject_failure("map", 2)
    with pytest.raises(RuntimeError, match="injected"):
        c.fork(a)
    c._inject_failure("none", 0)
    assert c.live_slots() == [a]
    after = c.stats()
    assert after["mapped_bytes"] == before["mapped_bytes"] and after["shared_mappings"] == 0
    assert_same_content(content(c, a), want, "source after a failed fork")


def test_copy_on_write_failure_keeps_both_slots():
    """A write below the end of a shared slot needs a private page; without memory the step fails
    with MemoryError and both slots still hold what they held."""
    c = make(max_physical_bytes=PAGE * 6)
    g = torch.Generator().manual_seed(5)
    a = c.alloc()
    n = 4 * PAGE // c.token_bytes
    append(c, a, chunk(g, n))  # 4 full pages
    b = c.fork(a)  # shares all 4
    c.shrink(b, 1)  # b keeps page 0 (shared); its next token lands inside it
    filler = c.alloc()
    append(c, filler, chunk(g, 2 * PAGE // c.token_bytes))  # the last 2 pages of the budget
    want_a, want_b = content(c, a), content(c, b)
    with pytest.raises(MemoryError):
        c.begin_step([b], [1])
    assert_same_content(content(c, a), want_a, "a")
    assert_same_content(content(c, b), want_b, "b")
    c.free(filler)
    append(c, b, chunk(g, 1))  # now b gets its private copy of page 0
    assert c.shared_pages(b) == 0
    assert_same_content(content(c, a), want_a, "a after b's copy-on-write")


def sharing_state(c, slots):
    st = c.stats()
    return (
        st["mapped_bytes"],
        st["pages_shared"],
        st["shared_mappings"],
        st["pages_pooled"],
        [c.shared_pages(s) for s in slots],
    )


def test_copy_on_write_then_growth_out_of_memory_changes_nothing():
    """A step on a shared slot copies a page and maps new ones: with room for the copy but not for
    the growth, the step fails before the copy, so pages, sharing and data stay as they were."""
    c = make(max_physical_bytes=PAGE * 6)
    g = torch.Generator().manual_seed(7)
    a = c.alloc()
    per_page = PAGE // c.token_bytes
    append(c, a, chunk(g, 3 * per_page))  # 3 full pages
    b = c.fork(a)  # shares all 3
    c.shrink(b, per_page + 1)  # b keeps pages 0 and 1 (shared); its next token lands in page 1
    want_a, want_b = content(c, a), content(c, b)
    before = sharing_state(c, [a, b])
    assert before[4] == [2, 2]
    # 3 pages are free: one for the copy of page 1, and 4 new pages would be needed beyond it
    with pytest.raises(MemoryError):
        c.begin_step([b], [4 * per_page])
    assert sharing_state(c, [a, b]) == before
    assert_same_content(content(c, a), want_a, "a")
    assert_same_content(content(c, b), want_b, "b")
    append(c, b, chunk(g, 2 * per_page))  # the copy and 1 new page fit (pages 1-2 of 3)
    assert c.shared_pages(b) == 1 and c.shared_pages(a) == 1
    assert_same_content(content(c, a), want_a, "a after b's copy-on-write")


def test_compacting_two_forks_out_of_memory_changes_nothing():
    """Compacting two forks of one request copies the pages each rewrites; with room for one
    fork's copies only, the call fails before the first copy."""
    c = make(max_physical_bytes=PAGE * 8)
    g = torch.Generator().manual_seed(8)
    a = c.alloc()
    n = 4 * PAGE // c.token_bytes
    append(c, a, chunk(g, n))  # 4 full pages; 4 left
    b, d = c.fork(a), c.fork(a)  # each page now has three mappings
    keep = torch.arange(1, n).expand(2, L, H, n - 1).contiguous()  # drop token 0: every page rewritten
    lens = torch.full((2, L, H), n - 1, dtype=torch.int64)
    want = {s: content(c, s) for s in (a, b, d)}
    before = sharing_state(c, [a, b, d])
    with pytest.raises(MemoryError):
        c.compact([b, d], keep, lens)  # 4 copies each: 8 > 4
    assert sharing_state(c, [a, b, d]) == before
    for s in (a, b, d):
        assert_same_content(content(c, s), want[s], f"slot {s}")
    c.compact([b], keep[:1], lens[:1])  # one fork's copies fit
    assert c.shared_pages(b) == 0 and c.length(b) == n - 1
    assert_same_content(content(c, a), want[a], "a after b's compaction")


def test_compaction_of_a_fork_leaves_the_source_alone():
    c = make(layout="layer_major", kv_format="int8")
    g = torch.Generator().manual_seed(6)
    a = c.alloc()
    append(c, a, chunk(g, 300))
    b = c.fork(a)
    want = content(c, a)
    keep = torch.arange(300)[::3].repeat(1, L, H, 1)
    lens = torch.full((1, L, H), 100)
    c.compact([b], keep, lens)
    assert_same_content(content(c, a), want, "source after the fork's compaction")
    assert c.length(b) == 100 and c.position(b) == 300
    for layer in range(L):
        kk, vv = c.kv(layer, dequantize=True)
        for h in range(H):
            ka, va = want["kv"][layer * H + h]
            assert torch.equal(kk[b, :100, h], ka[::3][:100])
            assert torch.equal(vv[b, :100, h], va[::3][:100])


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["token_major", "layer_major", "head_major"])
def test_fork_on_cuda(layout):
    # int8 rows of 2 kv heads x 64: 2 MiB device pages hold ~3900 tokens (token_major, all layers)
    # or ~15400 (layer_major, one region): enough tokens for whole pages to share.
    n = 6000 if layout == "token_major" else 20000
    c = make(layout, "int8", device="cuda", max_seq_len=24576)
    g = torch.Generator().manual_seed(7)
    a = c.alloc()
    append(c, a, chunk(g, n))
    before = c.stats()
    b = c.fork(a)
    after = c.stats()
    assert after["pages_shared"] > 0
    assert after["mapped_bytes"] - before["mapped_bytes"] <= c.stats()["page_bytes"] * len(c._m.region_pages(a))
    assert_same_content(content(c, b), content(c, a), "cuda fork")
    want = content(c, a)
    c.shrink(b, 10)
    append(c, b, chunk(g, 30))
    append(c, a, chunk(g, 1))
    torch.cuda.synchronize()
    got = content(c, a)
    for (kg, vg), (kw, vw) in zip(got["kv"], want["kv"]):
        assert torch.equal(kg[:n], kw) and torch.equal(vg[:n], vw)
    c.free(a)
    c.free(b)
    assert c.stats()["pages_shared"] == 0
    c.close()


@pytest.mark.parametrize("layout", ["token_major", "layer_major"])
def test_begin_step_with_a_dead_slot_copies_no_shared_page(layout):
    """begin_step checks every slot is live before the copy-on-write of a forked slot's shared
    pages, so a step refused for another slot leaves the fork's pages shared."""
    c = vattn.KVCache(2, 2, 16, 4, 256, dtype=torch.float32, layout=layout, device="cpu", page_bytes=4096)
    a = c.alloc()
    st = c.begin_step([a], [40])
    for layer in range(2):
        vattn.append_kv(c, layer, st, torch.randn(40, 2, 16), torch.randn(40, 2, 16))
    c.end_step(st)
    f = c.fork(a)
    c.shrink(f, 3)
    before = c.stats()
    assert before["pages_shared"] > 0
    with pytest.raises(ValueError, match="slot 3 is not allocated"):
        c.begin_step([f, 3], [1, 1])
    assert c.stats() == before
    st = c.begin_step([f], [1])  # the fork still steps (and copies now)
    c.end_step(st)
    assert c.length(f) == 4


def test_fork_out_of_memory_keeps_the_free_slots_pages():
    """A fork refused for memory leaves every page where it was: the free slot it would fork into
    kept its idle pages mapped (they went to the pool before the copies were found missing)."""
    L, H, D = 2, 1, 16
    c = vattn.KVCache(L, H, D, 2, 256, dtype=torch.float32, layout="layer_major", device="cpu",
                      page_bytes=4096, max_physical_bytes=10 * 4096)  # fmt: skip

    def fill(s, n):
        st = c.begin_step([s], [n])
        for layer in range(L):
            vattn.append_kv(c, layer, st, torch.randn(n, H, D), torch.randn(n, H, D))
        c.end_step(st)

    b = c.alloc()
    fill(b, 10)
    keep = torch.zeros(1, L, H, 10, dtype=torch.int64)
    keep[0, 0, 0] = torch.arange(10)
    c.compact([b], keep, torch.tensor([[[10], [0]]]))  # layer 1 keeps nothing: b maps 2 pages
    a = c.alloc()
    fill(a, 70)  # 8 pages: 10 in all, the cap
    c.free(b)  # b's 2 pages stay idle
    before = c.stats()
    with pytest.raises(vattn.OutOfMemoryError, match="4 pages"):
        c.fork(a)  # 4 partly filled pages to copy, 2 to be had
    after = c.stats()
    for key in ("mapped_bytes", "pages_mapped", "pages_pooled", "pages_created", "idle_bytes"):
        assert after[key] == before[key], key


@pytest.mark.parametrize("layout", ["token_major", "layer_major"])
def test_compacting_a_fork_copies_only_the_pages_it_keeps(layout):
    """compact() on a forked slot copies the shared pages its kept tokens are written to, not every
    shared page past the first moved token (which it drops right after): under a cap with one page
    of headroom it succeeds, and the source keeps its tokens."""
    H, D = 1, 16
    n = 320  # 10 full pages: one region of 128-byte tokens (token_major), or 5 in each of K and V
    c = vattn.KVCache(1, H, D, 2, 1024, dtype=torch.float32, layout=layout, device="cpu", page_bytes=4096,
                      max_physical_bytes=(10 + 2) * 4096)  # fmt: skip
    a = c.alloc()
    st = c.begin_step([a], [n])
    k, v = torch.randn(n, H, D), torch.randn(n, H, D)
    vattn.append_kv(c, 0, st, k, v)
    c.end_step(st)
    b = c.fork(a)
    created = c.stats()["create_calls"]
    c.compact([b], torch.tensor([[[[1, 2]]]]), torch.tensor([[[2]]]))
    assert c.stats()["create_calls"] - created <= (1 if layout == "token_major" else 2)
    K, V = c.kv(0)
    assert torch.equal(K[b, :2, 0], k[1:3, 0]) and torch.equal(V[b, :2, 0], v[1:3, 0])
    assert torch.equal(K[a, :n], k) and torch.equal(V[a, :n], v)


# ----------------------------------------------------------------------------- failures inside a call
# A page creation or map that fails part-way (KVCache._inject_failure; on CUDA a failing cuMemCreate /
# cuMemMap) must leave the cache exactly as it was: pages, sharing, the pool, and what slots store.

EVENTS = {"map_calls", "unmap_calls", "create_calls", "destroy_calls", "peak_mapped_bytes", "resident_bytes"}


def whole_state(c):
    live = sorted(c.live_slots())
    stats = {k: v for k, v in c.stats().items() if k not in EVENTS}
    return stats, live, [c.shared_pages(s) for s in live], [content(c, s) for s in live]


def assert_same_state(got, want):
    assert got[0] == want[0], {k: (want[0][k], got[0][k]) for k in want[0] if want[0][k] != got[0].get(k)}
    assert got[1] == want[1] and got[2] == want[2]
    for s, g, w in zip(got[1], got[3], want[3]):
        assert_same_content(g, w, f"slot {s}")


def _failing(c, kind, n, call):
    want = whole_state(c)
    c._inject_failure(kind, n)
    try:
        with pytest.raises(RuntimeError, match="injected"):
            call()
    finally:
        c._inject_failure("none", 0)
    assert_same_state(whole_state(c), want)


def _prompt(c, g, n):
    s = c.alloc()
    append(c, s, chunk(g, n))
    return s


def test_failed_share_prefix_keeps_the_reserved_pages_of_its_destination():
    c = make(max_physical_bytes=PAGE * 64)
    g = torch.Generator().manual_seed(9)
    per_page = PAGE // c.token_bytes
    a = _prompt(c, g, 2 * per_page + per_page // 2)  # 2 full pages and a partial one (copied)
    d = c.alloc()
    c.reserve(d, 4 * per_page)  # d stores nothing, maps 4 pages
    _failing(c, "map", 1, lambda: c.share_prefix(a, d, c.length(a)))
    c.share_prefix(a, d, c.length(a))
    assert_same_content(content(c, d), content(c, a), "d after the share")


def test_failed_fork_into_a_slot_that_kept_its_pages():
    c = make(max_physical_bytes=PAGE * 64, reclaim_watermark_bytes=PAGE * 8)
    g = torch.Generator().manual_seed(10)
    per_page = PAGE // c.token_bytes
    a = _prompt(c, g, 2 * per_page + 3)
    b = c.alloc()
    c.reserve(b, 2 * per_page)
    c.free(b)  # b keeps its 2 pages for the next alloc, which the fork takes
    _failing(c, "map", 1, lambda: c.fork(a))


def test_share_prefix_gives_the_destinations_unused_pages_to_the_watermark():
    c = make(max_physical_bytes=PAGE * 8)  # reclaim_watermark_bytes=0: no idle page is kept
    g = torch.Generator().manual_seed(11)
    a = _prompt(c, g, 1)
    b = c.alloc()
    c.reserve(b, 1)
    c.share_prefix(a, b, 0)
    assert c.stats()["idle_bytes"] == 0
    _failing(c, "map", 1, lambda: c.fork(a))  # the fork's page for a's partial page is created, not pooled


@pytest.mark.parametrize("kind, n", [("create", 2), ("map", 3)])
def test_copy_on_write_undone_when_the_growth_of_the_step_fails(kind, n):
    c = make(max_physical_bytes=PAGE * 64)
    g = torch.Generator().manual_seed(12)
    per_page = PAGE // c.token_bytes
    a = _prompt(c, g, 2 * per_page + 1)
    b = c.fork(a)  # pages 0 and 1 shared
    c.shrink(b, per_page + 1)  # b's next write lands in shared page 1: a copy, then 2 new pages
    _failing(c, kind, n, lambda: c.begin_step([b], [2 * per_page]))
    append(c, b, chunk(g, 2 * per_page))
    assert c.shared_pages(b) == 1


@pytest.mark.parametrize("n", [4, 5, 6])
def test_copy_on_write_undone_when_a_page_swap_fails(n):
    """compact of a fork rewrites its 3 shared pages: 3 maps of the copies, then one swap each."""
    c = make(max_physical_bytes=PAGE * 64)
    g = torch.Generator().manual_seed(13)
    per_page = PAGE // c.token_bytes
    a = _prompt(c, g, 3 * per_page)
    c.fork(a)
    m = 3 * per_page
    keep = torch.arange(1, m).expand(1, L, H, m - 1).contiguous()
    lens = torch.full((1, L, H), m - 1, dtype=torch.int64)
    _failing(c, "map", n, lambda: c.compact([a], keep, lens))


def test_compacting_two_forks_undone_when_the_second_ones_copy_fails():
    c = make(max_physical_bytes=PAGE * 64)
    g = torch.Generator().manual_seed(14)
    per_page = PAGE // c.token_bytes
    m = 2 * per_page
    a = _prompt(c, g, m)
    b = c.fork(a)
    c.fork(a)  # each page has three mappings
    keep = torch.arange(1, m).expand(2, L, H, m - 1).contiguous()
    lens = torch.full((2, L, H), m - 1, dtype=torch.int64)
    _failing(c, "create", 3, lambda: c.compact([a, b], keep, lens))  # a's 2 copies made, b's first fails
    c.compact([a, b], keep, lens)
    assert c.shared_pages(a) == 0 and c.shared_pages(b) == 0
