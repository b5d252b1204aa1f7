"""append_kv with per-head positions (head_positions [tokens, kv_heads]; after eviction the kv heads
of a row hold different numbers of tokens) against reference.append_kv, bit for bit: every storage
format, strided layouts, the parallel CPU path, bad positions (raise, cache unchanged), opcheck, and
eviction end to end (compact_kv, then appends at per-head positions, then decode with
head_seqlens_k). cpu; cuda marked gpu."""

from __future__ import annotations

import pytest
import torch

import vattn
from vattn import formats, reference
from helpers import LAYOUTS, cache_views, randn
from test_kv_formats import quant_side_views

DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]
QSPECS = ["fp8_e4m3", "int8", "int4", ("int8", "int4"), ("fp8_e4m3", "int8")]
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


def _pair(spec):
    return (spec, spec) if isinstance(spec, str) else tuple(spec)


def _id(spec):
    return spec if isinstance(spec, str) else "-".join(spec)


def bits(t):
    return t.view(_BITS[t.element_size()]).cpu()


def head_inputs(n, rows, seq, heads, dim, dtype, device, seed):
    """k, v [n, heads, dim], row ids [n] and head positions [n, heads]: for each head, the n
    (row, position) pairs are distinct, and the heads use different positions."""
    gen = torch.Generator().manual_seed(seed)
    k = randn((n, heads, dim), gen, dtype).to(device)
    v = randn((n, heads, dim), gen, dtype).to(device)
    row_ids = torch.randint(0, rows, (n,), generator=gen, dtype=torch.int32)
    hp = torch.empty((n, heads), dtype=torch.int32)
    for h in range(heads):
        for r in range(rows):
            idx = (row_ids == r).nonzero().flatten()
            hp[idx, h] = torch.randperm(seq, generator=gen)[: idx.numel()].to(torch.int32)
    positions = torch.randint(0, seq, (n,), generator=gen, dtype=torch.int32)  # ignored
    return k, v, row_ids.to(device), positions.to(device), hp.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dim", [64, 40])
def test_head_positions_plain(device, dtype, layout, dim):
    rows, seq, heads = 4, 30, 3
    for seed, n in ((0, 20), (1, 1)):
        kc, vc = cache_views(rows, seq, heads, dim, dtype, layout, device)
        rk, rv = kc.cpu().clone(), vc.cpu().clone()
        k, v, row_ids, positions, hp = head_inputs(n, rows, seq, heads, dim, dtype, device, seed)
        vattn.append_kv_raw(kc, vc, k, v, row_ids, positions, head_positions=hp)
        reference.append_kv(rk, rv, k.cpu(), v.cpu(), row_ids.cpu(), positions.cpu(), head_positions=hp.cpu())
        assert torch.equal(bits(kc), bits(rk)) and torch.equal(bits(vc), bits(rv))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec", QSPECS, ids=_id)
@pytest.mark.parametrize("layout", ["plain", "record", "head_major"])
def test_head_positions_quantized(device, spec, layout):
    """Codes and scale words of each (token, head) land at that head's position, bit for bit."""
    rows, seq, heads, dim = 3, 25, 4, 64
    kf, vf = (formats.get(s) for s in _pair(spec))
    for seed, dtype in ((0, torch.float32), (1, torch.float16), (2, torch.bfloat16)):
        kc, ks = quant_side_views(rows, seq, heads, dim, kf, layout, device)
        vc, vs = quant_side_views(rows, seq, heads, dim, vf, layout, device)
        ref = [t.cpu().clone() for t in (kc, vc, ks, vs)]
        k, v, row_ids, positions, hp = head_inputs(12, rows, seq, heads, dim, dtype, device, seed)
        vattn.append_kv_raw(kc, vc, k, v, row_ids, positions, k_scale=ks, v_scale=vs, head_positions=hp)
        reference.append_kv(ref[0], ref[1], k.cpu(), v.cpu(), row_ids.cpu(), positions.cpu(), ref[2], ref[3],
                            kf.name, vf.name, head_positions=hp.cpu())  # fmt: skip
        for name, a, b in zip(("k", "v", "k_scale", "v_scale"), (kc, vc, ks, vs), ref):
            assert torch.equal(bits(a), bits(b)), f"{_id(spec)}-{layout}-{dtype}: {name} differs"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kv_format", ["float16", "int8"])
def test_head_positions_large_parallel(device, kv_format):
    """Past the CPU op's small-append threshold (its OpenMP path), many CUDA blocks."""
    rows, seq, heads, dim = 8, 400, 4, 64
    fmt = formats.get(kv_format)
    if fmt.quantized:
        (kc, ks), (vc, vs) = (quant_side_views(rows, seq, heads, dim, fmt, "record", device) for _ in range(2))
    else:
        (kc, vc), ks, vs = cache_views(rows, seq, heads, dim, torch.float16, "token_major", device), None, None
    ref = [None if t is None else t.cpu().clone() for t in (kc, vc, ks, vs)]
    k, v, row_ids, positions, hp = head_inputs(300, rows, seq, heads, dim, torch.float16, device, 3)
    vattn.append_kv_raw(kc, vc, k, v, row_ids, positions, k_scale=ks, v_scale=vs, head_positions=hp)
    name = kv_format if fmt.quantized else None
    reference.append_kv(ref[0], ref[1], k.cpu(), v.cpu(), row_ids.cpu(), positions.cpu(), ref[2], ref[3], name, name,
                        head_positions=hp.cpu())  # fmt: skip
    for a, b in zip((kc, vc, ks, vs), ref):
        assert a is None or torch.equal(bits(a), bits(b))


@pytest.mark.parametrize("device", DEVICES)
def test_head_positions_equal_to_positions_is_plain_append(device):
    kc, vc = cache_views(3, 16, 2, 32, torch.bfloat16, "token_major", device)
    kc2, vc2 = kc.clone(), vc.clone()
    k, v, row_ids, positions, _ = head_inputs(6, 3, 16, 2, 32, torch.bfloat16, device, 5)
    positions = torch.tensor([0, 1, 2, 3, 4, 5], dtype=torch.int32, device=device)
    vattn.append_kv_raw(kc, vc, k, v, row_ids, positions)
    vattn.append_kv_raw(kc2, vc2, k, v, row_ids, positions, head_positions=positions[:, None].expand(-1, 2))
    assert torch.equal(bits(kc), bits(kc2)) and torch.equal(bits(vc), bits(vc2))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kv_format", ["float32", "int4"])
def test_bad_head_positions_leave_cache_unchanged(device, kv_format):
    rows, seq, heads, dim = 3, 8, 2, 16
    fmt = formats.get(kv_format)
    if fmt.quantized:
        (kc, ks), (vc, vs) = (quant_side_views(rows, seq, heads, dim, fmt, "plain", device) for _ in range(2))
    else:
        (kc, vc), ks, vs = cache_views(rows, seq, heads, dim, torch.float32, "plain", device), None, None
    before = [None if t is None else bits(t).clone() for t in (kc, vc, ks, vs)]
    k = torch.randn(3, heads, dim, device=device)
    rows_t = torch.tensor([0, 1, 2], dtype=torch.int32, device=device)
    pos = torch.tensor([0, 1, 2], dtype=torch.int32, device=device)
    kw = dict(k_scale=ks, v_scale=vs)
    for hp in ([[0, 1], [2, 3], [4, 8]], [[0, 1], [2, -1], [4, 5]]):
        with pytest.raises(ValueError, match="outside"):
            vattn.append_kv_raw(kc, vc, k, k, rows_t, pos, head_positions=torch.tensor(hp, device=device), **kw)
    with pytest.raises(ValueError, match="head_positions"):
        vattn.append_kv_raw(kc, vc, k, k, rows_t, pos, head_positions=[[0], [1], [2]], **kw)
    with pytest.raises(ValueError, match="head_positions"):
        vattn.append_kv_raw(kc, vc, k, k, rows_t, pos, head_positions=[[0, 1], [1, 2]], **kw)
    with pytest.raises(TypeError, match="head_positions"):
        vattn.append_kv_raw(kc, vc, k, k, rows_t, pos, head_positions=torch.zeros(3, 2, device=device), **kw)
    for b, t in zip(before, (kc, vc, ks, vs)):
        assert b is None or torch.equal(b, bits(t))


@pytest.mark.parametrize("device", DEVICES)
def test_head_positions_int64_and_lists(device):
    kc, vc = cache_views(2, 8, 2, 16, torch.float32, "plain", device)
    k = torch.randn(2, 2, 16, device=device)
    vattn.append_kv_raw(kc, vc, k, -k, [0, 1], [0, 0], head_positions=[[3, 5], [0, 7]])
    vattn.append_kv_raw(kc, vc, k * 2, k, [1, 0], [0, 0], head_positions=torch.tensor([[1, 2], [0, 0]]))
    assert torch.equal(kc[0, 3, 0], k[0, 0]) and torch.equal(kc[0, 5, 1], k[0, 1])
    assert torch.equal(vc[1, 7, 1], -k[1, 1]) and torch.equal(kc[1, 2, 1], 2 * k[0, 1])
    assert torch.equal(kc[0, 0, 0], 2 * k[1, 0])


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_append_head_positions(device):
    kc, vc = cache_views(3, 8, 2, 64, torch.float16, "layer_major", device)
    kc.zero_()
    vc.zero_()
    k = torch.randn(4, 2, 64, dtype=torch.float16, device=device)
    rows = torch.tensor([2, 0, 1, 2], dtype=torch.int32, device=device)
    pos = torch.tensor([0, 3, 7, 5], dtype=torch.int32, device=device)
    hp = torch.tensor([[0, 1], [3, 2], [7, 6], [5, 4]], dtype=torch.int32, device=device)
    torch.library.opcheck(torch.ops.vattn.append_kv.default, (kc, vc, k, k * 2, rows, pos), dict(head_positions=hp))
    # Positional, at the end of the schema: existing callers keep their argument order.
    torch.library.opcheck(torch.ops.vattn.append_kv.default, (kc, vc, k, k * 2, rows, pos, None, None, hp))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kv_format", ["float16", "int8"])
def test_evict_then_append_then_decode(device, kv_format):
    """End to end on a user cache: per-head eviction with compact_kv, one new token per row appended
    at each head's own length, decode with head_seqlens_k, against the reference over the kept
    tokens."""
    rows, seq, heads, group, dim = 3, 64, 2, 2, 64
    gen = torch.Generator().manual_seed(21)
    fmt = formats.get(kv_format)
    if fmt.quantized:
        (kc, ks), (vc, vs) = (quant_side_views(rows, seq, heads, dim, fmt, "plain", device) for _ in range(2))
    else:
        (kc, vc), ks, vs = cache_views(rows, seq, heads, dim, torch.float16, "plain", device), None, None
    lens = [40, 17, 33]
    k = randn((sum(lens), heads, dim), gen, torch.float16).to(device)
    v = randn((sum(lens), heads, dim), gen, torch.float16).to(device)
    row_ids = torch.tensor([r for r, n in enumerate(lens) for _ in range(n)], dtype=torch.int32)
    pos = torch.tensor([p for n in lens for p in range(n)], dtype=torch.int32)
    vattn.append_kv_raw(kc, vc, k, v, row_ids, pos, k_scale=ks, v_scale=vs)
    # Per head: sinks + a window of a per-head size.
    keep = torch.zeros((rows, heads, seq), dtype=torch.int32)
    keep_lens = torch.zeros((rows, heads), dtype=torch.int32)
    for r, n in enumerate(lens):
        for h in range(heads):
            w = 4 + 6 * h + r
            idx = sorted(set(range(2)) | set(range(max(0, n - w), n)))
            keep[r, h, : len(idx)] = torch.tensor(idx, dtype=torch.int32)
            keep_lens[r, h] = len(idx)
    dense = [reference.dequantize(c.cpu(), s.cpu(), fmt.name) if fmt.quantized else c.cpu().float()
             for c, s in ((kc, ks), (vc, vs))]  # fmt: skip
    vattn.compact_kv(kc, vc, torch.arange(rows, dtype=torch.int32), keep, keep_lens, k_scale=ks, v_scale=vs)
    new_k = randn((rows, heads, dim), gen, torch.float16).to(device)
    new_v = randn((rows, heads, dim), gen, torch.float16).to(device)
    vattn.append_kv_raw(kc, vc, new_k, new_v, torch.arange(rows), torch.zeros(rows, dtype=torch.int32),
                        k_scale=ks, v_scale=vs, head_positions=keep_lens.to(device))  # fmt: skip
    head_lens = keep_lens + 1
    q = randn((rows, heads * group, dim), gen, torch.float16).to(device)
    out = vattn.decode_attention(q, kc, vc, torch.full((rows,), seq, dtype=torch.int32, device=device),
                                 head_seqlens_k=head_lens.to(device), k_scale=ks, v_scale=vs)  # fmt: skip
    # Reference: the kept tokens (dequantized before eviction) then the new one (quantized like the op).
    kr = torch.full((rows, seq, heads, dim), float("nan"), dtype=torch.float64)
    vr = kr.clone()
    for r in range(rows):
        for h in range(heads):
            n = int(keep_lens[r, h])
            idx = keep[r, h, :n].long()
            for dst, src, new in ((kr, dense[0], new_k), (vr, dense[1], new_v)):
                dst[r, :n, h] = src[r, idx, h].double()
                x = new[r, h].float().cpu()
                if fmt.quantized:
                    c, s = reference.quantize(x[None], fmt.name)
                    x = reference.dequantize(c, s, fmt.name)[0]
                dst[r, n, h] = x.double()
    ref, _ = reference.attention(q.cpu(), kr, vr, torch.full((rows,), seq, dtype=torch.int32),
                                 head_seqlens_k=head_lens)  # fmt: skip
    assert torch.isfinite(out).all()
    assert (out.cpu().double() - ref).abs().max().item() < 2e-2
