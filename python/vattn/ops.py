"""vattn's torch custom ops (`torch.ops.vattn.*`) and their public Python wrappers.

The native module takes raw pointers, element strides and dtype codes (no libtorch); this module
checks tensors, fills the parameter structs of cuda/include/vattn/params.h and calls the cpu or
cuda entry point for the device of the inputs. Every op has a fake implementation so
torch.compile can trace it, and on CUDA every launch goes to torch.cuda.current_stream().

CUDA graphs: the attention ops read lengths from device memory, so a captured graph stays valid as
lengths change. Pass `max_seqlen_q` / `max_seqlen_k` (host upper bounds): left at -1 / None they
are computed from the index tensors, which synchronizes the host with the device and cannot be
captured. (The kernels stay correct if a real length exceeds max_seqlen_k; it only steers how
decode splits long rows.)

Semantics of every op: python/vattn/reference.py.
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Iterator, Optional, Tuple, Union

import torch

from . import _C
from ._dtypes import TORCH_TO_CODE, code_of

__all__ = [
    "append_kv_raw", "decode_attention", "prefill_attention", "merge_states",
    "set_attention_impl", "get_attention_impl", "attention_impl",
]

Tensor = torch.Tensor

# ----------------------------------------------------------------------------- implementation choice

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


# ----------------------------------------------------------------------------- checks

_INT32_MAX = 2**31 - 1


def _check_float(t: Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in TORCH_TO_CODE:
        raise TypeError(f"{name} has dtype {t.dtype}; expected float32, float16 or bfloat16")


def _check_device(t: Tensor, name: str, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the op runs on {device}; move it first")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"vattn ops run on cpu or cuda tensors, got {device}")
    if device.type == "cuda" and not _C.built_with_cuda:
        raise RuntimeError("this vattn build has no CUDA support (built without nvcc); use CPU tensors or rebuild")


def _check_last_contiguous(t: Tensor, name: str) -> None:
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must have its last dimension contiguous (stride {t.stride(-1)})")
    if any(s < 0 for s in t.stride()):
        raise ValueError(f"{name} has a negative stride")


def _check_index(t: Optional[Tensor], name: str, shape: Tuple[int, ...], device: torch.device) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise TypeError(f"{name} must be int32 (the public wrappers convert int64), got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    _check_device(t, name, device)
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def _check_cache(k_cache: Tensor, v_cache: Tensor, device: torch.device) -> None:
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        _check_float(c, name)
        if c.dim() != 4:
            raise ValueError(f"{name} must be 4-D [rows, seq, kv_heads, head_dim], got shape {list(c.shape)}")
        _check_device(c, name, device)
        _check_last_contiguous(c, name)
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache shapes differ: {list(k_cache.shape)} vs {list(v_cache.shape)}")
    if k_cache.dtype != v_cache.dtype:
        raise TypeError(f"k_cache and v_cache dtypes differ: {k_cache.dtype} vs {v_cache.dtype}")
    rows, seq, heads, dim = k_cache.shape
    if max(rows, seq) > _INT32_MAX or heads == 0 or dim == 0:
        raise ValueError(f"cache shape {list(k_cache.shape)} is empty or too large")


def _check_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, seqlens_k: Tensor, cu_seqlens_q: Optional[Tensor],
                     row_ids: Optional[Tensor], head_seqlens_k: Optional[Tensor], window_left: int, softcap: float,
                     scale: Optional[float]) -> None:
    _check_float(q, "q")
    if q.dim() != 3:
        raise ValueError(f"q must be 3-D [tokens, q_heads, head_dim], got shape {list(q.shape)}")
    device = q.device
    _check_device(q, "q", device)
    _check_last_contiguous(q, "q")
    _check_cache(k_cache, v_cache, device)
    if k_cache.dtype != q.dtype:
        raise TypeError(f"the cache dtype {k_cache.dtype} must match the q dtype {q.dtype}")
    total_q, hq, dim = q.shape
    hkv, kdim = k_cache.shape[2], k_cache.shape[3]
    if dim != kdim:
        raise ValueError(f"q head_dim {dim} differs from the cache head_dim {kdim}")
    if hq == 0 or hq % hkv != 0:
        raise ValueError(f"num_q_heads ({hq}) must be a positive multiple of num_kv_heads ({hkv})")
    if not isinstance(seqlens_k, torch.Tensor) or seqlens_k.dim() != 1:
        raise ValueError("seqlens_k must be a 1-D tensor [batch]")
    batch = seqlens_k.shape[0]
    _check_index(seqlens_k, "seqlens_k", (batch,), device)
    if cu_seqlens_q is None:
        if total_q != batch:
            raise ValueError(f"decode takes one query per row: q has {total_q} rows but seqlens_k has {batch}")
    else:
        _check_index(cu_seqlens_q, "cu_seqlens_q", (batch + 1,), device)
    _check_index(row_ids, "row_ids", (batch,), device)
    _check_index(head_seqlens_k, "head_seqlens_k", (batch, hkv), device)
    if total_q > _INT32_MAX:
        raise ValueError("too many query tokens")
    if not isinstance(window_left, int):
        raise TypeError("window_left must be an int")
    if not math.isfinite(float(softcap)) or softcap < 0:
        raise ValueError(f"softcap must be a finite number >= 0 (0 disables it), got {softcap}")
    if scale is not None and not math.isfinite(float(scale)):
        raise ValueError(f"scale must be finite, got {scale}")
    if device.type == "cuda":
        # What the CUDA kernels cover (cuda/kernels/decode.cu, prefill.cu); the CPU path takes any head_dim.
        if dim % 8 != 0 or dim > 256:
            raise ValueError(f"CUDA attention needs head_dim a multiple of 8 up to 256, got {dim}")
        if cu_seqlens_q is not None and q.dtype == torch.float32:
            raise TypeError("CUDA prefill_attention supports float16 and bfloat16 (float32 runs on CPU)")


# ----------------------------------------------------------------------------- parameter structs

def _stream_of(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0


def _cache_view(k_cache: Tensor, v_cache: Tensor) -> "_C.KVCacheView":
    view = _C.KVCacheView()
    view.k = k_cache.data_ptr()
    view.v = v_cache.data_ptr()
    view.k_stride_row, view.k_stride_tok, view.k_stride_head = k_cache.stride(0), k_cache.stride(1), k_cache.stride(2)
    view.v_stride_row, view.v_stride_tok, view.v_stride_head = v_cache.stride(0), v_cache.stride(1), v_cache.stride(2)
    view.num_rows, view.max_seq = k_cache.shape[0], k_cache.shape[1]
    view.kv_dtype = code_of(k_cache.dtype)
    return view


def _ptr(t: Optional[Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _device_guard(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _max_of(t: Tensor) -> int:
    # Synchronizes on CUDA: only used when the caller gave no host bound.
    return int(t.max().item()) if t.numel() > 0 else 0


# ----------------------------------------------------------------------------- append_kv

@torch.library.custom_op("vattn::append_kv", mutates_args=("k_cache", "v_cache"))
def _append_kv(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, row_ids: Tensor, positions: Tensor) -> None:
    _check_append(k_cache, v_cache, k, v, row_ids, positions)
    if k.shape[0] == 0:
        return
    p = _C.AppendParams()
    p.cache = _cache_view(k_cache, v_cache)
    p.k, p.v = k.data_ptr(), v.data_ptr()
    p.k_stride_tok, p.k_stride_head = k.stride(0), k.stride(1)
    p.v_stride_tok, p.v_stride_head = v.stride(0), v.stride(1)
    p.row_ids, p.positions = row_ids.data_ptr(), positions.data_ptr()
    p.num_tokens, p.num_kv_heads, p.head_dim = k.shape
    p.dtype = code_of(k.dtype)
    if k.device.type == "cuda":
        with _device_guard(k.device):
            p.stream = _stream_of(k.device)
            _C.append_kv_cuda(p)
    else:
        _C.append_kv_cpu(p)


def _check_append(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, row_ids: Tensor, positions: Tensor) -> None:
    device = k_cache.device if isinstance(k_cache, torch.Tensor) else None
    _check_cache(k_cache, v_cache, device)
    for name, t in (("k", k), ("v", v)):
        _check_float(t, name)
        if t.dim() != 3:
            raise ValueError(f"{name} must be 3-D [tokens, kv_heads, head_dim], got shape {list(t.shape)}")
        _check_device(t, name, device)
        _check_last_contiguous(t, name)
        if t.dtype != k_cache.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but the cache holds {k_cache.dtype}")
        if tuple(t.shape[1:]) != tuple(k_cache.shape[2:]):
            raise ValueError(f"{name} has shape {list(t.shape)}; expected [tokens, {k_cache.shape[2]}, {k_cache.shape[3]}]")
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {list(k.shape)} vs {list(v.shape)}")
    n = k.shape[0]
    _check_index(row_ids, "row_ids", (n,), device)
    _check_index(positions, "positions", (n,), device)


@_append_kv.register_fake
def _(k_cache, v_cache, k, v, row_ids, positions):
    _check_append(k_cache, v_cache, k, v, row_ids, positions)
    return None


# ----------------------------------------------------------------------------- attention

def _attention_params(q: Tensor, k_cache: Tensor, v_cache: Tensor, out: Tensor, lse: Tensor, seqlens_k: Tensor,
                      cu_seqlens_q: Optional[Tensor], row_ids: Optional[Tensor], head_seqlens_k: Optional[Tensor],
                      scale: Optional[float], window_left: int, softcap: float, max_seqlen_q: int,
                      max_seqlen_k: int) -> "_C.AttentionParams":
    p = _C.AttentionParams()
    p.q = q.data_ptr()
    p.q_stride_tok, p.q_stride_head = q.stride(0), q.stride(1)
    p.out = out.data_ptr()
    p.o_stride_tok, p.o_stride_head = out.stride(0), out.stride(1)
    p.lse = lse.data_ptr()
    p.kv = _cache_view(k_cache, v_cache)
    p.cu_seqlens_q = _ptr(cu_seqlens_q)
    p.seqlens_k = seqlens_k.data_ptr()
    p.head_seqlens_k = _ptr(head_seqlens_k)
    p.row_ids = _ptr(row_ids)
    p.total_q, p.num_q_heads, p.head_dim = q.shape
    p.batch = seqlens_k.shape[0]
    p.num_kv_heads = k_cache.shape[2]
    if max_seqlen_k < 0:
        max_seqlen_k = _max_of(head_seqlens_k if head_seqlens_k is not None else seqlens_k)
    if max_seqlen_q < 0:
        max_seqlen_q = 1 if cu_seqlens_q is None else _max_of(cu_seqlens_q[1:] - cu_seqlens_q[:-1])
    p.max_seqlen_q, p.max_seqlen_k = int(max_seqlen_q), int(max_seqlen_k)
    p.scale = float(scale) if scale is not None else 1.0 / math.sqrt(q.shape[2])
    p.softcap = float(softcap)
    p.window_left = int(window_left) if window_left >= 0 else -1
    p.dtype = code_of(q.dtype)
    p.impl = _IMPLS[_impl]
    return p


def _empty_outputs(q: Tensor) -> Tuple[Tensor, Tensor]:
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((q.shape[0], q.shape[1]), dtype=torch.float32, device=q.device)
    return out, lse


@torch.library.custom_op("vattn::decode_attention", mutates_args=())
def _decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, seqlens_k: Tensor, row_ids: Optional[Tensor] = None,
                      head_seqlens_k: Optional[Tensor] = None, scale: Optional[float] = None, window_left: int = -1,
                      softcap: float = 0.0, max_seqlen_k: int = -1) -> Tuple[Tensor, Tensor]:
    _check_attention(q, k_cache, v_cache, seqlens_k, None, row_ids, head_seqlens_k, window_left, softcap, scale)
    out, lse = _empty_outputs(q)
    if q.shape[0] == 0:
        return out, lse
    p = _attention_params(q, k_cache, v_cache, out, lse, seqlens_k, None, row_ids, head_seqlens_k, scale, window_left,
                          softcap, 1, max_seqlen_k)
    if q.device.type == "cuda":
        with _device_guard(q.device):
            p.stream = _stream_of(q.device)
            workspace = torch.empty(int(_C.decode_workspace_bytes(p)), dtype=torch.uint8, device=q.device)
            p.workspace, p.workspace_bytes = _ptr(workspace), workspace.numel()
            _C.decode_attention_cuda(p)
    else:
        _C.decode_attention_cpu(p)
    return out, lse


@_decode_attention.register_fake
def _(q, k_cache, v_cache, seqlens_k, row_ids=None, head_seqlens_k=None, scale=None, window_left=-1, softcap=0.0,
      max_seqlen_k=-1):
    _check_attention(q, k_cache, v_cache, seqlens_k, None, row_ids, head_seqlens_k, window_left, softcap, scale)
    return _empty_outputs(q)


@torch.library.custom_op("vattn::prefill_attention", mutates_args=())
def _prefill_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, cu_seqlens_q: Tensor, seqlens_k: Tensor,
                       row_ids: Optional[Tensor] = None, head_seqlens_k: Optional[Tensor] = None,
                       scale: Optional[float] = None, window_left: int = -1, softcap: float = 0.0,
                       max_seqlen_q: int = -1, max_seqlen_k: int = -1) -> Tuple[Tensor, Tensor]:
    _check_attention(q, k_cache, v_cache, seqlens_k, cu_seqlens_q, row_ids, head_seqlens_k, window_left, softcap, scale)
    out, lse = _empty_outputs(q)
    if q.shape[0] == 0:
        return out, lse
    p = _attention_params(q, k_cache, v_cache, out, lse, seqlens_k, cu_seqlens_q, row_ids, head_seqlens_k, scale,
                          window_left, softcap, max_seqlen_q, max_seqlen_k)
    if q.device.type == "cuda":
        with _device_guard(q.device):
            p.stream = _stream_of(q.device)
            _C.prefill_attention_cuda(p)
    else:
        _C.prefill_attention_cpu(p)
    return out, lse


@_prefill_attention.register_fake
def _(q, k_cache, v_cache, cu_seqlens_q, seqlens_k, row_ids=None, head_seqlens_k=None, scale=None, window_left=-1,
      softcap=0.0, max_seqlen_q=-1, max_seqlen_k=-1):
    _check_attention(q, k_cache, v_cache, seqlens_k, cu_seqlens_q, row_ids, head_seqlens_k, window_left, softcap, scale)
    return _empty_outputs(q)


# ----------------------------------------------------------------------------- merge_states

def _check_merge(o_a: Tensor, lse_a: Tensor, o_b: Tensor, lse_b: Tensor) -> None:
    _check_float(o_a, "o_a")
    _check_float(o_b, "o_b")
    if o_a.dim() != 3:
        raise ValueError(f"o_a must be 3-D [tokens, heads, head_dim], got shape {list(o_a.shape)}")
    if o_b.shape != o_a.shape:
        raise ValueError(f"o_b has shape {list(o_b.shape)}; expected {list(o_a.shape)} like o_a")
    if o_b.dtype != o_a.dtype:
        raise TypeError(f"o_a and o_b dtypes differ: {o_a.dtype} vs {o_b.dtype}")
    device = o_a.device
    for name, t in (("o_a", o_a), ("o_b", o_b)):
        _check_device(t, name, device)
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    for name, t in (("lse_a", lse_a), ("lse_b", lse_b)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32:
            raise TypeError(f"{name} must be a float32 tensor")
        if tuple(t.shape) != tuple(o_a.shape[:2]):
            raise ValueError(f"{name} must have shape {list(o_a.shape[:2])}, got {list(t.shape)}")
        _check_device(t, name, device)
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")


@torch.library.custom_op("vattn::merge_states", mutates_args=())
def _merge_states(o_a: Tensor, lse_a: Tensor, o_b: Tensor, lse_b: Tensor) -> Tuple[Tensor, Tensor]:
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
    if o_a.device.type == "cuda":
        with _device_guard(o_a.device):
            p.stream = _stream_of(o_a.device)
            _C.merge_states_cuda(p)
    else:
        _C.merge_states_cpu(p)
    return out, lse


@_merge_states.register_fake
def _(o_a, lse_a, o_b, lse_b):
    _check_merge(o_a, lse_a, o_b, lse_b)
    return torch.empty_like(o_a, memory_format=torch.contiguous_format), torch.empty_like(lse_a)


# ----------------------------------------------------------------------------- public wrappers

IndexLike = Union[Tensor, list, tuple]


def _index(t: Optional[IndexLike], name: str, device: torch.device) -> Optional[Tensor]:
    """int32, contiguous, on `device`: converts int64 tensors and Python sequences, refuses the rest."""
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        t = torch.as_tensor(list(t), dtype=torch.int32)
        t = t.to(device)
    if t.dtype == torch.int64:
        t = t.to(torch.int32)
    elif t.dtype != torch.int32:
        raise TypeError(f"{name} must be an int32 or int64 tensor, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the op runs on {device}")
    return t.contiguous()


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
    return value


def append_kv_raw(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, row_ids: IndexLike,
                  positions: IndexLike) -> None:
    """Writes token i of k, v ([n, kv_heads, dim]) into k_cache / v_cache [rows, seq, kv_heads, dim]
    at (row_ids[i], positions[i]). Any cache strides with the last dimension contiguous."""
    device = _device_of(k_cache, "k_cache")
    torch.ops.vattn.append_kv(k_cache, v_cache, k, v, _index(row_ids, "row_ids", device),
                              _index(positions, "positions", device))


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, seqlens_k: IndexLike, *,
                     row_ids: Optional[IndexLike] = None, head_seqlens_k: Optional[IndexLike] = None,
                     scale: Optional[float] = None, window_left: int = -1, softcap: float = 0.0,
                     max_seqlen_k: Optional[int] = None, return_lse: bool = False):
    """Attention of one query per batch row (q: [batch, q_heads, dim]) over its cache row.

    Returns out (like q), or (out, lse [batch, q_heads] float32) with return_lse=True.
    Give max_seqlen_k (host bound on the lengths) to avoid a host sync on CUDA (CUDA graphs).
    """
    device = _device_of(q, "q")
    out, lse = torch.ops.vattn.decode_attention(
        q, k_cache, v_cache, _index(seqlens_k, "seqlens_k", device), _index(row_ids, "row_ids", device),
        _index(head_seqlens_k, "head_seqlens_k", device), None if scale is None else float(scale), int(window_left),
        float(softcap), _max_hint(max_seqlen_k, "max_seqlen_k"))
    return (out, lse) if return_lse else out


def prefill_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, cu_seqlens_q: IndexLike, seqlens_k: IndexLike, *,
                      row_ids: Optional[IndexLike] = None, head_seqlens_k: Optional[IndexLike] = None,
                      scale: Optional[float] = None, window_left: int = -1, softcap: float = 0.0,
                      max_seqlen_q: Optional[int] = None, max_seqlen_k: Optional[int] = None,
                      return_lse: bool = False):
    """Causal attention of ragged queries (q: [total_q, q_heads, dim], row b owns
    q[cu_seqlens_q[b]:cu_seqlens_q[b+1]]) over cache rows that may already hold a prefix.

    Returns out (like q), or (out, lse) with return_lse=True. Give max_seqlen_q and max_seqlen_k to
    avoid host syncs on CUDA.
    """
    device = _device_of(q, "q")
    out, lse = torch.ops.vattn.prefill_attention(
        q, k_cache, v_cache, _index(cu_seqlens_q, "cu_seqlens_q", device), _index(seqlens_k, "seqlens_k", device),
        _index(row_ids, "row_ids", device), _index(head_seqlens_k, "head_seqlens_k", device),
        None if scale is None else float(scale), int(window_left), float(softcap),
        _max_hint(max_seqlen_q, "max_seqlen_q"), _max_hint(max_seqlen_k, "max_seqlen_k"))
    return (out, lse) if return_lse else out


def merge_states(o_a: Tensor, lse_a: Tensor, o_b: Tensor, lse_b: Tensor) -> Tuple[Tensor, Tensor]:
    """Merges two attention states over disjoint key sets: returns (out, lse)."""
    return torch.ops.vattn.merge_states(o_a, lse_a, o_b, lse_b)
