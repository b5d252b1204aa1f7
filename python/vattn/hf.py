"""transformers integration: a `Cache` backed by `vattn.KVCache`, and the attention function that reads it.

    cache = vattn.hf.VAttnCache.for_model(model, max_batch=4, max_seq_len=4096)
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=128)
    cache.release()          # or let it go out of scope

(transformers >= 5.2x names generate's argument `cache=`; `past_key_values=` still works there, with a
deprecation warning. Tested with transformers 5.24; needs the per-layer Cache API of 4.56+.)

How it plugs in (supported extension points only, no model code is patched):
- `AttentionInterface.register("vattn", ...)` adds an attention function and
  `AttentionMaskInterface.register("vattn", ...)` a mask function that hands it the 2D padding mask;
  `for_model` switches the model to it with `model.set_attn_implementation("vattn")`. The registry
  entries are new keys: nothing that other models use is replaced.
- transformers calls `cache.update(k, v, layer)` right before the attention function of the same
  layer. Which new tokens are real (not left padding) is only known from the attention mask, which
  `update` does not receive, so `update` only parks (cache, layer, k) in a thread-local slot and the
  attention function, which gets the mask, does the work: on the first layer of a forward it opens
  a `vattn` step with each row's real new tokens, then per layer `vattn.append_kv` + `vattn.attention`;
  after the last layer it commits the step. Padding tokens are never stored and never attended
  (FlashAttention's cache_leftpad idea); outputs at pad positions are zeros.
- Positions as transformers sees them ("columns", padding included) are tracked separately from the
  tokens each slot really holds, so `get_seq_length()` and continuing `generate` on the same cache
  behave exactly like `DynamicCache`.
- torch.compile (`is_compileable` is True): traced, the attention function records one opaque op per
  layer, `torch.ops.vattn.hf_attend`, whose implementation is the eager code above (mapping pages,
  MemoryError, commit after the last layer included), so a compiled forward (fullgraph=True) behaves
  exactly like an eager one. The op names the cache by a host int64 handle tensor (a graph input: a
  new cache of the same shape reuses the graph) and is declared to mutate it, which keeps every call
  and their order; tagged cudagraph_unsafe, so inductor keeps it out of CUDA graphs. With the default
  dynamic=None the second compiled step recompiles once (mask width and column count turn symbolic),
  later steps never; dynamic=True compiles once. dynamic=False does not work: the mask grows and
  transformers' mask code reads the column count as a Python int (get_mask_sizes / get_query_offset),
  so every step recompiles until dynamo's recompile limit (as with DynamicCache).
  generate() compiles the decode forward itself for a compileable cache on CUDA (transformers'
  default CompileConfig; `disable_compile=True` turns that off), on CPU only with a compile_config
  whose `_compile_all_devices` is set.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import threading
import weakref
from typing import Any, Optional

import numpy as np
import torch

try:
    from transformers import AttentionInterface
    from transformers.cache_utils import Cache, CacheLayerMixin
    from transformers.masking_utils import AttentionMaskInterface
except ImportError as exc:  # vattn itself never needs transformers; only this module does
    raise ImportError("vattn.hf needs transformers (pip install 'vattn[hf]', or pip install transformers)") from exc

import vattn
from vattn import _fast, formats
from vattn.cache import IndexOutOfRange

__all__ = ["VAttnCache", "ATTN_IMPLEMENTATION", "register", "enable", "disable"]

ATTN_IMPLEMENTATION = "vattn"

# Set by VAttnCache.update, taken by the attention function of the same layer (same thread).
_pending = threading.local()


# --------------------------------------------------------------------------------------------
# registration and switching


def register() -> None:
    """Registers the "vattn" attention and mask functions with transformers (idempotent).

    Only new keys are added to the global registries; no existing implementation is replaced.
    """
    AttentionInterface.register(ATTN_IMPLEMENTATION, _attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _padding_mask)


def enable(model) -> None:
    """Switches `model` (and its sub-models) to vattn's attention; remembers the previous choice."""
    register()
    current = model.config._attn_implementation
    if current == ATTN_IMPLEMENTATION:
        return
    if not model._can_set_attn_implementation():
        raise TypeError(
            f"vattn: {type(model).__name__} cannot switch its attention implementation (it does not use "
            "transformers' AttentionInterface), so VAttnCache cannot drive it"
        )
    model._vattn_previous_attn_implementation = current
    model.set_attn_implementation(ATTN_IMPLEMENTATION)


def disable(model) -> None:
    """Restores the attention implementation `model` had before `enable` (sdpa if unknown)."""
    if model.config._attn_implementation != ATTN_IMPLEMENTATION:
        return
    previous = getattr(model, "_vattn_previous_attn_implementation", None) or "sdpa"
    model.set_attn_implementation(previous)


def _padding_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset=0,
    kv_offset=0,
    mask_function=None,
    attention_mask: Optional[torch.Tensor] = None,
    **kwargs,
):
    """Mask function for "vattn": the attention function needs only the 2D padding mask.

    Causality (and sliding windows) are applied by the kernels from the lengths, so the dense 4D mask
    that sdpa/eager build is never materialized. `attention_mask` is already bool here.
    """
    return attention_mask


# --------------------------------------------------------------------------------------------
# the attention function


def _attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask,
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    **kwargs,
):
    """AttentionInterface function. query [B, Hq, Q, D], key/value [B, Hkv, Q|K, D].

    Returns (out [B, Q, Hq, D], None) like transformers' sdpa/flash functions.
    """
    entry = getattr(_pending, "entry", None)
    _pending.entry = None
    if entry is None:
        # Not fed by a VAttnCache (no cache, or another Cache class): plain masked attention.
        return _dense_attention(module, query, key, value, attention_mask, scaling, kwargs)
    cache_ref, layer, parked_key = entry
    cache = cache_ref()
    if parked_key is not key or cache is None:
        raise RuntimeError(
            "vattn: the keys reaching the attention function are not the ones VAttnCache.update returned; "
            "this model transforms K/V between the cache update and attention, which VAttnCache does not support"
        )
    if dropout and module.training:
        raise RuntimeError("vattn: VAttnCache is for inference; call model.eval() (attention dropout is active)")
    return cache._attend(module, layer, query, key, value, attention_mask, scaling, kwargs)


def _sliding_window(module, kwargs) -> int:
    """window_left for vattn.attention: transformers' window W lets a query see W keys (itself included)."""
    window = kwargs.get("sliding_window", None)
    if window is None:
        window = getattr(module, "sliding_window", None)
    return int(window) - 1 if window else -1


def _dense_attention(module, query, key, value, attention_mask, scaling, kwargs):
    """Reference path used when the model runs with attn_implementation="vattn" but without a VAttnCache
    (e.g. `use_cache=False`, or a DynamicCache): causal + padding mask, computed densely with torch SDPA.
    """
    batch, hq, q_len, dim = query.shape
    hkv, kv_len = key.shape[1], key.shape[2]
    scale = scaling if scaling is not None else dim**-0.5
    qpos = torch.arange(q_len, device=query.device)[:, None] + (kv_len - q_len)
    kpos = torch.arange(kv_len, device=query.device)[None, :]
    allowed = kpos <= qpos
    window_left = _sliding_window(module, kwargs)
    if window_left >= 0:
        allowed = allowed & (kpos >= qpos - window_left)
    allowed = allowed[None, None].expand(batch, 1, q_len, kv_len)
    if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2:
        pad = attention_mask.to(device=query.device, dtype=torch.bool)[:, -kv_len:]
        if pad.shape[1] < kv_len:  # a mask covering only the newest tokens: the rest are real
            pad = torch.cat([pad.new_ones(batch, kv_len - pad.shape[1]), pad], dim=1)
        allowed = allowed & pad[:, None, None, :]
    elif attention_mask is not None:
        raise TypeError("vattn: expected a 2D padding mask (or None) for attn_implementation='vattn'")
    softcap = kwargs.get("softcap", None)
    if hq != hkv:
        key = key.repeat_interleave(hq // hkv, dim=1)
        value = value.repeat_interleave(hq // hkv, dim=1)
    if softcap:
        logits = torch.matmul(query.float(), key.float().transpose(2, 3)) * scale
        logits = softcap * torch.tanh(logits / softcap)
        logits = logits.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
        out = torch.matmul(probs, value.float()).to(query.dtype)
    else:
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=allowed, scale=scale)
    # A query that sees no key (a padding position) gets zeros, as in the vattn kernels.
    out = torch.where(allowed.any(-1, keepdim=True), out, out.new_zeros(()))
    return out.transpose(1, 2).contiguous(), None


# --------------------------------------------------------------------------------------------
# torch.compile: the per-layer work of a VAttnCache as one opaque op


_op_ids = itertools.count(1)
_op_cores: "weakref.WeakValueDictionary[int, _Core]" = weakref.WeakValueDictionary()  # op_handle -> _Core

# Not capturable in a CUDA graph (it maps pages and reads the mask on the host): with the tag (torch
# >= 2.8) inductor keeps it out of its CUDA graphs (graph partitions around it, or no CUDA graph).
_HF_ATTEND_TAGS = tuple(t for t in (getattr(torch.Tag, "cudagraph_unsafe", None),) if t is not None)
_HF_ATTEND_OPTIONS = (
    {"tags": _HF_ATTEND_TAGS} if "tags" in inspect.signature(torch.library.custom_op).parameters else {}
)


# `handle` is declared mutated (the op never writes it): it stands for the cache state the op reads and
# writes, which the schema cannot name. So the compiler keeps every call (a mutating op is never dead
# code) and keeps the calls on one cache in program order (each reads the handle "written" by the one
# before), while calls on different caches stay independent.
@torch.library.custom_op("vattn::hf_attend", mutates_args=("handle",), **_HF_ATTEND_OPTIONS)
def _op_attend(
    handle: torch.Tensor,
    layer: int,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: Optional[torch.Tensor],
    scaling: Optional[float],
    window_left: int,
    softcap: float,
) -> torch.Tensor:
    """One layer of a forward on the VAttnCache family named by `handle` (_Core.op_handle): exactly
    VAttnCache._attend_eager (opens the vattn step at the first layer, maps pages, stores K/V, attends,
    commits after the last layer). This is what a torch.compile'd forward records per layer: the
    cache's host bookkeeping stays out of the graph, the graph sees a function of q/k/v and the mask.
    Internal to vattn.hf (its state is the cache, which the schema cannot name)."""
    core = _op_cores.get(int(handle))
    if core is None or core.closed:
        raise RuntimeError("vattn: the VAttnCache this compiled forward was called with is gone")
    return core.handle()._attend_eager(layer, query, key, value, mask, scaling, window_left, softcap)


@_op_attend.register_fake
def _(handle, layer, query, key, value, mask, scaling, window_left, softcap):
    batch, heads, q_len, dim = query.shape
    return query.new_empty((batch, q_len, heads, dim))


# --------------------------------------------------------------------------------------------
# the Cache


class _Forward:
    """Bookkeeping of one model forward: the vattn step and how batch rows map to packed rows."""

    __slots__ = ("batch", "q_len", "real", "new_tokens", "step", "flat_idx", "all_real", "done", "holes")

    def __init__(self, batch, q_len, real, new_tokens, step, flat_idx, all_real):
        self.batch, self.q_len = batch, q_len
        self.real = real  # host bool [batch, q_len]: which new positions are real tokens
        self.new_tokens = new_tokens  # host list: real new tokens per batch row
        self.step = step  # vattn.Step, or None when no row has a real new token
        self.flat_idx = flat_idx  # device int64 [total_new]: packed row -> b * q_len + j
        self.all_real = all_real
        self.done = set()  # layers already processed
        self.holes = None  # whether a row has a pad after a real token (VAttnCache._has_holes)


class _Storage:
    """The vattn.KVCache behind one or more families of VAttnCache handles: a deep copy that forks
    the original's slots (copy.deepcopy with free slots) is a family of its own on the same storage.
    Closed with the last family (or when it is collected)."""

    __slots__ = ("kv", "families")

    def __init__(self, kv):
        self.kv = kv
        self.families = 0

    def detach(self) -> None:
        self.families -= 1
        if self.families <= 0:
            self.close()

    def close(self) -> None:
        kv, self.kv = self.kv, None
        if kv is not None:
            kv.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # never raise from a finalizer
            pass


class _Core:
    """What a VAttnCache and its shallow copies (`copy.copy`) share: the storage, the batch rows'
    slots, and the handles (VAttnCache objects) alive on it. When the last handle goes (the core's
    finalizer) the family's slots are freed and the storage closes if no other family uses it; a
    shallow copy that is dropped while another handle lives closes nothing."""

    __slots__ = ("storage", "handles", "slots", "closed", "op_handle", "__weakref__")

    def __init__(self, storage: _Storage):
        self.storage = storage
        storage.families += 1
        self.handles = weakref.WeakSet()
        self.slots: Optional[list] = None  # vattn slot of each batch row (VAttnCache._slots)
        self.closed = False
        # What a compiled forward passes to torch.ops.vattn.hf_attend to name this family (see _op_attend):
        # a host int64 scalar, so a graph input rather than a constant the graph would be specialized on.
        op_id = next(_op_ids)
        _op_cores[op_id] = self
        with torch.inference_mode(False):  # a normal tensor even if made under inference_mode
            self.op_handle = torch.tensor(op_id, dtype=torch.int64, device="cpu")

    @property
    def kv(self):
        return self.storage.kv

    def handle(self) -> "VAttnCache":
        for h in self.handles:
            return h
        raise ReferenceError("vattn: the VAttnCache of this layer is gone")

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        kv, slots, self.slots = self.storage.kv, self.slots, None
        if kv is not None and not kv.closed and slots:
            for s in slots:  # another family may go on using the storage
                try:
                    kv.free(s)
                except Exception:
                    pass
        self.storage.detach()

    def __del__(self):
        try:
            self.close()
        except Exception:  # never raise from a finalizer
            pass


class VAttnLayer(CacheLayerMixin):
    """One model layer's view of a VAttnCache (transformers' Cache is a list of layers)."""

    is_compileable = True
    is_croppable = True
    is_sliding = False
    supports_early_init = False

    def __init__(self, core: _Core, layer_idx: int):
        super().__init__()
        self._core = weakref.ref(core)  # weak: a layer someone keeps does not keep the K/V mapped
        self.layer_idx = layer_idx
        self.is_initialized = True

    @property
    def _parent(self) -> "VAttnCache":
        core = self._core()
        if core is None:
            raise ReferenceError("vattn: the VAttnCache of this layer is gone")
        return core.handle()

    # keys / values: what transformers code reads from a layer, [batch, kv_heads, positions, head_dim]
    # in the cache dtype (VAttnCache.layer_kv says when it is a zero-copy view and when a copy).
    # Read-only: the storage is the vattn.KVCache; transformers' base __init__ assigns None, ignored.
    @property
    def keys(self) -> Optional[torch.Tensor]:
        return self._parent.layer_kv(self.layer_idx)[0]

    @keys.setter
    def keys(self, value) -> None:
        if value is not None:
            raise AttributeError("vattn: VAttnLayer.keys is a view of the vattn.KVCache (read-only)")

    @property
    def values(self) -> Optional[torch.Tensor]:
        return self._parent.layer_kv(self.layer_idx)[1]

    @values.setter
    def values(self, value) -> None:
        if value is not None:
            raise AttributeError("vattn: VAttnLayer.values is a view of the vattn.KVCache (read-only)")

    def lazy_initialization(self, key_states, value_states) -> None:  # storage lives in vattn.KVCache
        return None

    def update(self, key_states, value_states, *args, **kwargs):
        return self._parent.update(key_states, value_states, self.layer_idx)

    def get_mask_sizes(self, query_length) -> tuple[int, int]:
        return self._parent.get_mask_sizes(query_length)

    def get_seq_length(self) -> int:
        return self._parent.get_seq_length()

    def get_max_length(self) -> int:
        return self._parent.max_seq_len

    def reset(self) -> None:  # the parent resets all layers at once
        return None

    def crop(self, tokens_to_remove: int) -> None:  # the parent crops all layers at once
        return None

    def reorder_cache(self, beam_idx) -> None:
        return None

    def batch_repeat_interleave(self, repeats: int) -> None:
        return None

    def batch_select_indices(self, indices) -> None:
        return None

    def offload(self):
        return None

    def prefetch(self):
        return None


class VAttnCache(Cache):
    """A transformers `Cache` whose K/V live in a `vattn.KVCache` (contiguous virtual memory, pages
    mapped as tokens arrive). Pass it as `past_key_values=` to `model.generate` or a forward loop.

    Use `VAttnCache.for_model(model, ...)`: it sizes the cache from the model and switches the model's
    attention to vattn's kernels. One batch row of transformers is one vattn slot.

    Pass the cache itself (`past_key_values=cache`, or `cache=` in transformers >= 5.2x):
    `generate(..., cache_implementation="vattn")` is not possible, since transformers (checked in 5.24)
    has no registry for cache implementations; GenerationConfig.validate accepts only its fixed
    ALL_CACHE_IMPLEMENTATIONS (+ "paged") and generate builds those caches itself.

    torch.compile: a compiled forward (or generate's auto-compile) runs the same cache code per layer
    through one opaque op (see the module docstring); is_compileable is True.

    Copies: `copy.copy(cache)` is another handle on the same cache (the storage goes with the last
    handle); `copy.deepcopy(cache)` an independent cache with the same tokens: its rows are forks of
    the original's (full pages shared, see vattn.KVCache.fork) when the vattn.KVCache has free slots
    for them (max_batch >= twice the batch), else a full copy into a new vattn.KVCache. Beam search
    (`reorder_cache`), `batch_select_indices` with repeated rows and `batch_repeat_interleave` fork
    rows the same way. `layers[i].keys` / `.values` read the stored K/V (see `layer_kv`).
    """

    def __init__(
        self,
        config,
        *,
        max_batch: int,
        max_seq_len: int,
        dtype: torch.dtype,
        device: Any = "cpu",
        layout: str = "token_major",
        max_physical_bytes: Optional[int] = None,
        policy=None,
        **cache_options,
    ):
        from vattn.policies import Policy

        if policy is not None and not isinstance(policy, Policy):
            raise TypeError(f"policy must be a vattn.policies.Policy, got {type(policy).__name__}")
        text_config = config.get_text_config(decoder=True)
        layer_types = getattr(text_config, "layer_types", None) or []
        unsupported = sorted({t for t in layer_types if t not in ("full_attention", "sliding_attention")})
        if unsupported:
            raise NotImplementedError(f"vattn: VAttnCache supports attention layers only, not {unsupported}")
        self.config = text_config
        self.num_layers = int(text_config.num_hidden_layers)
        self.num_heads = int(text_config.num_attention_heads)
        self.num_kv_heads = int(getattr(text_config, "num_key_value_heads", None) or self.num_heads)
        self.head_dim = int(getattr(text_config, "head_dim", None) or text_config.hidden_size // self.num_heads)
        self.max_batch = int(max_batch)
        self.max_seq_len = int(max_seq_len)
        self.dtype = dtype
        self.device = torch.device(device)
        self.layout = layout
        self.max_physical_bytes = max_physical_bytes
        self.kv = vattn.KVCache(
            num_layers=self.num_layers,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            max_batch=self.max_batch,
            max_seq_len=self.max_seq_len,
            dtype=dtype,
            layout=layout,
            device=str(self.device),
            max_physical_bytes=max_physical_bytes,
            **cache_options,
        )
        self._cache_options = dict(cache_options)  # for copy.deepcopy: a new KVCache of the same options
        self._core = _Core(_Storage(self.kv))  # the KVCache is closed when the last handle on it goes
        self._core.handles.add(self)
        self.policy = policy
        if policy is not None and policy.needs_scores:
            self.kv.enable_scores()
        if policy is not None and hasattr(policy, "prepare"):
            policy.prepare(self.kv)
        # After the first prompt, rows holding byte-identical tokens (beam search and
        # num_return_sequences repeat the prompt) become forks of one row: the prompt is held once.
        self.share_duplicates = True
        self._decode_steps = 0  # decode forwards since the last prompt (policy.every)
        self._compacted = False  # a policy evicted tokens: stored tokens no longer follow columns
        self.compressions: list = []  # per prompt compression: {stat: (before, after)}
        super().__init__(layers=[VAttnLayer(self._core, i) for i in range(self.num_layers)])
        self._lengths: list[int] = []  # real tokens stored per batch row (host mirror)
        # host bool [batch, max_seq_len]: which columns are real tokens (numpy: host bookkeeping only,
        # free of torch's inference-mode rules)
        self._real: Optional[np.ndarray] = None
        self._columns = 0  # positions seen by transformers, padding included
        self._forward: Optional[_Forward] = None

    @property
    def _slots(self) -> Optional[list]:
        """The vattn slot of each batch row (kept by the core, so the family's finalizer frees them)."""
        return self._core.slots

    @_slots.setter
    def _slots(self, value) -> None:
        self._core.slots = value

    # ---- construction

    @classmethod
    def for_model(
        cls,
        model,
        max_batch: int = 8,
        max_seq_len: Optional[int] = None,
        *,
        layout: str = "token_major",
        max_physical_bytes: Optional[int] = None,
        dtype: Optional[torch.dtype] = None,
        device: Any = None,
        policy=None,
        **cache_options,
    ) -> "VAttnCache":
        """A cache for `model` (geometry from model.config, dtype and device from the model), and
        the model switched to vattn attention (`vattn.hf.disable(model)` switches it back).

        max_seq_len: positions per row including left padding (default: config.max_position_embeddings);
        it only reserves virtual memory. max_physical_bytes caps the physical memory mapped.
        policy: a vattn.policies eviction policy (e.g. SnapKV(keep=0.25)), applied to each row at the
        end of its prompt and, with every=N, during decode; get_seq_length() stays the logical length,
        so generate continues at the right positions after eviction.
        Other keyword options (kv_format, page_bytes, prealloc_bytes, ...) go to `vattn.KVCache`.
        """
        config = model.config.get_text_config(decoder=True)
        if max_seq_len is None:
            max_seq_len = getattr(config, "max_position_embeddings", None)
            if not max_seq_len:
                raise ValueError("vattn: pass max_seq_len= (the model config has no max_position_embeddings)")
        if dtype is None:
            dtype = model.dtype
        if device is None:
            device = model.device
        # Key smoothing on for quantized keys (the cache's own attention undoes it), except where a
        # soft-cap sees the logits, which smoothing shifts.
        if cache_options.get("smooth_keys", "auto") == "auto":
            cache_options["smooth_keys"] = False if getattr(config, "attn_logit_softcapping", None) else "auto"
        cache = cls(
            model.config,
            max_batch=max_batch,
            max_seq_len=max_seq_len,
            dtype=dtype,
            device=device,
            layout=layout,
            max_physical_bytes=max_physical_bytes,
            policy=policy,
            **cache_options,
        )
        enable(model)
        cache._model_config = model.config
        return cache

    # ---- what transformers calls

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Parks the new K/V for the attention function of this layer (see the module docstring).

        Only vattn's attention function stores them: called outside it (custom attention code, direct
        use), update raises RuntimeError, at the latest on the next update of this cache, instead of
        silently dropping the tokens. The K/V returned are the new ones only, not the layer's history."""
        if self.kv is None:
            raise RuntimeError("vattn: this VAttnCache was released")
        impl = getattr(getattr(self, "_model_config", self.config), "_attn_implementation", None)
        if impl != ATTN_IMPLEMENTATION:
            raise RuntimeError(
                f"vattn: the model uses attn_implementation={impl!r}; VAttnCache needs 'vattn' "
                "(VAttnCache.for_model switches it; or call vattn.hf.enable(model))"
            )
        b, h, _, d = key_states.shape
        if h != self.num_kv_heads or d != self.head_dim:
            raise ValueError(
                f"vattn: K/V with {h} heads of dim {d}, the cache was made for "
                f"{self.num_kv_heads} heads of dim {self.head_dim}"
            )
        if key_states.dtype != self.dtype:
            raise TypeError(
                f"vattn: K/V dtype {key_states.dtype}, the cache was made for {self.dtype} "
                "(create the cache after moving the model, or pass dtype=)"
            )
        entry = getattr(_pending, "entry", None)
        if entry is not None:
            parked = entry[0]()
            if parked is not None and getattr(parked, "__dict__", None) is self.__dict__:
                # The K/V parked by the previous update were never stored: refuse rather than lose them.
                _pending.entry = None
                self._abort_forward()
                raise RuntimeError(
                    f"vattn: VAttnCache.update(layer {layer_idx}) while the K/V of the previous update (layer "
                    f"{entry[1]}) were not consumed by vattn's attention function, so they were never stored. "
                    "VAttnCache stores K/V only through attn_implementation='vattn' (VAttnCache.for_model or "
                    "vattn.hf.enable(model)), whose attention function must run right after each update; "
                    "custom attention code calling cache.update directly needs another Cache (DynamicCache)"
                )
        _pending.entry = (weakref.ref(self), layer_idx, key_states)
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._columns

    def get_mask_sizes(self, query_length, layer_idx: int = 0) -> tuple[int, int]:
        if isinstance(query_length, torch.Tensor):  # transformers 4.5x passed cache_position here
            query_length = query_length.shape[-1]
        return self._columns + int(query_length), 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self._columns

    def get_max_length(self, layer_idx: Optional[int] = None) -> int:
        return self.max_seq_len

    @property
    def batch_size(self) -> int:
        return len(self._slots) if self._slots is not None else -1

    def reset(self) -> None:
        """Forgets all tokens (the slots are freed; their pages go back to vattn's pool)."""
        self._abort_forward()
        if self._slots is not None and self.kv is not None:
            for slot in self._slots:
                self.kv.free(slot)
        self._slots, self._lengths, self._real, self._columns = None, [], None, 0
        self._decode_steps, self._compacted = 0, False

    def crop(self, tokens_to_remove: int) -> None:
        """Drops the last -tokens_to_remove positions (transformers' convention: a negative count;
        0 is a no-op that generate calls every step)."""
        tokens_to_remove = int(tokens_to_remove)
        if tokens_to_remove > 0:
            raise ValueError(f"crop({tokens_to_remove}): pass a negative number of positions to remove")
        if tokens_to_remove == 0 or self._slots is None:
            return
        if self._compacted:
            raise NotImplementedError("vattn: crop after an eviction policy dropped tokens is not supported")
        self._abort_forward()
        new_columns = max(self._columns + tokens_to_remove, 0)
        for b, slot in enumerate(self._slots):
            keep = int(self._real[b, :new_columns].sum())
            if keep != self._lengths[b]:
                self.kv.shrink(slot, keep)
                self._lengths[b] = keep
        self._real[:, new_columns : self._columns] = False
        self._columns = new_columns

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keeps the given batch rows, in that order; a row given twice is forked (its full pages
        shared, see vattn.KVCache.fork), rows not given are freed."""
        if self._slots is None:
            return
        self._select_rows([int(i) for i in torch.as_tensor(indices).flatten().tolist()])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row i becomes a copy of row beam_idx[i]. A surviving beam keeps its slot;
        a beam chosen twice is forked (shared pages, one partial page copied); dropped beams are
        freed."""
        if self._slots is None:
            return
        self._select_rows([int(i) for i in torch.as_tensor(beam_idx).flatten().tolist()])

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Each row repeated `repeats` times in place (contrastive search, num_return_sequences after a
        shared prefill): the repeats are forks of the row."""
        repeats = int(repeats)
        if repeats < 1:
            raise ValueError(f"batch_repeat_interleave: repeats must be >= 1, got {repeats}")
        if self._slots is None or repeats == 1:
            return
        self._select_rows([b for b in range(len(self._slots)) for _ in range(repeats)])

    def _select_rows(self, order: list) -> None:
        """Row i of the new batch is old row order[i]. The first use of an old row keeps its slot,
        later uses fork it, unused rows are freed. All or nothing when the cache has free slots for
        the forks; otherwise the dropped rows are freed first to make room, and a fork that still
        fails (MemoryError) resets the cache."""
        self._abort_forward()
        kv, slots = self.kv, self._slots
        rows = len(slots)
        bad = [j for j in order if not 0 <= j < rows]
        if bad:
            raise IndexOutOfRange(f"vattn: batch row {bad[0]} out of range [0, {rows})")
        used = set()
        plan = []  # (old row, fork?)
        for j in order:
            plan.append((j, j in used))
            used.add(j)
        forks = sum(f for _, f in plan)
        unused = [slots[b] for b in range(rows) if b not in used]
        free_now = kv.max_batch - len(kv.live_slots())
        if forks > free_now + len(unused):
            raise RuntimeError(
                f"vattn: the new batch of {len(order)} rows needs {len(order)} slots; the cache has "
                f"max_batch={kv.max_batch} (pass a larger max_batch to VAttnCache.for_model)"
            )
        early = forks > free_now
        if early:  # the rows that go away make room
            for s in unused:
                kv.free(s)
            unused = []
        try:
            made = iter(self._fork_slots([slots[j] for j, fork in plan if fork]))
        except BaseException:
            if early:
                self.reset()
                raise MemoryError("vattn: a beam fork failed after dropped beams were freed; the cache was reset")
            raise
        for s in unused:
            kv.free(s)
        self._slots = [next(made) if fork else slots[j] for j, fork in plan]
        self._lengths = [self._lengths[j] for j in order]
        self._real = self._real[order].copy()

    def layer_kv(self, layer_idx: int) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """The stored K/V of one layer as transformers code expects them (`layers[i].keys` /
        `.values`): [batch, kv_heads, get_seq_length(), head_dim] in the cache dtype, each token at its
        column, zeros at left-padding columns (vattn stores no padding; a mask hides those columns
        anyway). (None, None) before the first forward.

        Zero-copy (a strided view of `cache.kv.kv(layer)`, writes go to the cache) when the format is
        plain without key smoothing, no row has padding, and the batch's slots are consecutive and in
        batch order (a batch without padding in a fresh cache); otherwise a gathered copy (always for
        quantized or smoothed keys: a dequantized copy). After an eviction policy dropped tokens the
        columns no longer map to tokens: each row's stored tokens, oldest first, [batch, kv_heads,
        longest head, head_dim], zeros past each head's length (a copy)."""
        if self.kv is None:
            raise RuntimeError("vattn: this VAttnCache was released")
        layer_idx = int(layer_idx)
        if not 0 <= layer_idx < self.num_layers:
            raise IndexOutOfRange(f"layer {layer_idx} out of range [0, {self.num_layers})")
        if self._slots is None:
            return None, None
        kv, slots, cols = self.kv, self._slots, self._columns
        plain = not (kv.k_format.quantized or kv.v_format.quantized) and kv._key_means is None
        k_all, v_all = kv.kv(layer_idx) if plain else kv.kv(layer_idx, dequantize=True)
        batch, heads, dim = len(slots), self.num_kv_heads, self.head_dim
        first = slots[0]
        if (
            plain
            and not self._compacted
            and slots == list(range(first, first + batch))
            and bool(self._real[:, :cols].all())
        ):
            return tuple(x[first : first + batch, :cols].permute(0, 2, 1, 3) for x in (k_all, v_all))
        if self._compacted:
            lengths = [kv.head_lengths(s)[layer_idx] for s in slots]  # [heads] per row
            width = max(int(n.max()) for n in lengths)
            out = []
            for x in (k_all, v_all):
                y = x.new_zeros(batch, width, heads, dim)
                for b, (s, n) in enumerate(zip(slots, lengths)):
                    m = int(n.max())
                    y[b, :m] = x[s, :m]
                    keep = torch.arange(width)[:, None] < n[None, :].long()  # [width, heads]
                    y[b] *= keep[..., None].to(device=y.device, dtype=y.dtype)
                out.append(y.permute(0, 2, 1, 3))
            return out[0], out[1]
        out = []
        for x in (k_all, v_all):
            y = x.new_zeros(batch, cols, heads, dim)
            for b, s in enumerate(slots):
                n = self._lengths[b]
                if n:
                    where = torch.from_numpy(np.flatnonzero(self._real[b, :cols])).to(y.device)
                    y[b].index_copy_(0, where, x[s, :n])
            out.append(y.permute(0, 2, 1, 3))
        return out[0], out[1]

    # ---- memory

    def stats(self) -> dict:
        """vattn.KVCache.stats() plus what a static max-length cache of the same batch would take."""
        out = self.kv.stats()
        out["columns"] = self._columns
        out["tokens"] = sum(self._lengths)
        return out

    def static_bytes(self, batch: int, seq_len: int) -> int:
        """Bytes of a preallocated [batch, seq_len] K/V cache for every layer (transformers' StaticCache)."""
        return batch * seq_len * formats.token_bytes(self.num_layers, self.num_kv_heads, self.head_dim, self.dtype)

    def release(self) -> None:
        """Frees the slots and releases the physical memory now (the cache is unusable afterwards).
        Pages a deep copy on the same storage still maps (forked rows) stay until that copy goes."""
        kv = getattr(self, "kv", None)
        if kv is None:
            return
        try:
            self.reset()
        finally:
            # The last reference to the vattn.KVCache: its manager unmaps and destroys every page.
            self.kv = None
            del kv
            self._core.close()

    close = release

    # No __del__: the vattn.KVCache is closed by _Core's finalizer when the last handle on it goes
    # (a shallow copy that is dropped must not close the storage the original still uses).

    def __copy__(self) -> "VAttnCache":
        """`copy.copy(cache)`: another handle on the same cache, not a new one (like a shallow copy of a
        DynamicCache, which shares its layers): both see every token stored through either, and the
        storage is released when the last handle is dropped (or at `release()` of any). For an
        independent cache use `copy.deepcopy`."""
        new = type(self).__new__(type(self))
        new.__dict__ = self.__dict__  # one state: a copy's length / position can never go stale
        self._core.handles.add(new)
        return new

    def __deepcopy__(self, memo) -> "VAttnCache":
        """`copy.deepcopy(cache)`: an independent cache holding the same tokens (transformers'
        prefix-reuse recipe: prefill a prompt once, deepcopy, continue from each copy).

        When the vattn.KVCache has a free slot for every row, the copy lives on the same storage and
        each row is a fork (vattn.KVCache.fork: full pages shared, the partly filled one copied; a
        row's per-head lengths, positions, key statistics, scores and Quest metadata go with it),
        so it costs about one page per row; the storage closes with the last copy. Otherwise this is
        a full copy: a new vattn.KVCache of the same geometry and options, into which every row's
        stored K/V (codes and scale words, bit for bit), key-smoothing statistics, scores and Quest
        metadata are copied, refused (NotImplementedError) after an eviction policy dropped tokens or
        with a policy holding tokens. RuntimeError during a forward."""
        if self.kv is None:
            raise RuntimeError("vattn: this VAttnCache was released")
        if self._forward is not None:
            raise RuntimeError("vattn: deepcopy of a VAttnCache in the middle of a forward")
        src = self.kv
        if self._slots is not None and len(self._slots) <= src.max_batch - len(src.live_slots()):
            return self._fork_copy(memo)
        holds = self._slots is not None and any(self._lengths)
        if self._compacted or any(s in src._deficit for s in self._slots or ()):
            raise NotImplementedError(
                "vattn: deepcopy of a VAttnCache after an eviction policy dropped tokens (per-head lengths) is not "
                "supported; copy the cache before the policy runs, or re-run the prompt"
            )
        if self.policy is not None and holds:
            raise NotImplementedError(
                "vattn: deepcopy of a VAttnCache with an eviction policy that already holds tokens is not "
                "supported (the policy's per-request state cannot be copied); make a new cache"
            )
        new = type(self)(
            self.config,
            max_batch=self.max_batch,
            max_seq_len=self.max_seq_len,
            dtype=self.dtype,
            device=self.device,
            layout=self.layout,
            max_physical_bytes=self.max_physical_bytes,
            policy=copy.deepcopy(self.policy, memo),
            **self._cache_options,
        )
        memo[id(self)] = new
        if hasattr(self, "_model_config"):
            new._model_config = self._model_config  # the same model drives both (not a copy of its config)
        new.compressions = copy.deepcopy(self.compressions, memo)
        new._decode_steps = self._decode_steps
        if self._slots is None:
            return new
        try:
            self._copy_rows_into(new)
        except BaseException:
            new.release()
            raise
        return new

    def _fork_slots(self, slots: list) -> list:
        """A fork of each slot (vattn.KVCache.fork), all or nothing."""
        kv, made = self.kv, []
        try:
            for s in slots:
                made.append(kv.fork(s))
        except BaseException:
            for t in made:
                kv.free(t)
            raise
        return made

    def _fork_copy(self, memo) -> "VAttnCache":
        """deepcopy on the same vattn.KVCache: every row forked (full pages shared, not copied)."""
        made = self._fork_slots(self._slots)
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__dict__ = dict(self.__dict__)
        new._core = _Core(self._core.storage)  # a family of its own: its slots go with its last handle
        new._core.handles.add(new)
        new._slots = made
        new._lengths = list(self._lengths)
        new._real = self._real.copy()
        new._forward = None
        new.policy = copy.deepcopy(self.policy, memo)
        new.compressions = copy.deepcopy(self.compressions, memo)
        new.layers = [VAttnLayer(new._core, i) for i in range(self.num_layers)]
        return new

    def _copy_rows_into(self, new: "VAttnCache") -> None:
        src, dst = self.kv, new.kv
        new._slots = [dst.alloc() for _ in self._slots]
        new._lengths = list(self._lengths)
        new._real = self._real.copy()
        new._columns = self._columns
        rows = [(s, d, n) for s, d, n in zip(self._slots, new._slots, self._lengths) if n > 0]
        if not rows:
            return
        step = dst.begin_step(slots=[d for _, d, _ in rows], new_tokens=[n for _, _, n in rows])
        try:
            for layer in range(self.num_layers):
                views = zip(src.kv(layer) + src.kv_scales(layer), dst.kv(layer) + dst.kv_scales(layer))
                for a, b in views:
                    if a is None:
                        continue
                    for s, d, n in rows:
                        m = src._group_end(n)  # int4_ch: the last group's parameters too
                        b[d, :m].copy_(a[s, :m])
        except BaseException:
            dst.abort_step(step)
            raise
        dst.end_step(step)
        for s, d, _ in rows:
            if src._key_means is not None:
                dst._key_means[d] = src._key_means[s]
                dst._key_scales[d] = src._key_scales[s]
                dst._mean_set[d] = src._mean_set[s]
            if src._scores is not None:
                dst.enable_scores()
                dst._scores[d] = src._scores[s]
        if src._quest_meta is not None:
            dst.enable_quest(src.quest_block)  # computes the copied rows' block metadata
        assert all(dst.position(d) == src.position(s) for s, d, _ in rows)

    def __repr__(self):
        return (
            f"VAttnCache(layers={self.num_layers}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
            f"max_batch={self.max_batch}, max_seq_len={self.max_seq_len}, layout={self.layout!r}, "
            f"seq_length={self._columns})"
        )

    # ---- the work, called by the attention function

    def _begin_forward(self, batch: int, q_len: int, mask2d, device) -> _Forward:
        if self._slots is None:
            if batch > self.max_batch:
                raise ValueError(
                    f"vattn: batch of {batch} rows, the cache has max_batch={self.max_batch}; "
                    "pass a larger max_batch to VAttnCache.for_model"
                )
            self._slots = [self.kv.alloc() for _ in range(batch)]
            self._lengths = [0] * batch
            self._real = np.zeros((batch, self.max_seq_len), dtype=bool)
            self._columns = 0
        elif batch != len(self._slots) and self._columns == 0:
            self.reset()  # nothing stored yet (e.g. a first step that failed): start over with this batch
            return self._begin_forward(batch, q_len, mask2d, device)
        elif batch != len(self._slots):
            raise ValueError(
                f"vattn: this cache holds a batch of {len(self._slots)} rows, the input has {batch}; "
                "call cache.reset() (or make a new cache) for a new batch"
            )
        end = self._columns + q_len
        if end > self.max_seq_len:
            raise ValueError(
                f"vattn: {end} positions (padding included) exceed max_seq_len={self.max_seq_len}; "
                "pass a larger max_seq_len to VAttnCache.for_model"
            )

        if mask2d is None:
            real = torch.ones(batch, q_len, dtype=torch.bool)
        else:
            if not isinstance(mask2d, torch.Tensor) or mask2d.ndim != 2 or mask2d.shape[0] != batch:
                raise ValueError("vattn: expected a 2D attention mask [batch, positions]")
            if mask2d.shape[1] < q_len:
                raise ValueError(f"vattn: attention mask has {mask2d.shape[1]} positions for {q_len} new tokens")
            if q_len > 1 and mask2d.shape[1] == end and self._columns > 0:
                # A prefill on top of cached tokens: the mask must describe what the cache holds.
                past = mask2d[:, : self._columns].to("cpu", torch.bool).numpy()
                if not np.array_equal(past, self._real[:, : self._columns]):
                    raise ValueError(
                        "vattn: the attention mask of earlier positions disagrees with the tokens "
                        "in the cache (padding can only be given when the positions first arrive)"
                    )
            real = mask2d[:, -q_len:].to("cpu", torch.bool)
        new_tokens = real.sum(dim=1).tolist()
        all_real = all(n == q_len for n in new_tokens)
        rows = [b for b in range(batch) if new_tokens[b] > 0]
        step = None
        if rows:
            try:
                step = self.kv.begin_step(
                    slots=[self._slots[b] for b in rows], new_tokens=[new_tokens[b] for b in rows]
                )
            except MemoryError as exc:
                limit = self.max_physical_bytes
                raise MemoryError(
                    f"vattn: the KV-cache needs more physical memory than max_physical_bytes="
                    f"{limit if limit is not None else 'None'} allows ({exc}). Pass a larger max_physical_bytes "
                    "(or None) to VAttnCache.for_model, or generate fewer tokens / use a smaller batch"
                ) from exc
        flat_idx = None
        if not all_real:
            flat_idx = torch.nonzero(real.reshape(-1)).squeeze(1).to(device, non_blocking=True)
        fw = _Forward(batch, q_len, real, new_tokens, step, flat_idx, all_real)
        self._forward = fw
        return fw

    def _has_holes(self, fw: _Forward) -> bool:
        """Whether some row has a padding column after a real token (right padding, packed
        sequences), counting the cached columns and this forward's; computed once per forward."""
        if fw.holes is None:
            full = np.concatenate([self._real[:, : self._columns], fw.real.numpy()], axis=1)
            seen = np.logical_or.accumulate(full, axis=1)
            fw.holes = bool((seen & ~full).any())
        return fw.holes

    def _abort_forward(self) -> None:
        """Drops a forward that raised half-way: its step is aborted, so the slots keep their
        previous lengths and nothing of it stays."""
        fw, self._forward = self._forward, None
        if fw is None or fw.step is None or self.kv is None:
            return
        self.kv.abort_step(fw.step)

    def _end_forward(self, fw: _Forward) -> None:
        first = self._columns == 0
        if fw.step is not None:
            self.kv.end_step(fw.step)
        self._real[:, self._columns : self._columns + fw.q_len] = fw.real.numpy()
        for b, n in enumerate(fw.new_tokens):
            self._lengths[b] += n
        self._columns += fw.q_len
        self._forward = None
        if first and fw.q_len > 1 and fw.batch > 1 and self.policy is None and self.share_duplicates:
            self._share_duplicate_rows()
        if self.policy is not None and fw.step is not None:
            self._apply_policy(fw.step)

    def _share_duplicate_rows(self) -> None:
        """After the first prompt: rows that stored exactly the same tokens (generate() repeats each
        prompt num_beams or num_return_sequences times before the prefill) are turned into forks of
        the first such row, so the prompt's pages are held once. Bytes are compared (every layer,
        codes and scale words), so rows that merely look alike are never merged."""
        kv, slots, lengths, real = self.kv, self._slots, self._lengths, self._real
        cols = self._columns
        views = None
        leader = 0
        for b in range(1, len(slots)):
            n = lengths[b]
            if n == 0 or n != lengths[leader] or not np.array_equal(real[b, :cols], real[leader, :cols]):
                leader = b
                continue
            if views is None:
                views = [kv.kv(layer) + kv.kv_scales(layer) for layer in range(self.num_layers)]
            m = kv._group_end(n)  # int4 keys: the last group's parameters span the whole group
            a, d = slots[leader], slots[b]
            same = all(x is None or torch.equal(x[a, :m], x[d, :m]) for vs in views for x in vs)
            if same and kv._key_means is not None:
                same = torch.equal(kv._key_means[a], kv._key_means[d]) and torch.equal(
                    kv._key_scales[a], kv._key_scales[d]
                )
            if not same:
                leader = b
                continue
            kv.free(d)  # then a slot is free for the fork, and the duplicate's pages for its copy
            try:
                slots[b] = kv.fork(a)
            except BaseException:
                self.reset()
                raise

    def _apply_policy(self, step) -> None:
        """End of a prompt: every row of it is compressed; decode (policy.every): every N steps, the
        rows over budget."""
        policy = self.policy
        if step.is_decode:
            if policy.every is None:
                return
            self._decode_steps += 1
            if self._decode_steps % policy.every:
                return
            done = policy.apply(self.kv, step.slots, only_over_budget=True)
        else:
            self._decode_steps = 0
            before = self.kv.stats()
            done = policy.apply(self.kv, step.slots)
            if done:
                after = self.kv.stats()
                self.compressions.append(
                    {k: (before[k], after[k]) for k in ("mapped_bytes", "used_bytes", "resident_bytes", "pages_mapped")}
                )
        if done:
            self._compacted = True
            for b, slot in enumerate(self._slots):
                self._lengths[b] = self.kv.length(slot)

    def _pack(self, x: torch.Tensor, fw: _Forward) -> torch.Tensor:
        """[B, H, Q, D] -> [total_new, H, D], real tokens only, rows in slot order, oldest first."""
        b, h, q, d = x.shape
        # (one view op instead of two when decoding: each torch call costs tens of microseconds
        # when the model's weights have just streamed through the CPU caches, see _fast.py)
        x = x.squeeze(2) if q == 1 else x.transpose(1, 2).reshape(b * q, h, d)
        if fw.all_real:
            return x if x.stride(-1) == 1 else x.contiguous()
        return x.index_select(0, fw.flat_idx)

    def _attend(self, module, layer: int, query, key, value, mask2d, scaling, kwargs):
        window_left = _sliding_window(module, kwargs)
        softcap = float(kwargs.get("softcap") or 0.0)
        if vattn.ops._direct_ok(query, key, value):
            return self._attend_eager(layer, query, key, value, mask2d, scaling, window_left, softcap), None
        # Traced (torch.compile, export) or another non-plain mode: one opaque op per layer.
        out = torch.ops.vattn.hf_attend(
            self._core.op_handle, layer, query, key, value, mask2d, scaling, window_left, softcap
        )
        return out, None

    def _attend_eager(self, layer: int, query, key, value, mask2d, scaling, window_left: int, softcap: float):
        batch, hq, q_len, dim = query.shape
        fw = self._forward
        if fw is None or layer in fw.done or fw.batch != batch or fw.q_len != q_len:
            # A new forward (a previous one that raised half-way is dropped uncommitted).
            self._abort_forward()
            fw = self._begin_forward(batch, q_len, mask2d, query.device)
        fw.done.add(layer)  # (before any raise below: the next forward then drops this one)
        if window_left >= 0 and self._has_holes(fw):
            # vattn stores no padding, so its window counts stored tokens; transformers counts
            # positions, holes included. Left padding (holes only before the first real token) agrees.
            raise ValueError(
                "vattn: sliding-window attention with padding after real tokens (right padding or "
                "packed sequences) is not supported: the window would count stored tokens, not "
                "positions; pad on the left (tokenizer.padding_side = 'left')"
            )
        if q_len == 1 and fw.all_real and self.policy is None and fw.step is not None:
            # A plain decode step (the common case): vattn's short path directly, with the eager
            # check _attend made, and the output already in transformers' [batch, 1, heads, dim].
            k1, v1, q1 = key.squeeze(2), value.squeeze(2), query.squeeze(2)
            if _fast.append_kv(self.kv, layer, fw.step, k1, v1, eager_checked=True) is NotImplemented:
                vattn.append_kv(self.kv, layer, fw.step, k1, v1)
            out = _fast.decode(self.kv, q1, layer, fw.step, scaling, window_left, softcap, False, True, True)
            if out is NotImplemented:
                out = vattn.attention(q1, self.kv, layer, fw.step, scale=scaling, window_left=window_left,
                                      softcap=softcap).view(batch, 1, hq, dim)  # fmt: skip
        elif fw.step is None:
            out = query.new_zeros(batch, q_len, hq, dim)
        else:
            packed_k, packed_v = self._pack(key, fw), self._pack(value, fw)
            vattn.append_kv(self.kv, layer, fw.step, packed_k, packed_v)
            on_append = getattr(self.policy, "on_append", None)
            if on_append is not None:
                on_append(self.kv, layer, fw.step, packed_k, packed_v)
            extra = {} if self.policy is None else self.policy.attention_kwargs(self.kv, layer, fw.step)
            packed = vattn.attention(
                self._pack(query, fw),
                self.kv,
                layer,
                fw.step,
                scale=scaling,
                window_left=window_left,
                softcap=softcap,
                **extra,
            )
            if fw.all_real:
                out = packed.view(batch, q_len, hq, dim)
            else:
                out = packed.new_zeros(batch * q_len, hq, dim).index_copy_(0, fw.flat_idx, packed)
                out = out.view(batch, q_len, hq, dim)
        if len(fw.done) == self.num_layers:
            self._end_forward(fw)
        return out
