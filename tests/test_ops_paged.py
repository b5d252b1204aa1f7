"""Paged KV views (vLLM's block tables, cuda/include/vattn/kv_paging.h): decode, prefill (chunks on a
cached prefix included) and append_kv through a block table, for every KV format, against the
reference (reference.gather_paged / reference.append_kv(block_table=...)) and against the same ops
on the contiguous view of the same data (bit for bit on CPU). Physical blocks are permuted, some are
shared by rows (prefix caching), unused blocks and slots past the lengths hold NaN (0xff codes), and
block-table entries past the lengths hold junk. Bad inputs raise with the cache unchanged. cpu; cuda
marked gpu (fast and simple kernels)."""

from __future__ import annotations

import dataclasses
import random
from typing import Optional

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vattn
from vattn import formats, reference
from helpers import Case, assert_attention_close, device_impls, randn, skip_unsupported

LAYOUTS = ("nhd", "hnd", "kv_blocks")  # physical layouts (see physical_views)
SPECS = ["float32", "float16", "bfloat16", "fp8_e4m3", "int8", "int4", ("int4_ch", "int4"), ("int8", "int4")]


def _spec_id(spec):
    return spec if isinstance(spec, str) else "-".join(spec)


def _formats(spec, dtype):
    """(K format, V format, q dtype) of a spec: a plain spec names the dtype itself."""
    if isinstance(spec, str) and spec in ("float32", "float16", "bfloat16"):
        f = formats.plain_for(getattr(torch, spec))
        return f, f, getattr(torch, spec)
    names = (spec, spec) if isinstance(spec, str) else spec
    return formats.get(names[0]), formats.get(names[1]), dtype


def _garbage(shape, fmt, device):
    """Storage of one side that reads as NaN: NaN floats, 0xff codes (fp8 NaN, int8 -1, int4 15)."""
    if not fmt.quantized:
        return torch.full(shape, float("nan"), dtype=fmt.storage_dtype, device=device)
    return torch.full(shape, 0xFF, dtype=torch.uint8, device=device).view(fmt.storage_dtype)


def physical_views(nb, bs, heads, dim, kf, vf, layout, device):
    """(k, v, k_scale, v_scale) physical blocks [nb, bs, heads, ...] of a layout, NaN-filled:
    nhd: plain [nb, bs, heads, d] tensors (vLLM's NHD); hnd: [nb, heads, bs, d] transposed (HND);
    kv_blocks: one allocation [nb, 2, bs, heads, d] holding K and V of a block side by side (a
    block stride of twice the block)."""
    out = []
    for fmt in (kf, vf):
        e = fmt.storage_elems(dim)
        if layout == "nhd":
            data = _garbage((nb, bs, heads, e), fmt, device)
        elif layout == "hnd":
            data = _garbage((nb, heads, bs, e), fmt, device).transpose(1, 2)
        else:
            data = None
        out.append(data)
    if layout == "kv_blocks":
        if kf.storage_dtype == vf.storage_dtype and kf.storage_elems(dim) == vf.storage_elems(dim):
            both = _garbage((nb, 2, bs, heads, kf.storage_elems(dim)), kf, device)
            out = [both[:, 0], both[:, 1]]
        else:  # different storage: two allocations with a gap between blocks
            out = [_garbage((nb, 2, bs, heads, f.storage_elems(dim)), f, device)[:, 1] for f in (kf, vf)]
    scales = []
    for fmt in (kf, vf):
        if not fmt.quantized:
            scales.append(None)
        elif layout == "hnd":
            scales.append(torch.full((nb, heads, bs, fmt.scale_words), float("nan"), device=device).transpose(1, 2))
        else:
            scales.append(torch.full((nb, bs, heads, fmt.scale_words), float("nan"), device=device))
    return out[0], out[1], scales[0], scales[1]


@dataclasses.dataclass
class Paged:
    """A paged problem: physical caches, the block table, and the op kwargs (block_table included)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    ks: Optional[torch.Tensor]
    vs: Optional[torch.Tensor]
    kf: formats.KVFormat
    vf: formats.KVFormat
    table: torch.Tensor
    kw: dict  # seqlens_k, row_ids, options (and cu_seqlens_q, head_seqlens_k)
    reach: list  # per batch row: tokens stored (max over its heads)

    def fmt_names(self):
        return (self.kf.name if self.kf.quantized else None, self.vf.name if self.vf.quantized else None)


def block_size_for(bs: int, kf, vf, dim: int) -> int:
    """bs, rounded up to a multiple of an int4_ch group when a side is int4_ch."""
    g = max(formats.group_tokens(kf, dim), formats.group_tokens(vf, dim))
    return bs if g <= 1 or bs % g == 0 else g * -(-bs // g)


def build_paged(case: Case, spec, dtype, bs, layout, device, seed, share=True, spare=3) -> Paged:
    """The paged problem of a case. Rows of the batch get shuffled physical blocks; with share,
    some rows reuse the first full blocks of another (prefix caching; they then hold the later
    row's values, which both rows read). Table entries past each row's tokens hold junk (-1, ids
    past the cache, valid ids of other rows). The cache is filled by reference.append_kv through
    the table (one call per row, so a shared block ends up with one row's values), and slots past a
    head's own length are reset to garbage. `spare` physical blocks are left unused (NaN)."""
    kf, vf, dtype = _formats(spec, dtype)
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    batch = len(case.lens)
    rows = batch + case.extra_rows
    row_ids = list(range(rows))
    rng.shuffle(row_ids)
    row_ids = row_ids[:batch]
    heads, dim = case.hkv, case.dim
    head_lens = case.head_lens or [[n] * heads for n in case.lens]
    reach = [max([n] + list(h)) for n, h in zip(case.lens, head_lens)]
    need = [-(-r // bs) for r in reach]
    per_row = max(need + [1]) + rng.randint(0, 2)
    nb = sum(need) + spare
    k, v, ks, vs = physical_views(nb, bs, heads, dim, kf, vf, layout, device)
    perm = torch.randperm(nb, generator=gen).tolist()
    table = torch.tensor([[rng.choice([-1, nb + 7, -(2**31), rng.randrange(nb)]) for _ in range(per_row)]
                          for _ in range(rows)], dtype=torch.int32)  # fmt: skip
    nxt = 0
    for b, row in enumerate(row_ids):
        for i in range(need[b]):
            table[row, i] = perm[nxt]
            nxt += 1
    if share and batch >= 2 and case.head_lens is None:
        for b in range(1, batch, 2):  # row b shares the leading full blocks of row b - 1
            s = min(case.lens[b], case.lens[b - 1]) // bs
            table[row_ids[b], :s] = table[row_ids[b - 1], :s]
    table_dev = table.to(device)
    kfmt, vfmt = (f.name if f.quantized else None for f in (kf, vf))
    for b, row in enumerate(row_ids):
        n = reach[b]
        if n == 0:
            continue
        xk = randn((n, heads, dim), gen, dtype).to(device)
        xv = randn((n, heads, dim), gen, dtype).to(device)
        idx = torch.full((n,), row, dtype=torch.int32, device=device)
        pos = torch.arange(n, dtype=torch.int32, device=device)
        reference.append_kv(k, v, xk, xv, idx, pos, ks, vs, kfmt, vfmt, block_table=table_dev)
    for b, row in enumerate(row_ids):  # per-head lengths: what lies past a head's own length is garbage
        for h, n in enumerate(head_lens[b]):
            if n < reach[b]:
                blk, off = reference.paged_slots(table, bs, torch.tensor([row]), torch.arange(n, reach[b])[None])
                for cache, sc, fmt in ((k, ks, kf), (v, vs, vf)):
                    if fmt.quantized:
                        cache.view(torch.uint8)[blk[0], off[0], h] = 0xFF
                    else:
                        cache[blk[0], off[0], h] = float("nan")
                    if sc is not None and formats.group_tokens(fmt, dim) <= 1:
                        sc[blk[0], off[0], h] = float("nan")
    total_q = batch if case.q_lens is None else sum(case.q_lens)
    q = randn((total_q, heads * case.group, dim), gen, dtype).to(device)
    kw = dict(
        seqlens_k=torch.tensor(case.lens, dtype=torch.int32, device=device),
        row_ids=torch.tensor(row_ids, dtype=torch.int32, device=device),
        scale=case.scale,
        window_left=case.window_left,
        softcap=case.softcap,
    )
    if case.head_lens is not None:
        kw["head_seqlens_k"] = torch.tensor(case.head_lens, dtype=torch.int32, device=device)
    if case.q_lens is not None:
        kw["cu_seqlens_q"] = torch.tensor([0] + list(_cumsum(case.q_lens)), dtype=torch.int32, device=device)
    return Paged(q, k, v, ks, vs, kf, vf, table_dev, kw, reach)


def _cumsum(xs):
    total = 0
    for x in xs:
        total += x
        yield total


def contiguous_of(p: Paged):
    """The contiguous view of the same data (reference.gather_paged of codes and scales)."""
    g = [None if t is None else reference.gather_paged(t, p.table) for t in (p.k, p.v, p.ks, p.vs)]
    return g[0], g[1], g[2], g[3]


def dense_of(p: Paged):
    """The values the kernels read, [rows, capacity, heads, dim] fp32 (NaN where nothing is stored)."""
    kc, vc, ks, vs = contiguous_of(p)
    dim = p.q.shape[-1]
    out = []
    for c, s, f in ((kc, ks, p.kf), (vc, vs, p.vf)):
        out.append(reference.dequantize(c.cpu(), s.cpu(), f.name, dim) if f.quantized else c.cpu().float())
    return out


def run_op(q, k, v, kw, ks=None, vs=None, block_table=None):
    kw = dict(kw)
    seq = kw.pop("seqlens_k")
    if "cu_seqlens_q" not in kw:
        return vattn.decode_attention(q, k, v, seq, return_lse=True, k_scale=ks, v_scale=vs,
                                      block_table=block_table, **kw)  # fmt: skip
    cu = kw.pop("cu_seqlens_q")
    return vattn.prefill_attention(q, k, v, cu, seq, return_lse=True, k_scale=ks, v_scale=vs,
                                   block_table=block_table, **kw)  # fmt: skip


def check_paged_attention(p: Paged, device: str, what: str) -> None:
    """The paged op against the float64 reference over the dequantized gathered view, and (CPU) bit
    for bit against the op on the contiguous view of the same data."""
    out, lse = run_op(p.q, p.k, p.v, p.kw, p.ks, p.vs, block_table=p.table)
    assert out.shape == p.q.shape and out.dtype == p.q.dtype
    kd, vd = dense_of(p)
    assert_attention_close(out, lse, p.q, kd, vd, p.kw, what)
    kc, vc, ks, vs = contiguous_of(p)
    out_c, lse_c = run_op(p.q, kc, vc, p.kw, ks, vs)
    if device == "cpu":
        assert torch.equal(out, out_c), f"{what}: paged output differs from the contiguous one"
        assert torch.equal(lse, lse_c), f"{what}: paged LSE differs from the contiguous one"


def _skip(device, p_dtype, dim, spec, prefill):
    kf, vf, dtype = _formats(spec, p_dtype)
    for f in (kf, vf):
        if f.quantized:
            if dim % f.elems_per_storage:
                pytest.skip(f"{f.name} needs an even head_dim")
            skip_unsupported(device, dtype, dim, prefill=prefill, kv_format=f.name)
        else:
            skip_unsupported(device, dtype, dim, prefill=prefill)


# (case, block size, layout): head dims 64 / 128 / 96, GQA groups 1 / 3 / 4, block sizes 16 - 512 and
# 48, blocks crossing inside the kernels' 64-key tiles, windows, soft-caps, per-head lengths.
DECODE_CONFIGS = [
    (Case(lens=[1, 200, 777], hkv=2, group=4, dim=64), 16, "nhd"),
    (Case(lens=[65, 1500], hkv=1, group=3, dim=128), 32, "hnd"),
    (Case(lens=[300, 17, 96, 500], hkv=2, group=1, dim=64, window_left=100), 48, "kv_blocks"),
    (Case(lens=[2049, 64], hkv=2, group=4, dim=128, softcap=30.0), 64, "nhd"),
    (Case(lens=[129, 700, 3], hkv=4, group=1, dim=96, scale=0.3), 128, "hnd"),
    (Case(lens=[1200, 513], hkv=1, group=4, dim=64, window_left=700), 512, "kv_blocks"),
    (Case(lens=[255, 400], hkv=2, group=3, dim=64, head_lens=[[255, 17], [0, 399]]), 32, "nhd"),
    (Case(lens=[0, 45, 90], hkv=1, group=1, dim=128), 16, "hnd"),
]
PREFILL_CONFIGS = [
    (Case(lens=[40, 200, 130], hkv=2, group=4, dim=64, q_lens=[40, 60, 1]), 16, "nhd"),
    (Case(lens=[700, 65], hkv=1, group=3, dim=128, q_lens=[150, 65]), 32, "hnd"),
    (Case(lens=[300, 97], hkv=2, group=1, dim=64, q_lens=[77, 0], window_left=50), 48, "kv_blocks"),
    (Case(lens=[520, 64], hkv=2, group=4, dim=128, q_lens=[256, 64], softcap=20.0), 64, "nhd"),
    (Case(lens=[333, 129], hkv=2, group=1, dim=96, q_lens=[33, 129], scale=0.3), 128, "hnd"),
    (Case(lens=[900], hkv=1, group=4, dim=64, q_lens=[100], window_left=300), 512, "kv_blocks"),
    (Case(lens=[255, 400], hkv=2, group=3, dim=64, q_lens=[5, 100], head_lens=[[255, 100], [120, 400]]), 32, "nhd"),
]


@pytest.mark.parametrize("device,impl", device_impls())
@pytest.mark.parametrize("spec", SPECS, ids=_spec_id)
@pytest.mark.parametrize("idx", range(len(DECODE_CONFIGS)))
def test_paged_decode_matrix(device, impl, spec, idx):
    case, bs, layout = DECODE_CONFIGS[idx]
    dtype = [torch.float16, torch.bfloat16, torch.float32][idx % 3]
    _skip(device, dtype, case.dim, spec, prefill=False)
    kf, vf, _ = _formats(spec, dtype)
    bs = block_size_for(bs, kf, vf, case.dim)
    with vattn.ops.attention_impl(impl):
        p = build_paged(case, spec, dtype, bs, layout, device, seed=idx)
        check_paged_attention(p, device, f"{_spec_id(spec)}-{case.describe()}-bs{bs}-{layout}")


@pytest.mark.parametrize("device,impl", device_impls())
@pytest.mark.parametrize("spec", SPECS, ids=_spec_id)
@pytest.mark.parametrize("idx", range(len(PREFILL_CONFIGS)))
def test_paged_prefill_matrix(device, impl, spec, idx):
    case, bs, layout = PREFILL_CONFIGS[idx]
    dtype = [torch.bfloat16, torch.float32, torch.float16][idx % 3]
    _skip(device, dtype, case.dim, spec, prefill=True)
    kf, vf, _ = _formats(spec, dtype)
    bs = block_size_for(bs, kf, vf, case.dim)
    with vattn.ops.attention_impl(impl):
        p = build_paged(case, spec, dtype, bs, layout, device, seed=100 + idx)
        check_paged_attention(p, device, f"{_spec_id(spec)}-{case.describe()}-bs{bs}-{layout}")


@pytest.mark.parametrize("device,impl", device_impls())
def test_paged_long_decode_split_and_shared_prefix(device, impl):
    """A long row (decode splits it over several key ranges) whose first blocks are shared with a
    second row, in reverse physical order, plus the int64 block table the wrappers convert."""
    case = Case(lens=[6000, 4100], hkv=2, group=4, dim=128)
    with vattn.ops.attention_impl(impl):
        p = build_paged(case, "bfloat16", torch.bfloat16, 16, "nhd", device, seed=5)
        check_paged_attention(p, device, "long decode")
        out64, _ = run_op(p.q, p.k, p.v, p.kw, block_table=p.table.long())
        out32, _ = run_op(p.q, p.k, p.v, p.kw, block_table=p.table)
        assert torch.equal(out64, out32)


def test_paged_block_table_strides_and_row_ids_absent():
    """A block table that is a column slice of a wider one (row stride > blocks per row), and one
    whose last dimension is not contiguous (the wrappers make it so); row_ids None reads row b."""
    case = Case(lens=[90, 33], hkv=1, group=2, dim=64, extra_rows=0)
    p = build_paged(case, "float32", torch.float32, 16, "nhd", "cpu", seed=3, share=False)
    kw = dict(p.kw)
    rows = kw.pop("row_ids").long()
    table = p.table[rows]  # batch row b -> its table row
    wide = torch.full((table.shape[0], table.shape[1] + 5), -1, dtype=torch.int32)
    wide[:, : table.shape[1]] = table
    want, _ = run_op(p.q, p.k, p.v, kw, block_table=table)
    got, _ = run_op(p.q, p.k, p.v, kw, block_table=wide[:, : table.shape[1]])
    assert torch.equal(got, want)
    got, _ = run_op(p.q, p.k, p.v, kw, block_table=table.t().contiguous().t())
    assert torch.equal(got, want)
    got, _ = run_op(p.q, p.k, p.v, kw, block_table=table.tolist())
    assert torch.equal(got, want)


@settings(max_examples=25, deadline=None)
@given(
    bs=st.sampled_from([1, 3, 16, 17, 48, 64, 100]),
    lens=st.lists(st.integers(0, 300), min_size=1, max_size=4),
    group=st.sampled_from([1, 3, 4]),
    prefill=st.booleans(),
    layout=st.sampled_from(LAYOUTS),
    seed=st.integers(0, 2**16),
)
def test_paged_equals_contiguous_property(bs, lens, group, prefill, layout, seed):
    """Any block size (1 and odd ones too), lengths and layout: the paged op equals the contiguous op
    on the gathered view bit for bit, and the reference (CPU)."""
    rng = random.Random(seed)
    q_lens = [rng.randint(0, n) for n in lens] if prefill else None
    case = Case(lens=lens, hkv=2, group=group, dim=64, q_lens=q_lens, window_left=rng.choice([-1, -1, 0, 40]))
    dtype = rng.choice([torch.float32, torch.bfloat16])
    p = build_paged(case, str(dtype).replace("torch.", ""), dtype, bs, layout, "cpu", seed=seed)
    check_paged_attention(p, "cpu", f"{case.describe()}-bs{bs}-{layout}")


# ----------------------------------------------------------------------------- append


def _bits(t):
    t = t.detach().cpu().contiguous()
    return (
        t.view(torch.uint8) if t.dtype.itemsize == 1 else t.view(torch.int32 if t.dtype.itemsize == 4 else torch.int16)
    )


def _state(p: Paged):
    return [_bits(t) for t in (p.k, p.v, p.ks, p.vs) if t is not None]


def _clone(p: Paged) -> Paged:
    """A deep copy with the same strides (physical tensors cloned through their storage)."""

    def c(t):
        return None if t is None else torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).copy_(t)

    return dataclasses.replace(p, k=c(p.k), v=c(p.v), ks=c(p.ks), vs=c(p.vs))


APPEND_CONFIGS = [
    (Case(lens=[40, 100, 7], hkv=2, group=1, dim=64), 16, "nhd"),
    (Case(lens=[65, 200], hkv=1, group=1, dim=128), 64, "hnd"),
    (Case(lens=[100, 31, 50], hkv=2, group=1, dim=64), 48, "kv_blocks"),
    (Case(lens=[500, 64], hkv=4, group=1, dim=96), 128, "nhd"),
    (Case(lens=[300], hkv=2, group=1, dim=64), 512, "hnd"),
]


@pytest.mark.parametrize("device,impl", device_impls())
@pytest.mark.parametrize("spec", SPECS, ids=_spec_id)
@pytest.mark.parametrize("idx", range(len(APPEND_CONFIGS)))
@pytest.mark.parametrize("step", ["decode", "chunk", "heads"])
def test_paged_append_matrix(device, impl, spec, idx, step):
    """A decode step (one token per row), a chunk (consecutive tokens of each row, crossing blocks,
    in shuffled order) or per-head positions, into a filled paged cache: the same bytes as the
    reference's paged append, and as the op's append into the contiguous view of the same data."""
    case, bs, layout = APPEND_CONFIGS[idx]
    dtype = [torch.float16, torch.bfloat16, torch.float32][idx % 3]
    kf, vf, dtype = _formats(spec, dtype)
    for f in (kf, vf):
        if f.quantized and case.dim % f.elems_per_storage:
            pytest.skip("needs an even head_dim")
    bs = block_size_for(bs, kf, vf, case.dim)
    rng = random.Random(idx)
    gen = torch.Generator().manual_seed(idx)
    # No sharing: a write into a shared block would change two rows of the paged cache but one of
    # the contiguous copy compared against.
    p = build_paged(case, spec, dtype, bs, layout, device, seed=200 + idx, share=False, spare=8 * len(case.lens) + 3)
    cap = p.table.shape[1] * bs
    rows = p.kw["row_ids"].tolist()
    pos, row_of, head_pos = [], [], None
    for b, row in enumerate(rows):
        n = {"decode": 1, "chunk": rng.randint(1, bs + 40), "heads": 1}[step]
        first = case.lens[b]
        for t in range(first, min(first + n, cap)):
            pos.append(t)
            row_of.append(row)
    if step == "heads":
        head_pos = torch.tensor([[max(t - rng.randint(0, 3), 0) for _ in range(case.hkv)] for t in pos])
    order = list(range(len(pos)))
    rng.shuffle(order)
    pos = [pos[i] for i in order]
    row_of = [row_of[i] for i in order]
    if head_pos is not None:
        head_pos = head_pos[order].to(torch.int32).to(device)
    n = len(pos)
    # Blocks past a row's tokens become the row's (spare ids, the table's junk there replaced).
    table = p.table.cpu().clone()
    owned = {(r, i) for b, r in enumerate(rows) for i in range(-(-p.reach[b] // bs))}
    free = sorted(set(range(p.k.shape[0])) - {int(table[r, i]) for r, i in owned})
    for r, t in zip(row_of, pos):
        if (r, t // bs) not in owned:
            table[r, t // bs] = free.pop()
            owned.add((r, t // bs))
    p.table = table.to(device)
    k = randn((n, case.hkv, case.dim), gen, dtype).to(device)
    v = randn((n, case.hkv, case.dim), gen, dtype).to(device)
    idx_rows = torch.tensor(row_of, dtype=torch.int32, device=device)
    idx_pos = torch.tensor(pos, dtype=torch.int32, device=device)
    before = contiguous_of(p)
    want = _clone(p)
    names = p.fmt_names()
    reference.append_kv(want.k, want.v, k, v, idx_rows, idx_pos, want.ks, want.vs, *names, head_pos,
                        block_table=p.table)  # fmt: skip
    with vattn.ops.attention_impl(impl):
        vattn.append_kv_raw(p.k, p.v, k, v, idx_rows, idx_pos, k_scale=p.ks, v_scale=p.vs, head_positions=head_pos,
                            block_table=p.table)  # fmt: skip
    for a, b, name in zip(_state(p), _state(want), ("k", "v", "k_scale", "v_scale")):
        assert torch.equal(a, b), f"paged append: {name} differs from the reference"
    # The contiguous op on the gathered view writes the same values, compared over the blocks each row
    # of the batch owns (junk table entries elsewhere may alias those blocks).
    kc, vc, ks, vs = before
    vattn.append_kv_raw(kc, vc, k, v, idx_rows, idx_pos, k_scale=ks, v_scale=vs, head_positions=head_pos)
    for a, b, name in zip(contiguous_of(p), (kc, vc, ks, vs), ("k", "v", "k_scale", "v_scale")):
        if b is None:
            continue
        for r in rows:
            m = bs * (1 + max(i for rr, i in owned if rr == r))
            assert torch.equal(_bits(a[r, :m]), _bits(b[r, :m])), (
                f"paged append: {name} differs from the contiguous one"
            )


@pytest.mark.parametrize("device,impl", device_impls())
@pytest.mark.parametrize("spec", ["bfloat16", "int8", ("int4_ch", "int4")], ids=_spec_id)
def test_append_through_vllm_slot_mapping(device, impl, spec):
    """vLLM's flat slot_mapping: block_table = arange(num_blocks)[None], row_ids = 0, positions =
    slot ids writes what the per-row append through the real block table writes."""
    case = Case(lens=[70, 20], hkv=2, group=1, dim=64)
    kf, vf, dtype = _formats(spec, torch.float16)
    bs = block_size_for(16, kf, vf, 64)
    p = build_paged(case, spec, dtype, bs, "nhd", device, seed=9, share=False)
    q = _clone(p)
    gen = torch.Generator().manual_seed(1)
    rows = p.kw["row_ids"]
    pos = p.kw["seqlens_k"] - 1  # rewrite each row's last token
    k = randn((2, 2, 64), gen, dtype).to(device)
    v = randn((2, 2, 64), gen, dtype).to(device)
    vattn.append_kv_raw(p.k, p.v, k, v, rows, pos, k_scale=p.ks, v_scale=p.vs, block_table=p.table)
    blk, off = reference.paged_slots(p.table.cpu(), bs, rows.cpu(), pos.cpu())
    nb = p.k.shape[0]
    flat = torch.arange(nb, dtype=torch.int32, device=device)[None]
    slots = (blk * bs + off).to(torch.int32).to(device)
    with vattn.ops.attention_impl(impl):
        vattn.append_kv_raw(q.k, q.v, k, v, torch.zeros_like(slots), slots, k_scale=q.ks, v_scale=q.vs,
                            block_table=flat)  # fmt: skip
    for a, b in zip(_state(p), _state(q)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("n", [3, 4000])
@pytest.mark.parametrize("heads", [False, True], ids=["positions", "head_positions"])
def test_append_shared_slot_last_write_wins(n, heads):
    """Tokens that land on one physical slot (two rows sharing a block): the last of them wins, in a
    small append and in one large enough to run in parallel (CPU), as in the reference."""
    bs, nb, hkv, dim = 16, 600, 2, 64
    gen = torch.Generator().manual_seed(n)
    k = torch.full((nb, bs, hkv, dim), float("nan"))
    v = torch.full_like(k, float("nan"))
    table = torch.arange(nb, dtype=torch.int32).reshape(2, nb // 2).repeat(2, 1)  # rows 2, 3 alias rows 0, 1
    rows = torch.randint(0, 4, (n,), generator=gen, dtype=torch.int32)
    pos = torch.randint(0, 50, (n,), generator=gen, dtype=torch.int32)
    hp = torch.randint(0, 50, (n, hkv), generator=gen, dtype=torch.int32) if heads else None
    x = randn((n, hkv, dim), gen)
    y = randn((n, hkv, dim), gen)
    want_k, want_v = k.clone(), v.clone()
    reference.append_kv(want_k, want_v, x, y, rows, pos, head_positions=hp, block_table=table)
    vattn.append_kv_raw(k, v, x, y, rows, pos, head_positions=hp, block_table=table)
    assert torch.equal(k.nan_to_num(7.0), want_k.nan_to_num(7.0))
    assert torch.equal(v.nan_to_num(7.0), want_v.nan_to_num(7.0))


@pytest.mark.parametrize("device,impl", device_impls())
def test_paged_append_then_attend_steps(device, impl):
    """A few serving steps through a block table (vLLM-like): prefill chunks, then decode steps, each
    appending then attending, with blocks allocated as rows grow (shuffled ids): the same outputs as
    the same steps on a contiguous cache."""
    bs, nb, hkv, group, dim = 16, 40, 2, 3, 64
    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    k = torch.full((nb, bs, hkv, dim), float("nan"), dtype=dtype, device=device)
    v = torch.full_like(k, float("nan"))
    kc = torch.full((2, 20 * bs, hkv, dim), float("nan"), dtype=dtype, device=device)
    vc = torch.full_like(kc, float("nan"))
    free = torch.randperm(nb, generator=gen).tolist()
    table = torch.full((2, 20), -1, dtype=torch.int32)
    lens = [0, 0]
    with vattn.ops.attention_impl(impl):
        for new in ([37, 5], [20, 60], [1, 1], [1, 1], [1, 1]):
            rows, pos = [], []
            for r, n in enumerate(new):
                for t in range(lens[r], lens[r] + n):
                    if table[r, t // bs] < 0:
                        table[r, t // bs] = free.pop()
                    rows.append(r)
                    pos.append(t)
                lens[r] += n
            bt = table.to(device)
            xr = torch.tensor(rows, dtype=torch.int32, device=device)
            xp = torch.tensor(pos, dtype=torch.int32, device=device)
            xk = randn((len(rows), hkv, dim), gen, dtype).to(device)
            xv = randn((len(rows), hkv, dim), gen, dtype).to(device)
            vattn.append_kv_raw(k, v, xk, xv, xr, xp, block_table=bt)
            vattn.append_kv_raw(kc, vc, xk, xv, xr, xp)
            q = randn((len(rows), hkv * group, dim), gen, dtype).to(device)
            cu = torch.tensor([0, new[0], sum(new)], dtype=torch.int32, device=device)
            seq = torch.tensor(lens, dtype=torch.int32, device=device)
            if new == [1, 1]:
                got = vattn.decode_attention(q, k, v, seq, block_table=bt)
                want = vattn.decode_attention(q, kc, vc, seq)
            else:
                got = vattn.prefill_attention(q, k, v, cu, seq, block_table=bt)
                want = vattn.prefill_attention(q, kc, vc, cu, seq)
            if device == "cpu":
                assert torch.equal(got, want)
            else:
                torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)


# ----------------------------------------------------------------------------- bad inputs


def _small(spec="float32", bs=16, dim=64):
    case = Case(lens=[40, 70], hkv=2, group=2, dim=dim, extra_rows=1)
    kf, vf, dtype = _formats(spec, torch.float32)
    return build_paged(case, spec, dtype, bs, "nhd", "cpu", seed=1, share=False)


@pytest.mark.parametrize("bad", [-1, "num_blocks", 2**31 - 1])
@pytest.mark.parametrize("prefill", [False, True])
def test_bad_block_id_below_a_length_raises(bad, prefill):
    p = _small()
    table = p.table.clone()
    row = int(p.kw["row_ids"][1])
    table[row, 2] = p.k.shape[0] if bad == "num_blocks" else bad  # tokens 32..47 of a row of 70
    kw = dict(p.kw)
    if prefill:
        kw["cu_seqlens_q"] = torch.tensor([0, 1, 3], dtype=torch.int32)
        p = dataclasses.replace(p, q=p.q.repeat(2, 1, 1)[:3])
    with pytest.raises(ValueError, match=r"block_table\[.*outside"):
        run_op(p.q, p.k, p.v, kw, block_table=table)
    # Entries past the lengths may hold anything.
    table[row, 5:] = -7
    kw2 = dict(kw, seqlens_k=torch.tensor([40, 32], dtype=torch.int32))
    run_op(p.q, p.k, p.v, kw2, block_table=table)


def test_bad_block_id_through_head_lengths_raises():
    p = _small()
    row = int(p.kw["row_ids"][0])
    table = p.table.clone()
    table[row, 3] = -1  # tokens 48..63: past the row's 40, but head 1 is given 60
    kw = dict(p.kw, head_seqlens_k=torch.tensor([[40, 60], [70, 70]], dtype=torch.int32))
    with pytest.raises(ValueError, match="outside"):
        run_op(p.q, p.k, p.v, kw, block_table=table)


@pytest.mark.parametrize("spec", ["float32", "int8", ("int4_ch", "int4")], ids=_spec_id)
def test_bad_append_changes_nothing(spec):
    kf, vf, _ = _formats(spec, torch.float32)
    p = _small(spec, bs=block_size_for(16, kf, vf, 64))
    bs = p.k.shape[1]
    before = _state(p)
    row = int(p.kw["row_ids"][0])
    cap = p.table.shape[1] * bs
    x = randn((3, 2, 64), torch.Generator().manual_seed(0))
    rows = torch.tensor([row, row, row], dtype=torch.int32)
    table = p.table.clone()
    table[row, 40 // bs + 1] = -1
    cases = [
        (dict(positions=torch.tensor([40, 41, 40 + bs], dtype=torch.int32), block_table=table), "outside"),
        (dict(positions=torch.tensor([40, 41, cap], dtype=torch.int32), block_table=p.table), "outside"),
        (dict(positions=torch.tensor([40, 41, 42], dtype=torch.int32), block_table=p.table.float()), "int32"),
        (dict(positions=torch.tensor([40, 41, 42], dtype=torch.int32), block_table=p.table[0]), "2-D"),
        (dict(positions=torch.tensor([40, 41, 42], dtype=torch.int32), block_table=p.table.to("meta")), "is on"),
    ]
    for kw, match in cases:
        err = TypeError if match == "int32" else ValueError
        with pytest.raises(err, match=match):
            vattn.append_kv_raw(p.k, p.v, x, x, rows, k_scale=p.ks, v_scale=p.vs, **kw)
        for a, b in zip(_state(p), before):
            assert torch.equal(a, b), f"a failed append ({match}) changed the cache"
    # A row id past the table's rows.
    with pytest.raises(ValueError, match="row id"):
        vattn.append_kv_raw(p.k, p.v, x, x, rows + 10, torch.tensor([40, 41, 42], dtype=torch.int32),
                            k_scale=p.ks, v_scale=p.vs, block_table=p.table)  # fmt: skip
    for a, b in zip(_state(p), before):
        assert torch.equal(a, b)


def test_too_short_block_table_raises():
    p = _small()
    cap = p.table.shape[1] * p.k.shape[1]
    with pytest.raises(ValueError, match="seqlens_k"):
        run_op(p.q, p.k, p.v, dict(p.kw, seqlens_k=torch.tensor([40, cap + 1], dtype=torch.int32)),
               block_table=p.table)  # fmt: skip


@pytest.mark.parametrize("bs", [16, 48])
def test_int4_ch_block_size_must_hold_whole_groups(bs):
    """int4_ch keys of head_dim 64 form groups of 32 tokens: a block of 16 or 48 would split one."""
    gen = torch.Generator().manual_seed(0)
    k = torch.zeros((8, bs, 2, 32), dtype=torch.uint8)
    ks = torch.zeros((8, bs, 2, 4))
    v, vs = k.clone(), torch.zeros((8, bs, 2, 2))
    table = torch.arange(8, dtype=torch.int32).reshape(2, 4)
    x = randn((1, 2, 64), gen)
    with pytest.raises(ValueError, match="multiple of 32"):
        vattn.append_kv_raw(k, v, x, x, [0], [0], k_scale=ks, v_scale=vs, block_table=table)
    assert not k.any() and not ks.any()
    q = randn((2, 2, 64), gen)
    with pytest.raises(ValueError, match="multiple of 32"):
        vattn.decode_attention(q, k, v, [1, 1], k_scale=ks, v_scale=vs, block_table=table)


def test_paged_shape_mismatch_and_unsupported_options_raise():
    p = _small()
    with pytest.raises(ValueError, match="shapes differ"):
        run_op(p.q, p.k, p.v[:-1], p.kw, block_table=p.table)  # num_blocks differ
    with pytest.raises(ValueError, match="shapes differ"):
        run_op(p.q, p.k, p.v[:, :8], p.kw, block_table=p.table)  # block sizes differ
    with pytest.raises(TypeError, match="int32 or int64"):
        run_op(p.q, p.k, p.v, p.kw, block_table=p.table.to(torch.int16))
    with pytest.raises(ValueError, match="2-D"):
        run_op(p.q, p.k, p.v, p.kw, block_table=p.table[None])
    scores = torch.zeros(3, 2, 1000)
    with pytest.raises(ValueError, match="scores are not supported on a paged"):
        vattn.decode_attention(p.q, p.k, p.v, p.kw["seqlens_k"], row_ids=p.kw["row_ids"], scores=scores,
                               block_table=p.table)  # fmt: skip
    assert not scores.any()


def test_reference_gather_paged_and_slots():
    cache = torch.arange(4 * 2 * 1 * 1, dtype=torch.float32).reshape(4, 2, 1, 1)
    table = torch.tensor([[2, 0], [3, -1]])
    g = reference.gather_paged(cache, table)
    assert g.shape == (2, 4, 1, 1)
    assert g[0, :, 0, 0].tolist() == [4, 5, 0, 1]
    assert g[1, :, 0, 0].tolist() == [6, 7, 0, 1]  # an id out of range reads block 0
    blk, off = reference.paged_slots(table, 2, torch.tensor([0, 1]), torch.tensor([3, 1]))
    assert blk.tolist() == [0, 3] and off.tolist() == [1, 1]
    codes = torch.full((4, 2, 1, 2), 0x7E, dtype=torch.uint8).view(torch.float8_e4m3fn)
    assert reference.gather_paged(codes, table).dtype == torch.float8_e4m3fn
