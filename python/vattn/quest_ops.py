"""Quest block-sparse decode ops (`torch.ops.vattn.block_minmax`, `quest_select`,
`sparse_decode_attention`) and their public wrappers.

Quest (Tang et al., 2024) keeps, per block of `block` consecutive stored tokens of each (cache row,
kv head), the per-channel min and max of the keys (`block_minmax`, in a float32 tensor
meta [rows, max_blocks, kv_heads, 2, head_dim]); scores each block for the decode query by an upper
bound of q.k and picks the last block plus the best others within a token budget (`quest_select`);
and attends over only the picked blocks (`sparse_decode_attention`). Any KV storage format (a
quantized K side is dequantized), batch > 1, ragged lengths per row or per (row, kv head).
Semantics: reference.block_minmax, reference.quest_select, reference.sparse_decode_attention.

Like the ops of ops.py: checks here (with _checks.py's helpers), one implementation run by the
registered op (with a fake for torch.compile) and by the eager fast path, launched on the current
stream without allocation outside torch (CUDA scratch: torch tensors sized by _C.*_workspace_bytes)
and without host syncs. The native CPU ops check the index values before they read or write; on
CUDA the public wrappers check them with torch ops first when check=True (one host sync, skipped
while a CUDA graph is being captured), and the kernels clamp or skip whatever is out of range, so
no input makes them touch memory outside the tensors.

Per decode step, for a cache row set `row_ids` (see the report of issue 10 / docs):
  block_minmax(k, meta, row_ids, lengths_after_append, first_block=start // block)   # after append_kv
  ids, counts = quest_select(q, meta, row_ids, lengths, token_budget=..., max_blocks_hint=...)
  out = sparse_decode_attention(q, k, v, row_ids, lengths, ids, counts, check=False)
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from . import _C, _support
from ._checks import (
    _INT32_MAX,
    _cache_format,
    _check_cache,
    _check_device,
    _check_float,
    _check_index,
    _check_last_contiguous,
    _KVGeom,
)
from ._dtypes import code_of
from ._launch import _attention_params, _device_guard, _ptr, _stream_of
from .ops import IndexLike, _device_of, _direct_ok, _index

__all__ = ["block_minmax", "quest_select", "sparse_decode_attention", "quest_max_blocks"]

Tensor = torch.Tensor

DEFAULT_BLOCK = 16


def quest_max_blocks(max_seq: int, block: int = DEFAULT_BLOCK) -> int:
    """Blocks a metadata tensor needs for rows of up to max_seq tokens: ceil(max_seq / block)."""
    return -(-int(max_seq) // int(block))


# ----------------------------------------------------------------------------- checks


def _check_block(block, name: str = "block") -> int:
    if isinstance(block, bool) or not isinstance(block, int):
        raise TypeError(f"{name} must be an int, got {type(block).__name__}")
    if block <= 0 or block > _INT32_MAX:
        raise ValueError(f"{name} must be a positive int32, got {block}")
    return block


def _check_rows(row_ids, lengths, head_lengths, heads: int, device) -> int:
    """row_ids [n], lengths [n], head_lengths [n, heads] (optional) int32 contiguous; returns n."""
    if not isinstance(row_ids, torch.Tensor) or row_ids.dim() != 1:
        raise ValueError("row_ids must be a 1-D int32 tensor [n]")
    n = row_ids.shape[0]
    if n > _INT32_MAX:
        raise ValueError("too many entries")
    _check_index(row_ids, "row_ids", (n,), device)
    if lengths is None:
        raise ValueError("lengths [n] is required (head_lengths, when given, overrides it per kv head)")
    _check_index(lengths, "lengths", (n,), device)
    _check_index(head_lengths, "head_lengths", (n, heads), device)
    return n


def _check_k_side(k_cache, k_scale, device):
    """(format, shape [rows, seq, heads, dim], strides, scale strides) of one cache side."""
    fmt = _cache_format(k_cache, k_scale, "k_cache")
    if k_cache.dim() != 4:
        raise ValueError(f"k_cache must be 4-D [rows, seq, kv_heads, head_dim], got shape {list(k_cache.shape)}")
    _check_device(k_cache, "k_cache", device)
    strides = _check_last_contiguous(k_cache, "k_cache")
    rows, seq, heads, elems = k_cache.shape
    dim = elems * fmt.elems_per_storage
    if max(rows, seq) > _INT32_MAX or heads == 0 or dim == 0:
        raise ValueError(f"k_cache shape {list(k_cache.shape)} is empty or too large")
    ss = (0, 0, 0, 0)
    if k_scale is not None:
        if k_scale.dtype != torch.float32:
            raise TypeError(f"k_scale must be float32, got {k_scale.dtype}")
        want = (rows, seq, heads, fmt.scale_words)
        if tuple(k_scale.shape) != want:
            raise ValueError(
                f"k_scale must have shape {list(want)} for kv_format {fmt.name!r}, got {list(k_scale.shape)}"
            )
        _check_device(k_scale, "k_scale", device)
        ss = _check_last_contiguous(k_scale, "k_scale")
    return fmt, (rows, seq, heads, dim), strides, ss


def _check_meta(meta, rows: int, heads: int, dim: int, min_blocks: int, device) -> Tuple[int, ...]:
    """meta float32 [rows, >= min_blocks, heads, 2, dim], head_dim contiguous; returns its strides."""
    if not isinstance(meta, torch.Tensor):
        raise TypeError(f"meta must be a torch.Tensor, got {type(meta).__name__}")
    if meta.dtype != torch.float32:
        raise TypeError(f"meta must be float32, got {meta.dtype}")
    if (
        meta.dim() != 5
        or meta.shape[0] != rows
        or meta.shape[1] < min_blocks
        or tuple(meta.shape[2:]) != (heads, 2, dim)
    ):
        raise ValueError(
            f"meta must have shape [{rows} rows, >= {min_blocks} blocks, {heads} kv_heads, 2, {dim}], "
            f"got {list(meta.shape)}"
        )
    if meta.shape[1] > _INT32_MAX:
        raise ValueError("meta has too many blocks")
    _check_device(meta, "meta", device)
    return _check_last_contiguous(meta, "meta")


def _meta_view(meta: Tensor, strides) -> "_C.BlockMetaView":
    return _C.make_block_meta(meta.data_ptr(), strides[0], strides[1], strides[2], strides[3], meta.shape[0],
                              meta.shape[1])  # fmt: skip


def _check_minmax(k_cache, meta, row_ids, lengths, head_lengths, first_block, block, k_scale):
    if not isinstance(k_cache, torch.Tensor):
        raise TypeError(f"k_cache must be a torch.Tensor, got {type(k_cache).__name__}")
    device = k_cache.device
    block = _check_block(block)
    fmt, shape, strides, ss = _check_k_side(k_cache, k_scale, device)
    rows, seq, heads, dim = shape
    ms = _check_meta(meta, rows, heads, dim, quest_max_blocks(seq, block), device)
    n = _check_rows(row_ids, lengths, head_lengths, heads, device)
    _check_index(first_block, "first_block", (n,), device)
    return fmt, shape, strides, ss, ms


def _check_select(q, meta, row_ids, lengths, head_lengths, block, token_budget, max_blocks_hint):
    _check_float(q, "q")
    if q.dim() != 3:
        raise ValueError(f"q must be 3-D [n, q_heads, head_dim], got shape {list(q.shape)}")
    device = q.device
    _check_device(q, "q", device)
    qs = _check_last_contiguous(q, "q")
    block = _check_block(block)
    _check_block(token_budget, "token_budget")
    if isinstance(max_blocks_hint, bool) or not isinstance(max_blocks_hint, int) or max_blocks_hint < 0:
        raise ValueError(f"max_blocks_hint must be an int >= 0, got {max_blocks_hint!r}")
    if not isinstance(meta, torch.Tensor) or meta.dim() != 5:
        raise ValueError("meta must be a 5-D float32 tensor [rows, max_blocks, kv_heads, 2, head_dim]")
    n, hq, dim = q.shape
    heads = meta.shape[2]
    if hq == 0 or heads == 0 or hq % heads != 0:
        raise ValueError(f"num_q_heads ({hq}) must be a positive multiple of num_kv_heads ({heads})")
    ms = _check_meta(meta, meta.shape[0], heads, dim, 0, device)
    if _check_rows(row_ids, lengths, head_lengths, heads, device) != n:
        raise ValueError(f"q has {n} rows but row_ids has {row_ids.shape[0]} (one decode query per entry)")
    max_sel = min(quest_max_blocks(token_budget, block), max_blocks_hint, meta.shape[1])
    return qs, ms, max_sel


def _check_sparse(q, k_cache, v_cache, row_ids, lengths, head_lengths, block_ids, block_counts, block, scale,
                  softcap, k_scale, v_scale) -> Tuple[_KVGeom, Tuple[int, ...]]:  # fmt: skip
    _check_float(q, "q")
    if q.dim() != 3:
        raise ValueError(f"q must be 3-D [n, q_heads, head_dim], got shape {list(q.shape)}")
    device = q.device
    _check_device(q, "q", device)
    qs = _check_last_contiguous(q, "q")
    _check_block(block)
    geom = _check_cache(k_cache, v_cache, device, k_scale, v_scale)
    if geom.dtype is not None and geom.dtype != q.dtype:
        raise TypeError(f"the cache dtype {geom.dtype} must match the q dtype {q.dtype}")
    n, hq, dim = q.shape
    heads = geom.shape[2]
    if dim != geom.shape[3]:
        raise ValueError(f"q head_dim {dim} differs from the cache head_dim {geom.shape[3]}")
    if hq == 0 or hq % heads != 0:
        raise ValueError(f"num_q_heads ({hq}) must be a positive multiple of num_kv_heads ({heads})")
    if _check_rows(row_ids, lengths, head_lengths, heads, device) != n:
        raise ValueError(f"q has {n} rows but row_ids has {row_ids.shape[0]} (one decode query per entry)")
    if not isinstance(block_ids, torch.Tensor) or block_ids.dim() != 3:
        raise ValueError("block_ids must be a 3-D int32 tensor [n, kv_heads, max_sel]")
    _check_index(block_ids, "block_ids", (n, heads, block_ids.shape[2]), device)
    if block_ids.shape[2] > _INT32_MAX:
        raise ValueError("block_ids has too many entries per (row, kv head)")
    _check_index(block_counts, "block_counts", (n, heads), device, required=True)
    if not math.isfinite(float(softcap)) or softcap < 0:
        raise ValueError(f"softcap must be a finite number >= 0 (0 disables it), got {softcap}")
    if scale is not None and not math.isfinite(float(scale)):
        raise ValueError(f"scale must be finite, got {scale}")
    e = _support.table()[device.type]["sparse_decode"]
    where = f"{'CUDA' if device.type == 'cuda' else 'CPU'} sparse_decode_attention"
    if q.dtype not in e.dtypes:
        raise TypeError(f"{where} supports {', '.join(str(d) for d in e.dtypes)}; got {q.dtype}")
    if not e.head_dim_ok(dim):
        raise ValueError(f"{where} needs {e.head_dim_rule()}, got {dim}")
    for fmt in (geom.k_format, geom.v_format):
        if fmt.name not in e.kv_formats:
            raise ValueError(f"{where} does not read the KV format {fmt.name!r}")
    return geom, qs


# Value checks on CUDA tensors (the CPU ops do the same natively); each synchronizes.


def _len_tensor(lengths: Tensor, head_lengths: Optional[Tensor], heads: int) -> Tensor:
    return (head_lengths if head_lengths is not None else lengths[:, None].expand(-1, heads)).long()


def _check_values_rows(op, row_ids, lengths, head_lengths, heads, rows, max_len, block, max_blocks, distinct):
    if row_ids.numel() == 0:
        return
    r = row_ids.long()
    bad = (r < 0) | (r >= rows)
    if bool(bad.any()):
        raise ValueError(f"{op}: row id {int(r[bad][0])} is outside [0, {rows})")
    if distinct and torch.unique(r).numel() != r.numel():
        raise ValueError(f"{op}: a row id appears twice in row_ids")
    lens = _len_tensor(lengths, head_lengths, heads)
    bad = (lens < 0) | (lens > max_len) | ((lens + block - 1) // block > max_blocks)
    if bool(bad.any()):
        raise ValueError(f"{op}: length {int(lens[bad][0])} is outside [0, {min(max_len, max_blocks * block)}]")


def _check_values_blocks(block_ids, block_counts, lengths, head_lengths, block):
    if block_counts.numel() == 0:
        return
    max_sel = block_ids.shape[2]
    c = block_counts.long()
    bad = (c < 0) | (c > max_sel)
    if bool(bad.any()):
        raise ValueError(f"sparse_decode_attention: block_counts value {int(c[bad][0])} is outside [0, {max_sel}]")
    if max_sel == 0:
        return
    nb = (_len_tensor(lengths, head_lengths, block_counts.shape[1]) + block - 1) // block
    live = torch.arange(max_sel, device=c.device) < c[..., None]
    ids = block_ids.long()
    bad = live & ((ids < 0) | (ids >= nb[..., None]))
    if bool(bad.any()):
        raise ValueError(f"sparse_decode_attention: block id {int(ids[bad][0])} is outside the row's blocks")
    if max_sel > 1 and bool((live[..., 1:] & (ids[..., 1:] <= ids[..., :-1])).any()):
        raise ValueError("sparse_decode_attention: the block ids of a (row, kv head) are not strictly increasing")


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


# ----------------------------------------------------------------------------- implementations


def _minmax_impl(k_cache, meta, row_ids, lengths, head_lengths, first_block, block, k_scale=None) -> None:
    fmt, shape, strides, ss, ms = _check_minmax(k_cache, meta, row_ids, lengths, head_lengths, first_block, block,
                                                k_scale)  # fmt: skip
    n = row_ids.shape[0]
    if n == 0:
        return
    rows, seq, heads, dim = shape
    view = _C.make_kv_view(k_cache.data_ptr(), 0, strides[0], strides[1], strides[2], 0, 0, 0, rows, seq, fmt.code,
                           fmt.code, _ptr(k_scale), ss[0], ss[1], ss[2], 0, 0, 0, 0)  # fmt: skip
    p = _C.make_block_minmax_params(view, _meta_view(meta, ms), row_ids.data_ptr(), lengths.data_ptr(),
                                    _ptr(head_lengths), first_block.data_ptr(), n, heads, dim, block)  # fmt: skip
    device = k_cache.device
    if device.type != "cuda":
        _C.block_minmax_cpu(p)
        return
    with _device_guard(device):
        p.stream = _stream_of(device)
        _C.block_minmax_cuda(p)


def _select_outputs(q: Tensor, heads: int, max_sel: int) -> Tuple[Tensor, Tensor]:
    n = q.shape[0]
    ids = torch.empty((n, heads, max_sel), dtype=torch.int32, device=q.device)
    counts = torch.empty((n, heads), dtype=torch.int32, device=q.device)
    return ids, counts


def _select_impl(q, meta, row_ids, lengths, head_lengths, block, token_budget, max_blocks_hint):
    qs, ms, max_sel = _check_select(q, meta, row_ids, lengths, head_lengths, block, token_budget, max_blocks_hint)
    n, hq, dim = q.shape
    heads = meta.shape[2]
    ids, counts = _select_outputs(q, heads, max_sel)
    if n == 0:
        return ids, counts
    p = _C.make_quest_select_params(q.data_ptr(), qs[0], qs[1], code_of(q.dtype), _meta_view(meta, ms),
                                    row_ids.data_ptr(), lengths.data_ptr(), _ptr(head_lengths), ids.data_ptr(),
                                    counts.data_ptr(), n, hq, heads, dim, block, token_budget, max_sel)  # fmt: skip
    device = q.device
    if device.type != "cuda":
        _C.quest_select_cpu(p)
        return ids, counts
    with _device_guard(device):
        p.stream = _stream_of(device)
        scratch = torch.empty(int(_C.quest_select_workspace_bytes(p)), dtype=torch.uint8, device=device)
        p.workspace, p.workspace_bytes = _ptr(scratch), scratch.numel()
        _C.quest_select_cuda(p)
        del scratch
    return ids, counts


def _sparse_impl(q, k_cache, v_cache, row_ids, lengths, head_lengths, block_ids, block_counts, block, scale=None,
                 softcap=0.0, k_scale=None, v_scale=None, need_lse=True):  # fmt: skip
    geom, qs = _check_sparse(q, k_cache, v_cache, row_ids, lengths, head_lengths, block_ids, block_counts, block,
                             scale, softcap, k_scale, v_scale)  # fmt: skip
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device) if need_lse else None
    if q.shape[0] == 0:
        return out, lse
    ap = _attention_params(q, qs, k_cache, v_cache, geom, out, lse, lengths, None, row_ids, head_lengths, scale, -1,
                           softcap, 1, 0)  # fmt: skip
    max_sel = block_ids.shape[2]
    device = q.device
    if device.type != "cuda":
        _C.sparse_decode_attention_cpu(_C.make_sparse_decode_params(ap, block_ids.data_ptr(), block_counts.data_ptr(),
                                                                    max_sel, block))  # fmt: skip
        return out, lse
    with _device_guard(device):
        ap.stream = _stream_of(device)
        p = _C.make_sparse_decode_params(ap, block_ids.data_ptr(), block_counts.data_ptr(), max_sel, block)
        scratch = torch.empty(int(_C.sparse_decode_workspace_bytes(p)), dtype=torch.uint8, device=device)
        ap.workspace, ap.workspace_bytes = _ptr(scratch), scratch.numel()
        p.attn = ap
        _C.sparse_decode_attention_cuda(p)
        del scratch
    return out, lse


# ----------------------------------------------------------------------------- torch.library registrations


@torch.library.custom_op("vattn::block_minmax", mutates_args=("meta",))
def _block_minmax(
    k_cache: Tensor,
    meta: Tensor,
    row_ids: Tensor,
    lengths: Tensor,
    first_block: Tensor,
    block: int = DEFAULT_BLOCK,
    head_lengths: Optional[Tensor] = None,
    k_scale: Optional[Tensor] = None,
) -> None:
    _minmax_impl(k_cache, meta, row_ids, lengths, head_lengths, first_block, block, k_scale)


@_block_minmax.register_fake
def _(k_cache, meta, row_ids, lengths, first_block, block=DEFAULT_BLOCK, head_lengths=None, k_scale=None):
    _check_minmax(k_cache, meta, row_ids, lengths, head_lengths, first_block, block, k_scale)
    return None


@torch.library.custom_op("vattn::quest_select", mutates_args=())
def _quest_select(
    q: Tensor,
    meta: Tensor,
    row_ids: Tensor,
    lengths: Tensor,
    token_budget: int,
    max_blocks_hint: int,
    block: int = DEFAULT_BLOCK,
    head_lengths: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    return _select_impl(q, meta, row_ids, lengths, head_lengths, block, token_budget, max_blocks_hint)


@_quest_select.register_fake
def _(q, meta, row_ids, lengths, token_budget, max_blocks_hint, block=DEFAULT_BLOCK, head_lengths=None):
    _, _, max_sel = _check_select(q, meta, row_ids, lengths, head_lengths, block, token_budget, max_blocks_hint)
    return _select_outputs(q, meta.shape[2], max_sel)


@torch.library.custom_op("vattn::sparse_decode_attention", mutates_args=())
def _sparse_decode_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    row_ids: Tensor,
    lengths: Tensor,
    block_ids: Tensor,
    block_counts: Tensor,
    block: int = DEFAULT_BLOCK,
    head_lengths: Optional[Tensor] = None,
    scale: Optional[float] = None,
    softcap: float = 0.0,
    k_scale: Optional[Tensor] = None,
    v_scale: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    return _sparse_impl(q, k_cache, v_cache, row_ids, lengths, head_lengths, block_ids, block_counts, block, scale,
                        softcap, k_scale, v_scale)  # fmt: skip


@_sparse_decode_attention.register_fake
def _(q, k_cache, v_cache, row_ids, lengths, block_ids, block_counts, block=DEFAULT_BLOCK, head_lengths=None,
      scale=None, softcap=0.0, k_scale=None, v_scale=None):  # fmt: skip
    _check_sparse(q, k_cache, v_cache, row_ids, lengths, head_lengths, block_ids, block_counts, block, scale, softcap,
                  k_scale, v_scale)  # fmt: skip
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(q.shape[:2], dtype=torch.float32)


# ----------------------------------------------------------------------------- public wrappers


def _index_nd(t, name: str, device: torch.device) -> Optional[Tensor]:
    """_index for nested sequences too."""
    if t is not None and not isinstance(t, torch.Tensor):
        t = torch.as_tensor(t, dtype=torch.int32).to(device)
    return _index(t, name, device)


def block_minmax(
    k_cache: Tensor,
    meta: Tensor,
    row_ids: IndexLike,
    lengths: IndexLike,
    first_block: Optional[IndexLike] = None,
    *,
    head_lengths: Optional[IndexLike] = None,
    block: int = DEFAULT_BLOCK,
    k_scale: Optional[Tensor] = None,
    check: bool = True,
) -> None:
    """(Re)computes Quest's per-block key min / max in meta, in place.

    k_cache [rows, seq, kv_heads, storage elems] (any strides, last dimension contiguous; a quantized
    K side with its fp32 k_scale [rows, seq, kv_heads, words], dequantized first); meta float32
    [rows, >= ceil(seq / block), kv_heads, 2, head_dim] ([..., 0, :] min, [..., 1, :] max); row_ids [n]
    distinct cache rows; lengths [n] tokens stored per row, or head_lengths [n, kv_heads] per (row,
    kv head) (then lengths is still passed, e.g. the row lengths, and head_lengths wins); first_block
    [n] (default 0): blocks first_block[i] .. ceil(L / block) - 1 of each (row_ids[i], h) are
    recomputed, all others are left untouched. After an append of tokens [start, L) pass
    first_block = start // block; after compaction, 0.

    Raises ValueError / TypeError on bad arguments with meta unchanged (on CUDA the index values are
    checked with one host sync when check=True and no graph is being captured; the kernel itself
    clamps). Semantics: vattn.reference.block_minmax."""
    device = _device_of(k_cache, "k_cache")
    row_ids = _index(row_ids, "row_ids", device)
    lengths = _index(lengths, "lengths", device)
    head_lengths = _index_nd(head_lengths, "head_lengths", device)
    if first_block is None and isinstance(row_ids, torch.Tensor):
        first_block = torch.zeros(row_ids.shape, dtype=torch.int32, device=device)
    first_block = _index(first_block, "first_block", device)
    block = _check_block(block)
    fmt, shape, _, _, _ = _check_minmax(k_cache, meta, row_ids, lengths, head_lengths, first_block, block, k_scale)
    if check and device.type == "cuda" and not _capturing(device):
        rows, seq, heads, _ = shape
        _check_values_rows("block_minmax", row_ids, lengths, head_lengths, heads, rows, seq, block, meta.shape[1], True)
        if row_ids.numel() and bool((first_block < 0).any()):
            raise ValueError("block_minmax: first_block holds a negative value")
    if _direct_ok(k_cache, meta, row_ids, lengths, first_block, head_lengths, k_scale):
        _minmax_impl(k_cache, meta, row_ids, lengths, head_lengths, first_block, block, k_scale)
        if not torch.is_inference_mode_enabled():
            torch.autograd.graph.increment_version(meta)
    else:
        torch.ops.vattn.block_minmax(k_cache, meta, row_ids, lengths, first_block, block, head_lengths, k_scale)


def quest_select(
    q: Tensor,
    meta: Tensor,
    row_ids: IndexLike,
    lengths: IndexLike,
    *,
    token_budget: int,
    block: int = DEFAULT_BLOCK,
    head_lengths: Optional[IndexLike] = None,
    max_blocks_hint: Optional[int] = None,
) -> Tuple[Tensor, Tensor]:
    """Quest's block choice for one decode query per entry.

    q [n, q_heads, head_dim] (row i is the query of cache row row_ids[i]); meta as block_minmax fills
    it; lengths [n] / head_lengths [n, kv_heads] as for block_minmax. Returns (block_ids
    [n, kv_heads, max_sel] int32, block_counts [n, kv_heads] int32) with
    max_sel = min(ceil(token_budget / block), max_blocks_hint, meta.shape[1]). For each (i, h) with
    nb = ceil(L / block) blocks, c = min(ceil(token_budget / block), nb, max_sel) blocks are chosen:
    all of them when c == nb, else the last (possibly partial) block plus the c - 1 others of highest
    score sum_g sum_d max(q[g, d] * min[b, d], q[g, d] * max[b, d]) over h's GQA group (ties: lower
    index); ascending in block_ids[i, h, :c], -1 after. max_blocks_hint: a host bound on
    max ceil(L / block) (None: computed from the lengths, one host sync on CUDA; give it for CUDA
    graphs). Semantics: vattn.reference.quest_select."""
    device = _device_of(q, "q")
    row_ids = _index(row_ids, "row_ids", device)
    lengths = _index(lengths, "lengths", device)
    head_lengths = _index_nd(head_lengths, "head_lengths", device)
    block = _check_block(block)
    token_budget = _check_block(token_budget, "token_budget")
    if max_blocks_hint is None:
        if lengths is None:
            raise ValueError("lengths [n] is required")
        src = head_lengths if head_lengths is not None else lengths
        max_blocks_hint = quest_max_blocks(int(src.max()) if src.numel() else 0, block)
    elif isinstance(max_blocks_hint, bool) or not isinstance(max_blocks_hint, int):
        raise TypeError(f"max_blocks_hint must be an int or None, got {type(max_blocks_hint).__name__}")
    if _direct_ok(q, meta, row_ids, lengths, head_lengths):
        return _select_impl(q, meta, row_ids, lengths, head_lengths, block, token_budget, max_blocks_hint)
    return torch.ops.vattn.quest_select(q, meta, row_ids, lengths, token_budget, max_blocks_hint, block, head_lengths)


def sparse_decode_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    row_ids: IndexLike,
    lengths: IndexLike,
    block_ids: Tensor,
    block_counts: Tensor,
    *,
    block: int = DEFAULT_BLOCK,
    head_lengths: Optional[IndexLike] = None,
    scale: Optional[float] = None,
    softcap: float = 0.0,
    return_lse: bool = False,
    k_scale: Optional[Tensor] = None,
    v_scale: Optional[Tensor] = None,
    check: bool = True,
):
    """Decode attention of q [n, q_heads, head_dim] over only the selected blocks of each (row, kv head).

    Caches, scales, lengths / head_lengths as decode_attention (row i reads cache row row_ids[i]);
    block_ids [n, kv_heads, max_sel] / block_counts [n, kv_heads] as quest_select returns them: the
    first block_counts[i, h] entries, strictly increasing block indices < ceil(L / block), name the
    blocks (tokens [b * block, (b + 1) * block) below L) that (i, h) attends over, with an exact
    softmax over their union (scale, soft-cap as decode_attention). Returns out (like q), or (out,
    lse [n, q_heads] float32) with return_lse=True; an entry with no selected token gets zeros and
    lse -inf. On CUDA check=True verifies the block lists with one host sync (skipped during graph
    capture; quest_select's output needs no check: pass check=False); the kernels skip entries out of
    range. Semantics: vattn.reference.sparse_decode_attention."""
    device = _device_of(q, "q")
    row_ids = _index(row_ids, "row_ids", device)
    lengths = _index(lengths, "lengths", device)
    head_lengths = _index_nd(head_lengths, "head_lengths", device)
    block_ids = _index_nd(block_ids, "block_ids", device)
    block_counts = _index_nd(block_counts, "block_counts", device)
    block = _check_block(block)
    scale = None if scale is None else float(scale)
    softcap = float(softcap)
    geom, _ = _check_sparse(q, k_cache, v_cache, row_ids, lengths, head_lengths, block_ids, block_counts, block,
                            scale, softcap, k_scale, v_scale)  # fmt: skip
    if check and device.type == "cuda" and not _capturing(device):
        rows, seq, heads, _ = geom.shape
        _check_values_rows("sparse_decode_attention", row_ids, lengths, head_lengths, heads, rows, seq, block,
                           _INT32_MAX, False)  # fmt: skip
        _check_values_blocks(block_ids, block_counts, lengths, head_lengths, block)
    if _direct_ok(q, k_cache, v_cache, row_ids, lengths, head_lengths, block_ids, block_counts, k_scale, v_scale):
        out, lse = _sparse_impl(q, k_cache, v_cache, row_ids, lengths, head_lengths, block_ids, block_counts, block,
                                scale, softcap, k_scale, v_scale, need_lse=return_lse)  # fmt: skip
    else:
        out, lse = torch.ops.vattn.sparse_decode_attention(q, k_cache, v_cache, row_ids, lengths, block_ids,
                                                           block_counts, block, head_lengths, scale, softcap,
                                                           k_scale, v_scale)  # fmt: skip
    return (out, lse) if return_lse else out
