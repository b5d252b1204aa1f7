"""Argument checks of the torch ops (python/vattn/ops.py): tensors, shapes, devices, index
tensors. What each device supports comes from the one support table (_support.py); the native code
checks what needs the data (index values, lengths) and throws."""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from . import _C, formats
from ._dtypes import TORCH_TO_CODE
from ._support import check_supported

Tensor = torch.Tensor

_INT32_MAX = 2**31 - 1


def _to_int32(t: Tensor, name: str) -> Tensor:
    """An int64 index tensor as int32, never wrapped: a value outside int32 would otherwise alias
    another row, position or block (2**32 + 1 -> 1). On the host it raises ValueError; on a device,
    where looking would synchronize (and break graph capture), it saturates to the int32 limits,
    which every check and kernel treats as out of range, never as another valid index."""
    if t.dtype != torch.int64:
        return t
    if t.device.type == "cpu":
        if t.numel() and (int(t.max()) > _INT32_MAX or int(t.min()) < -_INT32_MAX - 1):
            bad = t[(t > _INT32_MAX) | (t < -_INT32_MAX - 1)].reshape(-1)[0].item()
            raise ValueError(f"{name} holds {bad}, outside the int32 range the ops index with")
        return t.to(torch.int32)
    return t.clamp(-_INT32_MAX - 1, _INT32_MAX).to(torch.int32)


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


def _check_index(
    t: Optional[Tensor], name: str, shape: Tuple[int, ...], device: torch.device, required: bool = False
) -> None:
    if t is None:
        if required:
            raise TypeError(f"{name} is required: an int32 tensor of shape {list(shape)}, got None")
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
    views once, not per call. `view` is the native KVCacheView, built on first launch.
    `shape` is [rows, seq, kv_heads, head_dim] with the logical head_dim (a packed int4 cache holds
    head_dim / 2 bytes per vector); `dtype` is the dtype a plain cache stores (None when both sides
    are quantized: q, k and v may then be any float dtype the device supports)."""

    __slots__ = (
        "device",
        "dtype",
        "shape",
        "k_format",
        "v_format",
        "k_strides",
        "v_strides",
        "k_scale",
        "v_scale",
        "ks_strides",
        "vs_strides",
        "view",
        "block_table",
        "block_size",
        "num_blocks",
    )

    def __init__(self, device, dtype, shape, k_format, v_format, k_strides, v_strides, k_scale=None, v_scale=None):
        self.device, self.dtype, self.shape = device, dtype, shape
        self.k_format, self.v_format = k_format, v_format
        self.k_strides, self.v_strides = k_strides, v_strides
        self.k_scale, self.v_scale = k_scale, v_scale
        self.ks_strides = k_scale.stride() if k_scale is not None else (0, 0, 0, 0)
        self.vs_strides = v_scale.stride() if v_scale is not None else (0, 0, 0, 0)
        self.view = None
        # A paged view (_check_paged): the int32 block table [rows, blocks per row] whose rows are the
        # view's rows; the caches are then [num_blocks, block_size, kv_heads, ...] and `shape` is the
        # logical [rows, blocks per row * block_size, kv_heads, head_dim].
        self.block_table = None
        self.block_size = 0
        self.num_blocks = 0

    @property
    def quantized(self) -> bool:
        return self.k_format.quantized or self.v_format.quantized


def _cache_format(c: Tensor, scale: Optional[Tensor], name: str) -> formats.KVFormat:
    """The storage format of one cache tensor: a plain float dtype without scales, or a quantized
    storage dtype with its scale tensor."""
    if not isinstance(c, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(c).__name__}")
    if scale is None:
        fmt = formats.PLAIN.get(c.dtype)
        if fmt is None:
            if c.dtype in formats.QUANTIZED_BY_STORAGE:
                raise ValueError(f"{name} has dtype {c.dtype} (a quantized format): pass its {name[0]}_scale tensor")
            raise TypeError(
                f"{name} has dtype {c.dtype}; expected float32, float16 or bfloat16, or a quantized "
                f"storage dtype ({', '.join(str(d) for d in formats.QUANTIZED_BY_STORAGE)}) with scales"
            )
        return fmt
    fmt = formats.by_storage(c.dtype, scale.shape[-1] if isinstance(scale, torch.Tensor) and scale.dim() else None)
    if fmt is None:
        raise TypeError(
            f"{name} has dtype {c.dtype} but a {name[0]}_scale was given; quantized caches are stored as "
            f"{', '.join(f'{d} ({f.name})' for d, f in formats.QUANTIZED_BY_STORAGE.items())}"
        )
    return fmt


def _check_plain_cache(k_cache: Tensor, v_cache: Tensor, device: torch.device) -> Optional[_KVGeom]:
    """The common case of _check_cache (two plain caches of one dtype, well formed) in fewer steps;
    None sends anything else, errors included, through the full checks."""
    if type(k_cache) is not Tensor or type(v_cache) is not Tensor:
        return None
    fmt = formats.PLAIN.get(k_cache.dtype)
    if fmt is None or v_cache.dtype is not k_cache.dtype or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        return None
    if k_cache.device != device or v_cache.device != device or (device.type == "cuda" and not _C.built_with_cuda):
        return None
    ks, vs = k_cache.stride(), v_cache.stride()
    rows, seq, heads, dim = k_cache.shape
    if (dim > 1 and (ks[3] != 1 or vs[3] != 1)) or min(ks) < 0 or min(vs) < 0:
        return None
    if max(rows, seq) > _INT32_MAX or heads == 0 or dim == 0 or device.type not in ("cpu", "cuda"):
        return None
    return _KVGeom(device, fmt.storage_dtype, tuple(k_cache.shape), fmt, fmt, ks, vs)


def _check_cache(
    k_cache: Tensor,
    v_cache: Tensor,
    device: torch.device,
    k_scale: Optional[Tensor] = None,
    v_scale: Optional[Tensor] = None,
    paged: bool = False,
) -> _KVGeom:
    """The geometry of a (k_cache, v_cache) pair [rows, seq, kv_heads, dim]; paged=True: the physical
    blocks [num_blocks, block_size, kv_heads, dim] of a paged view (only the error messages differ)."""
    if k_scale is None and v_scale is None:
        fast = _check_plain_cache(k_cache, v_cache, device)
        if fast is not None:
            return fast
    strides, fmts, dims = [], [], []
    for name, c, sc in (("k_cache", k_cache, k_scale), ("v_cache", v_cache, v_scale)):
        fmt = _cache_format(c, sc, name)
        if c.dim() != 4:
            raise ValueError(f"{name} must be 4-D [rows, seq, kv_heads, head_dim], got shape {list(c.shape)}")
        _check_device(c, name, device)
        strides.append(_check_last_contiguous(c, name))
        fmts.append(fmt)
        dims.append(c.shape[3] * fmt.elems_per_storage)
    if k_cache.shape[:3] != v_cache.shape[:3] or dims[0] != dims[1]:
        raise ValueError(
            f"k_cache and v_cache shapes differ: {list(k_cache.shape)} vs {list(v_cache.shape)}"
            + ("" if fmts[0] == fmts[1] else f" (formats {fmts[0].name} / {fmts[1].name})")
        )
    plain = [f for f in fmts if not f.quantized]
    if len(plain) == 1:
        raise TypeError("k_cache and v_cache must be both plain or both quantized")
    if len(plain) == 2 and fmts[0] != fmts[1]:
        raise TypeError(f"k_cache and v_cache dtypes differ: {k_cache.dtype} vs {v_cache.dtype}")
    rows, seq, heads, _ = k_cache.shape
    dim = dims[0]
    if max(rows, seq) > _INT32_MAX or heads == 0 or dim == 0:
        raise ValueError(f"cache shape {list(k_cache.shape)} is empty or too large")
    shape = (rows, seq, heads, dim)
    for name, sc, fmt in (("k_scale", k_scale, fmts[0]), ("v_scale", v_scale, fmts[1])):
        if sc is None:
            continue
        if sc.dtype != torch.float32:
            raise TypeError(f"{name} must be float32, got {sc.dtype}")
        want = (rows, seq, heads, fmt.scale_words)
        if tuple(sc.shape) != want:
            raise ValueError(f"{name} must have shape {list(want)} for kv_format {fmt.name!r}, got {list(sc.shape)}")
        g = formats.group_tokens(fmt, dim)
        if g > 1 and seq % g:
            if paged:
                raise ValueError(
                    f"a paged {fmt.name} cache quantizes groups of {g} tokens, which must not cross a block: its "
                    f"block_size (k_cache.shape[1] = {seq}) must be a multiple of {g}"
                )
            raise ValueError(f"a {fmt.name} cache holds whole groups of {g} tokens: its seq ({seq}) must be a multiple")
        _check_device(sc, name, device)
        _check_last_contiguous(sc, name)
    return _KVGeom(
        device,
        plain[0].storage_dtype if plain else None,
        shape,
        fmts[0],
        fmts[1],
        strides[0],
        strides[1],
        k_scale,
        v_scale,
    )


def _check_paged(
    k_cache: Tensor,
    v_cache: Tensor,
    device: torch.device,
    block_table: Tensor,
    k_scale: Optional[Tensor] = None,
    v_scale: Optional[Tensor] = None,
) -> _KVGeom:
    """The geometry of a paged KV view (cuda/include/vattn/kv_paging.h): k_cache / v_cache (and the
    scales) hold physical blocks [num_blocks, block_size, kv_heads, ...] with any strides whose last
    dimension is contiguous, and block_table [rows, blocks per row] (int32, or int64, converted)
    names the block of each row's tokens: token t of row r is at block block_table[r, t // block_size],
    offset t % block_size. The block ids themselves are data: the CPU op checks the ones a call's
    lengths or positions reach; CUDA reads block 0 for an id out of range (no host sync)."""
    if not isinstance(block_table, torch.Tensor):
        raise TypeError(f"block_table must be a torch.Tensor, got {type(block_table).__name__}")
    if block_table.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"block_table must be an int32 or int64 tensor, got {block_table.dtype}")
    if block_table.dim() != 2:
        raise ValueError(f"block_table must be 2-D [rows, blocks per row], got shape {list(block_table.shape)}")
    geom = _check_cache(k_cache, v_cache, device, k_scale, v_scale, paged=True)
    if block_table.device != device:
        raise ValueError(f"block_table is on {block_table.device} but the op runs on {device}; move it first")
    num_blocks, block_size, heads, dim = geom.shape
    rows, per_row = block_table.shape
    if block_size == 0:
        raise ValueError("a paged cache needs block_size (k_cache.shape[1]) > 0")
    if rows > _INT32_MAX or per_row * block_size > _INT32_MAX:
        raise ValueError(f"block_table shape {list(block_table.shape)} addresses too many tokens per row")
    table = _to_int32(block_table, "block_table")
    if (per_row > 1 and table.stride(1) != 1) or table.stride(0) < 0:
        table = table.contiguous()
    geom.shape = (rows, per_row * block_size, heads, dim)
    geom.block_table, geom.block_size, geom.num_blocks = table, block_size, num_blocks
    return geom


def _checked_cache(
    k_cache: Tensor,
    v_cache: Tensor,
    device: torch.device,
    geom: Optional[_KVGeom],
    k_scale: Optional[Tensor] = None,
    v_scale: Optional[Tensor] = None,
) -> _KVGeom:
    """_check_cache, or for a geometry checked before (KVCache views) only the device match."""
    if geom is None:
        return _check_cache(k_cache, v_cache, device, k_scale, v_scale)
    if geom.device != device:
        raise ValueError(f"k_cache is on {geom.device} but the op runs on {device}; move it first")
    return geom


def _check_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    seqlens_k: Tensor,
    cu_seqlens_q: Optional[Tensor],
    row_ids: Optional[Tensor],
    head_seqlens_k: Optional[Tensor],
    window_left: int,
    softcap: float,
    scale: Optional[float],
    geom: Optional[_KVGeom] = None,
    k_scale: Optional[Tensor] = None,
    v_scale: Optional[Tensor] = None,
    block_table: Optional[Tensor] = None,
) -> Tuple[_KVGeom, Tuple[int, ...]]:
    """Checks an attention call; returns the cache geometry and q's strides. block_table: a paged
    view (_check_paged)."""
    _check_float(q, "q")
    if q.dim() != 3:
        raise ValueError(f"q must be 3-D [tokens, q_heads, head_dim], got shape {list(q.shape)}")
    device = q.device
    _check_device(q, "q", device)
    q_strides = _check_last_contiguous(q, "q")
    if block_table is None:
        geom = _checked_cache(k_cache, v_cache, device, geom, k_scale, v_scale)
    else:
        geom = _check_paged(k_cache, v_cache, device, block_table, k_scale, v_scale)
    if geom.dtype is not None and geom.dtype != q.dtype:
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
    _check_index(seqlens_k, "seqlens_k", (batch,), device, required=True)
    if cu_seqlens_q is None:
        if total_q != batch:
            raise ValueError(f"decode takes one query per row: q has {total_q} rows but seqlens_k has {batch}")
    else:
        _check_index(cu_seqlens_q, "cu_seqlens_q", (batch + 1,), device, required=True)
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
    check_supported(
        "decode" if cu_seqlens_q is None else "prefill",
        device.type,
        q.dtype,
        dim,
        (geom.k_format.name, geom.v_format.name),
    )
    return geom, q_strides


def _check_append(
    k_cache: Tensor,
    v_cache: Tensor,
    k: Tensor,
    v: Tensor,
    row_ids: Tensor,
    positions: Tensor,
    geom: Optional[_KVGeom] = None,
    k_scale: Optional[Tensor] = None,
    v_scale: Optional[Tensor] = None,
    head_positions: Optional[Tensor] = None,
    block_table: Optional[Tensor] = None,
) -> Tuple[_KVGeom, Tuple[int, ...], Tuple[int, ...]]:
    """Checks an append_kv call; returns the cache geometry and the strides of k and v.
    head_positions [tokens, kv_heads] int32 (optional): per-head positions (values in [0, seq) are
    checked by the native op, like positions). block_table: a paged view (_check_paged); row_ids
    and positions are then rows and positions of the view."""
    if block_table is not None:
        device = k_cache.device if isinstance(k_cache, torch.Tensor) else None
        geom = _check_paged(k_cache, v_cache, device, block_table, k_scale, v_scale)
    elif geom is None:
        device = k_cache.device if isinstance(k_cache, torch.Tensor) else None
        geom = _check_cache(k_cache, v_cache, device, k_scale, v_scale)
    device = geom.device
    _, _, heads, dim = geom.shape
    strides = []
    for name, t in (("k", k), ("v", v)):
        _check_float(t, name)
        if t.dim() != 3:
            raise ValueError(f"{name} must be 3-D [tokens, kv_heads, head_dim], got shape {list(t.shape)}")
        _check_device(t, name, device)
        strides.append(_check_last_contiguous(t, name))
        if geom.dtype is not None and t.dtype != geom.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but the cache holds {geom.dtype}")
        if t.shape[1] != heads or t.shape[2] != dim:
            raise ValueError(f"{name} has shape {list(t.shape)}; expected [tokens, {heads}, {dim}]")
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {list(k.shape)} vs {list(v.shape)}")
    if k.dtype != v.dtype:
        raise TypeError(f"k and v dtypes differ: {k.dtype} vs {v.dtype}")
    n = k.shape[0]
    _check_index(row_ids, "row_ids", (n,), device, required=True)
    _check_index(positions, "positions", (n,), device, required=True)
    if head_positions is not None:
        _check_index(head_positions, "head_positions", (n, heads), device)
    check_supported("append_kv", device.type, k.dtype, dim, (geom.k_format.name, geom.v_format.name))
    return geom, strides[0], strides[1]


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


SCORE_MODES = {"add": 1, "replace": 2}


def _check_scores(
    scores: Optional[Tensor],
    score_mode: str,
    score_last_queries: Optional[int],
    geom: _KVGeom,
    device: torch.device,
) -> int:
    """Checks the optional score buffer of an attention call (reference.attention's `scores`);
    returns the native score mode (0 when scores is None)."""
    if scores is None:
        return 0
    if geom.block_table is not None:
        raise ValueError("scores are not supported on a paged KV view (block_table); use a contiguous cache")
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
    mode = SCORE_MODES.get(score_mode) if isinstance(score_mode, str) else None
    if mode is None:
        raise ValueError(f"score_mode must be 'add' or 'replace', got {score_mode!r}")
    if score_last_queries is not None and (
        isinstance(score_last_queries, bool) or not isinstance(score_last_queries, int)
    ):
        raise TypeError(f"score_last_queries must be an int or None, got {type(score_last_queries).__name__}")
    if scores.dtype != torch.float32:
        raise ValueError(f"scores must be float32, got {scores.dtype}")
    rows, seq, heads, _ = geom.shape
    if scores.dim() != 3 or scores.shape[0] < rows or scores.shape[1] != heads or scores.shape[2] < seq:
        raise ValueError(
            f"scores must have shape [>= {rows} cache rows, {heads} kv_heads, >= {seq} tokens], got {list(scores.shape)}"
        )
    if scores.device != device:
        raise ValueError(f"scores is on {scores.device} but the op runs on {device}; move it first")
    _check_last_contiguous(scores, "scores")
    return mode
