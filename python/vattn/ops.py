"""vattn's torch custom ops (`torch.ops.vattn.*`) and their public Python wrappers.

The native module takes raw pointers, element strides and dtype codes (no libtorch); this module
registers the ops (schemas, what each mutates, fake implementations) and holds the public
wrappers; the argument checks are in _checks.py (support matrix: _support.py) and the native
launch in _launch.py. Every op has a fake implementation so
torch.compile can trace it, and on CUDA every launch goes to torch.cuda.current_stream().

CUDA graphs: the attention ops read lengths from device memory, so a captured graph stays valid as
lengths change. Pass `max_seqlen_q` / `max_seqlen_k` (host upper bounds): left at -1 / None they
are computed from the index tensors, which synchronizes the host with the device and cannot be
captured. (The kernels stay correct if a real length exceeds max_seqlen_k; it only steers how
decode splits long rows.)

Eager fast path: the public wrappers here and in api.py call an op's implementation directly
(skipping the torch.ops dispatch, ~50 us a call) when nothing could tell the difference: see
_direct_ok. The registered ops run the very same implementation functions, checks included.

Semantics of every op: python/vattn/reference.py.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from ._checks import _INT32_MAX, _check_append, _check_attention, _check_merge, _check_scores, _KVGeom, _to_int32
from ._launch import (
    _append_impl,
    _decode_impl,
    _empty_outputs,
    _merge_impl,
    _prefill_impl,
    attention_impl,
    get_attention_impl,
    set_attention_impl,
)

__all__ = [
    "append_kv_raw",
    "decode_attention",
    "prefill_attention",
    "merge_states",
    "set_attention_impl",
    "get_attention_impl",
    "attention_impl",
]

Tensor = torch.Tensor

# ----------------------------------------------------------------------------- torch.library registrations


# A quantized cache is a storage tensor (float8_e4m3fn / int8 / uint8) plus its fp32 scale tensor
# per side; append_kv writes both (vattn/formats.py says what each format stores).
@torch.library.custom_op("vattn::append_kv", mutates_args=("k_cache", "v_cache", "k_scale", "v_scale"))
def _append_kv(
    k_cache: Tensor,
    v_cache: Tensor,
    k: Tensor,
    v: Tensor,
    row_ids: Tensor,
    positions: Tensor,
    k_scale: Optional[Tensor] = None,
    v_scale: Optional[Tensor] = None,
    head_positions: Optional[Tensor] = None,
    block_table: Optional[Tensor] = None,
) -> None:
    _append_impl(k_cache, v_cache, k, v, row_ids, positions, k_scale, v_scale, None, head_positions, block_table)


def _append_direct(
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
    """The eager fast path of append_kv (the caller checked _direct_ok): also bumps the caches'
    version counters as the registered op does (its ADInplaceOrView kernel), so autograd still
    notices the mutation."""
    _append_impl(k_cache, v_cache, k, v, row_ids, positions, k_scale, v_scale, geom, head_positions, block_table)
    if not torch.is_inference_mode_enabled():
        torch.autograd.graph.increment_version(tuple(t for t in (k_cache, v_cache, k_scale, v_scale) if t is not None))


@_append_kv.register_fake
def _(k_cache, v_cache, k, v, row_ids, positions, k_scale=None, v_scale=None, head_positions=None, block_table=None):
    _check_append(k_cache, v_cache, k, v, row_ids, positions, None, k_scale, v_scale, head_positions, block_table)
    return None


# scores (optional, float32 [>= cache rows, kv_heads, >= seq]) is updated in place with per-token
# attention probabilities (reference.attention); score_last_queries 0 means all queries.
@torch.library.custom_op("vattn::decode_attention", mutates_args=("scores",))
def _decode_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    seqlens_k: Tensor,
    row_ids: Optional[Tensor] = None,
    head_seqlens_k: Optional[Tensor] = None,
    scale: Optional[float] = None,
    window_left: int = -1,
    softcap: float = 0.0,
    max_seqlen_k: int = -1,
    k_scale: Optional[Tensor] = None,
    v_scale: Optional[Tensor] = None,
    scores: Optional[Tensor] = None,
    score_mode: str = "add",
    score_last_queries: int = 0,
    block_table: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    return _decode_impl(
        q,
        k_cache,
        v_cache,
        seqlens_k,
        row_ids,
        head_seqlens_k,
        scale,
        window_left,
        softcap,
        max_seqlen_k,
        k_scale,
        v_scale,
        scores,
        score_mode,
        score_last_queries,
        block_table,
    )


@_decode_attention.register_fake
def _(
    q,
    k_cache,
    v_cache,
    seqlens_k,
    row_ids=None,
    head_seqlens_k=None,
    scale=None,
    window_left=-1,
    softcap=0.0,
    max_seqlen_k=-1,
    k_scale=None,
    v_scale=None,
    scores=None,
    score_mode="add",
    score_last_queries=0,
    block_table=None,
):
    geom, _ = _check_attention(
        q,
        k_cache,
        v_cache,
        seqlens_k,
        None,
        row_ids,
        head_seqlens_k,
        window_left,
        softcap,
        scale,
        None,
        k_scale,
        v_scale,
        block_table,
    )
    _check_scores(scores, score_mode, score_last_queries, geom, q.device)
    return _empty_outputs(q)


@torch.library.custom_op("vattn::prefill_attention", mutates_args=("scores",))
def _prefill_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cu_seqlens_q: Tensor,
    seqlens_k: Tensor,
    row_ids: Optional[Tensor] = None,
    head_seqlens_k: Optional[Tensor] = None,
    scale: Optional[float] = None,
    window_left: int = -1,
    softcap: float = 0.0,
    max_seqlen_q: int = -1,
    max_seqlen_k: int = -1,
    k_scale: Optional[Tensor] = None,
    v_scale: Optional[Tensor] = None,
    scores: Optional[Tensor] = None,
    score_mode: str = "add",
    score_last_queries: int = 0,
    block_table: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    return _prefill_impl(
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
        scores,
        score_mode,
        score_last_queries,
        block_table,
    )


@_prefill_attention.register_fake
def _(
    q,
    k_cache,
    v_cache,
    cu_seqlens_q,
    seqlens_k,
    row_ids=None,
    head_seqlens_k=None,
    scale=None,
    window_left=-1,
    softcap=0.0,
    max_seqlen_q=-1,
    max_seqlen_k=-1,
    k_scale=None,
    v_scale=None,
    scores=None,
    score_mode="add",
    score_last_queries=0,
    block_table=None,
):
    geom, _ = _check_attention(
        q,
        k_cache,
        v_cache,
        seqlens_k,
        cu_seqlens_q,
        row_ids,
        head_seqlens_k,
        window_left,
        softcap,
        scale,
        None,
        k_scale,
        v_scale,
        block_table,
    )
    _check_scores(scores, score_mode, score_last_queries, geom, q.device)
    return _empty_outputs(q)


@torch.library.custom_op("vattn::merge_states", mutates_args=())
def _merge_states(o_a: Tensor, lse_a: Tensor, o_b: Tensor, lse_b: Tensor) -> Tuple[Tensor, Tensor]:
    return _merge_impl(o_a, lse_a, o_b, lse_b)


@_merge_states.register_fake
def _(o_a, lse_a, o_b, lse_b):
    _check_merge(o_a, lse_a, o_b, lse_b)
    return torch.empty_like(o_a, memory_format=torch.contiguous_format), torch.empty_like(lse_a)


# ----------------------------------------------------------------------------- eager fast path

_TC = torch._C


def _direct_ok(*tensors: Optional[Tensor]) -> bool:
    """Whether a public wrapper may call an op's implementation (_decode_impl, ...) directly
    instead of torch.ops.vattn.* (whose Python dispatch costs more than a small CPU decode).

    Only in plain eager mode, where the two cannot be told apart: not traced (torch.compile,
    torch.jit.trace), no torch-function or dispatch mode (FakeTensorMode, make_fx, export,
    `with torch.device(...)`), no functorch transform (vmap, grad), no profiler running (its
    traces keep the op names), plain torch.Tensor inputs (no subclasses), and nothing autograd
    would record (grad mode off or no input requiring grad). Everything else takes the op.
    is_compiling() comes first so that dynamo, tracing a wrapper, stops there."""
    if (
        torch.compiler.is_compiling()
        or _TC._get_tracing_state() is not None
        or _TC._len_torch_dispatch_stack()
        or _TC._is_torch_function_mode_enabled()
        or _TC._are_functorch_transforms_active()
        or _TC._autograd._profiler_enabled()
    ):
        return False
    grad = _TC.is_grad_enabled()
    for t in tensors:
        if t is not None and (type(t) is not Tensor or (grad and t.requires_grad)):
            return False
    return True


# ----------------------------------------------------------------------------- internal API (api.py, wrappers)
# Each takes checked-form arguments (int32 index tensors on the device, host bounds) and runs the
# op's implementation directly when _direct_ok, else through torch.ops.vattn.*.


def run_append(
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
    if block_table is not None:  # a paged view (rare here: keeps the branches below as they were)
        if _direct_ok(k_cache, v_cache, k, v, row_ids, positions, k_scale, v_scale, head_positions, block_table):
            _append_direct(k_cache, v_cache, k, v, row_ids, positions, k_scale, v_scale, None, head_positions,
                           block_table)  # fmt: skip
        else:
            torch.ops.vattn.append_kv(
                k_cache, v_cache, k, v, row_ids, positions, k_scale, v_scale, head_positions, block_table
            )
        return
    if head_positions is None:
        if _direct_ok(k_cache, v_cache, k, v, row_ids, positions, k_scale, v_scale):
            _append_direct(k_cache, v_cache, k, v, row_ids, positions, k_scale, v_scale, geom)
        else:
            torch.ops.vattn.append_kv(k_cache, v_cache, k, v, row_ids, positions, k_scale, v_scale)
    elif _direct_ok(k_cache, v_cache, k, v, row_ids, positions, k_scale, v_scale, head_positions):
        _append_direct(k_cache, v_cache, k, v, row_ids, positions, k_scale, v_scale, geom, head_positions)
    else:
        torch.ops.vattn.append_kv(k_cache, v_cache, k, v, row_ids, positions, k_scale, v_scale, head_positions)


def run_decode(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    seqlens_k: Tensor,
    row_ids: Optional[Tensor],
    head_seqlens_k: Optional[Tensor],
    scale: Optional[float],
    window_left: int,
    softcap: float,
    max_seqlen_k: int,
    k_scale: Optional[Tensor],
    v_scale: Optional[Tensor],
    need_lse: bool,
    geom: Optional[_KVGeom] = None,
    scores: Optional[Tensor] = None,
    score_mode: str = "add",
    score_last_queries: Optional[int] = None,
    block_table: Optional[Tensor] = None,
):
    args = (
        q,
        k_cache,
        v_cache,
        seqlens_k,
        row_ids,
        head_seqlens_k,
        scale,
        window_left,
        softcap,
        max_seqlen_k,
        k_scale,
        v_scale,
    )
    if block_table is not None:  # a paged view (no scores: _check_scores refuses them there)
        if _direct_ok(*args[:6], k_scale, v_scale, scores, block_table):
            return _decode_impl(*args, scores, score_mode, _last_queries(score_last_queries), block_table,
                                need_lse=need_lse)  # fmt: skip
        return torch.ops.vattn.decode_attention(*args, scores, score_mode, _last_queries(score_last_queries),
                                                block_table)  # fmt: skip
    if scores is None:
        if _direct_ok(*args[:6], k_scale, v_scale):
            return _decode_impl(*args, need_lse=need_lse, geom=geom)
        return torch.ops.vattn.decode_attention(*args)
    w = _last_queries(score_last_queries)
    if _direct_ok(*args[:6], k_scale, v_scale, scores):
        result = _decode_impl(*args, scores, score_mode, w, need_lse=need_lse, geom=geom)
        _bump(scores)
        return result
    return torch.ops.vattn.decode_attention(*args, scores, score_mode, w)


def run_prefill(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cu_seqlens_q: Tensor,
    seqlens_k: Tensor,
    row_ids: Optional[Tensor],
    head_seqlens_k: Optional[Tensor],
    scale: Optional[float],
    window_left: int,
    softcap: float,
    max_seqlen_q: int,
    max_seqlen_k: int,
    k_scale: Optional[Tensor],
    v_scale: Optional[Tensor],
    need_lse: bool,
    geom: Optional[_KVGeom] = None,
    scores: Optional[Tensor] = None,
    score_mode: str = "add",
    score_last_queries: Optional[int] = None,
    block_table: Optional[Tensor] = None,
):
    args = (
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
    )
    if block_table is not None:  # a paged view (no scores: _check_scores refuses them there)
        if _direct_ok(*args[:7], k_scale, v_scale, scores, block_table):
            return _prefill_impl(*args, scores, score_mode, _last_queries(score_last_queries), block_table,
                                 need_lse=need_lse)  # fmt: skip
        return torch.ops.vattn.prefill_attention(*args, scores, score_mode, _last_queries(score_last_queries),
                                                 block_table)  # fmt: skip
    if scores is None:
        if _direct_ok(*args[:7], k_scale, v_scale):
            return _prefill_impl(*args, need_lse=need_lse, geom=geom)
        return torch.ops.vattn.prefill_attention(*args)
    w = _last_queries(score_last_queries)
    if _direct_ok(*args[:7], k_scale, v_scale, scores):
        result = _prefill_impl(*args, scores, score_mode, w, need_lse=need_lse, geom=geom)
        _bump(scores)
        return result
    return torch.ops.vattn.prefill_attention(*args, scores, score_mode, w)


def _last_queries(value: Optional[int]) -> int:
    """score_last_queries as the ops take it: an int, 0 (or less) for all queries."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"score_last_queries must be an int or None, got {type(value).__name__}")
    return max(int(value), 0)


def _bump(t: Tensor) -> None:
    """What the registered op's ADInplaceOrView kernel does for a mutated input: bump its version."""
    if not torch.is_inference_mode_enabled():
        torch.autograd.graph.increment_version(t)


# ----------------------------------------------------------------------------- public wrappers

IndexLike = Union[Tensor, list, tuple]


def _index(t: Optional[IndexLike], name: str, device: torch.device) -> Optional[Tensor]:
    """int32, contiguous, on `device`: converts int64 tensors and Python sequences, refuses the rest."""
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        t = _to_int32(torch.as_tensor(list(t), dtype=torch.int64), name)
        t = t.to(device)
    if t.dtype == torch.int64:
        t = _to_int32(t, name)
    elif t.dtype != torch.int32:
        raise TypeError(f"{name} must be an int32 or int64 tensor, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the op runs on {device}")
    return t.contiguous()


def _table(t, device: torch.device) -> Optional[Tensor]:
    """A block table as the ops take it: a tensor (int32, or int64, which the checks convert) or a
    nested sequence, made an int32 tensor on `device`."""
    if t is None or isinstance(t, torch.Tensor):
        return t
    return torch.as_tensor(t, dtype=torch.int32).to(device)


def _device_of(t: Tensor, name: str) -> torch.device:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t.device


def _max_hint(value: Optional[int], name: str) -> int:
    if value is None:
        return -1
    value = int(value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0 (or None to compute it, which synchronizes on CUDA)")
    if value > _INT32_MAX:
        raise ValueError(f"{name} must be at most 2**31 - 1 (an int32 length), got {value}")
    return value


def append_kv_raw(
    k_cache: Tensor,
    v_cache: Tensor,
    k: Tensor,
    v: Tensor,
    row_ids: IndexLike,
    positions: IndexLike,
    *,
    k_scale: Optional[Tensor] = None,
    v_scale: Optional[Tensor] = None,
    head_positions: Optional[IndexLike] = None,
    block_table: Optional[IndexLike] = None,
) -> None:
    """Writes token i of k, v ([n, kv_heads, dim]) into k_cache / v_cache [rows, seq, kv_heads, dim]
    at (row_ids[i], positions[i]). Any cache strides with the last dimension contiguous. A quantized
    cache (float8_e4m3fn / int8 / uint8 storage, see vattn.formats) is quantized into, with its fp32
    scales [rows, seq, kv_heads, scale_words] in k_scale / v_scale. head_positions [n, kv_heads]
    (optional) gives the position per kv head instead (after eviction the heads of a row may hold
    different numbers of tokens): token i of head h goes to head_positions[i, h].

    block_table (optional, int32 / int64 [rows, blocks per row]): a paged cache (vLLM's). k_cache /
    v_cache (and the scales) are then physical blocks [num_blocks, block_size, kv_heads, ...], any
    strides with the last dimension contiguous (NHD, or an HND view transposed), and (row_ids[i],
    positions[i]) is written at block block_table[row, pos // block_size], offset pos % block_size.
    vLLM's flat slot_mapping: block_table = arange(num_blocks)[None], row_ids = zeros,
    positions = slot_mapping. int4_ch needs block_size a multiple of its group (head_dim / 2).
    Tokens that land on one physical slot: the last of them wins on CPU (reference.append_kv);
    on CUDA which one is unspecified. On CPU every block id written through is checked first."""
    device = _device_of(k_cache, "k_cache")
    row_ids, positions = _index(row_ids, "row_ids", device), _index(positions, "positions", device)
    if head_positions is not None and not isinstance(head_positions, torch.Tensor):
        head_positions = torch.as_tensor(head_positions, dtype=torch.int32).to(device)
    head_positions = _index(head_positions, "head_positions", device)
    block_table = _table(block_table, device)
    run_append(k_cache, v_cache, k, v, row_ids, positions, k_scale, v_scale, None, head_positions, block_table)


def decode_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    seqlens_k: IndexLike,
    *,
    row_ids: Optional[IndexLike] = None,
    head_seqlens_k: Optional[IndexLike] = None,
    scale: Optional[float] = None,
    window_left: int = -1,
    softcap: float = 0.0,
    max_seqlen_k: Optional[int] = None,
    return_lse: bool = False,
    k_scale: Optional[Tensor] = None,
    v_scale: Optional[Tensor] = None,
    scores: Optional[Tensor] = None,
    score_mode: str = "add",
    score_last_queries: Optional[int] = None,
    block_table: Optional[IndexLike] = None,
):
    """Attention of one query per batch row (q: [batch, q_heads, dim]) over its cache row.

    Returns out (like q), or (out, lse [batch, q_heads] float32) with return_lse=True.
    Give max_seqlen_k (host bound on the lengths) to avoid a host sync on CUDA (CUDA graphs).
    A quantized cache is read with its scale tensors (k_scale / v_scale), dequantized in the kernel.
    scores: optional float32 [>= cache rows, kv_heads, >= cache seq], indexed by cache row, updated in
    place with each key's attention probability summed over the q heads of its GQA group
    (score_mode "add": H2O's accumulated score; "replace": TOVA's last-query score). Keys past each
    length are not touched. Definition: vattn.reference.attention.
    block_table (optional, int32 / int64 [rows, blocks per row]): a paged cache, see append_kv_raw;
    row_ids then index the block table's rows, and a row holds blocks per row x block_size tokens
    (on CPU the block ids below each length are checked; not with scores).
    """
    device = _device_of(q, "q")
    args = (
        q,
        k_cache,
        v_cache,
        _index(seqlens_k, "seqlens_k", device),
        _index(row_ids, "row_ids", device),
        _index(head_seqlens_k, "head_seqlens_k", device),
        None if scale is None else float(scale),
        int(window_left),
        float(softcap),
        _max_hint(max_seqlen_k, "max_seqlen_k"),
        k_scale,
        v_scale,
    )
    out, lse = run_decode(
        *args,
        need_lse=return_lse,
        scores=scores,
        score_mode=score_mode,
        score_last_queries=score_last_queries,
        block_table=_table(block_table, device),
    )
    return (out, lse) if return_lse else out


def prefill_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cu_seqlens_q: IndexLike,
    seqlens_k: IndexLike,
    *,
    row_ids: Optional[IndexLike] = None,
    head_seqlens_k: Optional[IndexLike] = None,
    scale: Optional[float] = None,
    window_left: int = -1,
    softcap: float = 0.0,
    max_seqlen_q: Optional[int] = None,
    max_seqlen_k: Optional[int] = None,
    return_lse: bool = False,
    k_scale: Optional[Tensor] = None,
    v_scale: Optional[Tensor] = None,
    scores: Optional[Tensor] = None,
    score_mode: str = "add",
    score_last_queries: Optional[int] = None,
    block_table: Optional[IndexLike] = None,
):
    """Causal attention of ragged queries (q: [total_q, q_heads, dim], row b owns
    q[cu_seqlens_q[b]:cu_seqlens_q[b+1]]) over cache rows that may already hold a prefix.

    Returns out (like q), or (out, lse) with return_lse=True. Give max_seqlen_q and max_seqlen_k to
    avoid host syncs on CUDA. max_seqlen_q must be at least the longest row's query count (as in
    FlashAttention's varlen API): host index tensors are checked (ValueError); on CUDA with device
    index tensors it is trusted, and a longer row's queries beyond it may be left unwritten.
    scores: optional float32 [>= cache rows, kv_heads, >= cache seq], updated in place with the sum,
    over the row's last score_last_queries queries (None: all; SnapKV's observation window, or H2O's
    column sums) and the q heads of each GQA group, of every key's attention probability;
    score_mode "add" or "replace". Definition: vattn.reference.attention.
    block_table (optional): a paged cache, as decode_attention.
    """
    device = _device_of(q, "q")
    args = (
        q,
        k_cache,
        v_cache,
        _index(cu_seqlens_q, "cu_seqlens_q", device),
        _index(seqlens_k, "seqlens_k", device),
        _index(row_ids, "row_ids", device),
        _index(head_seqlens_k, "head_seqlens_k", device),
        None if scale is None else float(scale),
        int(window_left),
        float(softcap),
        _max_hint(max_seqlen_q, "max_seqlen_q"),
        _max_hint(max_seqlen_k, "max_seqlen_k"),
        k_scale,
        v_scale,
    )
    out, lse = run_prefill(
        *args,
        need_lse=return_lse,
        scores=scores,
        score_mode=score_mode,
        score_last_queries=score_last_queries,
        block_table=_table(block_table, device),
    )
    return (out, lse) if return_lse else out


def merge_states(o_a: Tensor, lse_a: Tensor, o_b: Tensor, lse_b: Tensor) -> Tuple[Tensor, Tensor]:
    """Merges two attention states over disjoint key sets: returns (out, lse)."""
    if _direct_ok(o_a, lse_a, o_b, lse_b):
        return _merge_impl(o_a, lse_a, o_b, lse_b)
    return torch.ops.vattn.merge_states(o_a, lse_a, o_b, lse_b)
