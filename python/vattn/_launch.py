"""The native launch of the torch ops: parameter structs (cuda/include/vattn/params.h) from checked
tensors, and one way onto a device (`_run`: device guard, current stream, cpu or cuda entry point).
The ops' implementation functions (`*_impl`) are what torch.ops.vattn.* and the eager fast path
(ops.py) both run."""

from __future__ import annotations

import contextlib
import math
import os
from typing import Iterator, Optional, Tuple

import torch

from . import _C, _guard
from ._checks import _INT32_MAX, _check_append, _check_attention, _check_merge, _check_scores, _KVGeom
from ._dtypes import code_of

Tensor = torch.Tensor

_IMPLS = {"fast": 0, "simple": 1}


def _impl_from_env() -> str:
    name = os.environ.get("VATTN_ATTENTION_IMPL", "fast").strip().lower() or "fast"
    if name not in _IMPLS:
        raise ValueError(f"VATTN_ATTENTION_IMPL must be one of {sorted(_IMPLS)}, got {name!r}")
    return name


_impl = _impl_from_env()


def set_attention_impl(name: str) -> None:
    """Selects the CUDA attention kernels: "fast" (default) or "simple" (the plain reference kernel)."""
    global _impl
    if name not in _IMPLS:
        raise ValueError(f"attention impl must be one of {sorted(_IMPLS)}, got {name!r}")
    _impl = name


def get_attention_impl() -> str:
    return _impl


@contextlib.contextmanager
def attention_impl(name: str) -> Iterator[None]:
    """Context manager: `with vattn.ops.attention_impl("simple"): ...`."""
    previous = get_attention_impl()
    set_attention_impl(name)
    try:
        yield
    finally:
        set_attention_impl(previous)


# ----------------------------------------------------------------------------- parameter structs

# torch's own accessor of the current raw stream (what torch.cuda.current_stream(d).cuda_stream
# returns, without building a Stream object); only in CUDA builds of torch.
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def _stream_of(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    if _raw_stream is not None:
        return int(_raw_stream(device.index))
    return torch.cuda.current_stream(device).cuda_stream


def _cache_view(k_cache: Tensor, v_cache: Tensor, geom: _KVGeom) -> "_C.KVCacheView":
    """The native view of a checked cache pair, made once per geometry."""
    view = geom.view
    if view is None:
        ks, vs, kss, vss = geom.k_strides, geom.v_strides, geom.ks_strides, geom.vs_strides
        view = geom.view = _C.make_kv_view(
            k_cache.data_ptr(),
            v_cache.data_ptr(),
            ks[0],
            ks[1],
            ks[2],
            vs[0],
            vs[1],
            vs[2],
            geom.shape[0],
            geom.shape[1],
            geom.k_format.code,
            geom.v_format.code,
            _ptr(geom.k_scale),
            kss[0],
            kss[1],
            kss[2],
            _ptr(geom.v_scale),
            vss[0],
            vss[1],
            vss[2],
        )
        table = geom.block_table
        if table is not None:  # a paged view (kv_paging.h)
            _C.set_kv_view_paging(view, table.data_ptr(), table.stride(0), geom.block_size, geom.num_blocks)
    return view


def _ptr(t: Optional[Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _device_guard(device: torch.device):
    # Switching devices costs a few microseconds each way; usually the tensors are on the current one.
    if device.type != "cuda" or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def _max_of(t: Tensor) -> int:
    # Synchronizes on CUDA: only used when the caller gave no host bound.
    return int(t.max().item()) if t.numel() > 0 else 0


# cpu and cuda entry points of each op (the cuda ones are absent from CPU-only builds).
_ENTRY = {
    op: (getattr(_C, f"{op}_cpu"), getattr(_C, f"{op}_cuda", None))
    for op in ("append_kv", "decode_attention", "prefill_attention", "merge_states")
}


def _run(device: torch.device, op: str, p, workspace: bool = False) -> None:
    """Launches op's native entry point with params p: on CPU directly; on CUDA under the device
    guard, on the current stream, with decode's split-KV scratch (workspace=True) allocated there
    from torch's caching allocator (kept alive until the launch is queued)."""
    cpu_fn, cuda_fn = _ENTRY[op]
    if device.type != "cuda":
        cpu_fn(p)
        return
    with _device_guard(device):
        p.stream = _stream_of(device)
        scratch = None
        if workspace:
            scratch = torch.empty(int(_C.decode_workspace_bytes(p)), dtype=torch.uint8, device=device)
            p.workspace, p.workspace_bytes = _ptr(scratch), scratch.numel()
        cuda_fn(p)
        del scratch


# ----------------------------------------------------------------------------- implementations


def _attention_params(
    q: Tensor,
    q_strides: Tuple[int, ...],
    k_cache: Tensor,
    v_cache: Tensor,
    geom: _KVGeom,
    out: Tensor,
    lse: Optional[Tensor],
    seqlens_k: Tensor,
    cu_seqlens_q: Optional[Tensor],
    row_ids: Optional[Tensor],
    head_seqlens_k: Optional[Tensor],
    scale: Optional[float],
    window_left: int,
    softcap: float,
    max_seqlen_q: int,
    max_seqlen_k: int,
    scores: Optional[Tensor] = None,
    score_mode: int = 0,
    score_last_queries: Optional[int] = None,
) -> "_C.AttentionParams":
    total_q, hq, dim = q.shape
    if max_seqlen_k < 0:
        # Only decode plans with this hint (its split-KV grid); prefill never reads it, so it is not
        # worth a host sync there (0: unknown).
        max_seqlen_k = (
            0 if cu_seqlens_q is not None else _max_of(head_seqlens_k if head_seqlens_k is not None else seqlens_k)
        )
    if max_seqlen_q < 0:
        max_seqlen_q = 1 if cu_seqlens_q is None else _max_of(cu_seqlens_q[1:] - cu_seqlens_q[:-1])
    elif cu_seqlens_q is not None and cu_seqlens_q.device.type == "cpu":
        # The CUDA prefill sizes its grid from this bound, so a row with more queries would be left
        # unwritten there; where the check costs no sync, a low bound is refused on every device.
        longest = _max_of(cu_seqlens_q[1:] - cu_seqlens_q[:-1])
        if max_seqlen_q < longest:
            raise ValueError(f"max_seqlen_q={max_seqlen_q} is below the longest query row ({longest} queries)")
    o_strides = out.stride()
    sc_strides = scores.stride() if scores is not None else (0, 0, 0)
    return _C.make_attention_params(
        q.data_ptr(),
        q_strides[0],
        q_strides[1],
        out.data_ptr(),
        o_strides[0],
        o_strides[1],
        _ptr(lse),
        _cache_view(k_cache, v_cache, geom),
        _ptr(cu_seqlens_q),
        seqlens_k.data_ptr(),
        _ptr(head_seqlens_k),
        _ptr(row_ids),
        seqlens_k.shape[0],
        hq,
        geom.shape[2],
        dim,
        total_q,
        int(max_seqlen_q),
        int(max_seqlen_k),
        float(scale) if scale is not None else 1.0 / math.sqrt(dim),
        float(softcap),
        min(int(window_left), _INT32_MAX) if window_left >= 0 else -1,  # wider than any row: the same
        code_of(q.dtype),
        _IMPLS[_impl],
        _ptr(scores),
        sc_strides[0],
        sc_strides[1],
        score_mode,
        0 if score_last_queries is None or score_last_queries <= 0 else min(int(score_last_queries), _INT32_MAX),
    )


def _empty_outputs(q: Tensor, need_lse: bool = True) -> Tuple[Tensor, Optional[Tensor]]:
    """out like q (contiguous) and lse [tokens, heads] float32; lse None when not needed (the
    kernels skip it; only the eager fast path leaves it out, the ops always return it)."""
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((q.shape[0], q.shape[1]), dtype=torch.float32, device=q.device) if need_lse else None
    return out, lse


def _attend(
    op,
    q,
    k_cache,
    v_cache,
    cu_seqlens_q,
    seqlens_k,
    row_ids,
    head_seqlens_k,
    scale,
    window_left,
    softcap,
    max_seqlen_q,
    max_seqlen_k,
    k_scale,
    v_scale,
    need_lse,
    geom,
    scores=None,
    score_mode="add",
    score_last_queries=None,
    block_table=None,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Decode (cu_seqlens_q None) or prefill: checks, outputs, params, launch."""
    geom, q_strides = _check_attention(q, k_cache, v_cache, seqlens_k, cu_seqlens_q, row_ids, head_seqlens_k,
                                       window_left, softcap, scale, geom, k_scale, v_scale, block_table)  # fmt: skip
    mode = _check_scores(scores, score_mode, score_last_queries, geom, q.device)
    if mode and scores.numel() == 0:  # a cache without positions (or heads): no score to touch
        scores, mode = None, 0
    out, lse = _empty_outputs(q, need_lse or mode != 0)  # CUDA's score pass reads the lse
    # No query: nothing to compute, except "replace" scores, which zero each row's [0, L).
    if q.shape[0] == 0 and (mode != 2 or seqlens_k.shape[0] == 0):
        return out, lse
    if q.device.type == "cuda" and geom.block_table is None and 0 in geom.shape[:2]:
        # A CUDA cache with no positions (no storage): every row is empty, as the CPU op checks and
        # computes; its kernels refuse such a view, and checking the lengths here would sync.
        out.zero_()
        if lse is not None:
            lse.fill_(float("-inf"))
        return out, lse
    p = _attention_params(q, q_strides, k_cache, v_cache, geom, out, lse, seqlens_k, cu_seqlens_q, row_ids,
                          head_seqlens_k, scale, window_left, softcap, max_seqlen_q, max_seqlen_k,
                          scores, mode, score_last_queries)  # fmt: skip
    _run(q.device, op, p, workspace=cu_seqlens_q is None)
    return out, lse


def _decode_impl(q: Tensor, k_cache: Tensor, v_cache: Tensor, seqlens_k: Tensor, row_ids: Optional[Tensor],
                 head_seqlens_k: Optional[Tensor], scale: Optional[float], window_left: int, softcap: float,
                 max_seqlen_k: int, k_scale: Optional[Tensor] = None, v_scale: Optional[Tensor] = None,
                 scores: Optional[Tensor] = None, score_mode: str = "add", score_last_queries: Optional[int] = None,
                 block_table: Optional[Tensor] = None, need_lse: bool = True,
                 geom: Optional[_KVGeom] = None) -> Tuple[Tensor, Optional[Tensor]]:  # fmt: skip
    """The implementation of torch.ops.vattn.decode_attention (and of the eager fast path)."""
    return _attend("decode_attention", q, k_cache, v_cache, None, seqlens_k, row_ids, head_seqlens_k, scale,
                   window_left, softcap, 1, max_seqlen_k, k_scale, v_scale, need_lse, geom,
                   scores, score_mode, score_last_queries, block_table)  # fmt: skip


def _prefill_impl(q: Tensor, k_cache: Tensor, v_cache: Tensor, cu_seqlens_q: Tensor, seqlens_k: Tensor,
                  row_ids: Optional[Tensor], head_seqlens_k: Optional[Tensor], scale: Optional[float],
                  window_left: int, softcap: float, max_seqlen_q: int, max_seqlen_k: int,
                  k_scale: Optional[Tensor] = None, v_scale: Optional[Tensor] = None,
                  scores: Optional[Tensor] = None, score_mode: str = "add", score_last_queries: Optional[int] = None,
                  block_table: Optional[Tensor] = None, need_lse: bool = True,
                  geom: Optional[_KVGeom] = None) -> Tuple[Tensor, Optional[Tensor]]:  # fmt: skip
    """The implementation of torch.ops.vattn.prefill_attention (and of the eager fast path)."""
    return _attend("prefill_attention", q, k_cache, v_cache, cu_seqlens_q, seqlens_k, row_ids, head_seqlens_k,
                   scale, window_left, softcap, max_seqlen_q, max_seqlen_k, k_scale, v_scale, need_lse, geom,
                   scores, score_mode, score_last_queries, block_table)  # fmt: skip


def _append_impl(
    k_cache: Tensor,
    v_cache: Tensor,
    k: Tensor,
    v: Tensor,
    row_ids: Tensor,
    positions: Tensor,
    k_scale: Optional[Tensor] = None,
    v_scale: Optional[Tensor] = None,
    geom: Optional[_KVGeom] = None,
    head_positions: Optional[Tensor] = None,
    block_table: Optional[Tensor] = None,
) -> None:
    """The op's implementation (torch.ops.vattn.append_kv and the eager fast path). geom is given
    only by vattn.append_kv on a KVCache, whose step mapped what it writes; every other caller
    (raw ops, possibly on a KVCache's views) is checked against the mapping by _guard.
    block_table: a paged view (_checks._check_paged); row_ids / positions address its rows."""
    raw = geom is None
    geom, k_strides, v_strides = _check_append(
        k_cache, v_cache, k, v, row_ids, positions, geom, k_scale, v_scale, head_positions, block_table
    )
    n, heads, dim = k.shape
    if n == 0:
        return
    if raw:
        _guard.check_append(
            k_cache, v_cache, k_scale, v_scale, row_ids, positions, head_positions, geom.block_table, geom.block_size
        )
    p = _C.make_append_params(
        _cache_view(k_cache, v_cache, geom),
        k.data_ptr(),
        v.data_ptr(),
        k_strides[0],
        k_strides[1],
        v_strides[0],
        v_strides[1],
        row_ids.data_ptr(),
        positions.data_ptr(),
        n,
        heads,
        dim,
        code_of(k.dtype),
        _ptr(head_positions),
    )
    _run(geom.device, "append_kv", p)


def _merge_impl(o_a: Tensor, lse_a: Tensor, o_b: Tensor, lse_b: Tensor) -> Tuple[Tensor, Tensor]:
    """The implementation of torch.ops.vattn.merge_states (and of the eager fast path)."""
    _check_merge(o_a, lse_a, o_b, lse_b)
    out = torch.empty(o_a.shape, dtype=o_a.dtype, device=o_a.device)
    lse = torch.empty(lse_a.shape, dtype=torch.float32, device=o_a.device)
    if out.numel() == 0:
        return out, lse
    p = _C.MergeParams()
    p.o_a, p.lse_a, p.o_b, p.lse_b = o_a.data_ptr(), lse_a.data_ptr(), o_b.data_ptr(), lse_b.data_ptr()
    p.out, p.lse_out = out.data_ptr(), lse.data_ptr()
    p.n, p.num_heads, p.head_dim = o_a.shape
    p.dtype = code_of(o_a.dtype)
    _run(o_a.device, "merge_states", p)
    return out, lse
