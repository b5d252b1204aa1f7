"""`vattn.KVCache`: a KV-cache in contiguous virtual memory, mapped on demand.

Each slot (cache row) owns a fixed virtual range for `max_seq_len` tokens; physical pages are
mapped into it only as the slot grows (`reserve`, `begin_step`) and unmapped when it shrinks or
is freed. The C++ manager (`vattn._C.CacheManager`, cuda/memory/) does the mapping; this module
validates arguments, builds zero-copy tensor views over the reserved memory and the per-step
index tensors the attention ops consume.

    cache = vattn.KVCache(num_layers=32, num_kv_heads=8, head_dim=128, max_batch=8, max_seq_len=8192,
                          dtype=torch.bfloat16, device="cuda")
    slot = cache.alloc()
    step = cache.begin_step(slots=[slot], new_tokens=[prompt_len])   # maps what the step needs
    ...  vattn.append_kv(cache, layer, step, k, v); vattn.attention(q, cache, layer, step)
    cache.end_step(step)                                             # commits the lengths

Views (`kv(layer)`) cover the whole reserved range, but only the first `cache.length(slot)` tokens
of a slot are data. On the host backend (device="cpu") every element of a view may be read: the
unmapped part reads as zeros (the kernel's zero page, no physical memory). Writes there fault, so
the library's own ops refuse them (ValueError). On CUDA only the mapped part may be touched: an
unmapped address is an illegal address. The attention ops never read beyond a row's length.

Thread safety: every KVCache method that changes state (alloc, free, reserve, shrink, begin_step,
end_step, abort_step, close) takes the cache's lock, so calls from several threads on one cache are
each atomic: one of two racing calls wins and the other raises, and Python and native state never
disagree. vattn.append_kv / vattn.attention on one step are not synchronized with each other
(they write / read one layer's memory, as kernels on one stream would): run the layers of a step
from one thread, or from several threads on different layers. end_step, abort_step and close wait
for the vattn.append_kv calls in flight on a step, so another thread freeing or shrinking its slots
right after cannot unmap pages under a write. Raw ops on kv() views (vattn.append_kv_raw,
torch.ops.vattn.*) are checked against the mapping when called; keeping a slot alive while such a
write runs is the caller's part. Different caches share nothing.
"""

from __future__ import annotations

import operator
import os
import threading
import weakref
from array import array
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import _C, _guard, formats
from ._checks import _check_cache
from ._support import check_cache_supported

__all__ = ["KVCache", "Step"]

_LAYOUTS = ("token_major", "layer_major", "head_major")
_INT32_MAX = 2**31 - 1
_HOST_DEFAULT_PAGE = 2 << 20  # mirrors CUDA's usual granularity
_MAX_BYTES = 2**63 - 1  # the manager's byte counts are int64 inside
_DEFAULT_WATERMARK_PAGES = 64  # idle pages kept for reuse by the next request


# Fewest tokens of a request's first step from which key smoothing takes per-channel scales (_smooth).
_SCALE_MIN_TOKENS = 4


class IndexOutOfRange(IndexError, ValueError):
    """A slot, layer or batch row outside its range: an IndexError, and a ValueError like every
    other bad argument of the cache."""


class CacheStats(dict):
    """The dict stats() returns, whose keys also read as attributes (stats().mapped_bytes)."""

    __slots__ = ()

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"cache stats have no field {name!r}; fields: {', '.join(self)}") from None


@dataclass
class Step:
    """What one forward step of a batch needs from the cache (from `KVCache.begin_step`).

    Rows of q / k / v / out in the step are the new tokens of each slot in the order of `slots`,
    oldest first. Host lists and ints are for the host (grid sizes, no sync); tensors live on the
    cache's device and are read by the kernels.
    """

    slots: List[int]
    new_tokens: List[int]
    start: List[int]  # slot length before the step
    slot_ids: torch.Tensor  # int32 [batch]: cache row of each batch row
    seqlens: torch.Tensor  # int32 [batch]: start + new (the lengths attention sees)
    cu_seqlens_q: torch.Tensor  # int32 [batch + 1]
    token_slots: torch.Tensor  # int32 [total_new]: slot of each new token
    positions: torch.Tensor  # int32 [total_new]: position of each new token in its slot
    max_seqlen_q: int
    max_seqlen_k: int
    total_new: int
    is_decode: bool  # every new_tokens == 1
    # Only when a slot of the step was compacted (its kv heads / layers store different numbers of
    # tokens): per layer, the lengths attention sees per (batch row, kv head) and the position of
    # each new token per kv head. None otherwise (every head stores the slot's length).
    head_seqlens: Optional[torch.Tensor] = None  # int32 [num_layers, batch, kv_heads]
    head_positions: Optional[torch.Tensor] = None  # int32 [num_layers, total_new, kv_heads]
    positions_logical: Optional[List[int]] = None  # logical position of each slot's first new token
    _fast: Optional[dict] = field(default=None, repr=False, compare=False)  # _fast.py's per-step state
    _writers: int = field(default=0, repr=False, compare=False)  # appends in flight (KVCache._write_begin)
    _smoothed: list = field(default_factory=list, repr=False, compare=False)  # key statistics it set
    # The version counters of the index tensors when begin_step made them (the five views of the
    # step buffer share one): an in-place change shows as a new version, and the ops then refuse
    # the step instead of writing where begin_step mapped nothing.
    _versions: Tuple[int, int, int] = field(default=(-1, -1, -1), repr=False, compare=False)

    def __setattr__(self, name, value):
        if name in _STEP_READ_ONLY and "_versions" in self.__dict__:
            raise AttributeError(f"Step.{name} is read-only: it describes what begin_step mapped")
        object.__setattr__(self, name, value)

    def _intact(self) -> bool:
        """Whether the index tensors still hold what begin_step wrote (no in-place change since)."""
        v = self._versions
        return (
            self.positions._version == v[0]
            and (self.head_seqlens is None or self.head_seqlens._version == v[1])
            and (self.head_positions is None or self.head_positions._version == v[2])
        )


_STEP_READ_ONLY = frozenset(
    ("slot_ids", "seqlens", "cu_seqlens_q", "token_slots", "positions", "head_seqlens", "head_positions")
    + ("max_seqlen_q", "max_seqlen_k", "total_new", "is_decode")
)
_STEP_TAMPERED = (
    "the step's index tensors were changed in place after begin_step; they describe what begin_step "
    "mapped and must not be modified (begin a new step instead)"
)


def _int(x, name: str) -> int:
    if isinstance(x, bool):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        return operator.index(x)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(x).__name__}") from None


def _positive(x, name: str) -> int:
    v = _int(x, name)
    if v <= 0:
        raise ValueError(f"{name} must be positive, got {v}")
    return v


def _int_list(xs, name: str) -> List[int]:
    if type(xs) is list and all(type(x) is int for x in xs):  # the common case, ~10x cheaper (bool is not int here)
        return list(xs)
    if isinstance(xs, torch.Tensor):
        xs = xs.tolist()
    if isinstance(xs, (str, bytes)) or not isinstance(xs, Sequence) and not hasattr(xs, "__iter__"):
        raise TypeError(f"{name} must be a sequence of ints")
    return [_int(x, f"{name}[{i}]") for i, x in enumerate(xs)]


# Below this many new tokens a step's index buffer is built from Python lists (a decode step of up
# to ~100 slots: ~3-12 us); above, numpy's fixed cost (~15 us) pays off (long prompts).
_PACK_LIST_MAX_TOKENS = 128
assert array("i").itemsize == 4, "array('i') must be int32 for _pack_step"


def _pack_step(slots: List[int], new_tokens: List[int], start: List[int], ends: List[int], total: int) -> torch.Tensor:
    """The int32 host buffer of a step: slot_ids [b] | seqlens [b] | cu_seqlens_q [b+1] |
    token_slots [total] | positions [total] (Step's tensors are views of it on the device)."""
    if total <= _PACK_LIST_MAX_TOKENS:
        cu = [0]
        for n in new_tokens:
            cu.append(cu[-1] + n)
        if total == len(slots) and max(new_tokens) == 1:  # decode: one token per slot
            token_slots, positions = slots, start
        else:
            token_slots = [s for s, n in zip(slots, new_tokens) for _ in range(n)]
            positions = [p for a, e in zip(start, ends) for p in range(a, e)]
        buf = array("i", slots)  # C int: int32 on every platform torch supports
        buf.extend(ends)
        buf.extend(cu)
        buf.extend(token_slots)
        buf.extend(positions)
        return torch.frombuffer(buf, dtype=torch.int32)  # never empty: a step has >= 1 slot
    slots_a = np.asarray(slots, dtype=np.int32)
    new_a = np.asarray(new_tokens, dtype=np.int32)
    start_a = np.asarray(start, dtype=np.int32)
    cu = np.zeros(len(slots) + 1, dtype=np.int32)
    np.cumsum(new_a, out=cu[1:])
    token_slots = np.repeat(slots_a, new_a)
    positions = np.arange(total, dtype=np.int32) - np.repeat(cu[:-1] - start_a, new_a)
    return torch.from_numpy(np.concatenate([slots_a, start_a + new_a, cu, token_slots, positions]).astype(np.int32))


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _memory_bytes(dev: torch.device) -> int:
    """Physical memory of the device a cache lives on (host: RAM), or 2**62 where unknown."""
    try:
        if dev.type == "cuda":
            return int(torch.cuda.get_device_properties(dev).total_memory)
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError, RuntimeError):
        return 2**62


class _CudaRange:
    """`__cuda_array_interface__` (v3) over raw device memory; holds the manager so the memory
    outlives every tensor / CuPy array made from it."""

    def __init__(self, owner, ptr: int, shape, strides, typestr: str):
        self._owner = owner
        self.__cuda_array_interface__ = {
            "shape": tuple(shape),
            "strides": tuple(strides) if strides is not None else None,
            "typestr": typestr,
            "data": (int(ptr), False),
            "version": 3,
            "stream": None,
        }


class KVCache:
    """A KV-cache of `max_batch` slots x `max_seq_len` tokens x `num_layers` layers, in contiguous
    virtual memory backed by physical pages only where tokens are (see the module docstring).

    Keyword-only tuning options:
      page_bytes               page size (host: default 2 MiB, any multiple of the OS page; CUDA:
                               default the device's granularity, or a multiple of it)
      prealloc_bytes           pages created up front into the pool (growth then only maps)
      reclaim_watermark_bytes  idle pages (of freed slots + pool) kept for reuse; beyond it pages
                               are unmapped and destroyed (default 64 pages)
      background               a thread maps pages ahead of each live slot and refills the pool
      lookahead_tokens         how far ahead that thread maps (default one page of tokens)
      scrub_freed              zero the pages of a finished request before another request can see
                               them (a reused slot's pages at alloc, pooled / stolen pages when they
                               are mapped into a slot). Default False: attention never reads past a
                               row's length, so another request's bytes are visible only to code
                               reading a view beyond a slot's length, within the same process; the
                               price is a zeroing pass over every reused page, on the hot path (host:
                               a memset; alloc of a slot whose last request held 512 tokens of
                               Llama-3-8B, 32 pages of 2 MiB, took 27-31 ms instead of 1 us on a
                               loaded 2-core machine; CUDA: cuMemsetD8Async on the current stream, no
                               host wait). Turn it on where requests of different users must not see
                               each other's bytes even through raw views.
      smooth_keys              quantized keys are stored minus a per-(slot, layer, kv head) channel
                               mean taken from the request's first step (its prompt). Softmax is
                               invariant to that shift, so attention outputs and scores do not change,
                               but the outlier channels of keys stop dominating each vector's scale:
                               int4 / int8 / fp8 keys lose far less (bench/RESULTS.md). "auto": on
                               for int4 (per token), int8 and fp8_e4m3 keys; True: any K format;
                               False (default): the stored codes are reference.quantize of the keys
                               appended, so raw ops on kv() views read the keys as they are. With
                               smoothing only vattn.attention / vattn.dequantize_kv(cache, layer)
                               undo it (raw ops on the views see the smoothed keys). Not compatible
                               with logit soft-capping (raises). VAttnCache.for_model uses "auto".
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        max_batch: int,
        max_seq_len: int,
        dtype: torch.dtype = torch.bfloat16,
        kv_format: str = "auto",
        layout: str = "token_major",
        device="cuda",
        max_physical_bytes: Optional[int] = None,
        *,
        page_bytes: Optional[int] = None,
        prealloc_bytes: int = 0,
        reclaim_watermark_bytes: Optional[int] = None,
        background: bool = False,
        scrub_freed: bool = False,
        lookahead_tokens: Optional[int] = None,
        smooth_keys=False,
        _host_commit: bool = True,
    ):
        self.num_layers = _positive(num_layers, "num_layers")
        self.num_kv_heads = _positive(num_kv_heads, "num_kv_heads")
        self.head_dim = _positive(head_dim, "head_dim")
        self.max_batch = _positive(max_batch, "max_batch")
        self.max_seq_len = _positive(max_seq_len, "max_seq_len")
        # Lengths, positions and slot ids are int32 on the device.
        if self.max_seq_len > _INT32_MAX:
            raise ValueError(f"max_seq_len={self.max_seq_len} exceeds {_INT32_MAX} (int32 lengths)")
        if self.max_batch > _INT32_MAX:
            raise ValueError(f"max_batch={self.max_batch} exceeds {_INT32_MAX} (int32 slot ids)")
        for name in ("num_layers", "num_kv_heads", "head_dim"):
            if getattr(self, name) > _INT32_MAX:
                raise ValueError(f"{name}={getattr(self, name)} exceeds {_INT32_MAX}")
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype, got {type(dtype).__name__}")
        if layout not in _LAYOUTS:
            raise ValueError(f"layout must be one of {_LAYOUTS}, got {layout!r}")
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"invalid device {device!r}: {e}") from None
        if dev.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, got {dev}")
        self.k_format, self.v_format = formats.resolve(kv_format, dtype)
        check_cache_supported(dev.type, dtype, self.k_format, self.v_format, self.head_dim)
        # int4_ch keys keep their parameters in the scale words of whole groups of tokens: rows
        # hold whole groups and every slot maps its last group completely (the manager's
        # align_tokens).
        self._group = formats.group_tokens(self.k_format, self.head_dim)
        if self._group > 1:
            if self.head_dim % 2:
                raise ValueError(f"int4 keys (int4_ch) need an even head_dim, got {self.head_dim}")
            self.max_seq_len = self._group_end(self.max_seq_len)
        if dev.type == "cuda":
            if not _C.built_with_cuda:
                raise RuntimeError(
                    "device='cuda' needs a CUDA build of vattn (this one was built without CUDA); use device='cpu'"
                )
            drv = _C.cuda_driver_status()
            if not drv["ok"]:
                raise RuntimeError(f"device='cuda': {drv['message']}")
            if not torch.cuda.is_available() or _C.cuda_device_count() == 0:
                raise RuntimeError("device='cuda' but no CUDA device is available; use device='cpu'")
            dev = torch.device("cuda", dev.index if dev.index is not None else torch.cuda.current_device())
        self.dtype = dtype
        self.kv_format = kv_format
        self.layout = layout
        self.device = dev

        cap = 0 if max_physical_bytes is None else _positive(max_physical_bytes, "max_physical_bytes")
        page = 0 if page_bytes is None else _positive(page_bytes, "page_bytes")
        if page and page > _memory_bytes(dev):
            # One page is the least a slot maps: a page the machine cannot hold would be committed
            # on the first step, and the host's answer to that is the OOM killer, not MemoryError.
            raise ValueError(f"page_bytes={page} is more than the {dev.type} memory ({_memory_bytes(dev)} bytes)")
        prealloc = _int(prealloc_bytes, "prealloc_bytes")
        if prealloc < 0:
            raise ValueError(f"prealloc_bytes must be >= 0, got {prealloc}")
        if prealloc > _memory_bytes(dev):
            # Pre-created pages are committed at once: on the host past its memory that is the OOM
            # killer, not MemoryError.
            raise ValueError(
                f"prealloc_bytes={prealloc} is more than the {dev.type} memory ({_memory_bytes(dev)} bytes)"
            )
        if page:
            effective_page = page
        elif dev.type == "cuda":
            effective_page = _C.page_granularity(dev.index) or _HOST_DEFAULT_PAGE
        else:
            effective_page = _HOST_DEFAULT_PAGE
        if reclaim_watermark_bytes is None:
            watermark = _DEFAULT_WATERMARK_PAGES * effective_page
        else:
            watermark = _int(reclaim_watermark_bytes, "reclaim_watermark_bytes")
            if watermark < 0:
                raise ValueError(f"reclaim_watermark_bytes must be >= 0, got {watermark}")
        # head_major: a region per (layer, K|V, kv head), each holding one head's records.
        record_heads = 1 if layout == "head_major" else self.num_kv_heads
        head_regions = self.num_kv_heads if layout == "head_major" else 1
        k_record = self.k_format.record_bytes(record_heads, self.head_dim)
        v_record = self.v_format.record_bytes(record_heads, self.head_dim)
        region_token_bytes = (
            self.num_layers * (k_record + v_record) if layout == "token_major" else max(k_record, v_record)
        )
        self._region_record = int(region_token_bytes)  # bytes per token of one manager region
        self._record_heads, self._record_pair = record_heads, k_record + v_record  # heads per record, K + V bytes
        if lookahead_tokens is None:
            lookahead = max(1, effective_page // region_token_bytes)
        else:
            lookahead = _int(lookahead_tokens, "lookahead_tokens")
            if lookahead < 0:
                raise ValueError(f"lookahead_tokens must be >= 0, got {lookahead}")

        for name, value in (("max_physical_bytes", cap), ("reclaim_watermark_bytes", watermark)):
            if value > _MAX_BYTES:
                raise ValueError(f"{name}={value} is beyond any memory (at most 2**63 - 1)")
        if lookahead > max(self.max_seq_len, 1):
            lookahead = self.max_seq_len  # mapping ahead never goes past a slot's end anyway
        self._manager = _C.CacheManager(
            "cuda" if dev.type == "cuda" else "host",
            dev.index or 0,
            self.num_layers,
            k_record,
            v_record,
            self.max_batch,
            self.max_seq_len,
            layout,
            page_bytes=page,
            max_physical_bytes=cap,
            prealloc_bytes=prealloc,
            reclaim_watermark_bytes=watermark,
            background=bool(background),
            lookahead_tokens=lookahead,
            host_commit=bool(_host_commit),
            scrub_freed=bool(scrub_freed),
            align_tokens=self._group,  # int4_ch keys: slots map whole groups of tokens
            head_regions=head_regions,
        )
        self.page_bytes = int(self._m.page_bytes)
        self.token_bytes = int(self._m.token_bytes)  # one stored token, all layers, K and V, scales included
        self.background = bool(background)
        self.scrub_freed = bool(scrub_freed)
        self._cuda_scrub = self.scrub_freed and dev.type == "cuda"
        self._lengths_host = [0] * self.max_batch
        self._lengths = torch.zeros(self.max_batch, dtype=torch.int32, device=dev)
        self._lengths_np = self._lengths.numpy() if dev.type == "cpu" else None  # same memory (see _set_lengths)
        self._open: Dict[int, Step] = {}  # slot -> its open step
        self._open_steps: Dict[int, Step] = {}  # id(step) -> step
        self._views: List[Optional[Tuple[torch.Tensor, torch.Tensor]]] = [None] * self.num_layers
        self._ops_layers: List[Optional[tuple]] = [None] * self.num_layers  # see _ops_layer
        self._layer_view_keys: Optional[set] = None  # see _is_layer_view
        self._regions: Dict[int, torch.Tensor] = {}
        self._lock = threading.RLock()  # state transitions (see the module docstring)
        self._writes_done = threading.Condition(self._lock)  # a step's last append in flight returned
        # Eviction (compact): per compacted slot, how many tokens each (layer, kv head) stores
        # fewer than the slot's length (int32 [num_layers, kv_heads], min 0). Appends grow every head
        # alike, so the deficit only changes at compact / shrink; other slots store length everywhere.
        self._deficit: Dict[int, np.ndarray] = {}
        self._logical = [0] * self.max_batch  # tokens a slot has seen (RoPE positions), evicted included
        self._scores: Optional[torch.Tensor] = None  # [max_batch, layers, kv_heads, max_seq] (enable_scores)
        if smooth_keys not in ("auto", True, False):
            raise ValueError(f"smooth_keys must be 'auto', True or False, got {smooth_keys!r}")
        # "auto": every quantized key format. Measured on SmolLM2 (bench/RESULTS.md): int4 per token
        # +9.55% -> +4.31% perplexity, int8 +0.060% -> +0.011% (8 x 1024 tokens), fp8 +0.451% ->
        # +0.312% (64 windows not used to choose it; paired difference -0.0014 nats, s.e. 0.0005: an
        # earlier 8-window reading in the other direction was noise). int4_ch keys carry per-channel
        # offsets of their own and are not smoothed.
        smooth = self.k_format.name in ("int4", "int8", "fp8_e4m3") if smooth_keys == "auto" else bool(smooth_keys)
        # Key smoothing: float32 [max_batch, layers, kv_heads, head_dim] channel means, and which
        # (slot, layer) has its mean (set by the slot's first append of that layer).
        shape = (self.max_batch, self.num_layers, self.num_kv_heads, self.head_dim)
        self._key_means = torch.zeros(shape, device=dev) if smooth else None
        # and per-channel scales: stored key = (key - mean) / scale, and attention multiplies q by the
        # same scale (q . k - q . mean is unchanged), so wide channels no longer set every key's step.
        self._key_scales = torch.ones(shape, device=dev) if smooth else None
        self._mean_set = np.zeros((self.max_batch, self.num_layers), dtype=bool)
        self._shared: set = set()  # slots that may map pages shared with another slot (fork)
        self._quest_meta: Optional[List[torch.Tensor]] = None  # per layer (enable_quest)
        self.quest_block = 0
        # positions.data_ptr() of each open step -> (its token_slots.data_ptr(), total_new, its
        # per-layer head_positions pointers): raw appends with those index tensors skip _guard's scan.
        self._trusted_positions: dict = {}
        _guard.register(self)

    # ------------------------------------------------------------------ slots

    def alloc(self) -> int:
        """A free slot (length 0). RuntimeError when all `max_batch` slots are live."""
        with self._lock:
            slot = int(self._m.alloc(self._stream()))
            self._logical[slot] = 0
            if self._scores is not None:
                self._scores[slot].zero_()
            return slot

    def free(self, slot: int) -> None:
        """Frees a live slot; its pages are kept for the next alloc up to the reclaim watermark."""
        with self._lock:
            slot = self._live(slot)
            self._no_open_step(slot, "free")
            self._record_use()
            self._m.free(slot)
            self._shared.discard(slot)
            self._set_lengths({slot: 0})
            self._deficit.pop(slot, None)
            self._logical[slot] = 0
            self._mean_set[slot] = False

    def reserve(self, slot: int, n: int) -> None:
        """Maps pages so that slot holds >= n tokens in every layer (lengths do not change)."""
        n = _int(n, "n")
        if not 0 <= n <= self.max_seq_len:
            raise ValueError(f"cannot reserve {n} tokens: must be in [0, max_seq_len={self.max_seq_len}]")
        with self._lock:
            slot = self._live(slot)
            self._m.reserve([slot], [n], self._stream())

    def shrink(self, slot: int, n: int) -> None:
        """Keeps the first n tokens of slot and unmaps the pages no longer needed. After compact(),
        each (layer, kv head) keeps the first min(n, tokens it stores), and in layer_major each layer
        keeps only the pages its longest head needs (head_major: each head its own)."""
        n = _int(n, "n")
        with self._lock:
            slot = self._live(slot)
            self._no_open_step(slot, "shrink")
            length = self._lengths_host[slot]
            if not 0 <= n <= length:
                raise ValueError(f"cannot shrink slot {slot} to {n} tokens: must be in [0, length={length}]")
            self._record_use()
            self._m.shrink(slot, n)
            self._set_lengths({slot: n})
            self._logical[slot] -= length - n
            d = self._deficit.get(slot)
            if d is not None:  # heads that stored fewer than n keep all they have
                heads = np.minimum(length - d, n)
                self._set_deficit(slot, int(heads.max()) if n else 0, heads)

    def length(self, slot: int) -> int:
        """Tokens stored in slot (host int; 0 for a free slot). After compact(), the most any
        (layer, kv head) of the slot stores (head_lengths has each); position() is the logical
        length."""
        self._m  # raises once closed
        return self._lengths_host[self._index(slot)]

    def live_slots(self) -> List[int]:
        return list(self._m.live_slots())

    @property
    def lengths(self) -> torch.Tensor:
        """int32 [max_batch] on the cache's device (0 for free slots); updated in place at
        end_step / shrink / free, so the same tensor can be captured in a CUDA graph."""
        return self._lengths

    # ------------------------------------------------------------------ steps

    def begin_step(self, slots, new_tokens) -> Step:
        """Maps what a step of `new_tokens[i]` new tokens for `slots[i]` needs and returns the Step
        the ops consume. Lengths change only at `end_step`. All or nothing."""
        with self._lock:
            return self._begin_step(slots, new_tokens)

    def _begin_step(self, slots, new_tokens) -> Step:
        slots = _int_list(slots, "slots")
        new_tokens = _int_list(new_tokens, "new_tokens")
        if len(slots) != len(new_tokens):
            raise ValueError(f"begin_step got {len(slots)} slots and {len(new_tokens)} new_tokens")
        if not slots:
            raise ValueError("begin_step needs at least one slot")
        if len(set(slots)) != len(slots):
            raise ValueError(f"begin_step got a slot twice: {slots}")
        m = self._m
        max_batch, max_seq = self.max_batch, self.max_seq_len
        lengths, open_steps = self._lengths_host, self._open
        start, ends = [], []
        # Liveness is checked by m.reserve below (all slots before it maps anything: ValueError "slot
        # s is not allocated"), not with one native call per slot here: that was the largest per-slot
        # cost of a step.
        for s, n in zip(slots, new_tokens):
            if not 0 <= s < max_batch:
                self._index(s)  # raises the error
            if s in open_steps:
                raise RuntimeError(f"slot {s} already has an open step; end it with end_step first")
            if n < 0:
                raise ValueError(f"new_tokens must be >= 0, got {n} for slot {s}")
            length = lengths[s]
            if length + n > max_seq:
                raise ValueError(f"slot {s} holds {length} tokens; {n} more exceed max_seq_len={self.max_seq_len}")
            start.append(length)
            ends.append(length + n)
        shared = [s for s in slots if s in self._shared] if self._shared else None
        if shared:  # copy-on-write: the step writes from each head's stored length on
            for s in slots:  # every slot live before any copy (m.reserve checks it only after)
                if not m.is_live(s):
                    raise ValueError(f"slot {s} is not allocated (never allocated or already freed)")
            froms = {s: self._region_min_tokens(self._head_lengths_np(s)) for s in shared}
            private_from = [froms.get(s, []) for s in slots]
            # MemoryError before the first copy when the copies and the growth do not both fit;
            # reserve then makes the copies and grows in one call (a failure undoes both)
            m.check_room(slots, ends, private_from, [[] for _ in slots])
            m.reserve(slots, ends, self._stream(), private_from)
            for s in shared:
                if m.shared_pages(s) == 0:
                    self._shared.discard(s)
        elif self._cuda_scrub:  # scrubbing of reused pages goes on the current stream
            m.reserve(slots, ends, torch.cuda.current_stream(self.device).cuda_stream)
        else:
            m.reserve(slots, ends)

        b = len(slots)
        total = sum(new_tokens)
        # Made as normal tensors even under inference_mode: inference tensors have no version
        # counter, which is how the ops notice a step's tensors changed in place (Step._intact).
        if torch.is_inference_mode_enabled():
            with torch.inference_mode(False):
                dev, head_seqlens, head_positions = self._step_tensors(slots, new_tokens, start, ends, total)
        else:
            dev, head_seqlens, head_positions = self._step_tensors(slots, new_tokens, start, ends, total)
        slot_ids, seqlens, cu_seqlens_q, token_slots, positions = dev.split_with_sizes([b, b, b + 1, total, total])
        max_q = max(new_tokens)
        step = Step(
            slots=slots,
            new_tokens=new_tokens,
            start=start,
            slot_ids=slot_ids,
            seqlens=seqlens,
            cu_seqlens_q=cu_seqlens_q,
            token_slots=token_slots,
            positions=positions,
            max_seqlen_q=max_q,
            max_seqlen_k=max(ends),
            total_new=total,
            is_decode=max_q == 1 and min(new_tokens) == 1,
            head_seqlens=head_seqlens,
            head_positions=head_positions,
            positions_logical=[self._logical[s] for s in slots],
        )
        step._versions = (
            dev._version,
            -1 if head_seqlens is None else head_seqlens._version,
            -1 if head_positions is None else head_positions._version,
        )
        for s in slots:
            open_steps[s] = step
        self._open_steps[id(step)] = step
        self._trusted_positions[positions.data_ptr()] = (
            step.token_slots.data_ptr(),
            step.total_new,
            frozenset() if head_positions is None else frozenset(h.data_ptr() for h in head_positions.unbind(0)),
            step,
        )
        return step

    def _step_tensors(self, slots, new_tokens, start, ends, total):
        """The step's int32 buffer on the cache's device, and its per-head lengths / positions
        (None unless a slot of the step was compacted)."""
        # One int32 buffer so the device gets a single copy, split into views of it.
        dev = self._to_device(_pack_step(slots, new_tokens, start, ends, total))
        head_seqlens = head_positions = None
        if self._deficit and any(s in self._deficit for s in slots):
            head_seqlens, head_positions = self._ragged_step(slots, new_tokens, ends)
        return dev, head_seqlens, head_positions

    def abort_step(self, step: Step) -> None:
        """Closes an open step without committing it: lengths stay as they were before
        begin_step (pages it mapped stay mapped for the slots' next steps). For a forward pass that
        failed half-way. An int4_ch key group the step appended into keeps the re-encoding: its
        earlier keys stay quantized over the range the aborted tokens gave the group."""
        if not isinstance(step, Step):
            raise TypeError(f"abort_step expects a vattn.Step, got {type(step).__name__}")
        with self._lock:
            self._wait_writes(step)
            self._check_step(step)
            self._record_use()
            if step._smoothed:
                self._unsmooth(step)
            self._close_step(step)

    def end_step(self, step: Step) -> None:
        """Commits a step: each slot's length grows by its new tokens. Once per step."""
        if not isinstance(step, Step):
            raise TypeError(f"end_step expects a vattn.Step, got {type(step).__name__}")
        with self._lock:
            self._wait_writes(step)
            self._check_step(step)
            self._m.commit(step.slots, step.new_tokens)
            self._record_use()  # the step's kernels are on the current stream: unmapping waits for them
            self._close_step(step)
            self._set_lengths(dict(zip(step.slots, [a + n for a, n in zip(step.start, step.new_tokens)])))
            logical = self._logical
            for s, n in zip(step.slots, step.new_tokens):
                logical[s] += n

    def _check_step(self, step) -> None:
        """Raises unless step is open in this cache (vattn.append_kv / vattn.attention call it)."""
        if not isinstance(step, Step) or self._open_steps.get(id(step)) is not step:
            if self._manager is None:
                raise RuntimeError("this KVCache is closed")
            if not isinstance(step, Step):
                raise TypeError(f"step must be a vattn.Step from cache.begin_step(), got {type(step).__name__}")
            raise ValueError(
                "this step is not open in this cache (already ended or aborted, or begun on another cache)"
            )

    # An append (vattn.append_kv) runs its native write without the lock. It registers on its open
    # step first, and closing the step waits for it: otherwise another thread could end or abort
    # the step and free or shrink its slots, unmapping pages under the write (a segfault on CPU).
    def _write_begin(self, step) -> bool:
        """Registers an append in flight on step; False (nothing registered) if step is not open here."""
        with self._lock:
            if type(step) is not Step or self._open_steps.get(id(step)) is not step:
                return False
            step._writers += 1
            return True

    def _write_end(self, step: Step) -> None:
        with self._lock:
            step._writers -= 1
            if step._writers == 0:
                self._writes_done.notify_all()

    def _wait_writes(self, step) -> None:
        """(lock held) Until no append is in flight on step; no new one can register while the lock
        is held, and none can once the step is closed."""
        if isinstance(step, Step):
            while step._writers > 0:
                self._writes_done.wait()

    def _close_step(self, step: Step) -> None:
        del self._open_steps[id(step)]
        open_steps = self._open
        for s in step.slots:
            del open_steps[s]
        self._trusted_positions.pop(step.positions.data_ptr(), None)

    # ------------------------------------------------------------------ eviction

    def position(self, slot: int) -> int:
        """The logical length of slot: tokens it has seen, evicted ones included (the position of
        its next token, what RoPE and transformers count). Equals length(slot) until compact()."""
        self._m
        return self._logical[self._index(slot)]

    def head_lengths(self, slot: Optional[int] = None) -> torch.Tensor:
        """Tokens stored per (layer, kv head): int32 [num_layers, num_kv_heads] for one slot, or
        [max_batch, num_layers, num_kv_heads] for all (host tensors, a copy)."""
        self._m
        L, H = self.num_layers, self.num_kv_heads
        if slot is not None:
            slot = self._index(slot)
            return torch.from_numpy(self._head_lengths_np(slot).copy())
        out = np.repeat(np.asarray(self._lengths_host, dtype=np.int32), L * H).reshape(self.max_batch, L, H)
        for s, d in self._deficit.items():
            out[s] -= d
        return torch.from_numpy(out)

    def _head_lengths_np(self, slot: int) -> np.ndarray:
        n = self._lengths_host[slot]
        d = self._deficit.get(slot)
        if d is None:
            return np.full((self.num_layers, self.num_kv_heads), n, dtype=np.int32)
        return (n - d).astype(np.int32)

    def _set_deficit(self, slot: int, length: int, heads: np.ndarray) -> None:
        d = (length - heads).astype(np.int32)
        if d.any():
            self._deficit[slot] = d
        else:
            self._deficit.pop(slot, None)

    def _ragged_step(self, slots, new_tokens, ends):
        """Step.head_seqlens / head_positions for a step with compacted slots (see Step)."""
        L, H = self.num_layers, self.num_kv_heads
        zero = np.zeros((L, H), dtype=np.int32)
        deficit = np.stack([self._deficit.get(s, zero) for s in slots], axis=1)  # [L, b, H]
        seqlens = np.asarray(ends, dtype=np.int32)[None, :, None] - deficit
        counts = np.asarray(new_tokens, dtype=np.int64)
        rows = np.repeat(np.arange(len(slots)), counts)
        base = np.repeat(np.asarray(ends, dtype=np.int64) - counts, counts)
        within = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
        pos = (base + within)[None, :, None] - deficit[:, rows, :]  # [L, total, H]
        return (
            self._to_device(torch.from_numpy(np.ascontiguousarray(seqlens, dtype=np.int32))),
            self._to_device(torch.from_numpy(np.ascontiguousarray(pos, dtype=np.int32))),
        )

    def enable_scores(self) -> None:
        """Allocates the per-token score buffer that eviction policies read (H2O, TOVA, SnapKV):
        float32 [max_batch, num_layers, num_kv_heads, max_seq_len] on the cache's device, zero for new
        slots, moved with the tokens by compact(). Costs max_batch * num_layers * kv_heads *
        max_seq_len * 4 bytes of ordinary device memory. Idempotent."""
        with self._lock:
            self._m
            if self._scores is None:
                self._scores = torch.zeros(
                    (self.max_batch, self.num_layers, self.num_kv_heads, self.max_seq_len),
                    dtype=torch.float32,
                    device=self.device,
                )

    def enable_quest(self, block: int = 16) -> None:
        """Keeps Quest's per-block key metadata (per-channel min and max of the keys of every block of
        `block` stored tokens, per slot, layer and kv head), updated by vattn.append_kv and compact(),
        so that vattn.attention(..., token_budget=N) decodes over the best blocks only. Costs
        max_batch * ceil(max_seq_len / block) * kv_heads * 2 * head_dim * 4 bytes per layer of ordinary
        device memory (1/16 of an fp32 K cache at block 16... 1/8 of a bf16 one)."""
        from .quest_ops import quest_max_blocks

        block = _positive(block, "block")
        with self._lock:
            self._m
            if self._quest_meta is not None:
                if block != self.quest_block:
                    raise ValueError(f"Quest metadata already kept for blocks of {self.quest_block} tokens")
                return
            if block > _INT32_MAX:
                raise ValueError(f"block must be a positive int32, got {block}")
            nb = quest_max_blocks(self.max_seq_len, block)
            self._quest_meta = [
                torch.zeros((self.max_batch, nb, self.num_kv_heads, 2, self.head_dim), device=self.device)
                for _ in range(self.num_layers)
            ]
            self.quest_block = block
            try:
                for s in self.live_slots():  # tokens already stored get their metadata now
                    if self._lengths_host[s]:
                        self._quest_refresh([s])
            except BaseException:  # as before the call (e.g. out of device memory)
                self._quest_meta = None
                self.quest_block = 0
                raise

    def quest_meta(self, layer: int) -> Optional[torch.Tensor]:
        """float32 [max_batch, blocks, kv_heads, 2, head_dim] (min, max) of one layer; None if off."""
        if self._quest_meta is None:
            return None
        return self._quest_meta[self._layer_index(layer)]

    def _layer_index(self, layer) -> int:
        layer = _int(layer, "layer")
        if not 0 <= layer < self.num_layers:
            raise IndexOutOfRange(f"layer {layer} out of range [0, {self.num_layers})")
        return layer

    def _quest_refresh(self, slots: List[int]) -> None:
        """Recomputes every block of these slots (after compaction or enable_quest)."""
        from .quest_ops import block_minmax

        rows = torch.tensor(slots, dtype=torch.int32, device=self.device)
        lengths = torch.tensor([self._lengths_host[s] for s in slots], dtype=torch.int32, device=self.device)
        heads = torch.stack([torch.from_numpy(self._head_lengths_np(s)) for s in slots], dim=1)  # [L, n, H]
        heads = heads.to(self.device)
        for layer in range(self.num_layers):
            k, _, ks, _, _ = self._ops_layer(layer)
            block_minmax(
                k,
                self._quest_meta[layer],
                rows,
                lengths,
                torch.zeros_like(rows),
                head_lengths=heads[layer].contiguous(),
                block=self.quest_block,
                k_scale=ks,
                check=False,
            )

    def scores(self, layer: Optional[int] = None) -> Optional[torch.Tensor]:
        """The score buffer (enable_scores), all layers, or one layer's [max_batch, kv_heads, max_seq_len]
        view to pass to vattn.attention(..., scores=...). None when not enabled."""
        if self._scores is None:
            return None
        if layer is None:
            return self._scores
        layer = _int(layer, "layer")
        if not 0 <= layer < self.num_layers:
            raise IndexOutOfRange(f"layer {layer} out of range [0, {self.num_layers})")
        return self._scores[:, layer]

    def compact(self, slots, keep, keep_lens) -> None:
        """Keeps, per (slot, layer, kv head), only the tokens listed and unmaps the pages no head
        needs any more (physical memory drops at once).

        slots [n] live slots; keep int [n, num_layers, num_kv_heads, max_keep]: indices into each
        head's stored tokens, strictly increasing over the first keep_lens[i, l, h] entries; keep_lens
        int [n, num_layers, num_kv_heads]. The kept tokens move to the front in order (K, V, their
        scales, and the score buffer). Logical positions (position()) do not change. All checks come
        first: a bad call raises and changes nothing. Not while a slot has an open step."""
        from .sparse_ops import compact_kv

        slots = _int_list(slots, "slots")
        keep = torch.as_tensor(keep).to("cpu")
        keep_lens = torch.as_tensor(keep_lens).to("cpu")
        L, H = self.num_layers, self.num_kv_heads
        n = len(slots)
        if keep.dtype not in (torch.int32, torch.int64) or keep_lens.dtype not in (torch.int32, torch.int64):
            raise TypeError("compact: keep and keep_lens must be integer tensors")
        if keep.dim() != 4 or tuple(keep.shape[:3]) != (n, L, H):
            raise ValueError(f"compact: keep must have shape [{n}, {L}, {H}, max_keep], got {list(keep.shape)}")
        if tuple(keep_lens.shape) != (n, L, H):
            raise ValueError(f"compact: keep_lens must have shape [{n}, {L}, {H}], got {list(keep_lens.shape)}")
        if len(set(slots)) != n:
            raise ValueError(f"compact: a slot appears twice in {slots}")
        with self._lock:
            heads_before = []
            for s in slots:
                self._live(s)
                self._no_open_step(s, "compact")
                heads_before.append(torch.from_numpy(self._head_lengths_np(s)))
            if n == 0:
                return
            before = torch.stack(heads_before)  # [n, L, H]
            kmax = keep.shape[3]
            if bool((keep_lens < 0).any()) or bool((keep_lens > kmax).any()):
                raise ValueError(f"compact: keep_lens must be in [0, max_keep={kmax}]")
            if bool((keep_lens > before).any()):
                raise ValueError("compact: keep_lens exceeds the tokens a head stores")
            valid = torch.arange(kmax)[None, None, None, :] < keep_lens[..., None]
            if bool(((keep < 0) | (keep >= before[..., None])).logical_and(valid).any()):
                raise ValueError("compact: a kept index is outside the tokens its head stores")
            if kmax > 1:
                rising = keep[..., 1:] > keep[..., :-1]
                if bool((~rising & valid[..., 1:]).any()):
                    raise ValueError("compact: kept indices must be strictly increasing per (slot, layer, head)")
            if self._shared:  # the gather rewrites each head from its first dropped token on
                spans = {}
                for i, s in enumerate(slots):
                    if s in self._shared:
                        same = keep[i] == torch.arange(kmax)
                        lead = (same & valid[i]).int().cumprod(-1).sum(-1)  # [L, H] tokens left in place
                        # writes land in [lead, keep_lens): the shared pages past the kept tokens are
                        # only dropped after the gather, not copied
                        spans[s] = (lead.numpy().astype(np.int32), keep_lens[i].numpy().astype(np.int32))
                if spans:  # every slot's copies counted before the first is made, then made all or nothing
                    froms = [self._region_min_tokens(spans[s][0]) if s in spans else [] for s in slots]
                    tos = [self._region_tokens(spans[s][1]) if s in spans else [] for s in slots]
                    self._m.check_room(slots, [], froms, tos)
                    left = self._m.make_private_slots(slots, froms, tos, self._stream())
                    for s, n in zip(slots, left):
                        if n == 0:
                            self._shared.discard(s)
            rows = torch.tensor(slots, dtype=torch.int32, device=self.device)
            keep_dev = keep.to(self.device, torch.int32)
            lens_dev = keep_lens.to(self.device, torch.int32)
            for layer in range(L):
                k, v, ks, vs, _ = self._ops_layer(layer)
                compact_kv(
                    k,
                    v,
                    rows,
                    keep_dev[:, layer].contiguous(),
                    lens_dev[:, layer].contiguous(),
                    k_scale=ks,
                    v_scale=vs,
                    scores=None if self._scores is None else self._scores[:, layer],
                )
            heads_after = keep_lens.to(torch.int32).numpy()
            self._record_use()  # compact_kv ran on the current stream; shrink below unmaps
            for i, s in enumerate(slots):
                new_len = int(heads_after[i].max())
                if self._scores is not None:  # scores past each head's new length start from zero
                    stale = torch.arange(self.max_seq_len, device=self.device) >= lens_dev[i][..., None]
                    self._scores[s].masked_fill_(stale, 0.0)
                # Unmaps every page no head needs: token_major, beyond the longest head of all;
                # layer_major, per layer beyond that layer's longest head (its K and V regions);
                # head_major, per (layer, kv head) beyond that head's own tokens.
                self._m.shrink_regions(s, new_len, self._region_tokens(heads_after[i]))
                self._set_lengths({s: new_len})
                self._set_deficit(s, new_len, heads_after[i])
            if self._quest_meta is not None:  # tokens moved: every block of these slots changed
                self._quest_refresh(slots)

    # ------------------------------------------------------------------ prefix sharing

    def fork(self, slot: int) -> int:
        """A new slot holding exactly what `slot` holds (same lengths, per-head lengths, positions,
        key statistics, scores and Quest metadata) that shares its physical pages: every full page
        is mapped again, not copied; only the partly filled last page (group) is copied, so later
        appends to either slot never touch a shared page. O(pages) map calls. A shared page is
        released only when its last slot lets go of it (shrink, compact, free); a write below a
        slot's end (after shrink or compact) first gives that slot a private copy. stats() counts a
        shared page once (pages_shared, shared_mappings). Raw writes through kv() views or the torch
        ops on the cache's tensors bypass this and reach every slot that shares the page. All or
        nothing (MemoryError, RuntimeError when no slot is free). Not while slot has an open step."""
        with self._lock:
            slot = self._live(slot)
            self._no_open_step(slot, "fork")
            heads = self._head_lengths_np(slot)
            length = self._lengths_host[slot]
            new = self.alloc()
            try:
                self._m.share(
                    slot,
                    new,
                    length,
                    list(self._m.region_tokens(slot)),
                    self._region_min_tokens(heads),
                    self._stream(),
                )
            except BaseException:
                self._m.free(new)
                raise
            self._copy_slot_state(slot, new, length, heads)
            self._logical[new] = self._logical[slot]
            if self._quest_meta is not None:
                for meta in self._quest_meta:
                    meta[new] = meta[slot]
            self._shared.update((slot, new))
            return new

    def share_prefix(self, src: int, dst: int, n: int) -> None:
        """dst (a live slot that stores nothing) starts with the first n tokens of src: the pages
        wholly inside them are src's pages mapped again, the remainder is copied. src must not have
        been compacted (its stored tokens must be its positions). See fork() for how shared pages
        behave. All or nothing."""
        n = _int(n, "n")
        with self._lock:
            src, dst = self._live(src), self._live(dst)
            if src == dst:
                raise ValueError("share_prefix: src and dst are the same slot")
            self._no_open_step(src, "share_prefix from")
            self._no_open_step(dst, "share_prefix into")
            if self._lengths_host[dst] != 0:
                raise ValueError(f"share_prefix: slot {dst} stores {self._lengths_host[dst]} tokens; it must be empty")
            length = self._lengths_host[src]
            if not 0 <= n <= length:
                raise ValueError(f"share_prefix: n={n} must be in [0, length of slot {src}={length}]")
            if src in self._deficit or self._logical[src] != length:
                raise ValueError(
                    f"share_prefix: slot {src} was compacted (it stores {length} of {self._logical[src]} "
                    "positions), so its first n stored tokens are not a prefix; use fork()"
                )
            regions = [n] * self._m.num_regions
            self._m.share(src, dst, n, regions, regions, self._stream())
            heads = np.full((self.num_layers, self.num_kv_heads), n, dtype=np.int32)
            self._copy_slot_state(src, dst, n, heads)
            self._logical[dst] = n
            if self._scores is not None:
                self._scores[dst, :, :, n:] = 0.0
            if self._quest_meta is not None and n:
                self._quest_refresh([dst])  # the last block may be partial: from dst's own keys
            self._shared.update((src, dst))

    def shared_pages(self, slot: int) -> int:
        """Pages of slot that are mapped into another slot too (fork, share_prefix)."""
        with self._lock:
            return int(self._m.shared_pages(self._index(slot)))

    def _copy_slot_state(self, src: int, dst: int, length: int, heads: np.ndarray) -> None:
        self._set_lengths({dst: length})
        self._set_deficit(dst, length, heads)
        if self._key_means is not None:
            self._key_means[dst] = self._key_means[src]
            self._key_scales[dst] = self._key_scales[src]
            self._mean_set[dst] = self._mean_set[src]
        if self._scores is not None:
            self._scores[dst] = self._scores[src]

    def _group_end(self, n: int) -> int:
        """n rounded up to whole groups of int4_ch keys (n itself for other formats): a group's
        parameters live in the scale words of all its tokens."""
        return -(-n // self._group) * self._group

    def _region_min_tokens(self, heads: np.ndarray) -> List[int]:
        """Per manager region, the tokens every head of it stores (the shortest head): writes to the
        region (appends, compaction) land at or beyond them."""
        if self.layout == "token_major":
            return [int(heads.min())]
        if self.layout == "head_major":
            return self._per_head_regions(heads)
        return np.repeat(heads.min(axis=1).astype(np.int64), 2).tolist()

    def _region_tokens(self, heads: np.ndarray) -> List[int]:
        """Tokens each manager region must keep for per-(layer, kv head) stored counts [L, H]:
        token_major one region (the longest head of all), layer_major regions 2l (K) and 2l + 1 (V)
        of layer l (its longest head), head_major regions (2l + side) H + h (the head itself)."""
        if self.layout == "token_major":
            return [int(heads.max())]
        if self.layout == "head_major":
            return self._per_head_regions(heads)
        per_layer = heads.max(axis=1).astype(np.int64)
        return np.repeat(per_layer, 2).tolist()

    @staticmethod
    def _per_head_regions(heads: np.ndarray) -> List[int]:
        """head_major: per-(layer, kv head) counts [L, H] as one entry per region, region
        (2l + side) H + h (K and V of a head alike)."""
        h = heads.astype(np.int64)
        return np.stack([h, h], axis=1).reshape(-1).tolist()

    # ------------------------------------------------------------------ views

    def kv(self, layer: int, like: str = "torch", dequantize: bool = False):
        """Zero-copy (K, V) views of one layer, [max_batch, max_seq_len, num_kv_heads, head_dim] in
        the storage dtype (a quantized format: its codes, e.g. uint8 [..., head_dim / 2] for int4;
        the scales are kv_scales(layer)). like="cupy" gives CuPy arrays over the same memory (CUDA
        only; bfloat16 and fp8 are exposed as unsigned bit patterns). Only the first length tokens of
        a slot hold data, and only the mapped part of a slot may be touched.

        dequantize=True returns a dequantized copy instead, [max_batch, max_seq_len, num_kv_heads,
        head_dim] in the cache dtype, holding each live slot's first length tokens (zeros elsewhere)."""
        layer = _int(layer, "layer")
        if not 0 <= layer < self.num_layers:
            raise IndexOutOfRange(f"layer {layer} out of range [0, {self.num_layers})")
        if dequantize:
            if like != "torch":
                raise ValueError("kv(dequantize=True) returns torch tensors; drop like=")
            return self._dequantized(layer)
        if like == "torch":
            views = self._views[layer]
            if views is None:
                views = self._views[layer] = self._make_views(layer)
            return views
        if like == "cupy":
            return self._cupy_views(layer)
        raise ValueError(f"like must be 'torch' or 'cupy', got {like!r}")

    def kv_scales(self, layer: int) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Zero-copy views of the fp32 scale words of one layer's K and V, [max_batch, max_seq_len,
        num_kv_heads, scale_words] (vattn.formats says what the words are); None for a plain side."""
        layer = _int(layer, "layer")
        if not 0 <= layer < self.num_layers:
            raise IndexOutOfRange(f"layer {layer} out of range [0, {self.num_layers})")
        return self._ops_layer(layer)[2:4]

    @property
    def smooth_keys(self) -> bool:
        return self._key_means is not None

    def key_means(self, layer: int) -> Optional[torch.Tensor]:
        """The channel means subtracted from the stored keys of one layer (smooth_keys), float32
        [max_batch, num_kv_heads, head_dim]; None without smoothing. Stored key = key - mean."""
        if self._key_means is None:
            return None
        layer = _int(layer, "layer")
        if not 0 <= layer < self.num_layers:
            raise IndexOutOfRange(f"layer {layer} out of range [0, {self.num_layers})")
        return self._key_means[:, layer]

    def key_scales(self, layer: int) -> Optional[torch.Tensor]:
        """The per-channel key scales of one layer (smooth_keys), float32 [max_batch, num_kv_heads,
        head_dim]: stored key = (key - mean) / scale; vattn.attention multiplies q by scale."""
        if self._key_scales is None:
            return None
        self.key_means(layer)  # checks layer
        return self._key_scales[:, layer]

    def _smooth(self, layer: int, step: Step, k: torch.Tensor):
        """((k - mean) / scale with its slot's channel statistics, commit). A slot's first step takes
        them from its keys; they are stored only by commit(), which the caller runs once the append
        has succeeded (a refused append leaves them unset), and abort_step puts them back."""
        means = self._key_means[:, layer]
        scales = self._key_scales[:, layer]
        unset = [i for i, s in enumerate(step.slots) if not self._mean_set[s, layer]]
        pending = []
        if unset:
            off = 0
            offsets = []
            for n in step.new_tokens:
                offsets.append(off)
                off += n
            for i in unset:
                s, n = step.slots[i], step.new_tokens[i]
                if n == 0:
                    continue
                x = k[offsets[i] : offsets[i] + n].float()
                mu = x.mean(0)
                # fp8 keys keep a relative step per element, so a shift buys them little, and a mean
                # of 1-3 tokens cost them (SmolLM2, first steps of 1 / 2 tokens: +0.67 / +0.54%
                # perplexity against +0.08 / +0.09% unsmoothed); int8 / int4 keys gain from it even
                # there (+0.14 / +0.05% against +0.33 / +0.09%).
                if n < _SCALE_MIN_TOKENS and self.k_format.name == "fp8_e4m3":
                    mu = torch.zeros_like(mu)
                # Channel spread, normalized to geometric mean 1 (only ratios matter), from a first
                # step of _SCALE_MIN_TOKENS or more: from 2 or 3 tokens a channel's range is one or
                # two differences, near 0 in some channels, whose keys the division then blows up
                # until they set every later key's quantization step (SmolLM2, 2- and 3-token first
                # steps: int8 +1.14% / fp8 +0.70% perplexity against +0.09% / +0.13% without the
                # scales; bench/RESULTS.md). The mean alone is still subtracted.
                if n >= _SCALE_MIN_TOKENS:
                    spread = (x - mu).abs().amax(0).clamp_min(1e-6)
                    spread = spread.sqrt()  # half the channel range moves into q (SmoothQuant's alpha 0.5)
                    sc = spread / spread.log().mean(-1, keepdim=True).exp()
                else:
                    sc = torch.ones_like(mu)
                pending.append((s, mu, sc))
        if pending:  # this step's rows read the new statistics; the cache's stay as they are for now
            means, scales = means.clone(), scales.clone()
            for s, mu, sc in pending:
                means[s], scales[s] = mu, sc
        rows = step.token_slots
        out = ((k.float() - means.index_select(0, rows)) / scales.index_select(0, rows)).to(k.dtype)

        def commit():
            for s, mu, sc in pending:
                old = (self._key_means[s, layer].clone(), self._key_scales[s, layer].clone())
                self._key_means[s, layer], self._key_scales[s, layer] = mu, sc
                self._mean_set[s, layer] = True
                step._smoothed.append((s, layer, old))

        return out, commit

    def _unsmooth(self, step: Step) -> None:
        """abort_step: the statistics the step's appends took are unset again, as before begin_step."""
        for s, layer, (mu, sc) in reversed(step._smoothed):
            self._key_means[s, layer], self._key_scales[s, layer] = mu, sc
            self._mean_set[s, layer] = False
        step._smoothed.clear()

    def _dequantized(self, layer: int) -> Tuple[torch.Tensor, torch.Tensor]:
        from .reference import dequantize

        k, v = self.kv(layer)
        ks, vs = self.kv_scales(layer)
        shape = (self.max_batch, self.max_seq_len, self.num_kv_heads, self.head_dim)
        out = []
        for codes, scales, fmt in ((k, ks, self.k_format), (v, vs, self.v_format)):
            dense = torch.zeros(shape, dtype=self.dtype, device=self.device)
            for s in self.live_slots():
                # This layer's longest head: after a per-layer compaction (layer_major) the pages of a
                # shorter layer past it are unmapped (on CUDA, not even readable); in head_major each
                # head's own length, for the same reason.
                lens = self._head_lengths_np(s)[layer]
                parts = (
                    [(slice(h, h + 1), int(lens[h])) for h in range(len(lens))]
                    if self.layout == "head_major"
                    else [(slice(None), int(lens.max()))]
                )
                for hs, n in parts:
                    if n == 0:
                        continue
                    if fmt.name == "int4_ch":  # parameters in the words of the row's whole groups
                        dense[s, :n, hs] = dequantize(
                            codes[s, :n, hs], scales[s, :, hs], fmt.name, self.head_dim, self.dtype
                        )
                    elif fmt.quantized:
                        dense[s, :n, hs] = dequantize(
                            codes[s, :n, hs], scales[s, :n, hs], fmt.name, self.head_dim, self.dtype
                        )
                    else:
                        dense[s, :n, hs] = codes[s, :n, hs]
                n = int(lens.max())
                if fmt is self.k_format and codes is k and self._key_means is not None:
                    kd = dense[s, :n].float() * self._key_scales[s, layer] + self._key_means[s, layer]
                    dense[s, :n] = kd.to(self.dtype)
                for h in range(len(lens)):  # a head compacted below the longest: zeros past its tokens
                    if lens[h] < n:
                        dense[s, int(lens[h]) : n, h] = 0
            out.append(dense)
        return out[0], out[1]

    def stats(self) -> "CacheStats":
        """reserved_bytes, mapped_bytes, used_bytes, page_bytes, pages_mapped, pages_pooled, and
        more: pages_created / physical_bytes (mapped + pooled), live_mapped_bytes, idle_bytes,
        resident_bytes (measured by the backend), peak_mapped_bytes, live_slots and call counts;
        token_bytes and the K / V storage formats with their effective bits per element (scales
        included). A dict whose keys also read as attributes (stats()["used_bytes"] or
        stats().used_bytes); a snapshot, not updated by later calls."""
        with self._lock:
            out = CacheStats(self._m.stats())
            if self._deficit:  # compacted slots: the manager counts each at its longest head
                # A record holds _record_heads heads (one in head_major): each (layer, head) its share.
                missing = sum(int(d.sum()) for d in self._deficit.values())
                out["used_bytes"] -= missing * self._record_pair // self._record_heads
        out["token_bytes"] = self.token_bytes
        out["k_format"], out["v_format"] = self.k_format.name, self.v_format.name
        out["k_bits_per_element"] = self.k_format.bits_per_element(self.head_dim)
        out["v_bits_per_element"] = self.v_format.bits_per_element(self.head_dim)
        return out

    def wait_background(self) -> None:
        """Waits until the background mapping thread (if any) has nothing left to do."""
        self._m.wait_background_idle()

    def __copy__(self):
        raise TypeError(
            "a vattn.KVCache owns its memory and cannot be copied (a shallow copy would share and then "
            "release it); fork() gives a request a copy-on-write copy of another's tokens"
        )

    def close(self) -> None:
        """Drops the cache's native state: its virtual range and physical pages are released as
        soon as no view returned by kv() is alive any more. Any later call raises RuntimeError."""
        with self._lock:
            if self._manager is None:
                return
            for step in list(self._open_steps.values()):
                self._wait_writes(step)
            _guard.unregister(self)
            self._manager = None
            self._views = [None] * self.num_layers
            self._ops_layers = [None] * self.num_layers
            self._layer_view_keys = None
            self._regions = {}
            self._open = {}
            self._open_steps = {}
            self._trusted_positions = {}

    @property
    def closed(self) -> bool:
        return self._manager is None

    @property
    def _m(self):
        if self._manager is None:
            raise RuntimeError("this KVCache is closed")
        return self._manager

    def _inject_failure(self, kind: str, n: int) -> None:
        """Test hook: the n-th next page creation (kind="create") or page map ("map") fails with a
        RuntimeError; "none" clears it. Used to check that failed calls roll back."""
        self._m._inject_failure(kind, _int(n, "n"))

    def __repr__(self) -> str:
        return (
            f"KVCache(num_layers={self.num_layers}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
            f"max_batch={self.max_batch}, max_seq_len={self.max_seq_len}, dtype={self.dtype}, "
            f"layout={self.layout!r}, device={str(self.device)!r}, page_bytes={self.page_bytes})"
        )

    # ------------------------------------------------------------------ internals

    def _index(self, slot) -> int:
        slot = _int(slot, "slot")
        if not 0 <= slot < self.max_batch:
            raise IndexOutOfRange(f"slot {slot} out of range [0, {self.max_batch})")
        return slot

    def _live(self, slot) -> int:
        slot = self._index(slot)
        if not self._m.is_live(slot):
            raise ValueError(f"slot {slot} is not allocated (never allocated or already freed)")
        return slot

    def _no_open_step(self, slot: int, what: str) -> None:
        if slot in self._open:
            raise RuntimeError(f"cannot {what} slot {slot} while it has an open step; call end_step first")

    def _to_device(self, host: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cpu":
            return host
        # Pinned + non_blocking: no host sync; the caching host allocator keeps the pinned block
        # alive until the copy has run, and `host` is never written again.
        return host.pin_memory().to(self.device, non_blocking=True)

    def _stream(self) -> int:
        """The current CUDA stream of the cache's device as an int (0 on the host backend)."""
        if self.device.type == "cpu":
            return 0
        return torch.cuda.current_stream(self.device).cuda_stream

    def _record_use(self) -> None:
        """Tells the manager that work on the cache's memory was enqueued on the current stream, so
        that unmapping (shrink, free, pages taken from free slots) waits for it with an event instead
        of synchronizing the device. Work on other streams the cache never saw is the caller's to
        finish before shrink / free (as with any memory torch frees)."""
        if self.device.type != "cpu":
            self._m.record_stream(torch.cuda.current_stream(self.device).cuda_stream)

    def _set_lengths(self, changes: Dict[int, int]) -> None:
        host = self._lengths_host
        if self.device.type == "cpu":
            # Through a numpy view of the same memory: an element store instead of an index_put op.
            lengths_np = self._lengths_np
            for s, n in changes.items():
                host[s] = n
                lengths_np[s] = n
        else:
            for s, n in changes.items():
                host[s] = n
            # One asynchronous copy from pinned memory straight into the tensor (the caching host
            # allocator keeps the pinned block until the copy has run, as in _to_device).
            self._lengths.copy_(torch.tensor(host, dtype=torch.int32).pin_memory(), non_blocking=True)

    def _region(self, r: int) -> torch.Tensor:
        """Region r as a 1-D uint8 tensor (not a copy), starting at the region's guard page: the
        region's own bytes begin guard_bytes in (_strided adds it). Torch asks the CUDA driver about
        a tensor's first address when it builds it (cudaPointerGetAttributes), which fails on an
        unmapped page, e.g. when slot 0 is free or was never used; the manager keeps one physical
        page mapped at every region's guard on device backends, so building views never depends on
        what the slots hold. (Host: the guard is read-only zero memory, enough for frombuffer.)"""
        t = self._regions.get(r)
        if t is None:
            # head_major: a layer's K (or V) view spans the regions of all its heads.
            count = self.num_kv_heads if self.layout == "head_major" else 1
            if self.device.type == "cpu":
                buf = self._m.region_buffer(r, count)
                self._memory_owners.append(weakref.ref(buf))  # _guard: the memory lives while buf does
                t = torch.frombuffer(buf, dtype=torch.uint8)
            else:
                size = self._m.region_span_bytes(r, count)
                rng = _CudaRange(self._m, self._m.region_guard_base(r), (size,), None, "|u1")
                self._memory_owners.append(weakref.ref(rng))
                t = torch.as_tensor(rng, device=self.device)
            self._regions[r] = t
        return t

    def _geometry(self, layer: int, fmt: "formats.KVFormat", which: str):
        """(region, byte offset, shape, element strides, element size) of one layer's K or V data,
        and the same for its scale words (None for plain formats): record layout of formats.py
        over the manager's byte strides."""
        lv = self._m.layer_view(layer)
        region, offset = lv[which + "_region"], lv[which + "_offset_bytes"]
        row, tok = lv["stride_row_bytes"], lv["stride_tok_bytes"]
        heads, dim = self.num_kv_heads, self.head_dim
        # head_major: each head is its own region (records of one head), a fixed spacing apart.
        head_step = lv["stride_head_bytes"]
        record_heads = 1 if head_step else heads
        data_head = head_step or fmt.data_bytes(dim)
        scale_head = head_step or fmt.scale_words * 4
        isz = _itemsize(fmt.storage_dtype)
        data = (
            region,
            offset,
            (self.max_batch, self.max_seq_len, heads, fmt.storage_elems(dim)),
            (row // isz, tok // isz, data_head // isz, 1),
            isz,
        )
        scales = None
        if fmt.quantized:
            scales = (
                region,
                offset + fmt.scale_offset(record_heads, dim),
                (self.max_batch, self.max_seq_len, heads, fmt.scale_words),
                (row // 4, tok // 4, scale_head // 4, 1),
                4,
            )
        return data, scales

    def _strided(self, geo, dtype: torch.dtype) -> torch.Tensor:
        region, offset, shape, strides, isz = geo
        return self._region(region).view(dtype).as_strided(shape, strides, (self._m.guard_bytes + offset) // isz)

    def _make_views(self, layer: int) -> Tuple[torch.Tensor, torch.Tensor]:
        out = []
        for which, fmt in (("k", self.k_format), ("v", self.v_format)):
            data, _ = self._geometry(layer, fmt, which)
            out.append(self._strided(data, fmt.storage_dtype))
        return out[0], out[1]

    def _make_scale_views(self, layer: int):
        out = []
        for which, fmt in (("k", self.k_format), ("v", self.v_format)):
            _, scales = self._geometry(layer, fmt, which)
            out.append(None if scales is None else self._strided(scales, torch.float32))
        return out[0], out[1]

    def _is_layer_view(self, t: torch.Tensor) -> bool:
        """Whether t is one of the cache's whole per-layer views (kv(), kv_scales(): address, shape,
        strides and dtype), the only views a step's own index tensors are trusted with."""
        keys = self._layer_view_keys
        if keys is None:
            keys = set()
            for layer in range(self.num_layers):
                for x in self._ops_layer(layer)[:4]:
                    if x is not None:
                        keys.add((x.data_ptr(), tuple(x.shape), x.stride(), x.dtype))
            self._layer_view_keys = keys
        return (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype) in keys

    def _ops_layer(self, layer: int):
        """(k, v, k_scale, v_scale, geometry) of one layer for vattn.append_kv / vattn.attention:
        the kv() views, the scale views and their checked geometry (_checks._KVGeom), made once. The
        views' shape, strides and addresses never change (the virtual range is fixed), so checking
        them once per layer is enough."""
        entry = self._ops_layers[layer]
        if entry is None:
            k, v = self.kv(layer)
            ks, vs = self._make_scale_views(layer)
            entry = self._ops_layers[layer] = (k, v, ks, vs, _check_cache(k, v, self.device, ks, vs))
        return entry

    def _cupy_views(self, layer: int):
        if self.device.type != "cuda":
            raise ValueError("kv(like='cupy') needs a CUDA cache (device='cuda')")
        try:
            import cupy
        except ImportError:
            raise ImportError(
                "kv(like='cupy') needs CuPy: pip install cupy-cuda12x (or the build for your CUDA)"
            ) from None
        out = []
        guard = self._m.guard_bytes
        for which, fmt in (("k", self.k_format), ("v", self.v_format)):
            (region, offset, shape, strides, isz), _ = self._geometry(layer, fmt, which)
            byte_strides = tuple(st * isz for st in strides)
            # Like _region: CuPy queries the first address of the memory it wraps, so wrap the region
            # from its (always mapped) guard page, then cut the strided view out of it.
            size = guard + self._m.region_bytes(region)
            rng = _CudaRange(self._m, self._m.region_guard_base(region), (size,), None, "|u1")
            self._memory_owners.append(weakref.ref(rng))
            start = guard + offset
            with cupy.cuda.Device(self.device.index):
                whole = cupy.asarray(rng)
                flat = whole[start : start + (size - start) // isz * isz].view(cupy.dtype(fmt.cupy_typestr))
                out.append(cupy.lib.stride_tricks.as_strided(flat, shape=shape, strides=byte_strides))
        return tuple(out)
