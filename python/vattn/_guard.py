"""Which tensors live inside a vattn.KVCache's virtual memory, and whether a raw op's writes there
land on mapped pages.

The unmapped part of a cache's reservation reads as zeros (host backend: the kernel's zero page)
but faults on a write, so a raw op (`vattn.ops.append_kv_raw`, `torch.ops.vattn.append_kv`) that is
given the cache's own views with a position nobody mapped must raise instead of killing the
process. `vattn.append_kv(cache, layer, step, ...)` never needs the check: `begin_step` mapped
everything its step writes, and the step's own index tensors are recognised as trusted.
"""

from __future__ import annotations

import threading
import weakref
from typing import List, Optional, Tuple

import torch

_lock = threading.Lock()
_regions: List[Tuple[int, int, "weakref.ref"]] = []  # (base, end, cache) of every open cache
# Ranges of caches closed (or collected) while tensors over their memory live on: kv()'s views keep
# the reservation, not the cache's knowledge of what is mapped, so nothing may be written there.
# (base, end, weak references to the objects whose lifetime is the memory's: RegionBuffer on the
# host, _CudaRange on a device; the entry goes once they are all gone and the range may be reused.)
_retired: List[Tuple[int, int, List["weakref.ref"]]] = []


class _Closed:
    """owner()'s answer for memory of a closed KVCache."""

    def __repr__(self) -> str:
        return "<memory of a closed vattn.KVCache>"


CLOSED = _Closed()


def register(cache) -> None:
    """Records cache's ranges. cache._memory_owners collects weak references to the objects that
    keep its memory alive (cache._region adds them); when the cache is closed or collected its
    ranges move to _retired for as long as any of them lives."""
    m = cache._m
    ref = weakref.ref(cache)
    ranges = [
        (int(m.region_base(r)), int(m.region_base(r)) + int(m.region_bytes(r))) for r in range(int(m.num_regions))
    ]
    cache._memory_owners = owners = []
    with _lock:
        _regions[:] = [e for e in _regions if e[2]() is not None]
        _regions.extend((base, end, ref) for base, end in ranges)
    # Runs once: at close (unregister) or when the cache is collected without close.
    cache._guard_retire = weakref.finalize(cache, _retire, ref, ranges, owners)


def _alive(owners) -> bool:
    """Whether any object keeping a retired range's memory is still alive."""
    return any(o() is not None for o in owners)


def _retire(ref, ranges, owners) -> None:
    with _lock:
        _regions[:] = [e for e in _regions if e[2] is not ref and e[2]() is not None]
        _retired[:] = [e for e in _retired if _alive(e[2])]
        if _alive(owners):
            _retired.extend((base, end, owners) for base, end in ranges)


def retired_ranges() -> int:
    """How many ranges of closed caches tensors still keep alive (entries whose memory is gone are
    dropped here)."""
    with _lock:
        _retired[:] = [e for e in _retired if _alive(e[2])]
        return len(_retired)


def unregister(cache) -> None:
    retire = getattr(cache, "_guard_retire", None)
    if retire is not None:
        retire()


def owner(t: Optional[torch.Tensor]):
    """The open KVCache whose reservation holds t's first element; CLOSED when that memory
    belongs to a closed cache that tensors still keep alive; else None."""
    if t is None or not (_regions or _retired):
        return None
    p = t.data_ptr()
    for base, end, ref in _regions:
        if base <= p < end:
            c = ref()
            if c is not None and not c.closed:
                return c
    for base, end, owners in _retired:
        if base <= p < end and _alive(owners):
            return CLOSED
    return None


def refuse_closed(op: str, name: str) -> None:
    raise ValueError(
        f"{op}: {name} lies in the memory of a closed vattn.KVCache (its views keep the memory alive, not "
        "what is mapped there), so nothing can be written into it"
    )


def _token_addrs(
    t: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor, head: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, int]:
    """int64 start addresses of the (row, position) records of a [rows, seq, heads, elems] view and
    the bytes each spans. Usually one address per entry spanning all heads; with `head` (one kv
    head per entry) one vector each. A view whose heads lie further apart than its tokens
    (layout="head_major": a region per head) gets one address per (entry, head), entry-major, so
    entry i is address i // (addrs.numel() // rows.numel())."""
    isz = t.element_size()
    s_row, s_tok, s_head, _ = t.stride()
    addrs = t.data_ptr() + (rows * s_row + pos * s_tok) * isz
    if head is not None:
        return (addrs + head * s_head * isz).contiguous(), t.shape[3] * isz
    if s_head > s_tok:
        heads = torch.arange(t.shape[2], dtype=torch.int64) * (s_head * isz)
        return (addrs[:, None] + heads[None, :]).reshape(-1).contiguous(), t.shape[3] * isz
    span = ((t.shape[2] - 1) * s_head + t.shape[3]) * isz
    return addrs.contiguous(), span


def _physical(block_table: torch.Tensor, block_size: int, num_blocks: int, rows: torch.Tensor, pos: torch.Tensor):
    """(physical block, offset) of the view's (row, position) pairs; indices out of range are
    clamped and block ids outside [0, num_blocks) read as block 0, as the kernels do."""
    table = block_table.to("cpu", torch.int64)
    if table.numel() == 0:
        return torch.zeros_like(rows), pos % block_size
    r = rows.clamp(0, table.shape[0] - 1)
    blocks = table[r, (pos // block_size).clamp(0, table.shape[1] - 1)]
    return torch.where((blocks >= 0) & (blocks < num_blocks), blocks, 0), pos % block_size


def check_append(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_scale: Optional[torch.Tensor],
    v_scale: Optional[torch.Tensor],
    row_ids: torch.Tensor,
    positions: torch.Tensor,
    head_positions: Optional[torch.Tensor] = None,
    block_table: Optional[torch.Tensor] = None,
    block_size: int = 0,
) -> None:
    """Raises ValueError when an append would write outside the mapped pages of a KVCache.
    Tensors outside every cache, and the index tensors of a cache's open step, pass at once.
    block_table (a paged view, block_size tokens a block): rows / positions are translated to the
    physical blocks and offsets the append writes (ids out of range clamped, as the kernels do;
    the native op refuses them)."""
    cache = owner(k_cache) or owner(v_cache)
    if cache is None or row_ids.numel() == 0:
        return
    if cache is CLOSED:
        refuse_closed("append_kv", "k_cache" if owner(k_cache) is CLOSED else "v_cache")
    trusted = cache._trusted_positions.get(positions.data_ptr())
    if (
        trusted is not None
        and block_table is None
        and row_ids.data_ptr() == trusted[0]
        and row_ids.dtype == positions.dtype == torch.int32
        and row_ids.is_contiguous()
        and positions.is_contiguous()
        and positions.numel() <= trusted[1]
        and (head_positions is None or (head_positions.data_ptr() in trusted[2] and head_positions.is_contiguous()))
        and trusted[3]._intact()
        and all(t is None or cache._is_layer_view(t) for t in (k_cache, v_cache, k_scale, v_scale))
    ):
        # an open step's own index tensors, unchanged, on the cache's whole layer views: begin_step
        # mapped every position they name
        return
    if positions.is_cuda and torch.cuda.is_current_stream_capturing():
        return  # cannot read the indices while capturing; documented in KVCache.kv
    rows = row_ids.to("cpu", torch.int64)
    pos = positions.to("cpu", torch.int64)
    heads = None
    if head_positions is not None:  # one write per (token, head), each at its own position
        heads = k_cache.shape[2]
        rows = rows.repeat_interleave(heads)
        pos = head_positions.to("cpu", torch.int64).reshape(-1)
    if block_table is not None:
        rows, pos = _physical(block_table, block_size, k_cache.shape[0], rows, pos)
    # An int4_ch side (uint8 codes with 4-word scales) re-encodes the whole group of each written
    # position, parameter words up to the group's last token included: check that token instead
    # (a slot's pages are mapped from token 0 on, so the group's earlier tokens are mapped too).
    grouped = {}
    for codes, sc in ((k_cache, k_scale), (v_cache, v_scale)):
        if sc is not None and codes.dtype == torch.uint8 and sc.dim() == 4 and sc.shape[-1] == 4:
            g = codes.shape[3]  # G = head_dim / 2 = codes per vector
            grouped[id(codes)] = grouped[id(sc)] = pos - pos % g + (g - 1)
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("k_scale", k_scale), ("v_scale", v_scale)):
        if t is None or owner(t) is not cache:
            continue
        if heads is not None:  # rows / pos are per (token, head), head-minor
            head = torch.arange(heads).repeat(rows.numel() // heads)
            addrs, span = _token_addrs(t, rows, grouped.get(id(t), pos), head)
        else:
            addrs, span = _token_addrs(t, rows, grouped.get(id(t), pos))
        bad = int(cache._m.first_unmapped(addrs.data_ptr(), addrs.numel(), span))
        if bad >= 0:
            bad //= addrs.numel() // rows.numel()
            raise ValueError(
                f"append_kv: token {bad} (row {int(rows[bad])}, position {int(pos[bad])}) would be written into "
                f"unmapped memory of a vattn.KVCache ({name}); map it first (cache.reserve / cache.begin_step) "
                "or use vattn.append_kv(cache, layer, step, k, v)"
            )
