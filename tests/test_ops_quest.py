"""Quest block-sparse decode (block_minmax, quest_select, sparse_decode_attention) against
vattn.reference: every K storage format and both vattn.KVCache layouts for the metadata, partial
last blocks, first_block > 0, per-head lengths; selection with ragged lengths at batch > 1, budgets
past the row, the last block always in, ascending order, GQA groups 1 and 3, exact ties; sparse
attention equal to dense reference attention over the selected tokens (caches NaN / garbage past
each length) and, with every block selected, to decode_attention; NaN keys and NaN metadata as the
reference (NaN min / max, NaN-scored blocks ranked last); bad inputs raise and change nothing;
opcheck. cpu; cuda (plain and split kernels) marked gpu."""

from __future__ import annotations

import random

import pytest
import torch

import vattn
from vattn import formats, reference
from helpers import cache_views, fill_cache, randn
from test_ops_compact import _fill_cache, side

DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]
IMPLS = [
    pytest.param("cpu", "fast", id="cpu"),
    pytest.param("cuda", "fast", id="cuda-fast", marks=pytest.mark.gpu),
    pytest.param("cuda", "simple", id="cuda-simple", marks=pytest.mark.gpu),
]
K_FORMATS = ["float32", "float16", "bfloat16", "fp8_e4m3", "int8", "int4"]
SPECS = ["float32", "float16", "bfloat16", "fp8_e4m3", "int8", "int4", ("int8", "int4"), ("fp8_e4m3", "int8")]
B = 16


def _pair(spec):
    return (spec, spec) if isinstance(spec, str) else tuple(spec)


def _id(spec):
    return spec if isinstance(spec, str) else "-".join(spec)


def _i32(x, device="cpu"):
    return torch.tensor(x, dtype=torch.int32, device=device)


def _nb(n, block=B):
    return -(-n // block)


def _sentinel_meta(rows, max_blocks, heads, dim, device, gen):
    """Metadata full of recognizable values, so an untouched block shows."""
    return (randn((rows, max_blocks, heads, 2, dim), gen) + 100.0).to(device)


def _dense(data, scales, name):
    """fp64 values of one side (garbage past lengths stays garbage / NaN)."""
    fmt = formats.get(name)
    if not fmt.quantized:
        return data.cpu().double()
    return reference.dequantize(data.cpu(), scales.cpu(), name).double()


# ----------------------------------------------------------------------------- block_minmax


def _minmax_case(seed, rows=5, seq=70, heads=2, per_head=False):
    rng = random.Random(seed)
    choices = [0, 1, 15, 16, 17, 33, seq]
    lens = [[rng.choice(choices)] * heads for _ in range(rows)]
    if per_head:
        lens = [[rng.choice(choices) for _ in range(heads)] for _ in range(rows)]
    row_ids = rng.sample(range(rows), rows - 1)
    return lens, row_ids


def _run_minmax(kd, ks, name, meta, row_ids, lens, first, per_head, device):
    heads = kd.shape[2]
    row_len = [max(lens[r]) for r in row_ids]
    lengths = _i32(row_len)
    hl = _i32([lens[r] for r in row_ids]) if per_head else None
    if not per_head:
        lengths = _i32([lens[r][0] for r in row_ids])
    want = meta.cpu().clone()
    fmt = formats.get(name)
    reference.block_minmax(kd.cpu(), want, _i32(row_ids), lengths, _i32(first), B,
                           k_scale=None if ks is None else ks.cpu(), k_format=fmt.name if fmt.quantized else None,
                           head_lengths=hl)  # fmt: skip
    vattn.block_minmax(kd, meta, _i32(row_ids, device), lengths.to(device), _i32(first, device),
                       head_lengths=None if hl is None else hl.to(device), k_scale=ks)  # fmt: skip
    assert heads == meta.shape[2]
    return want


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["plain", "token_major", "head_major"])
@pytest.mark.parametrize("name", K_FORMATS)
def test_block_minmax_matches_reference(device, name, layout):
    for seed, dim, per_head in ((0, 64, False), (1, 40, True), (2, 128, False)):
        gen = torch.Generator().manual_seed(seed)
        rows, seq, heads = 5, 70, 2
        lens, row_ids = _minmax_case(seed, rows, seq, heads, per_head)
        kd, ks = side(rows, seq, heads, dim, name, layout, device, gen, lens)
        meta = _sentinel_meta(rows, _nb(seq), heads, dim, device, gen)
        rng = random.Random(seed)
        first = [rng.choice([0, 0, 1, _nb(max(lens[r]))]) for r in row_ids]
        want = _run_minmax(kd, ks, name, meta, row_ids, lens, first, per_head, device)
        torch.testing.assert_close(meta.cpu(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_block_minmax_explicit_values(device):
    """The definition spelled out: partial last block, first_block > 0 leaves earlier blocks alone."""
    k = torch.arange(1 * 40 * 1 * 4, dtype=torch.float32).reshape(1, 40, 1, 4).to(device)
    k[0, 35:] = float("nan")  # past the length
    meta = torch.full((1, 3, 1, 2, 4), 7.0, device=device)
    vattn.block_minmax(k, meta, [0], [35], [1])
    assert torch.equal(meta[0, 0].cpu(), torch.full((1, 2, 4), 7.0))  # block 0 untouched
    for b, (t0, t1) in enumerate([(16, 32), (32, 35)], start=1):
        assert torch.equal(meta[0, b, 0, 0].cpu(), k[0, t0, 0].cpu())
        assert torch.equal(meta[0, b, 0, 1].cpu(), k[0, t1 - 1, 0].cpu())
    vattn.block_minmax(k, meta, [0], [35])  # first_block defaults to 0
    assert torch.equal(meta[0, 0, 0, 1].cpu(), k[0, 15, 0].cpu())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["token_major", "layer_major"])
@pytest.mark.parametrize("kv_format", ["auto", "int8", ("int4", "int8"), "fp8_e4m3"], ids=_id)
def test_block_minmax_kvcache_views(device, layout, kv_format):
    gen = torch.Generator().manual_seed(3)
    heads, dim = 2, 64
    cache = vattn.KVCache(num_layers=2, num_kv_heads=heads, head_dim=dim, max_batch=4, max_seq_len=128,
                          dtype=torch.float16, kv_format=kv_format, layout=layout, device=device)  # fmt: skip
    try:
        slots = [cache.alloc() for _ in range(3)]
        lens = [50, 100, 7]
        _fill_cache(cache, slots, lens, gen)
        kname = _pair(kv_format)[0]
        for layer in (0, 1):
            kd, _ = cache.kv(layer)
            ks, _ = cache.kv_scales(layer)
            meta = _sentinel_meta(cache.max_batch, _nb(128), heads, dim, device, gen)
            per_slot = {s: [n] * heads for s, n in zip(slots, lens)}
            row_ids = [slots[2], slots[0], slots[1]]
            full = {**{r: [0] * heads for r in range(cache.max_batch)}, **per_slot}
            name = "float16" if kname == "auto" else cache.k_format.name  # "int4": keys int4_ch
            want = _run_minmax(kd, ks, name, meta, row_ids, full, [0, 1, 2], False, device)
            torch.testing.assert_close(meta.cpu(), want, rtol=1e-6, atol=1e-6)
    finally:
        cache.close()


# ----------------------------------------------------------------------------- quest_select


def _random_meta(rows, max_blocks, heads, dim, gen, integer=False):
    if integer:
        lo = torch.randint(-3, 3, (rows, max_blocks, heads, dim), generator=gen).float()
        hi = lo + torch.randint(0, 3, lo.shape, generator=gen).float()
    else:
        lo = randn((rows, max_blocks, heads, dim), gen)
        hi = lo + torch.rand(lo.shape, generator=gen)
    return torch.stack([lo, hi], dim=3)


def _check_selection(ids, counts, want_ids, want_counts, scores, lens_of, budget, what):
    """Exact counts; ascending ids with the last block in and -1 after; the chosen set equal to the
    reference's up to blocks whose reference scores tie within rounding."""
    ids, counts = ids.cpu(), counts.cpu()
    assert torch.equal(counts, want_counts), f"{what}: counts differ"
    n, heads, max_sel = ids.shape
    for i in range(n):
        for h in range(heads):
            c, nb = int(counts[i, h]), _nb(lens_of(i, h))
            assert c == min(_nb(budget), nb, max_sel)
            got = ids[i, h, :c].tolist()
            assert torch.all(ids[i, h, c:] == -1), f"{what}: entries past the count must be -1"
            assert got == sorted(set(got)), f"{what}: not strictly ascending: {got}"
            if c:
                assert got[-1] == nb - 1, f"{what}: the last block must be selected"
            want = set(want_ids[i, h, :c].tolist())
            extra, missing = set(got) - want, want - set(got)
            assert len(extra) == len(missing)
            for a, b in zip(sorted(extra), sorted(missing)):
                sa, sb = float(scores[i, h, a]), float(scores[i, h, b])
                assert abs(sa - sb) <= 1e-4 * (1 + abs(sb)), f"{what}: chose block {a} ({sa}) over {b} ({sb})"


@pytest.mark.parametrize("device,impl", IMPLS)
@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quest_select_matches_reference(device, impl, group, dtype):
    for seed, per_head in ((0, False), (1, True), (2, False)):
        gen = torch.Generator().manual_seed(seed)
        rng = random.Random(seed)
        rows, heads, dim, max_blocks = 6, 2, 64, 40
        n = 5
        row_ids = rng.sample(range(rows), n)
        choices = [0, 1, 16, 17, 100, 255, 333, max_blocks * B]
        if per_head:
            lens = [[rng.choice(choices) for _ in range(heads)] for _ in range(n)]
        else:
            lens = [[rng.choice(choices)] * heads for _ in range(n)]
        meta = _random_meta(rows, max_blocks, heads, dim, gen).to(device)
        q = randn((n, heads * group, dim), gen, dtype).to(device)
        lengths = _i32([max(x) for x in lens])
        hl = _i32(lens) if per_head else None
        for budget in (1, 16, 40, 64, 160, 10_000):
            with vattn.ops.attention_impl(impl):
                ids, counts = vattn.quest_select(q, meta, _i32(row_ids, device), lengths.to(device),
                                                 token_budget=budget,
                                                 head_lengths=None if hl is None else hl.to(device))  # fmt: skip
            max_sel = min(_nb(budget), _nb(max(max(x) for x in lens)))
            assert ids.shape == (n, heads, max_sel) and ids.dtype == torch.int32
            want_ids, want_counts, scores = reference.quest_select(q.cpu(), meta.cpu(), _i32(row_ids), lengths, B,
                                                                   budget, max_sel, head_lengths=hl)  # fmt: skip
            _check_selection(ids, counts, want_ids, want_counts, scores, lambda i, h: lens[i][h], budget,
                             f"seed{seed}-budget{budget}")  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("group", [1, 3])
def test_quest_select_exact_ties(device, group):
    """Integer q and metadata: scores are exact and tie often; ties go to the lower block index."""
    gen = torch.Generator().manual_seed(7)
    rows, heads, dim, max_blocks = 3, 2, 8, 30
    meta = _random_meta(rows, max_blocks, heads, dim, gen, integer=True).to(device)
    q = torch.randint(-2, 3, (3, heads * group, dim), generator=gen).float().to(device)
    lens = _i32([max_blocks * B, 200, 17 * B - 3])
    rid = _i32([2, 0, 1])
    for budget in (16, 48, 100, 250):
        ids, counts = vattn.quest_select(q, meta, rid.to(device), lens.to(device), token_budget=budget)
        want_ids, want_counts, _ = reference.quest_select(q.cpu(), meta.cpu(), rid, lens, B, budget, ids.shape[2])
        assert torch.equal(ids.cpu(), want_ids) and torch.equal(counts.cpu(), want_counts), f"budget {budget}"


@pytest.mark.parametrize("device", DEVICES)
def test_quest_select_max_blocks_hint_and_block_size(device):
    gen = torch.Generator().manual_seed(8)
    meta = _random_meta(2, 20, 1, 16, gen).to(device)
    q = randn((2, 2, 16), gen).to(device)
    lens = _i32([150, 40], device)
    ids, counts = vattn.quest_select(q, meta, [0, 1], lens, token_budget=64, block=8, max_blocks_hint=3)
    assert ids.shape == (2, 1, 3)  # min(ceil(64 / 8), hint)
    assert counts.cpu().tolist() == [[3], [3]]
    assert ids[0, 0, -1].item() == _nb(150, 8) - 1 and ids[1, 0, -1].item() == _nb(40, 8) - 1
    ids, counts = vattn.quest_select(q, meta, [0, 1], lens, token_budget=64, block=8)
    assert ids.shape == (2, 1, 8) and counts.cpu().tolist() == [[8], [5]]
    assert ids[1, 0].cpu().tolist() == [0, 1, 2, 3, 4, -1, -1, -1]
    # No room at all (hint 0): nothing selected, and the CUDA kernel must not write its "last block"
    # entry to ids[-1] (it did: an illegal address on an empty ids tensor).
    ids, counts = vattn.quest_select(q, meta, [0, 1], lens, token_budget=64, block=8, max_blocks_hint=0)
    assert ids.shape == (2, 1, 0) and counts.cpu().tolist() == [[0], [0]]
    ids, counts = vattn.quest_select(q, meta, [0, 1], lens, token_budget=64, block=8, max_blocks_hint=1)
    assert counts.cpu().tolist() == [[1], [1]] and ids[:, 0, 0].cpu().tolist() == [_nb(150, 8) - 1, _nb(40, 8) - 1]


# ----------------------------------------------------------------------------- sparse_decode_attention


def _random_blocks(rng, nb, max_sel, kind):
    if nb == 0 or kind == 0:
        return []
    if kind == 1:
        return list(range(min(nb, max_sel)))
    k = rng.randint(1, min(nb, max_sel))
    return sorted(set(rng.sample(range(nb - 1), k - 1)) | {nb - 1}) if nb > 1 else [0]


def _sparse_case(seed, n, heads, lens, max_sel=None):
    rng = random.Random(seed)
    nbs = [[_nb(x) for x in row] for row in lens]
    max_sel = max_sel if max_sel is not None else max(1, max(max(r) for r in nbs))
    ids = torch.full((n, heads, max_sel), -5, dtype=torch.int32)  # junk past the counts is ignored
    counts = torch.zeros((n, heads), dtype=torch.int32)
    for i in range(n):
        for h in range(heads):
            chosen = _random_blocks(rng, nbs[i][h], max_sel, (seed + i * heads + h) % 4)
            ids[i, h, : len(chosen)] = torch.tensor(chosen, dtype=torch.int32)
            counts[i, h] = len(chosen)
    return ids, counts


def _dense_restricted(q, kd, vd, row_ids, lens, ids, counts, scale, softcap, compute_dtype):
    """Independent of reference.sparse_decode_attention: gather each (entry, head)'s selected
    tokens into a dense cache and run reference.attention over it (decode, per-head lengths)."""
    n, hq, dim = q.shape
    heads = kd.shape[2]
    sel = [[[t for b in ids[i, h, : counts[i, h]].tolist() for t in range(b * B, min((b + 1) * B, lens[i][h]))]
            for h in range(heads)] for i in range(n)]  # fmt: skip
    width = max(1, max(len(s) for row in sel for s in row))
    kc = torch.zeros((n, width, heads, dim), dtype=torch.float64)
    vc = torch.zeros_like(kc)
    for i in range(n):
        for h in range(heads):
            if sel[i][h]:
                idx = torch.tensor(sel[i][h])
                kc[i, : len(idx), h] = kd[row_ids[i], idx, h]
                vc[i, : len(idx), h] = vd[row_ids[i], idx, h]
    hl = torch.tensor([[len(s) for s in row] for row in sel], dtype=torch.int32)
    return reference.attention(q.cpu(), kc, vc, hl.max(dim=1).values, head_seqlens_k=hl, scale=scale, softcap=softcap,
                               compute_dtype=compute_dtype)  # fmt: skip


def _assert_close_fa(out, lse, ref, ref_lse, low, what, eps_scale=1.0):
    out = out.detach().cpu().double()
    assert torch.isfinite(out).all(), f"{what}: non-finite output (read past a length?)"
    err = (out - ref).abs().max().item()
    base = (low.double() - ref).abs().max().item()
    eps = 1e-5 if low.dtype in (torch.float32, torch.float64) else 1e-4
    assert err <= 2 * base + eps * eps_scale, f"{what}: max error {err:.3g} vs torch error {base:.3g}"
    lse = lse.cpu()
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse) & (lse < 0), empty), f"{what}: -inf LSE pattern differs"
    assert (out[empty] == 0).all(), f"{what}: an entry without tokens must output zeros"
    if (~empty).any():
        assert (lse[~empty].double() - ref_lse[~empty].double()).abs().max().item() <= 1e-3, f"{what}: LSE"


def _sparse_inputs(seed, spec, layout, device, dtype, group, dim, per_head):
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    rows, heads, n = 6, 2, 5
    seq = 90
    choices = [0, 1, 15, 16, 17, 40, 77, seq]
    per_row = [rng.choice(choices) for _ in range(rows)]
    lens_r = [[rng.choice(choices) for _ in range(heads)] if per_head else [per_row[r]] * heads for r in range(rows)]
    row_ids = rng.sample(range(rows), n)
    kname, vname = _pair(spec)
    kd, ks = side(rows, seq, heads, dim, kname, layout, device, gen, lens_r)
    vd, vs = side(rows, seq, heads, dim, vname, layout, device, gen, lens_r)
    if not formats.get(kname).quantized:
        kd, vd = kd.to(dtype) if kd.dtype != dtype else kd, vd.to(dtype) if vd.dtype != dtype else vd
    q = randn((n, heads * group, dim), gen, dtype).to(device)
    lens = [lens_r[r] for r in row_ids]
    kw = dict(lengths=_i32([max(x) for x in lens], device), head_lengths=_i32(lens, device) if per_head else None)
    dense = (_dense(kd, ks, kname), _dense(vd, vs, vname))
    return q, (kd, vd, ks, vs), dense, row_ids, lens, kw


@pytest.mark.parametrize("device,impl", IMPLS)
@pytest.mark.parametrize("spec", SPECS, ids=_id)
@pytest.mark.parametrize("group", [1, 3])
def test_sparse_decode_matches_reference(device, impl, spec, group):
    kname = _pair(spec)[0]
    plain = not formats.get(kname).quantized
    dtypes = [formats.get(kname).storage_dtype] if plain else [torch.float16, torch.bfloat16, torch.float32]
    for seed, (dim, per_head, softcap, scale) in enumerate([(64, False, 0.0, None), (40, True, 20.0, None),
                                                             (128, False, 0.0, 0.3)]):  # fmt: skip
        if kname == "int4" and dim % 2:
            continue
        dtype = dtypes[seed % len(dtypes)]
        layout = ["plain", "token_major", "head_major"][seed]
        q, (kd, vd, ks, vs), (kf, vf), row_ids, lens, kw = _sparse_inputs(seed, spec, layout, device, dtype, group, dim,
                                                                         per_head)  # fmt: skip
        ids, counts = _sparse_case(seed, len(row_ids), kd.shape[2], lens)
        with vattn.ops.attention_impl(impl):
            out, lse = vattn.sparse_decode_attention(q, kd, vd, _i32(row_ids, device), kw["lengths"], ids.to(device),
                                                     counts.to(device), head_lengths=kw["head_lengths"], scale=scale,
                                                     softcap=softcap, return_lse=True, k_scale=ks, v_scale=vs)  # fmt: skip
        assert out.dtype == q.dtype and out.shape == q.shape
        ref, ref_lse = _dense_restricted(q, kf, vf, row_ids, lens, ids, counts, scale, softcap, torch.float64)
        low, _ = _dense_restricted(q, kf, vf, row_ids, lens, ids, counts, scale, softcap, q.dtype)
        _assert_close_fa(out, lse, ref, ref_lse, low, f"{_id(spec)}-seed{seed}")
        # The reference op itself agrees with the restricted dense attention.
        r2, l2 = reference.sparse_decode_attention(q.cpu(), kf, vf, _i32(row_ids), kw["lengths"].cpu(), ids, counts, B,
                                                   head_lengths=None if kw["head_lengths"] is None
                                                   else kw["head_lengths"].cpu(), scale=scale, softcap=softcap)  # fmt: skip
        torch.testing.assert_close(r2, ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("device,impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_sparse_decode_all_blocks_equals_decode(device, impl, dtype):
    gen = torch.Generator().manual_seed(4)
    rows, seq, heads, group, dim = 5, 300, 2, 3, 64
    lens = [300, 1, 16, 17, 250]
    k, v = cache_views(rows, seq, heads, dim, dtype, "token_major", device)
    fill_cache(k, v, list(range(rows)), lens, gen)
    q = randn((rows, heads * group, dim), gen, dtype).to(device)
    rid, L = _i32([4, 2, 0, 1, 3], device), _i32([lens[r] for r in [4, 2, 0, 1, 3]], device)
    ids, counts = vattn.quest_select(q, torch.zeros(rows, _nb(seq), heads, 2, dim, device=device), rid, L,
                                     token_budget=10**6)  # fmt: skip
    assert torch.equal(counts.cpu(), _nb(L.cpu())[:, None].expand(-1, heads).int())
    with vattn.ops.attention_impl(impl):
        out, lse = vattn.sparse_decode_attention(q, k, v, rid, L, ids, counts, return_lse=True, softcap=30.0)
        want, want_lse = vattn.decode_attention(q, k, v, L, row_ids=rid, return_lse=True, softcap=30.0)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out.float(), want.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(lse, want_lse, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device,impl", IMPLS)
def test_quest_pipeline_long_rows(device, impl):
    """block_minmax -> quest_select -> sparse_decode on long rows (many CUDA splits), against the
    dense reference restricted to the selection."""
    gen = torch.Generator().manual_seed(9)
    rows, seq, heads, group, dim = 3, 2000, 2, 4, 128
    lens = [2000, 1333, 40]
    k, v = cache_views(rows, seq, heads, dim, torch.float16, "layer_major", device)
    fill_cache(k, v, list(range(rows)), lens, gen)
    meta = torch.zeros(rows, _nb(seq), heads, 2, dim, device=device)
    rid, L = _i32([0, 1, 2], device), _i32(lens, device)
    vattn.block_minmax(k, meta, rid, L)
    q = randn((rows, heads * group, dim), gen, torch.float16).to(device)
    ids, counts = vattn.quest_select(q, meta, rid, L, token_budget=1024, max_blocks_hint=_nb(seq))
    with vattn.ops.attention_impl(impl):
        out, lse = vattn.sparse_decode_attention(q, k, v, rid, L, ids, counts, return_lse=True, check=False)
    hl = [[x] * heads for x in lens]
    kd, vd = k.cpu().double(), v.cpu().double()
    ref, ref_lse = _dense_restricted(q, kd, vd, [0, 1, 2], hl, ids.cpu(), counts.cpu(), None, 0.0, torch.float64)
    low, _ = _dense_restricted(q, kd, vd, [0, 1, 2], hl, ids.cpu(), counts.cpu(), None, 0.0, torch.float16)
    _assert_close_fa(out, lse, ref, ref_lse, low, "pipeline")


# ----------------------------------------------------------------------------- NaN keys and metadata
# reference.block_minmax takes amin / amax (NaN propagates: a NaN key element makes its channel's min
# and max NaN) and reference.quest_select's torch.maximum propagates NaN into the score, which then
# ranks below every number (nan_to_num(nan=-inf) keeps a true -inf score as the lowest finite value).
# The ops once skipped NaN in their compares: a NaN key was ignored, an all-NaN block got (+inf, -inf)
# and so an upper bound of +inf, and NaN max metadata left the finite min side's product as the score.


def _assert_same_meta(got, want, exact, what):
    """Equal NaN positions, and the other values equal (bit for bit when exact)."""
    got = got.cpu()
    assert torch.equal(torch.isnan(got), torch.isnan(want)), f"{what}: NaN positions differ"
    tol = 0.0 if exact else 1e-6
    torch.testing.assert_close(got, want, rtol=tol, atol=tol, equal_nan=True, msg=f"{what}: values differ")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", K_FORMATS)
def test_block_minmax_nan_keys(device, name):
    """One NaN key element in a block (quantized: a NaN scale, so the token's elements), a block whose
    keys are all NaN, a partial last block with a NaN: the metadata as the reference's, NaN for NaN."""
    gen = torch.Generator().manual_seed(21)
    rows, seq, heads, dim = 3, 70, 2, 64
    lens = [[70, 70], [0, 0], [45, 37]]
    kd, ks = side(rows, seq, heads, dim, name, "plain", device, gen, lens)
    quantized = formats.get(name).quantized
    if not quantized:
        kd[0, 3, 0, 5] = float("nan")  # one element of block 0
        kd[0, 16:32, 1] = float("nan")  # all of block 1, head 1
        kd[2, 44, 0, 0] = float("nan")  # the partial last block
        kd[2, 33, 1, 63] = float("nan")
    else:
        ks[0, 3, 0] = float("nan")  # token 3: every channel of block 0 gets one NaN element
        ks[0, 16:32, 1] = float("nan")
        ks[2, 44, 0] = float("nan")
        ks[2, 33, 1] = float("nan")
    meta = _sentinel_meta(rows, _nb(seq), heads, dim, device, gen)
    want = _run_minmax(kd, ks, name, meta, [0, 2], lens, [0, 0], True, device)
    assert torch.isnan(want[0, 0, 0, :, 0 if quantized else 5]).all()  # the case is what it says
    assert torch.isnan(want[0, 1, 1]).all()
    assert torch.isnan(want[2, 2, 0, :, 0]).all() and torch.isnan(want[2, 2, 1, :, 63]).all()
    if not quantized:
        assert not torch.isnan(want[2, 2, 0, :, 1:]).any()
    _assert_same_meta(meta, want, not quantized, name)


@pytest.mark.parametrize("device", DEVICES)
def test_block_minmax_nan_kvcache_int4_ch(device):
    """int4_ch keys (the grouped path): a NaN scale word (one channel of a token group NaN) and a
    group of all-NaN words (whole blocks NaN) give the reference's NaN metadata."""
    gen = torch.Generator().manual_seed(22)
    heads, dim = 2, 64
    cache = vattn.KVCache(num_layers=1, num_kv_heads=heads, head_dim=dim, max_batch=2, max_seq_len=128,
                          dtype=torch.float16, kv_format=("int4", "int8"), device=device)  # fmt: skip
    try:
        slots = [cache.alloc() for _ in range(2)]
        lens = [100, 70]
        _fill_cache(cache, slots, lens, gen)
        kd, _ = cache.kv(0)
        ks, _ = cache.kv_scales(0)
        assert cache.k_format.name == "int4_ch"
        ks[slots[0], 1, 0, 1] = float("nan")  # a scale word of tokens 0 .. 31, head 0
        ks[slots[1], 32:64, 1] = float("nan")  # every word of tokens 32 .. 63, head 1
        ks[slots[1], 65, 0, 3] = float("nan")  # the partial last group
        meta = _sentinel_meta(cache.max_batch, _nb(128), heads, dim, device, gen)
        per_slot = {s: [n] * heads for s, n in zip(slots, lens)}
        want = _run_minmax(kd, ks, "int4_ch", meta, slots, per_slot, [0, 0], False, device)
        assert torch.isnan(want[slots[0], :2, 0]).any() and not torch.isnan(want[slots[0], 2:]).any()
        assert torch.isnan(want[slots[1], 2:4, 1]).all()
        assert torch.isnan(want[slots[1], 4, 0]).any()
        _assert_same_meta(meta, want, False, "int4_ch")
    finally:
        cache.close()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("group", [1, 3])
def test_quest_select_nan_metadata(device, group):
    """NaN written into metadata (max side, min side, every channel of a block) on the blocks that
    would score best: they score NaN and rank last, below a block whose score is -inf; every budget
    selects exactly the reference's blocks. Integer values, so the scores are exact."""
    gen = torch.Generator().manual_seed(23)
    rows, heads, dim, nb = 2, 2, 8, 20
    meta = _random_meta(rows, nb, heads, dim, gen, integer=True)
    q = torch.randint(-2, 3, (rows, heads * group, dim), generator=gen).float()
    q[:, :, 0] = 1.0  # channel 0 positive: a -inf meta there gives a -inf score
    nan = float("nan")
    for r in range(rows):
        for h in range(heads):
            meta[r, [2, 5, 7, 9], h] += 10.0  # the best blocks, but for their NaN
        meta[r, 2, 0, 1, 3] = nan  # max side, head 0
        meta[r, 5, 1, 0, 6] = nan  # min side, head 1
        meta[r, 7, :, 1, :] = nan  # every max channel, both heads
        meta[r, 9, 0] = nan  # all of block 9, head 0
        meta[r, 9, 1, :, 0] = nan  # channel 0 of block 9, head 1
        meta[r, 11, :, :, 0] = float("-inf")  # score -inf: still above the NaN blocks
    rid, lens = _i32([1, 0]), _i32([nb * B, nb * B - 5])
    _, _, scores = reference.quest_select(q, meta, rid, lens, B, (nb - 1) * B, nb)
    assert torch.isinf(scores[:, :, 11]).sum() == 0 and (scores[:, :, 11] < -1e300).all()
    assert (scores[:, 0, [2, 7, 9]] == float("-inf")).all() and (scores[:, 1, [5, 7, 9]] == float("-inf")).all()
    for budget in range(B, (nb + 1) * B, B):
        ids, counts = vattn.quest_select(q.to(device), meta.to(device), rid.to(device), lens.to(device),
                                         token_budget=budget)  # fmt: skip
        want_ids, want_counts, _ = reference.quest_select(q, meta, rid, lens, B, budget, ids.shape[2])
        assert torch.equal(counts.cpu(), want_counts), f"budget {budget}"
        assert torch.equal(ids.cpu(), want_ids), f"budget {budget}: {ids.cpu().tolist()} vs {want_ids.tolist()}"


@pytest.mark.parametrize("device,impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_quest_pipeline_nan_keys(device, impl, dtype):
    """block_minmax -> quest_select -> sparse_decode_attention with NaN keys in the blocks that would
    score best (one NaN element; every key NaN): NaN metadata as the reference's, those blocks never
    chosen, the reference's choice, and the sparse output finite and equal to the reference's over
    that choice."""
    gen = torch.Generator().manual_seed(24)
    rows, seq, heads, group, dim = 2, 160, 2, 2, 32
    lens = [160, 150]
    k, v = cache_views(rows, seq, heads, dim, dtype, "token_major", device)
    fill_cache(k, v, list(range(rows)), lens, gen)
    for r in range(rows):
        k[r, 1 * B : 2 * B] *= 8.0  # blocks 1, 3 and 6: the largest upper bounds ...
        k[r, 3 * B : 4 * B] *= 8.0
        k[r, 6 * B : 7 * B, 1] *= 8.0
        k[r, 1 * B + 5, 0, 9] = float("nan")  # ... but for a NaN element,
        k[r, 3 * B : 4 * B] = float("nan")  # all their keys NaN
        k[r, 6 * B + 2, 1, 0] = float("nan")
    rid, L = _i32([1, 0], device), _i32([lens[1], lens[0]], device)
    meta = torch.zeros(rows, _nb(seq), heads, 2, dim, device=device)
    vattn.block_minmax(k, meta, rid, L)
    want_meta = torch.zeros(rows, _nb(seq), heads, 2, dim)
    reference.block_minmax(k.cpu(), want_meta, rid.cpu(), L.cpu(), _i32([0, 0]), B)
    _assert_same_meta(meta, want_meta, True, "meta")
    assert torch.isnan(want_meta[:, 1, 0, :, 9]).all() and torch.isnan(want_meta[:, 3]).all()
    q = randn((2, heads * group, dim), gen, dtype).to(device)
    for budget in (2 * B, 4 * B, 6 * B):
        ids, counts = vattn.quest_select(q, meta, rid, L, token_budget=budget)
        want_ids, want_counts, scores = reference.quest_select(q.cpu(), want_meta, rid.cpu(), L.cpu(), B, budget,
                                                               ids.shape[2])  # fmt: skip
        got = ids.cpu()
        for i, h, b in ((0, 0, 1), (1, 0, 1), (0, 0, 3), (0, 1, 3), (1, 0, 3), (1, 1, 3), (0, 1, 6), (1, 1, 6)):
            assert b not in got[i, h].tolist(), f"budget {budget}: NaN block {b} chosen for ({i}, {h})"
        _check_selection(ids, counts, want_ids, want_counts, scores, lambda i, h: int(L[i]), budget, f"b{budget}")
        with vattn.ops.attention_impl(impl):
            out, lse = vattn.sparse_decode_attention(q, k, v, rid, L, ids, counts, return_lse=True)
        ref, ref_lse = reference.sparse_decode_attention(q.cpu(), k.cpu(), v.cpu(), rid.cpu(), L.cpu(), got,
                                                         counts.cpu(), B)  # fmt: skip
        assert torch.isfinite(out).all(), f"budget {budget}: non-finite output"
        tol = 1e-5 if dtype == torch.float32 else 2e-3
        torch.testing.assert_close(out.cpu().double(), ref, rtol=tol, atol=tol)
        torch.testing.assert_close(lse.cpu(), ref_lse, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- bad inputs


def _bad_minmax_setup(device):
    gen = torch.Generator().manual_seed(11)
    k, _ = cache_views(4, 40, 2, 16, torch.float32, "plain", device)
    k.copy_(randn(k.shape, gen).to(device))
    meta = _sentinel_meta(4, 3, 2, 16, device, gen)
    return k, meta


BAD_MINMAX = {
    "row-out-of-range": (dict(row_ids=[1, 4]), ValueError, "row"),
    "negative-row": (dict(row_ids=[-1, 2]), ValueError, "row"),
    "duplicate-row": (dict(row_ids=[2, 2]), ValueError, "twice"),
    "length-past-seq": (dict(lengths=[10, 41]), ValueError, "outside"),
    "negative-length": (dict(lengths=[-1, 5]), ValueError, "outside"),
    "negative-first-block": (dict(first_block=[0, -1]), ValueError, "first_block"),
    "lengths-shape": (dict(lengths=[3]), ValueError, "lengths"),
    "head-lengths-shape": (dict(head_lengths=[[1], [2]]), ValueError, "head_lengths"),
    "float-rows": (dict(row_ids=torch.tensor([0.0, 1.0])), TypeError, "row_ids"),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(BAD_MINMAX))
def test_block_minmax_bad_input_leaves_meta_unchanged(device, name):
    change, exc, match = BAD_MINMAX[name]
    k, meta = _bad_minmax_setup(device)
    before = meta.clone()
    args = dict(row_ids=[0, 2], lengths=[40, 20], first_block=[0, 0], head_lengths=None)  # entry 0 is valid
    args.update(change)
    if isinstance(args["row_ids"], torch.Tensor):
        args["row_ids"] = args["row_ids"].to(device)
    with pytest.raises(exc, match=match):
        vattn.block_minmax(k, meta, args["row_ids"], args["lengths"], args["first_block"],
                           head_lengths=args["head_lengths"])  # fmt: skip
    assert torch.equal(meta, before)


@pytest.mark.parametrize("device", DEVICES)
def test_block_minmax_rejects_bad_tensors(device):
    k, meta = _bad_minmax_setup(device)
    before = meta.clone()
    with pytest.raises(ValueError, match="meta"):
        vattn.block_minmax(k, meta[:, :2], [0], [10])  # fewer blocks than the cache needs
    with pytest.raises(TypeError, match="meta"):
        vattn.block_minmax(k, meta.double(), [0], [10])
    with pytest.raises(ValueError, match="meta"):
        vattn.block_minmax(k, meta[..., :8], [0], [10])
    with pytest.raises(ValueError, match="block"):
        vattn.block_minmax(k, meta, [0], [10], block=0)
    q8 = torch.zeros(4, 40, 2, 16, dtype=torch.int8, device=device)
    with pytest.raises(ValueError, match="scale"):
        vattn.block_minmax(q8, meta, [0], [10])
    with pytest.raises(TypeError, match="int32"):
        torch.ops.vattn.block_minmax(k, meta, _i32([0], device).long(), _i32([10], device), _i32([0], device))
    assert torch.equal(meta, before)


@pytest.mark.parametrize("device", DEVICES)
def test_quest_select_rejects_bad_inputs(device):
    gen = torch.Generator().manual_seed(12)
    meta = _random_meta(3, 4, 2, 16, gen).to(device)
    q = randn((2, 4, 16), gen).to(device)
    good = dict(token_budget=32)
    with pytest.raises(ValueError, match="token_budget"):
        vattn.quest_select(q, meta, [0, 1], [10, 20], token_budget=0)
    with pytest.raises(ValueError, match="outside"):
        vattn.quest_select(q, meta, [0, 5], [10, 20], max_blocks_hint=4, **good)
    with pytest.raises(ValueError, match="outside|blocks"):
        vattn.quest_select(q, meta, [0, 1], [10, 65], max_blocks_hint=4, **good)  # 5 blocks, meta holds 4
    with pytest.raises(ValueError, match="multiple"):
        vattn.quest_select(q[:, :3], meta, [0, 1], [10, 20], **good)
    with pytest.raises(ValueError, match="q has"):
        vattn.quest_select(q, meta, [0], [10], **good)
    with pytest.raises(TypeError, match="meta"):
        vattn.quest_select(q, meta.half(), [0, 1], [10, 20], **good)
    with pytest.raises(ValueError, match="max_blocks_hint"):
        torch.ops.vattn.quest_select(q, meta, _i32([0, 1], device), _i32([10, 20], device), 32, -1)


def _bad_sparse_setup(device):
    gen = torch.Generator().manual_seed(13)
    k, v = cache_views(3, 64, 2, 16, torch.float32, "token_major", device)
    fill_cache(k, v, [0, 1, 2], [64, 40, 64], gen)
    q = randn((2, 2, 16), gen).to(device)
    ids = _i32([[[0, 2, 3], [1, 3, -1]], [[0, 1, 2], [2, -1, -1]]])
    counts = _i32([[3, 2], [3, 1]])
    return q, k, v, ids, counts


BAD_SPARSE = {
    "block-past-row": (
        lambda ids, c, L: (
            ids.index_put_((torch.tensor(1), torch.tensor(0), torch.tensor(2)), torch.tensor(3, dtype=torch.int32)),
            c,
            L,
        ),
        "outside",
    ),  # fmt: skip
    "negative-block": (
        lambda ids, c, L: (
            ids.index_put_((torch.tensor(0), torch.tensor(1), torch.tensor(0)), torch.tensor(-1, dtype=torch.int32)),
            c,
            L,
        ),
        "outside",
    ),  # fmt: skip
    "not-increasing": (
        lambda ids, c, L: (
            ids.index_put_((torch.tensor(0), torch.tensor(0), torch.tensor(1)), torch.tensor(0, dtype=torch.int32)),
            c,
            L,
        ),
        "increasing",
    ),  # fmt: skip
    "count-past-max": (
        lambda ids, c, L: (
            ids,
            c.index_put_((torch.tensor(1), torch.tensor(1)), torch.tensor(4, dtype=torch.int32)),
            L,
        ),
        "outside",
    ),
    "negative-count": (
        lambda ids, c, L: (
            ids,
            c.index_put_((torch.tensor(1), torch.tensor(1)), torch.tensor(-1, dtype=torch.int32)),
            L,
        ),
        "outside",
    ),
    "length-past-seq": (lambda ids, c, L: (ids, c, _i32([64, 65])), "outside"),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(BAD_SPARSE))
def test_sparse_decode_bad_block_lists(device, name):
    make, match = BAD_SPARSE[name]
    q, k, v, ids, counts = _bad_sparse_setup(device)
    before = (k.clone(), v.clone())
    ids, counts, L = make(ids.clone(), counts.clone(), _i32([64, 40]))
    with pytest.raises(ValueError, match=match):
        vattn.sparse_decode_attention(q, k, v, _i32([0, 1], device), L.to(device), ids.to(device), counts.to(device))
    assert torch.equal(k.nan_to_num(7.0), before[0].nan_to_num(7.0)) and torch.equal(
        v.nan_to_num(7.0), before[1].nan_to_num(7.0)
    )


@pytest.mark.parametrize("device", DEVICES)
def test_sparse_decode_rejects_bad_tensors(device):
    q, k, v, ids, counts = _bad_sparse_setup(device)
    r, L, ids, counts = _i32([0, 1], device), _i32([64, 40], device), ids.to(device), counts.to(device)
    with pytest.raises(ValueError, match="block_ids"):
        vattn.sparse_decode_attention(q, k, v, r, L, ids[:, :1], counts)
    with pytest.raises(ValueError, match="block_counts"):
        vattn.sparse_decode_attention(q, k, v, r, L, ids, counts[:, :1])
    with pytest.raises(TypeError, match="dtype"):
        vattn.sparse_decode_attention(q.half(), k, v, r, L, ids, counts)
    with pytest.raises(ValueError, match="softcap"):
        vattn.sparse_decode_attention(q, k, v, r, L, ids, counts, softcap=-1.0)
    with pytest.raises(ValueError, match="q has"):
        vattn.sparse_decode_attention(q[:1], k, v, r, L, ids, counts)
    with pytest.raises(TypeError, match="int32"):
        torch.ops.vattn.sparse_decode_attention(q, k, v, r, L, ids.long(), counts)


def test_quest_int64_and_lists_accepted():
    q, k, v, ids, counts = _bad_sparse_setup("cpu")
    a = vattn.sparse_decode_attention(q, k, v, [0, 1], [64, 40], ids.long(), counts.tolist())
    b = vattn.sparse_decode_attention(q, k, v, _i32([0, 1]), _i32([64, 40]), ids, counts)
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------- torch.library


@pytest.mark.parametrize("device,impl", IMPLS)
def test_opcheck_quest(device, impl):
    gen = torch.Generator().manual_seed(14)
    rows, seq, heads, dim = 3, 70, 2, 64
    k, v = cache_views(rows, seq, heads, dim, torch.float16, "token_major", device)
    k.copy_(randn(k.shape, gen, torch.float16).to(device))  # opcheck compares runs: no NaN filler
    v.copy_(randn(v.shape, gen, torch.float16).to(device))
    meta = torch.zeros(rows, _nb(seq), heads, 2, dim, device=device)
    r, L, first = _i32([2, 0], device), _i32([70, 33], device), _i32([0, 1], device)
    torch.library.opcheck(torch.ops.vattn.block_minmax.default, (k, meta, r, L, first))
    torch.library.opcheck(torch.ops.vattn.block_minmax.default, (k, meta, r, L, first),
                          dict(head_lengths=_i32([[70, 3], [33, 0]], device)))  # fmt: skip
    q = randn((2, heads * 3, dim), gen, torch.float16).to(device)
    torch.library.opcheck(torch.ops.vattn.quest_select.default, (q, meta, r, L, 32, 5))
    ids, counts = torch.ops.vattn.quest_select(q, meta, r, L, 32, 5)
    with vattn.ops.attention_impl(impl):
        torch.library.opcheck(torch.ops.vattn.sparse_decode_attention.default, (q, k, v, r, L, ids, counts))
        torch.library.opcheck(torch.ops.vattn.sparse_decode_attention.default, (q, k, v, r, L, ids, counts),
                              dict(softcap=10.0, scale=0.2))  # fmt: skip


def test_quest_under_torch_compile():
    q, k, v, ids, counts = _bad_sparse_setup("cpu")
    r, L = _i32([0, 1]), _i32([64, 40])
    meta = torch.zeros(3, 4, 2, 2, 16)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def f(q, k, v, meta):
        torch.ops.vattn.block_minmax(k, meta, r, L, torch.zeros(2, dtype=torch.int32))
        i, c = torch.ops.vattn.quest_select(q, meta, r, L, 32, 4)
        return torch.ops.vattn.sparse_decode_attention(q, k, v, r, L, i, c)[0]

    got = f(q, k, v, meta)
    m2 = torch.zeros_like(meta)
    vattn.block_minmax(k, m2, r, L)
    assert torch.equal(meta, m2)
    i, c = vattn.quest_select(q, m2, r, L, token_budget=32)
    assert torch.equal(got, vattn.sparse_decode_attention(q, k, v, r, L, i, c))


@pytest.mark.gpu
def test_quest_cuda_kernels_skip_out_of_range():
    """The CUDA ops themselves (no value checks, as under graph capture) stay inside the tensors."""
    q, k, v, ids, counts = _bad_sparse_setup("cuda")
    r = _i32([0, 1], "cuda")
    bad_ids = ids.clone()
    bad_ids[0, 0] = torch.tensor([1 << 30, -7, 3], dtype=torch.int32)
    bad_counts = _i32([[1000, -3], [3, 1]])
    for impl in ("fast", "simple"):
        with vattn.ops.attention_impl(impl):
            out, _ = torch.ops.vattn.sparse_decode_attention(q, k, v, _i32([-1, 1 << 30], "cuda"),
                                                             _i32([1 << 30, -5], "cuda"), bad_ids.cuda(),
                                                             bad_counts.cuda())  # fmt: skip
            torch.ops.vattn.sparse_decode_attention(
                q, k, v, r, _i32([64, 40], "cuda"), bad_ids.cuda(), bad_counts.cuda()
            )
    meta = torch.zeros(3, 4, 2, 2, 16, device="cuda")
    torch.ops.vattn.block_minmax(k, meta, _i32([-1, 1 << 30], "cuda"), _i32([1 << 30, -1], "cuda"),
                                 _i32([-4, 1 << 30], "cuda"))  # fmt: skip
    torch.ops.vattn.block_minmax(k, meta, _i32([0, 0], "cuda"), _i32([1 << 30, 5], "cuda"), _i32([-4, 0], "cuda"))
    torch.ops.vattn.quest_select(q, meta, _i32([-1, 7], "cuda"), _i32([1 << 30, -1], "cuda"), 32, 4)
    torch.ops.vattn.quest_select(q, meta, r, _i32([1 << 30, 64], "cuda"), 32, 4)
    torch.cuda.synchronize()
