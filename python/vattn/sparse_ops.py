"""The KV eviction ops (`torch.ops.vattn.compact_kv`) and their public wrappers.

compact_kv moves the kept tokens of each (cache row, kv head) to the front of the row, in order,
in place: K and V in any storage format (a quantized side with its scale words) and, when given,
a per-token score buffer that must move with its tokens. Semantics: reference.compact_kv.

Like the ops of ops.py: checks here and in _checks.py, one implementation run by the registered op
(with a fake for torch.compile) and by the eager fast path, launched on the current stream without
allocation outside torch (the CUDA scratch is a torch tensor sized by _C.compact_workspace_bytes).
The native CPU op checks the index values before it writes; on CUDA the public wrapper checks them
with torch ops first (one host sync, skipped while a CUDA graph is being captured, where the kernels
skip whatever is out of range instead), so a bad call raises and leaves the cache unchanged.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import _C, _support
from ._checks import _INT32_MAX, _check_cache, _check_index, _KVGeom
from ._launch import _cache_view, _device_guard, _ptr, _stream_of
from .ops import IndexLike, _device_of, _direct_ok, _index

__all__ = ["compact_kv"]

Tensor = torch.Tensor


# ----------------------------------------------------------------------------- checks


def _check_compact(
    k_cache: Tensor,
    v_cache: Tensor,
    row_ids: Tensor,
    keep: Tensor,
    keep_lens: Tensor,
    k_scale: Optional[Tensor] = None,
    v_scale: Optional[Tensor] = None,
    scores: Optional[Tensor] = None,
) -> Tuple[_KVGeom, Tuple[int, int, int]]:
    """Checks a compact_kv call (shapes, dtypes, devices, formats); returns the cache geometry and
    scores' strides (zeros without scores). The index values are the native op's (CPU) or the
    public wrapper's (CUDA) to check."""
    if not isinstance(k_cache, torch.Tensor):
        raise TypeError(f"k_cache must be a torch.Tensor, got {type(k_cache).__name__}")
    device = k_cache.device
    geom = _check_cache(k_cache, v_cache, device, k_scale, v_scale)
    rows, seq, heads, _ = geom.shape
    if not isinstance(row_ids, torch.Tensor) or row_ids.dim() != 1:
        raise ValueError("row_ids must be a 1-D tensor [n]")
    n = row_ids.shape[0]
    _check_index(row_ids, "row_ids", (n,), device)
    if not isinstance(keep, torch.Tensor) or keep.dim() != 3:
        raise ValueError("keep must be a 3-D tensor [n, kv_heads, max_keep]")
    _check_index(keep, "keep", (n, heads, keep.shape[2]), device)
    _check_index(keep_lens, "keep_lens", (n, heads), device, required=True)
    if n > _INT32_MAX or keep.shape[2] > _INT32_MAX:
        raise ValueError("compact_kv: too many rows or kept tokens")
    sc_strides = (0, 0, 0)
    if scores is not None:
        if not isinstance(scores, torch.Tensor):
            raise TypeError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
        if scores.dtype != torch.float32:
            raise TypeError(f"scores must be float32, got {scores.dtype}")
        if scores.dim() != 3 or scores.shape[0] < rows or scores.shape[1] != heads or scores.shape[2] < seq:
            raise ValueError(
                f"scores must have shape [>= {rows} cache rows, {heads} kv_heads, >= {seq} tokens], "
                f"got {list(scores.shape)}"
            )
        if scores.device != device:
            raise ValueError(f"scores is on {scores.device} but the op runs on {device}; move it first")
        sc_strides = scores.stride()
        if min(sc_strides) < 0:
            raise ValueError("scores has a negative stride")
    e = _support.table()[device.type]["compact_kv"]
    for fmt in (geom.k_format, geom.v_format):
        if fmt.name not in e.kv_formats:
            raise ValueError(f"compact_kv on {device.type} does not move the KV format {fmt.name!r}")
    return geom, sc_strides


def _check_values(row_ids: Tensor, keep: Tensor, keep_lens: Tensor, rows: int, seq: int) -> None:
    """The native CPU op's value checks, in torch ops (for CUDA tensors; synchronizes)."""
    n, heads, max_keep = keep.shape
    if n == 0:
        return
    r = row_ids.long()
    if bool(((r < 0) | (r >= rows)).any()):
        bad = r[(r < 0) | (r >= rows)][0].item()
        raise ValueError(f"compact_kv: row id {bad} is outside [0, {rows})")
    if torch.unique(r).numel() != n:
        raise ValueError("compact_kv: row_ids holds a row twice")
    lens = keep_lens.long()
    if bool(((lens < 0) | (lens > max_keep)).any()):
        bad = lens[(lens < 0) | (lens > max_keep)][0].item()
        raise ValueError(f"compact_kv: keep_lens value {bad} is outside [0, {max_keep}]")
    if max_keep == 0:
        return
    j = torch.arange(max_keep, device=keep.device)
    live = j < lens[..., None]
    k = keep.long()
    if bool((live & ((k < 0) | (k >= seq))).any()):
        bad = k[live & ((k < 0) | (k >= seq))][0].item()
        raise ValueError(f"compact_kv: kept token index {bad} is outside [0, {seq})")
    if max_keep > 1 and bool((live[..., 1:] & (k[..., 1:] <= k[..., :-1])).any()):
        raise ValueError("compact_kv: the kept token indices of a (row, kv head) are not strictly increasing")


def _check_mapped(k_cache, v_cache, k_scale, v_scale, row_ids, keep, keep_lens, seq: int) -> None:
    """On a vattn.KVCache's own views: raises ValueError unless every record compact_kv reads or
    writes lies on mapped pages (an unmapped page faults on a write). Other tensors pass at once."""
    try:
        from . import _guard
    except ImportError:  # no mapping guard in this version
        return
    owner = getattr(_guard, "owner", None)
    cache = (owner(k_cache) or owner(v_cache)) if owner is not None else None
    if cache is not None and cache is getattr(_guard, "CLOSED", None) and keep.numel():
        _guard.refuse_closed("compact_kv", "k_cache" if owner(k_cache) is cache else "v_cache")
    if cache is None or keep.numel() == 0 or not hasattr(cache._m, "first_unmapped"):
        return
    if keep.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    n, heads, max_keep = keep.shape
    k = keep.to("cpu", torch.int64)
    live = torch.arange(max_keep)[None, None, :] < keep_lens.to("cpu", torch.int64)[..., None]
    r = row_ids.to("cpu", torch.int64)[:, None, None].expand(n, heads, max_keep)[live]
    h = torch.arange(heads)[None, :, None].expand(n, heads, max_keep)[live]
    dst = torch.arange(max_keep)[None, None, :].expand(n, heads, max_keep)[live]
    rr, hh, pos = torch.cat([r, r]), torch.cat([h, h]), torch.cat([k[live], dst])
    ok = (rr >= 0) & (rr < k_cache.shape[0]) & (pos >= 0) & (pos < seq)  # the rest is rejected later
    rr, hh, pos = rr[ok], hh[ok], pos[ok]
    if rr.numel() == 0:
        return
    # An int4_ch side (uint8 codes with 4-word scales) writes the parameter words of each new
    # group up to its last token: check that token too (pages are mapped from token 0 on).
    grouped = {}
    for codes, sc in ((k_cache, k_scale), (v_cache, v_scale)):
        if sc is not None and codes.dtype == torch.uint8 and sc.dim() == 4 and sc.shape[-1] == 4:
            g = codes.shape[3]  # G = head_dim / 2 = codes per vector
            ends = torch.clamp(pos - pos % g + (g - 1), max=seq - 1)
            grouped[id(codes)] = grouped[id(sc)] = (torch.cat([rr, rr]), torch.cat([pos, ends]), torch.cat([hh, hh]))
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("k_scale", k_scale), ("v_scale", v_scale)):
        if t is None or owner(t) is not cache:
            continue
        t_rows, t_pos, t_heads = grouped.get(id(t), (rr, pos, hh))
        addrs, span = _guard._token_addrs(t, t_rows, t_pos, t_heads)
        bad = int(cache._m.first_unmapped(addrs.data_ptr(), addrs.numel(), span))
        if bad >= 0:
            raise ValueError(
                f"compact_kv: row {int(t_rows[bad])}, position {int(t_pos[bad])} of {name} lies in unmapped memory of "
                "a vattn.KVCache; compact only tokens the cache holds"
            )


# ----------------------------------------------------------------------------- implementation


def _compact_impl(
    k_cache: Tensor,
    v_cache: Tensor,
    row_ids: Tensor,
    keep: Tensor,
    keep_lens: Tensor,
    k_scale: Optional[Tensor] = None,
    v_scale: Optional[Tensor] = None,
    scores: Optional[Tensor] = None,
) -> None:
    """The implementation of torch.ops.vattn.compact_kv (and of the eager fast path)."""
    geom, sc = _check_compact(k_cache, v_cache, row_ids, keep, keep_lens, k_scale, v_scale, scores)
    n, heads, max_keep = keep.shape
    if n == 0 or max_keep == 0:
        return
    _check_mapped(k_cache, v_cache, k_scale, v_scale, row_ids, keep, keep_lens, geom.shape[1])
    p = _C.make_compact_params(
        _cache_view(k_cache, v_cache, geom),
        row_ids.data_ptr(),
        keep.data_ptr(),
        keep_lens.data_ptr(),
        _ptr(scores),
        sc[0],
        sc[1],
        sc[2],
        n,
        heads,
        max_keep,
        geom.shape[3],
    )
    device = geom.device
    if device.type != "cuda":
        _C.compact_kv_cpu(p)
        return
    with _device_guard(device):
        p.stream = _stream_of(device)
        scratch = torch.empty(int(_C.compact_workspace_bytes(p)), dtype=torch.uint8, device=device)
        p.workspace, p.workspace_bytes = _ptr(scratch), scratch.numel()
        _C.compact_kv_cuda(p)
        del scratch  # the caching allocator keeps it for the stream until the kernels are queued


@torch.library.custom_op("vattn::compact_kv", mutates_args=("k_cache", "v_cache", "k_scale", "v_scale", "scores"))
def _compact_kv(
    k_cache: Tensor,
    v_cache: Tensor,
    row_ids: Tensor,
    keep: Tensor,
    keep_lens: Tensor,
    k_scale: Optional[Tensor] = None,
    v_scale: Optional[Tensor] = None,
    scores: Optional[Tensor] = None,
) -> None:
    _compact_impl(k_cache, v_cache, row_ids, keep, keep_lens, k_scale, v_scale, scores)


@_compact_kv.register_fake
def _(k_cache, v_cache, row_ids, keep, keep_lens, k_scale=None, v_scale=None, scores=None):
    _check_compact(k_cache, v_cache, row_ids, keep, keep_lens, k_scale, v_scale, scores)
    return None


# ----------------------------------------------------------------------------- public wrapper


def _index_nd(t, name: str, device: torch.device) -> Tensor:
    """_index for nested sequences too (keep, keep_lens)."""
    if t is not None and not isinstance(t, torch.Tensor):
        t = torch.as_tensor(t, dtype=torch.int32).to(device)
    return _index(t, name, device)


def compact_kv(
    k_cache: Tensor,
    v_cache: Tensor,
    row_ids: IndexLike,
    keep: IndexLike,
    keep_lens: IndexLike,
    *,
    k_scale: Optional[Tensor] = None,
    v_scale: Optional[Tensor] = None,
    scores: Optional[Tensor] = None,
) -> None:
    """Moves the kept tokens of each (cache row, kv head) to the front of the row, in order, in place.

    k_cache / v_cache [rows, seq, kv_heads, storage elems]: any strides with the last dimension
    contiguous, any storage format (a quantized side with its fp32 scales k_scale / v_scale
    [rows, seq, kv_heads, words], which move too). row_ids [n] distinct cache rows; keep
    [n, kv_heads, max_keep] token indices, strictly increasing in [0, seq) over the first
    keep_lens[i, h] entries of each (i, h); keep_lens [n, kv_heads] in [0, max_keep]. For
    j < keep_lens[i, h], position j of (row_ids[i], h) receives the old token keep[i, h, j];
    positions from keep_lens[i, h] on keep what they hold (stale: the caller's lengths decide what
    counts). scores (optional) float32 [>= rows, kv_heads, >= seq], a per-token score buffer
    indexed like the cache (scores[row, h, token]), is moved the same way. Index tensors may be
    int32 or int64 tensors or nested sequences.

    Raises ValueError / TypeError on bad arguments, with the cache unchanged. On CUDA the index
    values are checked with one host sync (not while a CUDA graph is being captured; there the
    kernels skip out-of-range entries).
    Semantics: vattn.reference.compact_kv."""
    device = _device_of(k_cache, "k_cache")
    row_ids = _index_nd(row_ids, "row_ids", device)
    keep = _index_nd(keep, "keep", device)
    keep_lens = _index_nd(keep_lens, "keep_lens", device)
    geom, _ = _check_compact(k_cache, v_cache, row_ids, keep, keep_lens, k_scale, v_scale, scores)
    if device.type == "cuda" and not torch.cuda.is_current_stream_capturing():
        _check_values(row_ids, keep, keep_lens, geom.shape[0], geom.shape[1])
    if _direct_ok(k_cache, v_cache, row_ids, keep, keep_lens, k_scale, v_scale, scores):
        _compact_impl(k_cache, v_cache, row_ids, keep, keep_lens, k_scale, v_scale, scores)
        if not torch.is_inference_mode_enabled():
            mutated = tuple(t for t in (k_cache, v_cache, k_scale, v_scale, scores) if t is not None)
            torch.autograd.graph.increment_version(mutated)
    else:
        torch.ops.vattn.compact_kv(k_cache, v_cache, row_ids, keep, keep_lens, k_scale, v_scale, scores)
