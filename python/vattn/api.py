"""The high-level calls of the Python API: `vattn.append_kv(cache, layer, step, k, v)` and
`vattn.attention(q, cache, layer, step)`, on a vattn.KVCache and a Step from cache.begin_step().

They only pick the cache views of one layer and the step's index tensors and call the torch ops
(python/vattn/ops.py). Everything they pass is already on the device, and the length bounds come
from the step's host values, so neither call synchronizes with the GPU.

They run once per layer per token, so their host cost matters: in plain eager mode they call the
ops' implementations directly (ops.run_append / run_decode / run_prefill), and on a vattn.KVCache they reuse the layer's
views as checked once (KVCache._ops_layer) instead of checking them on every call.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _fast, ops  # ops registers torch.ops.vattn.*
from .cache import _STEP_TAMPERED, Step

__all__ = ["append_kv", "attention", "dequantize_kv"]


def _check_layer(cache, layer) -> None:
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise TypeError(f"layer must be an int, got {type(layer).__name__}")
    if not 0 <= layer < cache.num_layers:
        raise ValueError(f"layer {layer} is outside [0, {cache.num_layers})")


def _check_step(cache, step) -> None:
    """A KVCache accepts only a step that is open in it (so its slots are still the live requests
    it was begun for: a slot with an open step cannot be freed); other caches get a type check."""
    check = getattr(cache, "_check_step", None)
    if check is not None:
        check(step)
        if isinstance(step, Step) and not step._intact():
            raise ValueError(_STEP_TAMPERED)
    elif step is None or not hasattr(step, "total_new"):
        raise TypeError(f"step must be a vattn.Step from cache.begin_step(), got {type(step).__name__}")


def _layer_views(cache, layer: int):
    """(k_view, v_view, k_scale, v_scale, checked geometry or None) of one layer. KVCache memoizes
    the geometry; any other object with kv(layer) (the call contract; kv_scales(layer) too when it
    is quantized) gets its views checked by the op on each call."""
    fast = getattr(cache, "_ops_layer", None)
    if fast is not None:
        return fast(layer)
    k_view, v_view = cache.kv(layer)
    scales = getattr(cache, "kv_scales", None)
    k_scale, v_scale = scales(layer) if scales is not None else (None, None)
    return k_view, v_view, k_scale, v_scale, None


def _check_tokens(t, name: str, step, heads: Optional[int], cache, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != cache.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but the cache works in {cache.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the cache is on {device}")
    if (
        t.dim() != 3
        or t.shape[0] != step.total_new
        or t.shape[2] != cache.head_dim
        or (heads is not None and t.shape[1] != heads)
    ):
        want = f"[{step.total_new}, {heads if heads is not None else 'q_heads'}, {cache.head_dim}]"
        raise ValueError(f"{name} must have shape {want} (step.total_new, heads, head_dim), got {list(t.shape)}")


def append_kv(cache, layer: int, step, k: torch.Tensor, v: torch.Tensor) -> None:
    """Stores the step's new K and V ([step.total_new, kv_heads, head_dim]) of one layer.

    Row i is the i-th new token of the step (slots in the order of step.slots, oldest first).
    """
    if _fast.append_kv(cache, layer, step, k, v) is not NotImplemented:
        return
    begin = getattr(cache, "_write_begin", None)  # a KVCache: closing the step waits for this write
    registered = begin is not None and begin(step)
    try:
        _append_kv(cache, layer, step, k, v)
    finally:
        if registered:
            cache._write_end(step)


def _append_kv(cache, layer: int, step, k: torch.Tensor, v: torch.Tensor) -> None:
    _check_layer(cache, layer)
    _check_step(cache, step)
    k_view, v_view, k_scale, v_scale, geom = _layer_views(cache, layer)
    _check_tokens(k, "k", step, cache.num_kv_heads, cache, k_view.device)
    _check_tokens(v, "v", step, cache.num_kv_heads, cache, k_view.device)
    if step.total_new == 0:
        return
    commit = None
    if getattr(cache, "_key_means", None) is not None:
        k, commit = cache._smooth(layer, step, k)  # stored keys are key - channel mean (KVCache smooth_keys)
    head_positions = getattr(step, "head_positions", None)
    if head_positions is None:
        ops.run_append(k_view, v_view, k, v, step.token_slots, step.positions, k_scale, v_scale, geom)
    else:  # compacted slots: each kv head appends at its own length
        ops.run_append(
            k_view, v_view, k, v, step.token_slots, step.positions, k_scale, v_scale, geom, head_positions[layer]
        )
    if commit is not None:
        commit()
    meta = cache.quest_meta(layer) if getattr(cache, "_quest_meta", None) is not None else None
    if meta is not None:  # Quest: the blocks this step wrote into get their key min / max again
        _quest_update(cache, layer, step, k_view, k_scale, meta)


def _quest_update(cache, layer, step, k_view, k_scale, meta) -> None:
    from .quest_ops import block_minmax

    new = step.cu_seqlens_q[1:] - step.cu_seqlens_q[:-1]
    head_seqlens = None if step.head_seqlens is None else step.head_seqlens[layer]
    start = step.seqlens - new if head_seqlens is None else (head_seqlens - new[:, None]).amin(1)
    if cache._group > 1:
        # int4_ch keys: the append re-encoded its group's earlier tokens too (their dequantized
        # values moved), so the blocks from the group's first token on are stale.
        start = torch.div(start, cache._group, rounding_mode="floor") * cache._group
    block_minmax(
        k_view,
        meta,
        step.slot_ids,
        step.seqlens,
        torch.div(start, cache.quest_block, rounding_mode="floor").to(torch.int32),
        head_lengths=head_seqlens,
        block=cache.quest_block,
        k_scale=k_scale,
        check=False,
    )


def attention(
    q: torch.Tensor,
    cache,
    layer: int,
    step,
    *,
    scale: Optional[float] = None,
    window_left: int = -1,
    softcap: float = 0.0,
    return_lse: bool = False,
    scores: Optional[torch.Tensor] = None,
    score_mode: str = "add",
    score_last_queries: Optional[int] = None,
    token_budget: Optional[int] = None,
):
    """Causal attention of the step's queries ([step.total_new, q_heads, head_dim]) over one layer.

    Each query sees everything its slot holds up to and including itself (append_kv of this step
    must come first). Returns out like q, or (out, lse [total_new, q_heads] float32).
    scores: optional float32 [>= max_batch, kv_heads, >= max_seq_len] indexed by slot, updated in
    place with per-token attention probabilities (vattn.ops.decode_attention / prefill_attention).
    token_budget: Quest block-sparse decode (cache.enable_quest() first): each (row, kv head) attends
    only to the best blocks within this many tokens (the last block always); prefill steps and rows
    shorter than the budget attend to everything.
    """
    if scores is None and token_budget is None:
        out = _fast.decode(cache, q, layer, step, scale, window_left, softcap, return_lse)
        if out is not NotImplemented:
            return out
    _check_layer(cache, layer)
    _check_step(cache, step)
    k_view, v_view, k_scale, v_scale, geom = _layer_views(cache, layer)
    _check_tokens(q, "q", step, None, cache, k_view.device)
    if q.shape[1] % cache.num_kv_heads != 0:
        raise ValueError(f"q has {q.shape[1]} heads, not a multiple of the cache's {cache.num_kv_heads} kv heads")
    scale = None if scale is None else float(scale)
    if isinstance(window_left, bool) or not isinstance(window_left, int):
        raise TypeError(f"window_left must be an int (-1: no window), got {window_left!r}")
    means = getattr(cache, "_key_means", None)
    if means is not None and softcap and float(softcap) > 0:
        raise ValueError(
            "softcap needs the true logits, but this cache stores smoothed keys (key - channel mean); "
            "create the KVCache with smooth_keys=False for a soft-capped model"
        )
    q_true = q
    if means is not None:  # stored keys are (k - mean) / scale: q * scale keeps q . k - q . mean
        group = q.shape[1] // cache.num_kv_heads
        ks = cache._key_scales[:, layer].index_select(0, step.token_slots)
        q = (q.float() * (ks if group == 1 else ks.repeat_interleave(group, dim=1))).to(q.dtype)
    head_seqlens = getattr(step, "head_seqlens", None)
    if head_seqlens is not None:  # compacted slots: lengths per (row, kv head) of this layer
        head_seqlens = head_seqlens[layer]
    if token_budget is not None and step.is_decode and step.max_seqlen_k > token_budget:
        if scores is not None:
            raise ValueError("token_budget (Quest) and scores= cannot be combined")
        out, lse = _quest_decode(cache, layer, step, q, k_view, v_view, k_scale, v_scale, head_seqlens,
                                 token_budget, scale, softcap, return_lse)  # fmt: skip
    elif step.is_decode:
        out, lse = ops.run_decode(
            q,
            k_view,
            v_view,
            step.seqlens,
            step.slot_ids,
            head_seqlens,
            scale,
            int(window_left),
            float(softcap),
            int(step.max_seqlen_k),
            k_scale,
            v_scale,
            return_lse,
            geom,
            scores,
            score_mode,
            score_last_queries,
        )
    else:
        out, lse = ops.run_prefill(
            q,
            k_view,
            v_view,
            step.cu_seqlens_q,
            step.seqlens,
            step.slot_ids,
            head_seqlens,
            scale,
            int(window_left),
            float(softcap),
            int(step.max_seqlen_q),
            int(step.max_seqlen_k),
            k_scale,
            v_scale,
            return_lse,
            geom,
            scores,
            score_mode,
            score_last_queries,
        )
    if return_lse and means is not None and lse is not None:
        # The stored keys are k - mu: every logit of a query is lower by scale * q . mu, which the
        # softmax ignores but the lse does not. Add it back, so lse is the true one (for merging).
        d = q.shape[-1]
        group = q.shape[1] // cache.num_kv_heads
        mu = means[:, layer].index_select(0, step.token_slots).repeat_interleave(group, dim=1)  # [n, Hq, D]
        sc = scale if scale is not None else d**-0.5
        lse = lse + sc * (q_true.float() * mu).sum(-1)
    return (out, lse) if return_lse else out


def _quest_decode(cache, layer, step, q, k_view, v_view, k_scale, v_scale, head_seqlens, budget, scale, softcap,
                  return_lse):  # fmt: skip
    from .quest_ops import quest_select, sparse_decode_attention

    meta = cache.quest_meta(layer) if getattr(cache, "quest_meta", None) is not None else None
    if meta is None:
        raise ValueError("token_budget= needs Quest metadata: call cache.enable_quest() first")
    if isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0:
        raise ValueError(f"token_budget must be a positive int, got {budget!r}")
    block = cache.quest_block
    ids, counts = quest_select(
        q, meta, step.slot_ids, step.seqlens, token_budget=budget, block=block, head_lengths=head_seqlens,
        max_blocks_hint=-(-int(step.max_seqlen_k) // block),
    )  # fmt: skip
    res = sparse_decode_attention(
        q, k_view, v_view, step.slot_ids, step.seqlens, ids, counts, block=block, head_lengths=head_seqlens,
        scale=scale, softcap=float(softcap), return_lse=return_lse, k_scale=k_scale, v_scale=v_scale, check=False,
    )  # fmt: skip
    return res if return_lse else (res, None)


def dequantize_kv(cache_or_codes, layer_or_scales=None, kv_format: Optional[str] = None, dtype=None):
    """A dequantized copy of K/V.

    dequantize_kv(cache, layer) -> (K, V): cache.kv(layer, dequantize=True), [max_batch, max_seq_len,
    kv_heads, head_dim] in the cache dtype, each live slot's stored tokens (zeros elsewhere), with
    any key smoothing undone (the keys as appended).
    dequantize_kv(codes, scales, kv_format, dtype=torch.float32) -> tensor: the codes of one side of
    any quantized cache ([..., storage elems] with their fp32 scale words [..., words]) as values;
    int4_ch keys (per group of G = head_dim / 2 tokens): codes [..., n, kv_heads, head_dim / 2] with
    the words of whole groups [..., >= ceil(n / G) * G, kv_heads, 4]."""
    if hasattr(cache_or_codes, "kv") and not isinstance(cache_or_codes, torch.Tensor):
        if layer_or_scales is None:
            raise TypeError("dequantize_kv(cache, layer): pass the layer")
        return cache_or_codes.kv(layer_or_scales, dequantize=True)
    from . import formats
    from .reference import dequantize

    if not isinstance(cache_or_codes, torch.Tensor) or not isinstance(layer_or_scales, torch.Tensor):
        raise TypeError("dequantize_kv(codes, scales, kv_format): codes and scales must be tensors")
    fmt = formats.get(kv_format)
    if not fmt.quantized:
        raise ValueError(f"{kv_format!r} is not a quantized format")
    codes, scales = cache_or_codes, layer_or_scales
    if codes.dtype != fmt.storage_dtype:
        raise TypeError(f"dequantize_kv: {fmt.name} codes are {fmt.storage_dtype}, got {codes.dtype}")
    if scales.dtype != torch.float32:
        raise TypeError(f"dequantize_kv: scale words are float32, got {scales.dtype}")
    if fmt.name == "int4_ch":
        # per group of tokens: codes [..., n, kv_heads, dim / 2], the words of whole groups
        # [..., >= ceil(n / G) * G, kv_heads, 4] (a row's last group may be partial)
        ok = codes.dim() >= 3 and scales.dim() == codes.dim() and scales.shape[-1] == fmt.scale_words
        if ok:
            g = formats.group_tokens(fmt, codes.shape[-1] * fmt.elems_per_storage)
            need = -(-codes.shape[-3] // g) * g
            ok = scales.shape[:-3] == codes.shape[:-3] and scales.shape[-2] == codes.shape[-2]
            ok = ok and scales.shape[-3] >= need
        if not ok:
            raise ValueError(
                f"dequantize_kv: int4_ch codes [..., n, kv_heads, dim / 2] of shape {list(codes.shape)} need the "
                f"scale words of whole groups [..., >= ceil(n / G) * G, kv_heads, 4], got {list(scales.shape)}"
            )
    elif codes.dim() < 1 or scales.shape != codes.shape[:-1] + (fmt.scale_words,):
        raise ValueError(
            f"dequantize_kv: {fmt.name} codes of shape {list(codes.shape)} need scales of shape "
            f"{list(codes.shape[:-1]) + [fmt.scale_words]}, got {list(scales.shape)}"
        )
    dim = cache_or_codes.shape[-1] * fmt.elems_per_storage
    return dequantize(cache_or_codes, layer_or_scales, fmt.name, dim, dtype or torch.float32)
