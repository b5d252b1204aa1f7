"""compact_kv (KV eviction: kept tokens to the front of each (row, kv head), in order) against
reference.compact_kv, bit for bit: every storage format, user caches of several layouts and both
vattn.KVCache layouts, ragged keep lengths, the score buffer, bad inputs (raise, cache unchanged),
opcheck. cpu; cuda marked gpu."""

from __future__ import annotations

import random

import pytest
import torch

import vattn
from vattn import formats, reference
from helpers import cache_views, randn
from test_kv_formats import quant_side_views

DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]
SPECS = ["float32", "float16", "bfloat16", "fp8_e4m3", "int8", "int4", ("int8", "int4"), ("fp8_e4m3", "int8")]
LAYOUTS = ("plain", "token_major", "layer_major", "head_major")
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


def _pair(spec):
    return (spec, spec) if isinstance(spec, str) else tuple(spec)


def _id(spec):
    return spec if isinstance(spec, str) else "-".join(spec)


def bits(t):
    """t's bit patterns (NaN compares equal to itself)."""
    return None if t is None else t.view(_BITS[t.element_size()]).cpu()


def assert_same_bits(got, want, what):
    for name, a, b in zip(("k", "v", "k_scale", "v_scale", "scores"), got, want):
        if a is None:
            assert b is None
            continue
        assert torch.equal(bits(a), bits(b)), f"{what}: {name} differs"


def side(rows, seq, heads, dim, name, layout, device, gen, lens):
    """(data, scales or None) of one side: random values in the first lens[row][h] tokens of each
    (row, head), garbage past them (NaN; quantized: 0xff codes and NaN scales)."""
    fmt = formats.get(name)
    if not fmt.quantized:
        data, _ = cache_views(rows, seq, heads, dim, fmt.storage_dtype, layout, device)
        scales = None
    else:
        qlayout = {"plain": "plain", "head_major": "head_major"}.get(layout, "record")
        data, scales = quant_side_views(rows, seq, heads, dim, fmt, qlayout, device)
    for r in range(rows):
        for h in range(heads):
            n = lens[r][h]
            if not n:
                continue
            x = randn((n, dim), gen)
            if fmt.quantized:
                codes, sc = reference.quantize(x, name)
                data[r, :n, h] = codes.to(device)
                scales[r, :n, h] = sc.to(device)
            else:
                data[r, :n, h] = x.to(fmt.storage_dtype).to(device)
    return data, scales


def make_case(seed, rows=6, seq=40, heads=3, n=4, max_keep=None):
    """Lengths per (row, head), distinct row ids, and keep / keep_lens with ragged lengths: 0, the
    full length (identity), a prefix, sinks plus a recent window, random subsets."""
    rng = random.Random(seed)
    lens = [[rng.choice([0, 1, seq, rng.randint(1, seq)]) for _ in range(heads)] for _ in range(rows)]
    row_ids = rng.sample(range(rows), n)
    kept = []
    for i, r in enumerate(row_ids):
        per_head = []
        for h in range(heads):
            length = lens[r][h]
            kind = (i * heads + h + seed) % 5
            if kind == 0 or length == 0:
                idx = []
            elif kind == 1:
                idx = list(range(length))  # everything: nothing moves
            elif kind == 2:
                idx = list(range(min(length, 3))) + list(range(max(3, length - 5), length))  # sinks + window
            else:
                idx = sorted(rng.sample(range(length), rng.randint(1, length)))
            per_head.append(idx)
        kept.append(per_head)
    mk = max_keep if max_keep is not None else max(1, max(len(x) for ph in kept for x in ph)) + rng.randint(0, 3)
    keep = torch.full((n, heads, mk), -7, dtype=torch.int32)  # junk past keep_lens must be ignored
    keep_lens = torch.zeros((n, heads), dtype=torch.int32)
    for i, per_head in enumerate(kept):
        for h, idx in enumerate(per_head):
            keep[i, h, : len(idx)] = torch.tensor(idx, dtype=torch.int32)
            keep_lens[i, h] = len(idx)
    return lens, torch.tensor(row_ids, dtype=torch.int32), keep, keep_lens


def scores_buffer(rows, heads, seq, device, gen, strided=False):
    s = randn((rows + 1, heads, seq + 3), gen)  # larger than the cache, as attention's buffers may be
    if strided:
        s = randn((heads, rows + 1, seq + 3), gen).transpose(0, 1)
    return s.to(device)


def run_both(kd, vd, ks, vs, sc, row_ids, keep, keep_lens, device):
    """(op result, reference result) as tuples (k, v, k_scale, v_scale, scores), from clones."""
    want = [None if t is None else t.cpu().clone() for t in (kd, vd, ks, vs, sc)]
    reference.compact_kv(want[0], want[1], row_ids, keep, keep_lens, want[2], want[3], want[4])
    vattn.compact_kv(
        kd, vd, row_ids.to(device), keep.to(device), keep_lens.to(device), k_scale=ks, v_scale=vs, scores=sc
    )
    return (kd, vd, ks, vs, sc), want


# ----------------------------------------------------------------------------- matrix against the reference


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("spec", SPECS, ids=_id)
def test_compact_matches_reference(device, spec, layout):
    kname, vname = _pair(spec)
    for seed, dim in ((0, 64), (1, 40), (2, 128)):
        gen = torch.Generator().manual_seed(seed)
        rows, seq, heads = 6, 40, 3
        lens, row_ids, keep, keep_lens = make_case(seed, rows, seq, heads)
        kd, ks = side(rows, seq, heads, dim, kname, layout, device, gen, lens)
        vd, vs = side(rows, seq, heads, dim, vname, layout, device, gen, lens)
        sc = scores_buffer(rows, heads, seq, device, gen, strided=seed == 1) if seed != 2 else None
        got, want = run_both(kd, vd, ks, vs, sc, row_ids, keep, keep_lens, device)
        assert_same_bits(got, want, f"{_id(spec)}-{layout}-seed{seed}")


@pytest.mark.parametrize("device", DEVICES)
def test_compact_explicit_values(device):
    """The definition spelled out on a small case (independent of the reference)."""
    k = torch.arange(2 * 8 * 2 * 4, dtype=torch.float32).reshape(2, 8, 2, 4).to(device)
    v = -k
    sc = torch.arange(2 * 2 * 8, dtype=torch.float32).reshape(2, 2, 8).to(device)
    old_k, old_v, old_s = k.clone(), v.clone(), sc.clone()
    keep = torch.tensor([[[0, 3, 6, 7], [2, 5, 0, 0]]], dtype=torch.int32)
    vattn.compact_kv(k, v, [1], keep, [[4, 2]], scores=sc)
    for h, idx in ((0, [0, 3, 6, 7]), (1, [2, 5])):
        n = len(idx)
        assert torch.equal(k[1, :n, h], old_k[1, idx, h])
        assert torch.equal(v[1, :n, h], old_v[1, idx, h])
        assert torch.equal(sc[1, h, :n], old_s[1, h, idx])
        assert torch.equal(k[1, n:, h], old_k[1, n:, h])  # the rest is untouched
        assert torch.equal(sc[1, h, n:], old_s[1, h, n:])
    assert torch.equal(k[0], old_k[0]) and torch.equal(v[0], old_v[0]) and torch.equal(sc[0], old_s[0])


@pytest.mark.parametrize("device", DEVICES)
def test_compact_large_parallel(device):
    """Enough work for the parallel CPU path and many CUDA blocks."""
    gen = torch.Generator().manual_seed(5)
    rows, seq, heads, dim = 8, 700, 4, 128
    lens, row_ids, keep, keep_lens = make_case(9, rows, seq, heads, n=8)
    kd, _ = side(rows, seq, heads, dim, "float16", "token_major", device, gen, lens)
    vd, _ = side(rows, seq, heads, dim, "float16", "token_major", device, gen, lens)
    sc = scores_buffer(rows, heads, seq, device, gen)
    got, want = run_both(kd, vd, None, None, sc, row_ids, keep, keep_lens, device)
    assert_same_bits(got, want, "large")


@pytest.mark.parametrize("device", DEVICES)
def test_compact_empty_calls(device):
    kc, vc = cache_views(3, 8, 2, 16, torch.float32, "plain", device)
    kc.normal_()
    vc.normal_()
    before = kc.clone()
    vattn.compact_kv(kc, vc, torch.zeros(0, dtype=torch.int32), torch.zeros(0, 2, 4, dtype=torch.int32),
                     torch.zeros(0, 2, dtype=torch.int32))  # fmt: skip
    vattn.compact_kv(kc, vc, [0], torch.zeros(1, 2, 0, dtype=torch.int32), [[0, 0]])
    assert torch.equal(kc, before)


# ----------------------------------------------------------------------------- vattn.KVCache views


def _fill_cache(cache, slots, lens, gen):
    step = cache.begin_step(slots=slots, new_tokens=lens)
    for layer in range(cache.num_layers):
        k = randn((sum(lens), cache.num_kv_heads, cache.head_dim), gen, cache.dtype).to(cache.device)
        v = randn((sum(lens), cache.num_kv_heads, cache.head_dim), gen, cache.dtype).to(cache.device)
        vattn.append_kv(cache, layer, step, k, v)
    cache.end_step(step)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["token_major", "layer_major"])
@pytest.mark.parametrize("kv_format", ["auto", "int8", ("int8", "int4"), "fp8_e4m3"], ids=_id)
def test_compact_kvcache_views(device, layout, kv_format):
    gen = torch.Generator().manual_seed(3)
    heads, dim = 2, 64
    cache = vattn.KVCache(num_layers=3, num_kv_heads=heads, head_dim=dim, max_batch=4, max_seq_len=256,
                          dtype=torch.float16, kv_format=kv_format, layout=layout, device=device)  # fmt: skip
    try:
        slots = [cache.alloc() for _ in range(3)]
        lens = [50, 130, 7]
        _fill_cache(cache, slots, lens, gen)
        rng = random.Random(4)
        row_ids = torch.tensor([slots[2], slots[0], slots[1]], dtype=torch.int32)
        max_keep = 64
        keep = torch.zeros((3, heads, max_keep), dtype=torch.int32)
        keep_lens = torch.zeros((3, heads), dtype=torch.int32)
        for i, r in enumerate(row_ids.tolist()):
            length = lens[slots.index(r)]
            for h in range(heads):
                idx = sorted(rng.sample(range(length), rng.randint(0, min(length, max_keep))))
                keep[i, h, : len(idx)] = torch.tensor(idx, dtype=torch.int32)
                keep_lens[i, h] = len(idx)
        for layer in (0, 2):
            kd, vd = cache.kv(layer)
            ks, vs = cache.kv_scales(layer)
            other = [bits(t).clone() for t in cache.kv(1)]
            got, want = run_both(kd, vd, ks, vs, None, row_ids, keep, keep_lens, device)
            assert_same_bits(got, want, f"{layout}-{_id(kv_format)}-layer{layer}")
            assert all(torch.equal(a, bits(b)) for a, b in zip(other, cache.kv(1))), "another layer changed"
    finally:
        cache.close()


# ----------------------------------------------------------------------------- bad inputs


def _bad_setup(device, spec="float32"):
    gen = torch.Generator().manual_seed(11)
    rows, seq, heads, dim = 4, 10, 2, 16
    lens = [[seq] * heads for _ in range(rows)]
    kname, vname = _pair(spec)
    kd, ks = side(rows, seq, heads, dim, kname, "token_major", device, gen, lens)
    vd, vs = side(rows, seq, heads, dim, vname, "token_major", device, gen, lens)
    sc = scores_buffer(rows, heads, seq, device, gen)
    # Entry 0 is valid and would move tokens: a call that writes before it checks shows up.
    keep = torch.tensor([[[1, 3, 5], [2, 4, 6]], [[0, 1, 2], [3, 4, 5]]], dtype=torch.int32)
    keep_lens = torch.tensor([[3, 3], [3, 3]], dtype=torch.int32)
    return (kd, vd, ks, vs, sc), torch.tensor([1, 2], dtype=torch.int32), keep, keep_lens


def _bad_cases():
    def keep_at(v):
        def f(keep, lens, rows):
            keep = keep.clone()
            keep[1, 1] = torch.tensor(v, dtype=torch.int32)
            return rows, keep, lens

        return f

    def lens_at(v):
        def f(keep, lens, rows):
            lens = lens.clone()
            lens[1, 1] = v
            return rows, keep, lens

        return f

    return {
        "repeated-index": (keep_at([3, 4, 4]), ValueError, "strictly increasing"),
        "decreasing-index": (keep_at([5, 4, 6]), ValueError, "strictly increasing"),
        "index-ge-seq": (keep_at([3, 4, 10]), ValueError, "outside"),
        "negative-index": (keep_at([-1, 4, 5]), ValueError, "outside"),
        "keep-lens-gt-max": (lens_at(4), ValueError, r"outside \[0, 3\]"),
        "negative-keep-lens": (lens_at(-1), ValueError, "outside"),
        "row-out-of-range": (lambda k, l, r: (torch.tensor([1, 4], dtype=torch.int32), k, l), ValueError, "row"),
        "negative-row": (lambda k, l, r: (torch.tensor([1, -1], dtype=torch.int32), k, l), ValueError, "row"),
        "duplicate-row": (lambda k, l, r: (torch.tensor([1, 1], dtype=torch.int32), k, l), ValueError, "twice"),
        "float-keep": (lambda k, l, r: (r, k.float(), l), TypeError, "keep"),
        "keep-shape": (lambda k, l, r: (r, k[:, :1], l), ValueError, "keep"),
        "keep-lens-shape": (lambda k, l, r: (r, k, l[:, :1]), ValueError, "keep_lens"),
        "keep-2d": (lambda k, l, r: (r, k[:, 0], l), ValueError, "3-D"),
        "row-ids-shape": (lambda k, l, r: (torch.tensor([1, 2, 3], dtype=torch.int32), k, l), ValueError, "shape"),
    }


BAD = _bad_cases()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec", ["float32", "int4", ("int8", "int4")], ids=_id)
@pytest.mark.parametrize("name", sorted(BAD))
def test_compact_bad_input_leaves_cache_unchanged(device, spec, name):
    make, exc, match = BAD[name]
    (kd, vd, ks, vs, sc), rows, keep, keep_lens = _bad_setup(device, spec)
    before = [None if t is None else bits(t).clone() for t in (kd, vd, ks, vs, sc)]
    rows, keep, keep_lens = make(keep, keep_lens, rows)
    with pytest.raises(exc, match=match):
        vattn.compact_kv(kd, vd, rows.to(device), keep.to(device), keep_lens.to(device), k_scale=ks, v_scale=vs,
                         scores=sc)  # fmt: skip
    for b, t in zip(before, (kd, vd, ks, vs, sc)):
        assert b is None or torch.equal(b, bits(t)), f"{name}: the cache changed"


@pytest.mark.parametrize("device", DEVICES)
def test_compact_rejects_bad_tensors(device):
    (kd, vd, ks, vs, sc), rows, keep, keep_lens = _bad_setup(device, "int8")
    before = [bits(t).clone() for t in (kd, vd, ks, vs, sc)]
    r, k, kl = rows.to(device), keep.to(device), keep_lens.to(device)
    with pytest.raises(ValueError, match="scale"):  # a quantized cache without its scales
        vattn.compact_kv(kd, vd, r, k, kl)
    with pytest.raises(TypeError, match="scores"):
        vattn.compact_kv(kd, vd, r, k, kl, k_scale=ks, v_scale=vs, scores=sc.double())
    with pytest.raises(ValueError, match="scores"):
        vattn.compact_kv(kd, vd, r, k, kl, k_scale=ks, v_scale=vs, scores=sc[:, :1])
    with pytest.raises(ValueError, match="scores"):
        vattn.compact_kv(kd, vd, r, k, kl, k_scale=ks, v_scale=vs, scores=sc[:2])
    with pytest.raises(ValueError, match="k_scale"):
        vattn.compact_kv(kd, vd, r, k, kl, k_scale=ks[:, :3], v_scale=vs)
    with pytest.raises(TypeError, match="int32"):  # the op itself takes int32 only (the wrapper converts)
        torch.ops.vattn.compact_kv(kd, vd, r.long(), k, kl, ks, vs)
    for b, t in zip(before, (kd, vd, ks, vs, sc)):
        assert torch.equal(b, bits(t))


def test_compact_int64_and_lists_accepted():
    (kd, vd, ks, vs, sc), rows, keep, keep_lens = _bad_setup("cpu")
    want = [t.clone() for t in (kd, vd)]
    reference.compact_kv(want[0], want[1], rows, keep, keep_lens)
    vattn.compact_kv(kd, vd, rows.tolist(), keep.long(), keep_lens.tolist())
    assert torch.equal(bits(kd), bits(want[0])) and torch.equal(bits(vd), bits(want[1]))


@pytest.mark.gpu
def test_compact_cuda_kernel_skips_out_of_range():
    """The CUDA op itself (no value checks, as under graph capture) never touches memory outside
    the cache: out-of-range rows, lengths and indices are skipped; valid entries still move."""
    (kd, vd, ks, vs, sc), rows, keep, keep_lens = _bad_setup("cuda")
    want = [t.cpu().clone() for t in (kd, vd)]
    reference.compact_kv(want[0], want[1], rows[:1], keep[:1], keep_lens[:1])
    keep = keep.clone()
    keep[1, 0] = torch.tensor([-5, 1 << 30, 3], dtype=torch.int32)
    keep_lens = keep_lens.clone()
    keep_lens[1, 1] = 1000
    torch.ops.vattn.compact_kv(kd, vd, rows.cuda(), keep.cuda(), keep_lens.cuda())
    bad_rows = torch.tensor([-1, 1 << 30], dtype=torch.int32, device="cuda")
    torch.ops.vattn.compact_kv(kd, vd, bad_rows, keep.cuda(), keep_lens.cuda())
    torch.cuda.synchronize()
    assert torch.equal(bits(kd)[1], bits(want[0])[1]) and torch.equal(bits(vd)[1], bits(want[1])[1])


# ----------------------------------------------------------------------------- torch.library


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec", ["float16", ("int8", "int4")], ids=_id)
def test_opcheck_compact(device, spec):
    (kd, vd, ks, vs, sc), rows, keep, keep_lens = _bad_setup(device, spec)
    # opcheck compares runs: no NaN filler.
    for t in (kd, vd):
        if t.is_floating_point():
            t.nan_to_num_(0.0)
    for t in (ks, vs):
        if t is not None:
            t.nan_to_num_(0.0)
    args = (kd, vd, rows.to(device), keep.to(device), keep_lens.to(device))
    torch.library.opcheck(torch.ops.vattn.compact_kv.default, args, dict(k_scale=ks, v_scale=vs, scores=sc))
    torch.library.opcheck(torch.ops.vattn.compact_kv.default, args, dict(k_scale=ks, v_scale=vs))


def test_compact_under_torch_compile():
    (kd, vd, _, _, sc), rows, keep, keep_lens = _bad_setup("cpu")
    want = [t.clone() for t in (kd, vd, sc)]
    reference.compact_kv(want[0], want[1], rows, keep, keep_lens, scores=want[2])

    @torch.compile(backend="aot_eager", fullgraph=True)
    def f(kd, vd, rows, keep, keep_lens, sc):
        torch.ops.vattn.compact_kv(kd, vd, rows, keep, keep_lens, None, None, sc)

    f(kd, vd, rows, keep, keep_lens, sc)
    for a, b in zip((kd, vd, sc), want):
        assert torch.equal(bits(a), bits(b))
