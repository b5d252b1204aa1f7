"""The one semantic definition of every vattn op, as small pure-PyTorch functions.

The CPU (cuda/cpu/) and CUDA (cuda/kernels/) implementations are tested against these. They are
written for clarity, not speed: loops over batch rows and KV heads, dense math per head.
`compute_dtype` selects the arithmetic precision (float64 in tests; a low precision gives the
"what would PyTorch itself get wrong" baseline of FlashAttention-style tolerances).

Conventions (cuda/include/vattn/params.h):
  caches    k_cache, v_cache: [rows, seq, kv_heads, head_dim], any strides
  row_ids   batch row b reads cache row row_ids[b] (b when None)
  seqlens_k kv length L of batch row b, already including this step's new tokens;
            head_seqlens_k [batch, kv_heads] overrides it per KV head
  queries   decode: one query per row (cu_seqlens_q None); prefill: row b owns
            q[cu_seqlens_q[b]:cu_seqlens_q[b+1]]; query i of n_b sits at position L - n_b + i
  mask      query at position p sees key j iff p - window_left <= j <= p (window_left < 0: no
            left bound); a query that sees no key outputs zeros with lse = -inf
  logits    scale * q.k (scale defaults to 1/sqrt(head_dim)), then softcap * tanh(x / softcap)
            when softcap > 0; LSE is in natural log
  GQA       q head h uses kv head h // (num_q_heads // num_kv_heads)
  scores    optional per-token attention scores for eviction policies (H2O, TOVA, SnapKV): a
            float buffer [>= cache rows, kv_heads, >= seq] indexed by the cache row; see attention()
  paged     block_table [rows, blocks per row] (vLLM's paged cache, cuda/include/vattn/kv_paging.h):
            the caches (and scales) are physical blocks [num_blocks, block_size, kv_heads, ...] and
            token t of row r lives in block block_table[r, t // block_size] at offset
            t % block_size. Attention reads the view gather_paged() builds; append writes the
            physical slots (paged_slots) of its rows and positions. Blocks may be shared by rows
            (prefix caching) and appear in any order.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

__all__ = [
    "append_kv",
    "attention",
    "merge_states",
    "quantize",
    "dequantize",
    "compact_kv",
    "block_minmax",
    "quest_select",
    "sparse_decode_attention",
    "gather_paged",
    "paged_slots",
]

# ----------------------------------------------------------------------------- KV formats
# The exact definition of the quantized KV formats (cuda/include/vattn/quant.h computes the same
# bits). Every format stores one (token, kv_head) vector of head_dim values as codes plus fp32
# scale words. Common rules, all in float32 arithmetic:
#   - inputs are converted to float32; fp32 subnormals count as (signed) zero, NaN as 0;
#     +-inf saturate to the largest code of their sign and do not enter the scale;
#   - a vector (int4: a group) whose largest finite magnitude (int4: range) is below _TINY is
#     stored as zeros with scale 0 (int4: codes 0, so it decodes to its min);
#   - rounding is to nearest, ties to even.
# fp8_e4m3: scale = amax / 448; code = e4m3fn(x * (448 / amax)) (saturating); x ~ e4m3 * scale.
# int8:     scale = amax / 127; code = round(x * (127 / amax)) in [-127, 127]; x ~ code * scale.
# int4:     asymmetric over the whole vector: scale = (max - min) / 15, zero = min,
#           code = round((x - min) * (15 / (max - min))) in [0, 15]; x ~ code * scale + zero; two codes
#           per byte, element 2i in the low nibble; +inf -> 15, -inf -> 0; words = (scale, zero).
# int4_ch:  keys per channel (KIVI): asymmetric int4 as above, but the min / max are taken per
#           (kv_head, channel) over a group of G = head_dim // 2 consecutive tokens of one row (group
#           g holds tokens g*G .. g*G + G - 1). The group's 2 * head_dim fp32 parameters -- scale of
#           channel c at index c, zero (min) of channel c at index head_dim + c -- are spread over the
#           4 scale words of its G tokens: parameter i is word i % 4 of token g*G + i // 4. A group
#           that is not full yet (the row's last) is quantized over the tokens it holds; an append
#           into it re-encodes the whole group from its old tokens' dequantized values and the new
#           tokens (so the codes of a partial group change as it fills; a full group never changes).
#           Its parameter words live in tokens past the row's length: a cache maps whole groups.

_TINY = 1.0e-18
_F32_MIN_NORMAL = 2.0**-126


def _clean(x: torch.Tensor) -> torch.Tensor:
    x = x.to(torch.float32)
    x = torch.where(torch.isnan(x), torch.zeros_like(x), x)
    return torch.where(x.abs() < _F32_MIN_NORMAL, x * 0.0, x)  # x * 0 keeps the sign of a subnormal


def _finite_amax(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x.abs(), torch.zeros_like(x)).amax(dim=-1, keepdim=True)


def _sym(x: torch.Tensor, qmax: float):
    """(scaled values before rounding/conversion, scale [..., 1]) of the symmetric formats."""
    x = _clean(x)
    amax = _finite_amax(x)
    ok = amax >= _TINY
    inv = torch.where(ok, torch.tensor(qmax, dtype=torch.float32) / torch.where(ok, amax, 1.0), 0.0)
    scaled = torch.where(torch.isfinite(x), x * inv, torch.sign(x) * qmax)
    scaled = torch.where(ok, scaled, torch.zeros_like(scaled))
    scale = torch.where(ok, amax / torch.tensor(qmax, dtype=torch.float32), 0.0)
    return scaled, scale


def quantize(x: torch.Tensor, kv_format: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Quantizes vectors x [..., head_dim] into (codes [..., storage elems], scales [..., words])."""
    if kv_format == "fp8_e4m3":
        scaled, scale = _sym(x, 448.0)
        return scaled.to(torch.float8_e4m3fn), scale
    if kv_format == "int8":
        scaled, scale = _sym(x, 127.0)
        return torch.round(scaled).clamp(-127, 127).to(torch.int8), scale
    if kv_format == "int4":
        return _int4(x)
    raise ValueError(f"quantize: {kv_format!r} is not a quantized format")


def _int4(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    c, scale, lo = _int4_codes(x)
    packed = c[..., 0::2] | (c[..., 1::2] << 4)
    return packed, torch.cat([scale, lo], dim=-1)


def _int4_codes(x: torch.Tensor):
    """(codes [..., n] uint8 unpacked, scale [..., 1], zero [..., 1]) of asymmetric int4 over the last dim."""
    x = _clean(x)
    fin = torch.isfinite(x)
    lo = torch.where(fin, x, torch.full_like(x, float("inf"))).amin(dim=-1, keepdim=True)
    hi = torch.where(fin, x, torch.full_like(x, float("-inf"))).amax(dim=-1, keepdim=True)
    none = lo > hi  # no finite element
    lo = torch.where(none, 0.0, lo) + 0.0  # + 0.0 turns -0 into +0 (a min of signed zeros may be either)
    hi = torch.where(none, 0.0, hi) + 0.0
    rng = hi - lo
    flat = ~(rng >= _TINY)
    inv = torch.where(flat, 0.0, torch.tensor(15.0, dtype=torch.float32) / torch.where(flat, 1.0, rng))
    codes = torch.round((x - lo) * inv).clamp(0, 15)
    codes = torch.where(flat, torch.zeros_like(codes), codes)
    codes = torch.where(fin, codes, torch.where(x > 0, 15.0, 0.0))
    c = codes.to(torch.uint8)
    scale = torch.where(flat, 0.0, rng / torch.tensor(15.0, dtype=torch.float32))
    return c, scale, lo


INT4_CH_WORDS = 4  # fp32 scale words per (token, kv_head) of int4_ch


def int4_ch_group(head_dim: int) -> int:
    """Tokens per int4_ch parameter group (2 * head_dim parameters in 4 words per token)."""
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"int4_ch needs an even head_dim, got {head_dim}")
    return head_dim // 2


def quantize_int4_ch_group(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """One int4_ch group: x [m, head_dim] (1 <= m <= G tokens, oldest first) -> (packed codes
    [m, head_dim // 2] uint8, parameter words [G, 4] fp32: the scales then the zeros, see above)."""
    m, d = x.shape
    g = int4_ch_group(d)
    if not 1 <= m <= g:
        raise ValueError(f"an int4_ch group holds 1..{g} tokens, got {m}")
    c, scale, zero = _int4_codes(x.transpose(0, 1))  # [d, m]: per channel over the group's tokens
    c = c.transpose(0, 1).contiguous()  # [m, d]
    packed = c[:, 0::2] | (c[:, 1::2] << 4)
    words = torch.cat([scale[:, 0], zero[:, 0]]).reshape(g, INT4_CH_WORDS)
    return packed, words


def dequantize_int4_ch(codes: torch.Tensor, words: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """int4_ch values of one row and kv head: codes [n, head_dim // 2] of tokens 0 .. n - 1 and the
    scale words [>= ceil(n / G) * G, 4] of the same row and head -> [n, head_dim]."""
    n = codes.shape[0]
    d = codes.shape[-1] * 2
    g = int4_ch_group(d)
    lo, hi = (codes & 0xF).to(torch.float32), (codes >> 4).to(torch.float32)
    c = torch.stack([lo, hi], dim=-1).flatten(-2)  # [n, d]
    ng = -(-n // g)
    if ng == 0:
        return c.to(dtype)  # no token: [0, head_dim]
    if words.shape[0] < ng * g:
        raise ValueError(f"int4_ch: {n} tokens need the scale words of {ng * g} tokens, got {words.shape[0]}")
    p = words[: ng * g].to(torch.float32).reshape(ng, 2 * d)
    scale = p[:, :d].repeat_interleave(g, 0)[:n]
    zero = p[:, d:].repeat_interleave(g, 0)[:n]
    return (c * scale + zero).to(dtype)


def dequantize(
    codes: torch.Tensor,
    scales: torch.Tensor,
    kv_format: str,
    head_dim: Optional[int] = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The values a quantized vector stands for: [..., head_dim] in dtype. int4_ch (a per-group
    format): codes [..., n, kv_heads, head_dim // 2] are tokens 0 .. n - 1 of their rows and scales
    [..., >= ceil(n / G) * G, kv_heads, 4] those rows' scale words."""
    if kv_format == "int4_ch":
        if codes.numel() == 0:  # no token (or no row / head): nothing to dequantize
            return torch.zeros(*codes.shape[:-1], codes.shape[-1] * 2, dtype=dtype)
        lead = codes.shape[:-3]
        c = codes.reshape(-1, *codes.shape[-3:])
        w = scales.reshape(-1, *scales.shape[-3:])
        out = torch.stack(
            [
                torch.stack([dequantize_int4_ch(c[r, :, h], w[r, :, h], dtype) for h in range(c.shape[2])], 1)
                for r in range(c.shape[0])
            ]
        )
        return out.reshape(*lead, *out.shape[1:])
    if kv_format in ("fp8_e4m3", "int8"):
        return (codes.to(torch.float32) * scales[..., :1]).to(dtype)
    if kv_format == "int4":
        lo, hi = (codes & 0xF).to(torch.float32), (codes >> 4).to(torch.float32)
        c = torch.stack([lo, hi], dim=-1).flatten(-2)
        return (c * scales[..., :1] + scales[..., 1:2]).to(dtype)
    raise ValueError(f"dequantize: {kv_format!r} is not a quantized format")


# ----------------------------------------------------------------------------- paged views


def gather_paged(cache: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """The contiguous view of a paged cache: cache [num_blocks, block_size, ...] (K, V, codes or scale
    words) and block_table [rows, blocks per row] -> a copy [rows, blocks per row * block_size, ...]
    whose row r, token t is cache[block_table[r, t // block_size], t % block_size]. A block id outside
    [0, num_blocks) reads block 0, as the CUDA kernels do (the ops never read tokens past a length,
    and the CPU ops refuse an id out of range below one). Quantized storage is gathered as bytes, so
    gather codes and scales apart, then dequantize()."""
    nb, bs = cache.shape[0], cache.shape[1]
    ids = block_table.to(device=cache.device, dtype=torch.long)
    ids = torch.where((ids >= 0) & (ids < nb), ids, 0)
    src = cache.view(torch.uint8) if cache.dtype in (torch.float8_e4m3fn, torch.int8) else cache
    out = src[ids].reshape(ids.shape[0], ids.shape[1] * bs, *cache.shape[2:])
    return out.view(cache.dtype) if src is not cache else out


def paged_slots(block_table: torch.Tensor, block_size: int, row_ids: torch.Tensor, positions: torch.Tensor):
    """(physical block, offset) of the view's (row, position) pairs: block_table[row, pos // block_size]
    and pos % block_size (long tensors like positions; no range checks)."""
    pos = positions.long()
    rows = row_ids.long().to(pos.device)
    if pos.dim() == 2:
        rows = rows[:, None].expand_as(pos)
    table = block_table.to(device=pos.device, dtype=torch.long)
    return table[rows, pos // block_size], pos % block_size


def _append_paged(k_cache, v_cache, k, v, row_ids, positions, k_scale, v_scale, k_format, v_format, head_positions,
                  block_table) -> None:  # fmt: skip
    """append_kv through a block table: per kv head, the contiguous append into the physical cache
    [num_blocks, block_size, ...] at the (block, offset) of each token. A block id outside
    [0, num_blocks) raises ValueError before anything is written. Tokens that land on one physical
    slot: the last of them wins (int4_ch refuses that, as a repeated position of a group)."""
    nb, bs = k_cache.shape[0], k_cache.shape[1]
    n, heads = k.shape[0], k.shape[1]
    pos = positions.long()[:, None].expand(-1, heads) if head_positions is None else head_positions.long()
    blocks, offs = paged_slots(block_table, bs, row_ids, pos.cpu())
    if ((blocks < 0) | (blocks >= nb)).any():
        raise ValueError(f"append_kv: a block id the call writes through is outside [0, {nb})")
    grouped = "int4_ch" in (k_format, v_format)
    for h in range(heads):
        slot = (blocks[:, h] * bs + offs[:, h]).tolist()
        last = {sl: i for i, sl in enumerate(slot)}  # later tokens overwrite earlier ones
        if grouped and len(last) != n:
            raise ValueError("int4_ch append: the new tokens of a group must be consecutive positions")
        keep = torch.tensor(sorted(last.values()), dtype=torch.long)
        dev = k_cache.device
        append_kv(
            k_cache[:, :, h : h + 1],
            v_cache[:, :, h : h + 1],
            k[keep.to(k.device), h : h + 1],
            v[keep.to(v.device), h : h + 1],
            blocks[keep, h].to(dev),
            offs[keep, h].to(dev),
            None if k_scale is None else k_scale[:, :, h : h + 1],
            None if v_scale is None else v_scale[:, :, h : h + 1],
            k_format,
            v_format,
        )


def append_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    row_ids: torch.Tensor,
    positions: torch.Tensor,
    k_scale: Optional[torch.Tensor] = None,
    v_scale: Optional[torch.Tensor] = None,
    k_format: Optional[str] = None,
    v_format: Optional[str] = None,
    head_positions: Optional[torch.Tensor] = None,
    block_table: Optional[torch.Tensor] = None,
) -> None:
    """Writes token i of k, v ([n, kv_heads, dim]) at cache[row_ids[i], positions[i]] (in place).
    A quantized side (k_format / v_format given) stores quantize(x) into the cache and its scales.
    head_positions [n, kv_heads] (optional) overrides the position per kv head: token i of head h
    goes to cache[row_ids[i], head_positions[i, h], h] (its scale words too); positions is then unused.
    block_table (a paged cache, see the module notes): the same append into the view gather_paged()
    gives, scattered back to the physical slots it writes -- equivalently the append into the
    physical cache at (block_table[row, pos // block_size], pos % block_size). When tokens of the call
    land on one physical slot (rows sharing a block) the last of them wins."""
    if block_table is not None:
        _append_paged(k_cache, v_cache, k, v, row_ids, positions, k_scale, v_scale, k_format, v_format,
                      head_positions, block_table)  # fmt: skip
        return
    rows = row_ids.long()
    heads = k.shape[1]
    if head_positions is None:
        pos = positions.long()[:, None].expand(-1, heads)
    else:
        pos = head_positions.long()
    hidx = torch.arange(heads, device=rows.device)[None, :].expand(rows.shape[0], -1)
    r = rows[:, None].expand(-1, heads)
    for cache, scales, x, fmt in ((k_cache, k_scale, k, k_format), (v_cache, v_scale, v, v_format)):
        if fmt is None:
            cache[r, pos, hidx] = x.to(cache.dtype)
        elif fmt == "int4_ch":
            _append_int4_ch(cache, scales, x, rows, pos)
        else:
            codes, sc = quantize(x, fmt)
            cache[r, pos, hidx] = codes.view(cache.dtype) if codes.dtype.itemsize == cache.dtype.itemsize else codes
            scales[r, pos, hidx] = sc


def _append_int4_ch(cache, scales, x, rows, pos) -> None:
    """int4_ch append: each (row, kv head, group) the call writes into is re-encoded whole, from the
    dequantized values of its tokens before the call's first one and the call's tokens. The call's
    tokens of one (row, head, group) must be consecutive positions (in any order of the call); the
    group then holds the tokens up to the last of them."""
    n, heads, d = x.shape
    g = int4_ch_group(d)
    rl, pl = rows.tolist(), pos.tolist()
    done = set()
    for i in range(n):
        for h in range(heads):
            r, grp = rl[i], pl[i][h] // g
            if (r, h, grp) in done:
                continue
            done.add((r, h, grp))
            new = {pl[j][h]: j for j in range(n) if rl[j] == r and pl[j][h] // g == grp}
            first, last = min(new), max(new)
            if len(new) != last - first + 1:
                raise ValueError("int4_ch append: the new tokens of a group must be consecutive positions")
            lo = grp * g
            parts = []
            if first > lo:
                parts.append(dequantize_int4_ch(cache[r, lo:first, h], scales[r, lo : lo + g, h]))
            parts.append(x[[new[t] for t in range(first, last + 1)], h].to(torch.float32))
            packed, words = quantize_int4_ch_group(torch.cat(parts))
            cache[r, lo : last + 1, h] = packed
            scales[r, lo : lo + g, h] = words


def attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seqlens_k: torch.Tensor,
    cu_seqlens_q: Optional[torch.Tensor] = None,
    row_ids: Optional[torch.Tensor] = None,
    head_seqlens_k: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    window_left: int = -1,
    softcap: float = 0.0,
    compute_dtype: torch.dtype = torch.float64,
    scores: Optional[torch.Tensor] = None,
    score_mode: str = "add",
    score_last_queries: Optional[int] = None,
    block_table: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of q ([total_q, q_heads, dim]) over the cache; decode when cu_seqlens_q is None.

    block_table (a paged cache, see the module notes): attention over gather_paged(k_cache) and
    gather_paged(v_cache), whose rows are the block table's (float caches: gather a quantized
    cache's codes and scales and dequantize them first).

    Returns (out [total_q, q_heads, dim] in compute_dtype, lse [total_q, q_heads] float32).

    scores (optional, updated in place): [>= cache rows, kv_heads, >= seq], indexed by the cache row
    r = row_ids[b]. For each batch row b, kv head h and key j < L(b, h), S is the sum of the final
    softmax probabilities p[i, g, j] (after scale and soft-cap, normalized with the final LSE; masked
    keys have p = 0) over the q heads g of h's GQA group and the row's last score_last_queries
    queries i (all of them when None or <= 0). score_mode "add": scores[r, h, j] += S; "replace":
    scores[r, h, j] = S (also for a row without queries: S = 0). Entries j >= L(b, h) are never
    touched. Decode "add" is H2O's accumulated score, "replace" TOVA's last-query score; prefill
    with score_last_queries = window gives SnapKV's observation-window scores (before pooling),
    with all queries the column sums of the causal attention matrix. The row ids must be distinct.
    """
    if scores is not None and score_mode not in ("add", "replace"):
        raise ValueError(f"score_mode must be 'add' or 'replace', got {score_mode!r}")
    if block_table is not None:
        k_cache, v_cache = gather_paged(k_cache, block_table), gather_paged(v_cache, block_table)
    w = 0 if score_last_queries is None else int(score_last_queries)
    total_q, hq, dim = q.shape
    hkv = k_cache.shape[2]
    group = hq // hkv
    batch = seqlens_k.shape[0]
    if scale is None:
        scale = 1.0 / math.sqrt(dim)
    if cu_seqlens_q is None:
        cu = list(range(batch + 1))
    else:
        cu = [int(x) for x in cu_seqlens_q.tolist()]
    seq = [int(x) for x in seqlens_k.tolist()]
    rows = list(range(batch)) if row_ids is None else [int(x) for x in row_ids.tolist()]
    head_lens = None if head_seqlens_k is None else head_seqlens_k.tolist()

    out = torch.zeros(total_q, hq, dim, dtype=compute_dtype, device=q.device)
    lse = torch.full((total_q, hq), float("-inf"), dtype=torch.float32, device=q.device)
    for b in range(batch):
        q0, q1 = cu[b], cu[b + 1]
        n = q1 - q0
        if n == 0:
            if scores is not None and score_mode == "replace":
                for h in range(hkv):
                    scores[rows[b], h, : seq[b] if head_lens is None else int(head_lens[b][h])] = 0
            continue
        for h in range(hkv):
            length = seq[b] if head_lens is None else int(head_lens[b][h])
            # Only the first `length` keys exist; slicing first keeps the NaN filler out of the math.
            k = k_cache[rows[b], :length, h].to(compute_dtype)
            v = v_cache[rows[b], :length, h].to(compute_dtype)
            qh = q[q0:q1, h * group : (h + 1) * group].to(compute_dtype)  # [n, group, dim]
            logits = torch.einsum("ngd,kd->ngk", qh, k) * scale
            if softcap > 0:
                logits = softcap * torch.tanh(logits / softcap)
            qpos = torch.arange(n, device=q.device) + (length - n)
            kpos = torch.arange(length, device=q.device)
            visible = kpos[None, :] <= qpos[:, None]
            if window_left >= 0:
                visible &= kpos[None, :] >= qpos[:, None] - window_left
            logits = logits.masked_fill(~visible[:, None, :], float("-inf"))
            row_lse = torch.logsumexp(logits, dim=-1)  # -inf where nothing is visible
            seen = torch.isfinite(row_lse)
            probs = torch.exp(logits - torch.where(seen, row_lse, 0)[..., None])
            o = torch.einsum("ngk,kd->ngd", probs, v)
            o = torch.where(seen[..., None], o, torch.zeros((), dtype=compute_dtype, device=q.device))
            out[q0:q1, h * group : (h + 1) * group] = o
            lse[q0:q1, h * group : (h + 1) * group] = row_lse.float()
            if scores is not None and length > 0:
                first = 0 if w <= 0 else max(n - w, 0)
                s = probs[first:].sum(dim=(0, 1)).to(scores.dtype)  # masked keys: exp(-inf) = 0
                if score_mode == "add":
                    scores[rows[b], h, :length] += s
                else:
                    scores[rows[b], h, :length] = s
    return out, lse


def merge_states(
    o_a: torch.Tensor,
    lse_a: torch.Tensor,
    o_b: torch.Tensor,
    lse_b: torch.Tensor,
    compute_dtype: torch.dtype = torch.float64,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Combines two attention states over disjoint key sets.

    o: [n, heads, dim], lse: [n, heads] natural log. Returns (out in compute_dtype, lse float32).
    A state with lse = -inf contributes nothing; two empty states give zeros and -inf.
    """
    la = lse_a.to(torch.float64)
    lb = lse_b.to(torch.float64)
    m = torch.maximum(la, lb)
    empty = torch.isinf(m) & (m < 0)
    m_safe = torch.where(empty, 0.0, m)
    wa = torch.exp(la - m_safe)
    wb = torch.exp(lb - m_safe)
    s = wa + wb
    lse = torch.where(empty, float("-inf"), m_safe + torch.log(torch.where(empty, 1.0, s)))
    s_safe = torch.where(empty, 1.0, s)
    wa = (wa / s_safe).to(compute_dtype)[..., None]
    wb = (wb / s_safe).to(compute_dtype)[..., None]
    zero = torch.zeros((), dtype=compute_dtype, device=o_a.device)
    # A zero weight must also silence whatever the empty state's output holds.
    out = torch.where(wa > 0, wa * o_a.to(compute_dtype), zero) + torch.where(wb > 0, wb * o_b.to(compute_dtype), zero)
    return out, lse.float()


def compact_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    row_ids: torch.Tensor,
    keep: torch.Tensor,
    keep_lens: torch.Tensor,
    k_scale: Optional[torch.Tensor] = None,
    v_scale: Optional[torch.Tensor] = None,
    scores: Optional[torch.Tensor] = None,
    k_format: Optional[str] = None,
) -> None:
    """Moves the kept tokens of each (row, kv_head) to the front, in order (in place; KV eviction).

    row_ids [n] cache rows (distinct); keep [n, kv_heads, max_keep] token indices, strictly
    increasing in [0, seq) over the first keep_lens[i, h] entries of each (i, h) (the rest is
    ignored); keep_lens [n, kv_heads] in [0, max_keep]. For j < keep_lens[i, h]:
    cache[row_ids[i], j, h] = old cache[row_ids[i], keep[i, h, j], h], for k_cache, v_cache (any
    storage format), their scale words k_scale / v_scale [rows, seq, kv_heads, words] when given,
    and scores[row_ids[i], h, j] (a per-token score buffer [>= rows, kv_heads, >= seq]) when given.
    Positions >= keep_lens[i, h] and all other (row, head) pairs keep what they hold.
    k_format "int4_ch" (keys per channel over groups of tokens): the kept keys are dequantized and
    re-encoded in the groups of their new positions (codes of [0, n), scale words of the tokens of
    those groups, [0, ceil(n / G) * G)); a head keeping nothing keeps what it holds."""
    lens = keep_lens.tolist()
    kept = keep.tolist()
    for i, row in enumerate(row_ids.tolist()):
        for h, n in enumerate(lens[i]):
            if n == 0:
                continue
            src = torch.tensor(kept[i][h][:n], dtype=torch.long, device=k_cache.device)
            if k_format == "int4_ch":
                g = int4_ch_group(k_cache.shape[-1] * 2)
                stored = int(src.max()) + 1
                vals = dequantize_int4_ch(k_cache[row, :stored, h], k_scale[row, :, h])[src]
                for lo in range(0, n, g):
                    packed, words = quantize_int4_ch_group(vals[lo : lo + g])
                    k_cache[row, lo : lo + packed.shape[0], h] = packed
                    k_scale[row, lo : lo + g, h] = words
            for t in (k_cache, v_cache, k_scale, v_scale):
                if t is not None and not (k_format == "int4_ch" and (t is k_cache or t is k_scale)):
                    t[row, :n, h] = t[row, src, h].clone()
            if scores is not None:
                scores[row, h, :n] = scores[row, h, src.to(scores.device)].clone()


# ----------------------------------------------------------------------------- Quest (block-sparse decode)
# The stored tokens of a (row, kv head) of length L form blocks of `block` consecutive tokens: block b
# covers [b * block, min((b + 1) * block, L)), ceil(L / block) blocks, the last possibly partial.
# Entry i reads cache row row_ids[i]; its length is lengths[i], or head_lengths[i, h] when given.


def _quest_len(lengths, head_lengths, i: int, h: int) -> int:
    return int(head_lengths[i][h]) if head_lengths is not None else int(lengths[i])


def block_minmax(
    k_cache: torch.Tensor,
    meta: torch.Tensor,
    row_ids: torch.Tensor,
    lengths: Optional[torch.Tensor],
    first_block: torch.Tensor,
    block: int,
    k_scale: Optional[torch.Tensor] = None,
    k_format: Optional[str] = None,
    head_lengths: Optional[torch.Tensor] = None,
) -> None:
    """Recomputes Quest's per-block key metadata (in place).

    meta [rows, max_blocks, kv_heads, 2, head_dim] float32: for entry i, kv head h and blocks
    b = first_block[i] .. ceil(L / block) - 1 of row r = row_ids[i], meta[r, b, h, 0] is the per-channel
    min and meta[r, b, h, 1] the max of the block's keys, in float32 (a quantized K side, k_format
    given, is dequantized with its scales first). Every other entry of meta keeps what it holds."""
    lens = None if lengths is None else lengths.tolist()
    hl = None if head_lengths is None else head_lengths.tolist()
    firsts = first_block.tolist()
    for i, row in enumerate(row_ids.tolist()):
        for h in range(k_cache.shape[2]):
            n = _quest_len(lens, hl, i, h)
            for b in range(int(firsts[i]), -(-n // block)):
                t0, t1 = b * block, min((b + 1) * block, n)
                x = k_cache[row, t0:t1, h]
                if k_format is None:
                    x = x.to(torch.float32)
                elif k_format == "int4_ch":
                    x = dequantize_int4_ch(k_cache[row, :n, h].view(torch.uint8), k_scale[row, :, h])[t0:t1]
                else:
                    x = dequantize(x.view(_storage_of(k_format)), k_scale[row, t0:t1, h], k_format)
                meta[row, b, h, 0] = x.amin(dim=0).to(meta.device)
                meta[row, b, h, 1] = x.amax(dim=0).to(meta.device)


def _storage_of(kv_format: str) -> torch.dtype:
    return {"fp8_e4m3": torch.float8_e4m3fn, "int8": torch.int8, "int4": torch.uint8, "int4_ch": torch.uint8}[kv_format]


def quest_select(
    q: torch.Tensor,
    meta: torch.Tensor,
    row_ids: torch.Tensor,
    lengths: Optional[torch.Tensor],
    block: int,
    token_budget: int,
    max_sel: int,
    head_lengths: Optional[torch.Tensor] = None,
    compute_dtype: torch.dtype = torch.float64,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quest's block choice for one decode query per entry (q [n, q_heads, dim]).

    Returns (block_ids [n, kv_heads, max_sel] int32, block_counts [n, kv_heads] int32, scores
    [n, kv_heads, max_blocks] in compute_dtype, -inf where a block was not scored). For entry i and kv
    head h with nb = ceil(L / block) blocks: c = min(ceil(token_budget / block), nb, max_sel); all
    blocks when c == nb, else the last block nb - 1 plus the c - 1 other blocks of highest score (ties:
    lower block index; NaN ranks as -inf), ascending; entries past c are -1. The score of block b is
    sum over the q heads g of h's GQA group and d < dim of max(q[i, g, d] * min[b, h, d],
    q[i, g, d] * max[b, h, d]) (an upper bound of q.k over the block; the softmax scale, positive,
    does not change the order)."""
    n, hq, dim = q.shape
    hkv = meta.shape[2]
    group = hq // hkv
    want = -(-int(token_budget) // block)
    lens = None if lengths is None else lengths.tolist()
    hl = None if head_lengths is None else head_lengths.tolist()
    ids = torch.full((n, hkv, max_sel), -1, dtype=torch.int32)
    counts = torch.zeros((n, hkv), dtype=torch.int32)
    scores = torch.full((n, hkv, meta.shape[1]), float("-inf"), dtype=compute_dtype)
    for i, row in enumerate(row_ids.tolist()):
        for h in range(hkv):
            nb = -(-_quest_len(lens, hl, i, h) // block)
            c = min(want, nb, max_sel)
            counts[i, h] = c
            if c == 0:
                continue
            if c == nb:
                ids[i, h, :c] = torch.arange(c, dtype=torch.int32)
                continue
            qg = q[i, h * group : (h + 1) * group].to(compute_dtype).cpu()  # [group, dim]
            mn = meta[row, : nb - 1, h, 0].to(compute_dtype).cpu()  # [nb - 1, dim]
            mx = meta[row, : nb - 1, h, 1].to(compute_dtype).cpu()
            s = torch.maximum(qg[None] * mn[:, None], qg[None] * mx[:, None]).sum(dim=(1, 2))
            s = torch.nan_to_num(s, nan=float("-inf"))
            scores[i, h, : nb - 1] = s
            order = sorted(range(nb - 1), key=lambda b: (-float(s[b]), b))[: c - 1]
            ids[i, h, :c] = torch.tensor(sorted(order) + [nb - 1], dtype=torch.int32)
    return ids.to(q.device), counts.to(q.device), scores


def sparse_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    row_ids: torch.Tensor,
    lengths: Optional[torch.Tensor],
    block_ids: torch.Tensor,
    block_counts: torch.Tensor,
    block: int,
    head_lengths: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    softcap: float = 0.0,
    compute_dtype: torch.dtype = torch.float64,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Decode attention (one query per entry, q [n, q_heads, dim]) over only the selected blocks.

    Entry i, kv head h sees the tokens t < L of the blocks block_ids[i, h, :block_counts[i, h]] (block b:
    tokens [b * block, (b + 1) * block)): exact softmax attention over their union, logits as in
    attention(). Caches are dense float (dequantize a quantized one first). Returns (out [n, q_heads,
    dim] in compute_dtype, lse [n, q_heads] float32; zeros and -inf where no token is selected)."""
    n, hq, dim = q.shape
    hkv = k_cache.shape[2]
    group = hq // hkv
    if scale is None:
        scale = 1.0 / math.sqrt(dim)
    lens = None if lengths is None else lengths.tolist()
    hl = None if head_lengths is None else head_lengths.tolist()
    ids, counts = block_ids.tolist(), block_counts.tolist()
    out = torch.zeros(n, hq, dim, dtype=compute_dtype)
    lse = torch.full((n, hq), float("-inf"), dtype=torch.float32)
    for i, row in enumerate(row_ids.tolist()):
        for h in range(hkv):
            length = _quest_len(lens, hl, i, h)
            tok = [t for b in ids[i][h][: counts[i][h]] for t in range(b * block, min((b + 1) * block, length))]
            if not tok:
                continue
            idx = torch.tensor(tok, dtype=torch.long)
            k = k_cache[row, idx.to(k_cache.device), h].to(compute_dtype).cpu()  # only the selected tokens
            v = v_cache[row, idx.to(v_cache.device), h].to(compute_dtype).cpu()
            qh = q[i, h * group : (h + 1) * group].to(compute_dtype).cpu()
            logits = (qh @ k.T) * scale
            if softcap > 0:
                logits = softcap * torch.tanh(logits / softcap)
            row_lse = torch.logsumexp(logits, dim=-1)
            out[i, h * group : (h + 1) * group] = torch.softmax(logits, dim=-1) @ v
            lse[i, h * group : (h + 1) * group] = row_lse.float()
    return out, lse
