"""The short path of vattn.append_kv / vattn.attention for a decode step open in a KVCache.

Why it exists: in a model's decode step each layer makes one append and one attention call, and
between two layers the weights of the model stream through the CPU caches, so the Python layer runs
cold. Measured (SmolLM2 heads, b=1 x 1K fp32, a 64 MiB buffer written before each call): the
general path cost ~310 us per attention call, of which the native kernel was ~150 us; every torch
call on the way costs 5-40 us cold (torch.empty ~40 us) against well under 1 us hot.

So this path touches as little as it can: the step's tensors were made and checked by begin_step,
the layer's views and geometry are memoized (KVCache._ops_layer), and only the caller's tensors
are checked, with plain attribute reads. Decode outputs come from one buffer per step cut into one
tensor per layer (one torch call per step instead of one per layer); a layer asked for twice in a
step gets a fresh tensor, so no output is ever shared. Anything unusual (torch.compile, tracing,
modes, autograd, tensor subclasses, smoothed keys, scores, Quest, paged or odd strides) returns
NotImplemented and takes the general path, which also raises every error: the two paths return
the same values for every input (tests/test_fast_path.py).
"""

from __future__ import annotations

import math
import os

import torch

from . import _C, _launch
from ._checks import _INT32_MAX
from ._dtypes import code_of
from ._launch import _IMPLS, _cache_view, _run
from ._support import check_supported
from .cache import KVCache, Step

Tensor = torch.Tensor
_TC = torch._C

# False: every call takes the general path (tests and benchmarks compare the two; VATTN_SHORT_PATH=0
# sets it at import, for A/B runs of whole programs).
enabled = os.environ.get("VATTN_SHORT_PATH", "1").strip() != "0"


def _eager() -> bool:
    """Plain eager mode (ops._direct_ok's conditions, without its per-tensor part)."""
    return not (
        torch.compiler.is_compiling()
        or _TC._get_tracing_state() is not None
        or _TC._len_torch_dispatch_stack()
        or _TC._is_torch_function_mode_enabled()
        or _TC._are_functorch_transforms_active()
        or _TC._autograd._profiler_enabled()
    )


def _tokens_ok(t, cache, step, heads):
    """t.stride() when t is a plain [step.total_new, heads, head_dim] tensor of the cache's dtype
    and device, last dimension contiguous, no negative stride, that autograd would not record
    (heads None: any positive multiple of the kv heads); else None."""
    if type(t) is not Tensor or t.dtype is not cache.dtype or t.device != cache.device:
        return None
    shape = t.shape
    if len(shape) != 3 or shape[0] != step.total_new or shape[2] != cache.head_dim:
        return None
    h = shape[1]
    if heads is None:
        if h == 0 or h % cache.num_kv_heads:
            return None
    elif h != heads:
        return None
    st = t.stride()
    if (st[2] != 1 and shape[2] > 1) or st[0] < 0 or st[1] < 0:
        return None
    if t.requires_grad and _TC.is_grad_enabled():
        return None
    return st


def _state(cache, layer, step):
    """(the step's short-path state, the layer's ops entry), or None when this step is not open in
    this cache or the layer is not a valid index."""
    if type(layer) is not int or not 0 <= layer < cache.num_layers:
        return None
    if type(step) is not Step or cache._open_steps.get(id(step)) is not step or not step._intact():
        return None  # the general path raises the error
    st = step._fast
    if st is None:
        st = step._fast = {
            "head_seqlens": None if step.head_seqlens is None else step.head_seqlens.unbind(0),
            "head_positions": None if step.head_positions is None else step.head_positions.unbind(0),
            "outs": {},
        }
    return st, cache._ops_layer(layer)


def _decode_supported(cache, geom) -> bool:
    """Whether the device decodes this cache's dtype, head_dim and formats (fixed per cache: asked
    once; the general path raises the error otherwise)."""
    ok = cache.__dict__.get("_fast_decode_ok")
    if ok is None:
        try:
            check_supported("decode", cache.device.type, cache.dtype, cache.head_dim,
                            (geom.k_format.name, geom.v_format.name))  # fmt: skip
            ok = True
        except (TypeError, ValueError):
            ok = False
        cache.__dict__["_fast_decode_ok"] = ok
    return ok


def _decode_out(st, layer: int, q: Tensor, num_layers: int, as_bqhd: bool) -> Tensor:
    # One buffer per head count, shape and inference mode (an output made under inference_mode is
    # an inference tensor, as torch.empty there would make it; one made outside must not be).
    # as_bqhd: [tokens, 1, heads, dim] (transformers' [batch, q_len, heads, dim] of a decode step),
    # the same memory as [tokens, heads, dim].
    n, hq, dim = q.shape
    shape = (n, 1, hq, dim) if as_bqhd else (n, hq, dim)
    key = (shape, torch.is_inference_mode_enabled())
    outs = st["outs"].get(key)
    if outs is None:
        pool = torch.empty((num_layers,) + shape, dtype=q.dtype, device=q.device)
        outs = st["outs"][key] = [list(pool.unbind(0)), set()]
    tensors, used = outs
    if layer in used:  # asked again within the step: a fresh tensor, outputs are never shared
        return torch.empty(shape, dtype=q.dtype, device=q.device)
    used.add(layer)
    return tensors[layer]


def append_kv(cache, layer, step, k, v, eager_checked: bool = False):
    """vattn.append_kv on the short path, or NotImplemented. eager_checked: the caller has just
    checked ops._direct_ok on these tensors (vattn.hf)."""
    if not enabled or type(cache) is not KVCache:
        return NotImplemented
    if not cache._write_begin(step):  # not open here: the general path raises the usual error
        return NotImplemented
    try:
        return _append_kv(cache, layer, step, k, v, eager_checked)
    finally:
        cache._write_end(step)


def _append_kv(cache, layer, step, k, v, eager_checked):
    if cache._key_means is not None or cache._quest_meta is not None:
        return NotImplemented
    s = _state(cache, layer, step)
    if s is None or not step.total_new:
        return NotImplemented
    st, (k_view, v_view, k_scale, v_scale, geom) = s
    heads = cache.num_kv_heads
    ks = _tokens_ok(k, cache, step, heads)
    vs = _tokens_ok(v, cache, step, heads)
    if ks is None or vs is None or not (eager_checked or _eager()):
        return NotImplemented
    hp = st["head_positions"]
    p = _C.make_append_params(
        _cache_view(k_view, v_view, geom),
        k.data_ptr(),
        v.data_ptr(),
        ks[0],
        ks[1],
        vs[0],
        vs[1],
        step.token_slots.data_ptr(),
        step.positions.data_ptr(),
        step.total_new,
        heads,
        cache.head_dim,
        code_of(k.dtype),
        0 if hp is None else hp[layer].data_ptr(),
    )
    _run(cache.device, "append_kv", p)
    # as the registered op (its ADInplaceOrView kernel): autograd notices the cache's mutation
    if not torch.is_inference_mode_enabled():
        torch.autograd.graph.increment_version(tuple(t for t in (k_view, v_view, k_scale, v_scale) if t is not None))
    return None


def decode(cache, q, layer, step, scale, window_left, softcap, return_lse, eager_checked=False, as_bqhd=False):
    """vattn.attention for a decode step on the short path, or NotImplemented. eager_checked: as in
    append_kv; as_bqhd: the output as [tokens, 1, q_heads, dim] (vattn.hf)."""
    if (
        not enabled
        or type(cache) is not KVCache
        or type(step) is not Step
        or not step.is_decode
        or cache._key_means is not None
    ):
        return NotImplemented
    if type(window_left) is not int or type(softcap) not in (int, float) or not 0 <= softcap < math.inf:
        return NotImplemented
    if scale is not None and (type(scale) not in (int, float) or not math.isfinite(scale)):
        return NotImplemented
    s = _state(cache, layer, step)
    if s is None:
        return NotImplemented
    st, (k_view, v_view, _, _, geom) = s
    qs = _tokens_ok(q, cache, step, None)
    if qs is None or not (eager_checked or _eager()):
        return NotImplemented
    total_q, hq, dim = q.shape
    if not _decode_supported(cache, geom):
        return NotImplemented
    out = _decode_out(st, layer, q, cache.num_layers, as_bqhd)
    lse = torch.empty((total_q, hq), dtype=torch.float32, device=q.device) if return_lse else None
    hs = st["head_seqlens"]
    p = _C.make_attention_params(
        q.data_ptr(),
        qs[0],
        qs[1],
        out.data_ptr(),
        hq * dim,  # out is contiguous
        dim,
        0 if lse is None else lse.data_ptr(),
        _cache_view(k_view, v_view, geom),
        0,
        step.seqlens.data_ptr(),
        0 if hs is None else hs[layer].data_ptr(),
        step.slot_ids.data_ptr(),
        len(step.slots),
        hq,
        geom.shape[2],
        dim,
        total_q,
        1,
        int(step.max_seqlen_k),
        float(scale) if scale is not None else 1.0 / math.sqrt(dim),
        float(softcap),
        min(window_left, _INT32_MAX) if window_left >= 0 else -1,
        code_of(q.dtype),
        _IMPLS[_launch._impl],
        0,
        0,
        0,
        0,
        0,
    )
    _run(cache.device, "decode_attention", p, workspace=True)
    return (out, lse) if return_lse else out
