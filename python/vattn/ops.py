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

Eager fast path: the public wrappers here and in api.py call an op's implementation directly
(skipping the torch.ops dispatch, ~50 us a call) when nothing could tell the difference: see
_direct_ok. The registered ops run the very same implementation functions, checks included.

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
    if device.type != "cpu":
        if device.type != "cuda":
            raise ValueError(f"vattn ops run on cpu or cuda tensors, got {device}")
        if not _C.built_with_cuda:
            raise RuntimeError("this vattn build has no CUDA support (built without nvcc); use CPU tensors or rebuild")


def _check_last_contiguous(t: Tensor, name: str) -> Tuple[int, ...]:
    """Returns t.stride() (the callers need it too; one call instead of several)."""
    strides = t.stride()
    if t.shape[-1] > 1 and strides[-1] != 1:
        raise ValueError(f"{name} must have its last dimension contiguous (stride {strides[-1]})")
    for s in strides:
        if s < 0:
            raise ValueError(f"{name} has a negative stride")
    return strides


def _check_index(t: Optional[Tensor], name: str, shape: Tuple[int, ...], device: torch.device) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise TypeError(f"{name} must be int32 (the public wrappers convert int64), got {t.dtype}")
    if t.shape != shape:  # torch.Size compares as a tuple
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    _check_device(t, name, device)
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


class _KVGeom:
    """The checked facts about a (k_cache, v_cache) pair that the ops use (from _check_cache).

    The op path makes one per call; vattn.KVCache keeps one per layer for its own views (their
    shape, strides and addresses never change), so vattn.attention / append_kv check a layer's
    views once, not per call. `view` is the native KVCacheView, built on first launch."""

    __slots__ = ("device", "dtype", "shape", "k_strides", "v_strides", "view")

    def __init__(self, device, dtype, shape, k_strides, v_strides):
        self.device, self.dtype, self.shape = device, dtype, shape
        self.k_strides, self.v_strides = k_strides, v_strides
        self.view = None


def _check_cache(k_cache: Tensor, v_cache: Tensor, device: torch.device) -> _KVGeom:
    strides = []
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        _check_float(c, name)
        if c.dim() != 4:
            raise ValueError(f"{name} must be 4-D [rows, seq, kv_heads, head_dim], got shape {list(c.shape)}")
        _check_device(c, name, device)
        strides.append(_check_last_contiguous(c, name))
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache shapes differ: {list(k_cache.shape)} vs {list(v_cache.shape)}")
    if k_cache.dtype != v_cache.dtype:
        raise TypeError(f"k_cache and v_cache dtypes differ: {k_cache.dtype} vs {v_cache.dtype}")
    rows, seq, heads, dim = k_cache.shape
    if max(rows, seq) > _INT32_MAX or heads == 0 or dim == 0:
        raise ValueError(f"cache shape {list(k_cache.shape)} is empty or too large")
    return _KVGeom(device, k_cache.dtype, k_cache.shape, strides[0], strides[1])


def _checked_cache(k_cache: Tensor, v_cache: Tensor, device: torch.device, geom: Optional[_KVGeom]) -> _KVGeom:
    """_check_cache, or for a geometry checked before (KVCache views) only the device match."""
    if geom is None:
        return _check_cache(k_cache, v_cache, device)
    if geom.device != device:
        raise ValueError(f"k_cache is on {geom.device} but the op runs on {device}; move it first")
    return geom


def _check_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, seqlens_k: Tensor, cu_seqlens_q: Optional[Tensor],
                     row_ids: Optional[Tensor], head_seqlens_k: Optional[Tensor], window_left: int, softcap: float,
                     scale: Optional[float], geom: Optional[_KVGeom] = None) -> Tuple[_KVGeom, Tuple[int, ...]]:
    """Checks an attention call; returns the cache geometry and q's strides."""
    _check_float(q, "q")
    if q.dim() != 3:
        raise ValueError(f"q must be 3-D [tokens, q_heads, head_dim], got shape {list(q.shape)}")
    device = q.device
    _check_device(q, "q", device)
    q_strides = _check_last_contiguous(q, "q")
    geom = _checked_cache(k_cache, v_cache, device, geom)
    if geom.dtype != q.dtype:
        raise TypeError(f"the cache dtype {geom.dtype} must match the q dtype {q.dtype}")
    total_q, hq, dim = q.shape
    hkv, kdim = geom.shape[2], geom.shape[3]
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
    return geom, q_strides


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
        ks, vs = geom.k_strides, geom.v_strides
        code = code_of(geom.dtype)
        view = geom.view = _C.make_kv_view(k_cache.data_ptr(), v_cache.data_ptr(), ks[0], ks[1], ks[2], vs[0], vs[1],
                                           vs[2], geom.shape[0], geom.shape[1], code, code, 0, 0, 0, 0, 0, 0, 0, 0)
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


# ----------------------------------------------------------------------------- append_kv

def _append_impl(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, row_ids: Tensor, positions: Tensor,
                 geom: Optional[_KVGeom] = None) -> None:
    """The op's implementation (torch.ops.vattn.append_kv and the eager fast path)."""
    geom, k_strides, v_strides = _check_append(k_cache, v_cache, k, v, row_ids, positions, geom)
    n, heads, dim = k.shape
    if n == 0:
        return
    p = _C.make_append_params(_cache_view(k_cache, v_cache, geom), k.data_ptr(), v.data_ptr(), k_strides[0],
                              k_strides[1], v_strides[0], v_strides[1], row_ids.data_ptr(), positions.data_ptr(), n,
                              heads, dim, code_of(k.dtype))
    if geom.device.type == "cuda":
        with _device_guard(geom.device):
            p.stream = _stream_of(geom.device)
            _C.append_kv_cuda(p)
    else:
        _C.append_kv_cpu(p)


@torch.library.custom_op("vattn::append_kv", mutates_args=("k_cache", "v_cache"))
def _append_kv(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, row_ids: Tensor, positions: Tensor) -> None:
    _append_impl(k_cache, v_cache, k, v, row_ids, positions)


def _append_direct(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, row_ids: Tensor, positions: Tensor,
                   geom: Optional[_KVGeom] = None) -> None:
    """The eager fast path of append_kv (the caller checked _direct_ok): also bumps the caches'
    version counters as the registered op does (its ADInplaceOrView kernel), so autograd still
    notices the mutation."""
    _append_impl(k_cache, v_cache, k, v, row_ids, positions, geom)
    if not torch.is_inference_mode_enabled():
        torch.autograd.graph.increment_version((k_cache, v_cache))


def _check_append(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, row_ids: Tensor, positions: Tensor,
                  geom: Optional[_KVGeom] = None) -> Tuple[_KVGeom, Tuple[int, ...], Tuple[int, ...]]:
    """Checks an append_kv call; returns the cache geometry and the strides of k and v."""
    if geom is None:
        device = k_cache.device if isinstance(k_cache, torch.Tensor) else None
        geom = _check_cache(k_cache, v_cache, device)
    device = geom.device
    _, _, heads, dim = geom.shape
    strides = []
    for name, t in (("k", k), ("v", v)):
        _check_float(t, name)
        if t.dim() != 3:
            raise ValueError(f"{name} must be 3-D [tokens, kv_heads, head_dim], got shape {list(t.shape)}")
        _check_device(t, name, device)
        strides.append(_check_last_contiguous(t, name))
        if t.dtype != geom.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but the cache holds {geom.dtype}")
        if t.shape[1] != heads or t.shape[2] != dim:
            raise ValueError(f"{name} has shape {list(t.shape)}; expected [tokens, {heads}, {dim}]")
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {list(k.shape)} vs {list(v.shape)}")
    n = k.shape[0]
    _check_index(row_ids, "row_ids", (n,), device)
    _check_index(positions, "positions", (n,), device)
    return geom, strides[0], strides[1]


@_append_kv.register_fake
def _(k_cache, v_cache, k, v, row_ids, positions):
    _check_append(k_cache, v_cache, k, v, row_ids, positions)
    return None


# ----------------------------------------------------------------------------- attention

def _attention_params(q: Tensor, q_strides: Tuple[int, ...], k_cache: Tensor, v_cache: Tensor, geom: _KVGeom,
                      out: Tensor, lse: Optional[Tensor], seqlens_k: Tensor, cu_seqlens_q: Optional[Tensor],
                      row_ids: Optional[Tensor], head_seqlens_k: Optional[Tensor], scale: Optional[float],
                      window_left: int, softcap: float, max_seqlen_q: int, max_seqlen_k: int) -> "_C.AttentionParams":
    total_q, hq, dim = q.shape
    if max_seqlen_k < 0:
        max_seqlen_k = _max_of(head_seqlens_k if head_seqlens_k is not None else seqlens_k)
    if max_seqlen_q < 0:
        max_seqlen_q = 1 if cu_seqlens_q is None else _max_of(cu_seqlens_q[1:] - cu_seqlens_q[:-1])
    o_strides = out.stride()
    return _C.make_attention_params(
        q.data_ptr(), q_strides[0], q_strides[1], out.data_ptr(), o_strides[0], o_strides[1], _ptr(lse),
        _cache_view(k_cache, v_cache, geom), _ptr(cu_seqlens_q), seqlens_k.data_ptr(), _ptr(head_seqlens_k),
        _ptr(row_ids), seqlens_k.shape[0], hq, geom.shape[2], dim, total_q, int(max_seqlen_q), int(max_seqlen_k),
        float(scale) if scale is not None else 1.0 / math.sqrt(dim), float(softcap),
        int(window_left) if window_left >= 0 else -1, code_of(q.dtype), _IMPLS[_impl])


def _empty_outputs(q: Tensor, need_lse: bool = True) -> Tuple[Tensor, Optional[Tensor]]:
    """out like q (contiguous) and lse [tokens, heads] float32; lse None when not needed (the
    kernels skip it; only the eager fast path leaves it out, the ops always return it)."""
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((q.shape[0], q.shape[1]), dtype=torch.float32, device=q.device) if need_lse else None
    return out, lse


def _decode_impl(q: Tensor, k_cache: Tensor, v_cache: Tensor, seqlens_k: Tensor, row_ids: Optional[Tensor],
                 head_seqlens_k: Optional[Tensor], scale: Optional[float], window_left: int, softcap: float,
                 max_seqlen_k: int, need_lse: bool = True,
                 geom: Optional[_KVGeom] = None) -> Tuple[Tensor, Optional[Tensor]]:
    """The implementation of torch.ops.vattn.decode_attention (and of the eager fast path)."""
    geom, q_strides = _check_attention(q, k_cache, v_cache, seqlens_k, None, row_ids, head_seqlens_k, window_left,
                                       softcap, scale, geom)
    out, lse = _empty_outputs(q, need_lse)
    if q.shape[0] == 0:
        return out, lse
    p = _attention_params(q, q_strides, k_cache, v_cache, geom, out, lse, seqlens_k, None, row_ids, head_seqlens_k,
                          scale, window_left, softcap, 1, max_seqlen_k)
    if q.device.type == "cuda":
        with _device_guard(q.device):
            p.stream = _stream_of(q.device)
            workspace = torch.empty(int(_C.decode_workspace_bytes(p)), dtype=torch.uint8, device=q.device)
            p.workspace, p.workspace_bytes = _ptr(workspace), workspace.numel()
            _C.decode_attention_cuda(p)
    else:
        _C.decode_attention_cpu(p)
    return out, lse


@torch.library.custom_op("vattn::decode_attention", mutates_args=())
def _decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, seqlens_k: Tensor, row_ids: Optional[Tensor] = None,
                      head_seqlens_k: Optional[Tensor] = None, scale: Optional[float] = None, window_left: int = -1,
                      softcap: float = 0.0, max_seqlen_k: int = -1) -> Tuple[Tensor, Tensor]:
    return _decode_impl(q, k_cache, v_cache, seqlens_k, row_ids, head_seqlens_k, scale, window_left, softcap,
                        max_seqlen_k)


@_decode_attention.register_fake
def _(q, k_cache, v_cache, seqlens_k, row_ids=None, head_seqlens_k=None, scale=None, window_left=-1, softcap=0.0,
      max_seqlen_k=-1):
    _check_attention(q, k_cache, v_cache, seqlens_k, None, row_ids, head_seqlens_k, window_left, softcap, scale)
    return _empty_outputs(q)


def _prefill_impl(q: Tensor, k_cache: Tensor, v_cache: Tensor, cu_seqlens_q: Tensor, seqlens_k: Tensor,
                  row_ids: Optional[Tensor], head_seqlens_k: Optional[Tensor], scale: Optional[float],
                  window_left: int, softcap: float, max_seqlen_q: int, max_seqlen_k: int, need_lse: bool = True,
                  geom: Optional[_KVGeom] = None) -> Tuple[Tensor, Optional[Tensor]]:
    """The implementation of torch.ops.vattn.prefill_attention (and of the eager fast path)."""
    geom, q_strides = _check_attention(q, k_cache, v_cache, seqlens_k, cu_seqlens_q, row_ids, head_seqlens_k,
                                       window_left, softcap, scale, geom)
    out, lse = _empty_outputs(q, need_lse)
    if q.shape[0] == 0:
        return out, lse
    p = _attention_params(q, q_strides, k_cache, v_cache, geom, out, lse, seqlens_k, cu_seqlens_q, row_ids,
                          head_seqlens_k, scale, window_left, softcap, max_seqlen_q, max_seqlen_k)
    if q.device.type == "cuda":
        with _device_guard(q.device):
            p.stream = _stream_of(q.device)
            _C.prefill_attention_cuda(p)
    else:
        _C.prefill_attention_cpu(p)
    return out, lse


@torch.library.custom_op("vattn::prefill_attention", mutates_args=())
def _prefill_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, cu_seqlens_q: Tensor, seqlens_k: Tensor,
                       row_ids: Optional[Tensor] = None, head_seqlens_k: Optional[Tensor] = None,
                       scale: Optional[float] = None, window_left: int = -1, softcap: float = 0.0,
                       max_seqlen_q: int = -1, max_seqlen_k: int = -1) -> Tuple[Tensor, Tensor]:
    return _prefill_impl(q, k_cache, v_cache, cu_seqlens_q, seqlens_k, row_ids, head_seqlens_k, scale, window_left,
                         softcap, max_seqlen_q, max_seqlen_k)


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
    if o_a.device.type == "cuda":
        with _device_guard(o_a.device):
            p.stream = _stream_of(o_a.device)
            _C.merge_states_cuda(p)
    else:
        _C.merge_states_cpu(p)
    return out, lse


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
    if (torch.compiler.is_compiling() or _TC._get_tracing_state() is not None or _TC._len_torch_dispatch_stack()
            or _TC._is_torch_function_mode_enabled() or _TC._are_functorch_transforms_active()
            or _TC._autograd._profiler_enabled()):
        return False
    grad = _TC.is_grad_enabled()
    for t in tensors:
        if t is not None and (type(t) is not Tensor or (grad and t.requires_grad)):
            return False
    return True


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
    row_ids, positions = _index(row_ids, "row_ids", device), _index(positions, "positions", device)
    if _direct_ok(k_cache, v_cache, k, v, row_ids, positions):
        _append_direct(k_cache, v_cache, k, v, row_ids, positions)
    else:
        torch.ops.vattn.append_kv(k_cache, v_cache, k, v, row_ids, positions)


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, seqlens_k: IndexLike, *,
                     row_ids: Optional[IndexLike] = None, head_seqlens_k: Optional[IndexLike] = None,
                     scale: Optional[float] = None, window_left: int = -1, softcap: float = 0.0,
                     max_seqlen_k: Optional[int] = None, return_lse: bool = False):
    """Attention of one query per batch row (q: [batch, q_heads, dim]) over its cache row.

    Returns out (like q), or (out, lse [batch, q_heads] float32) with return_lse=True.
    Give max_seqlen_k (host bound on the lengths) to avoid a host sync on CUDA (CUDA graphs).
    """
    device = _device_of(q, "q")
    args = (q, k_cache, v_cache, _index(seqlens_k, "seqlens_k", device), _index(row_ids, "row_ids", device),
            _index(head_seqlens_k, "head_seqlens_k", device), None if scale is None else float(scale),
            int(window_left), float(softcap), _max_hint(max_seqlen_k, "max_seqlen_k"))
    if _direct_ok(*args[:6]):
        out, lse = _decode_impl(*args, need_lse=return_lse)
    else:
        out, lse = torch.ops.vattn.decode_attention(*args)
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
    args = (q, k_cache, v_cache, _index(cu_seqlens_q, "cu_seqlens_q", device), _index(seqlens_k, "seqlens_k", device),
            _index(row_ids, "row_ids", device), _index(head_seqlens_k, "head_seqlens_k", device),
            None if scale is None else float(scale), int(window_left), float(softcap),
            _max_hint(max_seqlen_q, "max_seqlen_q"), _max_hint(max_seqlen_k, "max_seqlen_k"))
    if _direct_ok(*args[:7]):
        out, lse = _prefill_impl(*args, need_lse=return_lse)
    else:
        out, lse = torch.ops.vattn.prefill_attention(*args)
    return (out, lse) if return_lse else out


def merge_states(o_a: Tensor, lse_a: Tensor, o_b: Tensor, lse_b: Tensor) -> Tuple[Tensor, Tensor]:
    """Merges two attention states over disjoint key sets: returns (out, lse)."""
    if _direct_ok(o_a, lse_a, o_b, lse_b):
        return _merge_impl(o_a, lse_a, o_b, lse_b)
    return torch.ops.vattn.merge_states(o_a, lse_a, o_b, lse_b)
