"""KV eviction policies: which tokens of a request to keep, applied to a vattn.KVCache.

A policy scores the tokens each (slot, layer, kv head) stores, keeps the best ones (plus the
tokens it always keeps: sinks, a recent window) and calls `KVCache.compact`, which moves the kept
tokens to the front of their head and unmaps the pages nobody needs, so the physical memory drops
at once, at any batch size. Scores that need attention probabilities come from the attention
kernels themselves (`vattn.attention(..., scores=cache.scores(layer), score_mode=...,
score_last_queries=...)`): `attention_kwargs` says what a policy needs from a step.

    policy = vattn.policies.SnapKV(keep=0.25)
    cache.enable_scores()
    ... prefill: out = vattn.attention(q, cache, layer, step, **policy.attention_kwargs(cache, layer, step))
    cache.end_step(step)
    policy.apply(cache, step.slots)            # end of the prompt: keep 25% of each request

`vattn.hf.VAttnCache.for_model(model, ..., policy=...)` does all of this inside `generate`.

Names, defaults and scores follow the papers and NVIDIA kvpress (0.5.5) so results compare:
StreamingLLM (kvpress StreamingLLMPress), H2O (ObservedAttentionPress: column sums of the prompt's
attention divided by how many queries saw each key), TOVA (TOVAPress: the last query's attention
averaged over all query heads), SnapKV (SnapKVPress: the last `window` queries' attention, averaged,
avg-pooled along keys, the window itself always kept), PyramidKV (PyramidKVPress's per-layer
budgets over SnapKV scores) and AdaKV (AdaKVPress: one budget shared by the heads of a layer, with a
safeguard per head). `keep` is a fraction of a request's stored tokens (float < 1: kvpress's
1 - compression_ratio) or a token count (int).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = ["Policy", "StreamingLLM", "H2O", "TOVA", "SnapKV", "PyramidKV", "AdaKV", "DelayedEviction", "Quest"]


def _check_keep(keep) -> None:
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise TypeError(f"keep must be a fraction (float in (0, 1)) or a token count (int), got {keep!r}")
    if isinstance(keep, float) and not 0.0 < keep < 1.0:
        raise ValueError(f"keep as a fraction must be in (0, 1), got {keep}")
    if isinstance(keep, int) and keep <= 0:
        raise ValueError(f"keep as a token count must be positive, got {keep}")


def _nonneg_int(x, name: str) -> int:
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"{name} must be an int, got {x!r}")
    if x < 0:
        raise ValueError(f"{name} must be >= 0, got {x}")
    return x


class Policy:
    """Base class. Subclasses set `prefill_scores` / `decode_scores` (what the attention kernels must
    emit: None, or (score_mode, score_last_queries)) and implement `token_scores`.

    every: also apply during decode, every `every` decode steps, to each request storing more than
    its budget (None: only at the end of the prompt); there a fractional keep applies to the
    request's logical length (int(position * keep)), and a request over it is cut back to it.
    Always-kept tokens (sinks, a recent window) are kept before any other; a budget smaller than
    them keeps the sinks, then the newest tokens of the window.

    page_align: in layout="head_major", where every (layer, kv head) has pages of its own, round each
    evicting head's kept count to what whole pages hold, the pages the request's chosen tokens fill
    going first to the heads the rounding cut most, then to those whose next token scores best: a
    request keeps at most the tokens the policy chose (each head its best ones, within a page of its
    choice) and maps at most their bytes, instead of up to a page more per (layer, K|V, head). No
    effect in the other layouts (their pages follow the longest head), nor where the pages would not
    cover what the heads must keep (pages larger than the budgets)."""

    prefill_scores: Optional[Tuple[str, Optional[int]]] = None
    decode_scores: Optional[Tuple[str, Optional[int]]] = None
    sinks = 0  # first tokens always kept
    recent = 0  # last tokens always kept
    page_align = True

    def __init__(self, keep, *, every: Optional[int] = None, page_align: bool = True):
        _check_keep(keep)
        self.keep = keep
        if not isinstance(page_align, bool):
            raise TypeError(f"page_align must be a bool, got {page_align!r}")
        self.page_align = page_align
        if every is not None:
            every = _nonneg_int(every, "every")
            if every == 0:
                raise ValueError("every must be a positive number of decode steps (or None)")
        self.every = every

    # ---- what a policy needs from attention

    @property
    def needs_scores(self) -> bool:
        return self.prefill_scores is not None or (self.every is not None and self.decode_scores is not None)

    def attention_kwargs(self, cache, layer: int, step) -> dict:
        """Keyword arguments for vattn.attention so that this step emits the scores the policy needs
        ({} when it needs none). Call cache.enable_scores() once first."""
        want = self.decode_scores if step.is_decode else self.prefill_scores
        if want is None or (step.is_decode and self.every is None):
            return {}
        buf = cache.scores(layer)
        if buf is None:
            raise RuntimeError(f"{type(self).__name__} needs attention scores: call cache.enable_scores() first")
        mode, last = want
        return {"scores": buf, "score_mode": mode, "score_last_queries": last}

    # ---- budgets

    def budget(self, n: int) -> int:
        """Tokens kept of a head that stores n (kvpress's rule for fractions: int(n * keep), >= 1)."""
        if isinstance(self.keep, float):
            return max(1, min(n, int(n * self.keep)))
        return min(n, self.keep)

    def layer_budget(self, layer: int, num_layers: int, n: int) -> int:
        return self.budget(n)

    # ---- scores and selection

    def token_scores(self, cache, slot: int, layer: int, n: int) -> torch.Tensor:
        """float [kv_heads, n]: higher is more worth keeping (over the first n stored tokens)."""
        raise NotImplementedError

    def _forced(self, scores: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
        """Scores with the always-kept tokens (sinks, each head's recent window) raised above every
        other (to _FORCED and up), and -inf past each head's stored tokens. The forced tokens are
        ranked too: sinks first, then the recent window newest first, so a budget smaller than the
        window (SnapKV's default 64 on a short prompt) keeps the newest tokens, without holes,
        instead of an arbitrary pick among equal scores."""
        scores = scores.clone()
        top = torch.finfo(scores.dtype).max
        for h in range(scores.shape[0]):
            n_h = int(heads[h])
            if self.recent:
                a = max(0, n_h - self.recent)
                scores[h, a:n_h] = _forced_ladder(n_h - a).to(scores.dtype)
            if self.sinks:
                scores[h, : min(self.sinks, n_h)] = top
            scores[h, n_h:] = float("-inf")
        return scores

    def select(self, cache, slot: int, *, logical: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """(keep [layers, kv_heads, max_keep] int64 ascending, keep_lens [layers, kv_heads]) for one slot.

        logical: the length a fractional keep applies to (None: each layer's stored tokens, as at the
        end of a prompt; decode-time use passes the request's logical length, see apply)."""
        heads = cache.head_lengths(slot)  # [L, H]
        L, H = heads.shape
        per_layer, units = [], []
        for layer in range(L):
            n = int(heads[layer].max())
            s = self.token_scores(cache, slot, layer, n).float().cpu()
            budget = min(n, self.layer_budget(layer, L, n if logical is None else max(n, logical)))
            # The sinks are always kept: a request holding no more than them keeps everything, and a
            # fraction too small for them keeps them (a fixed keep below the sinks is refused at init).
            budget = max(budget, min(n, self.sinks))
            forced = self._forced(s, heads[layer])
            per_layer.append(self._select_layer(forced, heads[layer], budget))
            units.append((forced, budget))
        align = _page_geometry(cache) if self.page_align else None
        if align is not None:
            counts = self._aligned(units, heads, torch.stack([ln for _, ln in per_layer]), *align)
            if counts is not None:
                per_layer = [_indices_for(forced, counts[layer]) for layer, (forced, _) in enumerate(units)]
        kmax = max(1, max(idx.shape[1] for idx, _ in per_layer))
        keep = torch.zeros((L, H, kmax), dtype=torch.int64)
        lens = torch.zeros((L, H), dtype=torch.int64)
        for layer, (idx, ln) in enumerate(per_layer):
            keep[layer, :, : idx.shape[1]] = idx
            lens[layer] = ln
        return keep, lens

    def _select_layer(self, scores: torch.Tensor, heads: torch.Tensor, budget: int):
        """Top `budget` per head (fewer when a head stores fewer), indices ascending."""
        H, n = scores.shape
        k = min(budget, n)
        if k <= 0:
            return torch.zeros((H, 0), dtype=torch.int64), torch.zeros(H, dtype=torch.int64)
        idx = scores.topk(k, dim=-1).indices.sort(dim=-1).values
        lens = torch.clamp(heads.to(torch.int64), max=k)
        # A head that stores fewer than k tokens keeps all of them (its -inf entries sort last).
        for h in range(H):
            if lens[h] < k:
                idx[h, : lens[h]] = torch.arange(int(lens[h]))
        return idx, lens

    def _min_kept(self, forced_count: int, n_h: int, budget: int) -> int:
        """The fewest tokens page alignment may leave a head: the ones the policy always keeps."""
        return forced_count

    def _aligned(self, units, heads, counts, page, record, group):
        """page_align for one request in head_major: new counts [layers][kv_heads], or None. Each
        (layer, head) that evicts keeps what p whole pages hold (or all its tokens), its best tokens
        by the policy's scores; sum p <= the pages its chosen counts fill completely (so the request
        keeps at most the tokens chosen, and at most their bytes are mapped), the pages going first
        to the heads the rounding cut most, then to those whose next token scores best. None where
        the pages do not cover what the heads must keep (sinks, recent window, safeguard)."""
        n = heads.to(torch.int64).tolist()
        c = counts.to(torch.int64).tolist()
        cut = [(layer, h) for layer in range(len(n)) for h in range(len(n[layer])) if c[layer][h] < n[layer][h]]
        if not cut:
            return None

        def pages(t):  # CacheManager::pages_for
            t = -(-t // group) * group
            return -(-(t * record) // page)

        def fits(q):  # the most tokens q pages hold, in whole groups
            return (q * page // record) // group * group

        order = [forced.sort(dim=-1, descending=True).values for forced, _ in units]
        lo, cap, share, p = {}, {}, {}, {}
        for u in cut:
            layer, h = u
            forced, budget = units[layer]
            nh = n[layer][h]
            must = self._min_kept(int((forced[h, :nh] >= _FORCED).sum()), nh, budget)
            lo[u], cap[u] = pages(min(nh, must)), pages(nh)
            share[u] = c[layer][h] * record / page
            p[u] = max(lo[u], min(cap[u], int(share[u])))
        pool = sum(c[layer][h] for layer, h in cut) * record // page  # pages the chosen tokens fill
        if sum(lo.values()) > pool:
            return None

        def mass(u, q):  # the policy's score of the tokens page q (0-based) of head u adds
            layer, h = u
            hi = min(n[layer][h], fits(q + 1))
            return float(order[layer][h, fits(q) : hi].sum()) if fits(q) < hi else float("-inf")

        extra = pool - sum(p.values())
        while extra < 0:  # the floors raised some heads: take back the pages worth least
            for u in sorted((u for u in cut if p[u] > lo[u]), key=lambda u: (mass(u, p[u] - 1), u[1]))[:-extra]:
                p[u] -= 1
                extra += 1
        for room in (lambda u: p[u] < min(cap[u], -(-share[u] // 1)), lambda u: p[u] < cap[u]):
            # first each head at most up to its chosen count's last page, then anywhere: the pages
            # whose tokens score best (ties: one page per layer before a second)
            while extra > 0:
                more = sorted((u for u in cut if room(u)), key=lambda u: (mass(u, p[u]), -u[1]), reverse=True)
                if not more:
                    break
                for u in more[:extra]:
                    p[u] += 1
                    extra -= 1
        for (layer, h), q in p.items():
            c[layer][h] = min(n[layer][h], fits(q))
        return c

    def apply(self, cache, slots: Sequence[int], *, only_over_budget: bool = False) -> List[int]:
        """Compacts the given slots to the policy's budget; returns the slots it compacted. With
        only_over_budget (decode-time use), slots within their budget are left alone."""
        chosen, keeps, lens = [], [], []
        for s in slots:
            heads = cache.head_lengths(s)
            n = int(heads.max())
            if n == 0:
                continue
            if only_over_budget and n <= self._decode_budget(cache, s, n):
                continue
            # During decode a fraction applies to the request's logical length (_decode_budget): the
            # row is cut back to that budget, not to a fraction of what it still stores.
            logical = cache.position(s) if only_over_budget and isinstance(self.keep, float) else None
            k, ln = self.select(cache, s, logical=logical)
            if bool((ln == heads).all()):
                continue  # nothing to drop
            chosen.append(s)
            keeps.append(k)
            lens.append(ln)
        if not chosen:
            return []
        kmax = max(k.shape[-1] for k in keeps)
        keep = torch.zeros((len(chosen),) + tuple(keeps[0].shape[:2]) + (kmax,), dtype=torch.int64)
        for i, k in enumerate(keeps):
            keep[i, ..., : k.shape[-1]] = k
        cache.compact(chosen, keep, torch.stack(lens))
        return chosen

    def _decode_budget(self, cache, slot: int, n: int) -> int:
        # During decode a fraction applies to the request's logical length (what it has seen).
        if isinstance(self.keep, float):
            return max(1, int(cache.position(slot) * self.keep))
        return self.keep

    def __repr__(self) -> str:
        return f"{type(self).__name__}(keep={self.keep!r})"


# Forced (always-kept) tokens score from _FORCED up, above any real score: the recent window's get
# _FORCED + k ulps (k = 1 for the oldest), distinct in float32 for windows below 2**23 tokens.
_FORCED = 2.0**100


def _forced_ladder(m: int) -> torch.Tensor:
    """float64 [m]: _FORCED + (1..m) float32 ulps of _FORCED, exact in float32."""
    return _FORCED + torch.arange(1, m + 1, dtype=torch.float64) * 2.0**77


def _page_geometry(cache):
    """(page bytes, bytes per token of a region, tokens per group) where page_align applies."""
    if getattr(cache, "layout", None) != "head_major":
        return None
    return int(cache.page_bytes), int(cache._region_record), int(cache._group)


def _indices_for(forced: torch.Tensor, counts: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per head h its counts[h] best tokens by forced scores, ascending, zero-padded."""
    H = forced.shape[0]
    width = max([0] + list(counts))
    idx = torch.zeros((H, width), dtype=torch.int64)
    for h in range(H):
        if counts[h]:
            idx[h, : counts[h]] = forced[h].topk(counts[h]).indices.sort().values
    return idx, torch.tensor(list(counts), dtype=torch.int64)


def _kept_indices(mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(indices [H, max kept] ascending, zero-padded; counts [H]) of the True entries of a bool [H, n]."""
    lens = mask.sum(-1)
    idx = torch.zeros((mask.shape[0], int(lens.max()) if mask.shape[0] else 0), dtype=torch.int64)
    for h in range(mask.shape[0]):
        pos = torch.nonzero(mask[h]).flatten()
        idx[h, : pos.numel()] = pos
    return idx, lens.to(torch.int64)


class StreamingLLM(Policy):
    """Attention sinks + a recent window (Xiao et al., 2023): keeps the first `sinks` tokens and the
    most recent ones. Needs no scores. A fractional keep too small for the sinks on a short request
    keeps the sinks (an int keep below them is refused)."""

    def __init__(self, keep, sinks: int = 4, *, every: Optional[int] = None, page_align: bool = True):
        super().__init__(keep, every=every, page_align=page_align)
        self.sinks = _nonneg_int(sinks, "sinks")
        if isinstance(keep, int) and self.sinks > keep:
            raise ValueError(f"StreamingLLM: sinks={sinks} exceeds the budget keep={keep}")

    def token_scores(self, cache, slot, layer, n):
        # Later is better; the sinks are forced by _forced.
        return torch.arange(n, dtype=torch.float32).expand(cache.num_kv_heads, n)

    def __repr__(self):
        return f"StreamingLLM(keep={self.keep!r}, sinks={self.sinks})"


class H2O(Policy):
    """Heavy hitters (Zhang et al., 2023): tokens with the largest accumulated attention. At the end
    of the prompt the score of key j is the sum of the attention all prompt queries give it, divided
    by the number of queries that see it (kvpress ObservedAttentionPress), averaged over the query
    heads of its group; during decode (every=N) the probabilities of each new query are added.
    recent: last tokens always kept (the paper's recent window)."""

    prefill_scores = ("add", None)
    decode_scores = ("add", None)

    def __init__(self, keep, recent: int = 0, *, every: Optional[int] = None, page_align: bool = True):
        super().__init__(keep, every=every, page_align=page_align)
        self.recent = _nonneg_int(recent, "recent")
        if isinstance(keep, int) and self.recent > keep:
            raise ValueError(f"H2O: recent={recent} exceeds the budget keep={keep}")

    def token_scores(self, cache, slot, layer, n):
        s = cache.scores(layer)[slot, :, :n].float()
        if cache.position(slot) == n:  # nothing evicted yet: normalize by the queries that saw j
            s = s / torch.arange(n, 0, -1, dtype=s.dtype, device=s.device)
        return s

    def __repr__(self):
        return f"H2O(keep={self.keep!r}, recent={self.recent})"


class TOVA(Policy):
    """Token omission via attention (Oren et al., 2024): keeps the tokens the last query attends to
    most, averaged over all query heads (one choice for every kv head, as in the paper and kvpress);
    the last token is always kept."""

    prefill_scores = ("replace", 1)
    decode_scores = ("replace", 1)
    recent = 1

    def token_scores(self, cache, slot, layer, n):
        s = cache.scores(layer)[slot, :, :n].float()
        return s.mean(0, keepdim=True).expand(cache.num_kv_heads, n)


class SnapKV(Policy):
    """SnapKV (Li et al., 2024): the attention of the prompt's last `window` queries, averaged over
    them, avg-pooled along keys with a kernel of `kernel`, averaged over the query heads of a group;
    the window itself is always kept (its newest tokens when the budget is smaller than the window,
    e.g. the default window of 64 on a short prompt). During decode (every=N) the last query's
    attention is used."""

    decode_scores = ("replace", 1)

    def __init__(
        self, keep, window: int = 64, kernel: int = 5, *, every: Optional[int] = None, page_align: bool = True
    ):
        super().__init__(keep, every=every, page_align=page_align)
        self.window = _nonneg_int(window, "window")
        self.kernel = _nonneg_int(kernel, "kernel")
        if self.window == 0:
            raise ValueError("SnapKV: window must be positive")
        if self.kernel == 0 or self.kernel % 2 == 0:
            raise ValueError(f"SnapKV: kernel must be a positive odd number, got {kernel}")
        self.prefill_scores = ("replace", self.window)
        self.recent = self.window

    def token_scores(self, cache, slot, layer, n):
        s = cache.scores(layer)[slot, :, :n].float()
        w = min(self.window, n)
        head = s[:, : n - w]
        if head.shape[1] > 0:
            k = self.kernel
            head = F.avg_pool1d(head[:, None, :], kernel_size=k, padding=k // 2, stride=1)[:, 0, :]
        return torch.cat([head, s[:, n - w :]], dim=1)

    def __repr__(self):
        return f"{type(self).__name__}(keep={self.keep!r}, window={self.window}, kernel={self.kernel})"


class PyramidKV(SnapKV):
    """PyramidKV (Cai et al., 2024): SnapKV scores with budgets that shrink linearly from the first
    layer to the last (steepness beta), the same total as SnapKV at the same keep. The budget rule is
    kvpress's PyramidKVPress (from KVCache-Factory); it falls back to a flat budget where the pyramid
    does not fit."""

    def __init__(
        self,
        keep,
        window: int = 64,
        kernel: int = 5,
        beta: int = 20,
        *,
        every: Optional[int] = None,
        page_align: bool = True,
    ):
        super().__init__(keep, window=window, kernel=kernel, every=every, page_align=page_align)
        if isinstance(beta, bool) or not isinstance(beta, int) or beta < 1:
            raise ValueError(f"PyramidKV: beta must be an int >= 1, got {beta!r}")
        self.beta = beta

    def layer_budget(self, layer: int, num_layers: int, n: int) -> int:
        flat = self.budget(n)
        w = self.window
        kept = flat  # tokens a flat budget keeps; the pyramid spends the same on average
        cap = w + kept
        lo = (cap - w) / self.beta
        hi = (cap - w) * 2 - lo
        if hi >= n - w:
            hi = n - w
            lo = (cap - w) * 2 - hi
        if not (n >= hi >= lo >= w):
            return flat
        steps = (hi - lo) / (num_layers - 1) if num_layers > 1 else 0.0
        return max(1, min(n, round(hi - layer * steps)))

    def __repr__(self):
        return f"PyramidKV(keep={self.keep!r}, window={self.window}, kernel={self.kernel}, beta={self.beta})"


class AdaKV(Policy):
    """AdaKV (Feng et al., 2024): the heads of a layer share one budget (kv_heads x the inner
    policy's budget), given to the best-scoring tokens over all heads, so heads that need more keep
    more; each head keeps at least alpha_safeguard of the per-head budget. Unlike kvpress, which masks
    the evicted tokens of such head-wise budgets, vattn stores per-head lengths, so the memory of
    every evicted token comes back."""

    def __init__(
        self,
        inner: Policy,
        alpha_safeguard: float = 0.20,
        *,
        every: Optional[int] = None,
        page_align: Optional[bool] = None,
    ):
        if not isinstance(inner, Policy) or isinstance(inner, AdaKV):
            raise TypeError("AdaKV wraps a scoring policy (H2O, TOVA, SnapKV, ...), not AdaKV itself")
        super().__init__(
            inner.keep,
            every=every if every is not None else inner.every,
            page_align=inner.page_align if page_align is None else page_align,
        )
        if not 0.0 <= float(alpha_safeguard) <= 1.0:
            raise ValueError(f"AdaKV: alpha_safeguard must be in [0, 1], got {alpha_safeguard}")
        self.inner = inner
        self.alpha_safeguard = float(alpha_safeguard)
        self.prefill_scores = inner.prefill_scores
        self.decode_scores = inner.decode_scores
        self.sinks, self.recent = inner.sinks, inner.recent

    def token_scores(self, cache, slot, layer, n):
        return self.inner.token_scores(cache, slot, layer, n)

    def layer_budget(self, layer, num_layers, n):
        return self.inner.layer_budget(layer, num_layers, n)

    def _safe(self, budget: int) -> int:
        safe = int(budget * self.alpha_safeguard)
        return max(1, safe) if self.alpha_safeguard > 0 and budget > 0 else safe

    def _min_kept(self, forced_count, n_h, budget):
        return max(forced_count, min(n_h, self._safe(budget)))

    def _select_layer(self, scores: torch.Tensor, heads: torch.Tensor, budget: int):
        H, n = scores.shape
        total = min(int(heads.sum()), H * budget)
        safe = self._safe(budget)
        s = scores.clone()
        if safe > 0:
            top = s.topk(min(safe, n), dim=-1).indices
            s.scatter_(-1, top, torch.finfo(s.dtype).max)
        flat = s.reshape(-1)
        chosen = flat.topk(total).indices
        mask = torch.zeros(H * n, dtype=torch.bool)
        mask[chosen] = True
        mask = mask.view(H, n) & (torch.arange(n)[None, :] < heads[:, None])
        return _kept_indices(mask)

    def __repr__(self):
        return f"AdaKV({self.inner!r}, alpha_safeguard={self.alpha_safeguard})"


class DelayedEviction(Policy):
    """DMS-style delayed eviction ("Inference-Time Hyper-Scaling with KV Cache Compression"): a
    callable decides, when tokens are written, which (token, kv head) pairs will be evicted; they
    leave only once `window` more tokens have arrived, so the recent context stays exact.

    decide(layer, k, v, positions) -> bool [n, kv_heads] (True: evict later), with k, v the new
    tokens' [n, kv_heads, head_dim] and positions their logical positions (int64 [n]). The marks
    live in the cache's score buffer (enable_scores) and move with the tokens at compaction; since
    no token of the last `window` is ever evicted, those are exactly each head's last `window`
    stored tokens. Applied at the end of each prompt and every `every` decode steps (default 1)."""

    page_align = False  # its decisions are exact: no count is rounded

    def __init__(self, decide, window: int, *, every: Optional[int] = 1):
        if not callable(decide):
            raise TypeError("DelayedEviction needs a callable decide(layer, k, v, positions) -> bool [n, kv_heads]")
        self.decide = decide
        self.window = _nonneg_int(window, "window")
        self.keep = None
        if every is not None:
            every = _nonneg_int(every, "every")
            if every == 0:
                raise ValueError("every must be a positive number of decode steps (or None)")
        self.every = every
        self.recent = self.window

    @property
    def needs_scores(self) -> bool:
        return True

    def attention_kwargs(self, cache, layer, step) -> dict:
        return {}

    def on_append(self, cache, layer: int, step, k: torch.Tensor, v: torch.Tensor) -> None:
        """Records the decisions for the step's new tokens (call after vattn.append_kv)."""
        buf = cache.scores(layer)
        if buf is None:
            raise RuntimeError("DelayedEviction keeps its marks in the score buffer: call cache.enable_scores() first")
        logical = torch.cat([torch.arange(p, p + n) for p, n in zip(step.positions_logical, step.new_tokens)]).to(
            torch.int64
        )
        marks = self.decide(layer, k, v, logical)
        if not isinstance(marks, torch.Tensor) or tuple(marks.shape) != (k.shape[0], k.shape[1]):
            raise ValueError(f"decide must return a bool tensor [{k.shape[0]}, {k.shape[1]}]")
        marks = marks.to(device=buf.device, dtype=torch.float32)
        slots = step.token_slots.to(device=buf.device, dtype=torch.int64)
        if step.head_positions is not None:
            pos = step.head_positions[layer].to(device=buf.device, dtype=torch.int64)  # [n, H]
        else:
            pos = step.positions.to(device=buf.device, dtype=torch.int64)[:, None].expand_as(marks)
        heads = torch.arange(k.shape[1], device=buf.device)[None, :].expand_as(marks)
        buf[slots[:, None].expand_as(marks), heads, pos] = marks

    def budget(self, n: int) -> int:
        return n

    def _decode_budget(self, cache, slot, n):
        return 0  # every decode-time application looks at every request

    def token_scores(self, cache, slot, layer, n):
        return -cache.scores(layer)[slot, :, :n].float()  # marked: -1, kept: 0

    def _select_layer(self, scores: torch.Tensor, heads: torch.Tensor, budget: int):
        H, n = scores.shape
        keep = scores > -0.5  # unmarked, sinks-free; the recent window was raised by _forced
        keep &= torch.arange(n)[None, :] < heads[:, None]
        return _kept_indices(keep)

    def __repr__(self):
        return f"DelayedEviction(window={self.window}, every={self.every})"


class Quest(Policy):
    """Quest (Tang et al., 2024): query-aware block-sparse decode. Nothing is evicted (all KV stays);
    per block of `block` stored tokens the cache keeps the per-channel min and max of the keys
    (KVCache.enable_quest), each decode query scores every block by an upper bound of q . k
    (sum over channels of max(q * min, q * max), summed over its GQA group) and attends only to the
    best blocks within `token_budget` tokens, the last block always included; at any batch size,
    with ragged lengths. Prefill is dense."""

    def __init__(self, token_budget: int, block: int = 16):
        if isinstance(token_budget, bool) or not isinstance(token_budget, int) or token_budget <= 0:
            raise ValueError(f"Quest: token_budget must be a positive int, got {token_budget!r}")
        if isinstance(block, bool) or not isinstance(block, int) or block <= 0:
            raise ValueError(f"Quest: block must be a positive int, got {block!r}")
        self.token_budget = token_budget
        self.block = block
        self.keep = token_budget
        self.every = None

    @property
    def needs_scores(self) -> bool:
        return False

    def prepare(self, cache) -> None:
        cache.enable_quest(self.block)

    def attention_kwargs(self, cache, layer: int, step) -> dict:
        return {"token_budget": self.token_budget} if step.is_decode else {}

    def apply(self, cache, slots, *, only_over_budget: bool = False) -> List[int]:
        return []  # Quest selects per query; it never drops tokens

    def __repr__(self):
        return f"Quest(token_budget={self.token_budget}, block={self.block})"


def parse(spec: str) -> Policy:
    """A policy from a CLI spec: "name:keep[:key=value,...]", e.g. "snapkv:0.25", "h2o:512:recent=32"."""
    parts = spec.split(":")
    name = parts[0].strip().lower()
    if len(parts) < 2:
        raise ValueError(f"policy spec {spec!r}: expected name:keep, e.g. snapkv:0.25")
    raw = parts[1].strip()
    keep = float(raw) if any(c in raw for c in ".eE") else int(raw)
    kwargs = {}
    for item in ":".join(parts[2:]).split(","):
        if item.strip():
            k, _, v = item.partition("=")
            kwargs[k.strip()] = int(v) if v.strip().lstrip("-").isdigit() else float(v)
    classes = {"streamingllm": StreamingLLM, "h2o": H2O, "tova": TOVA, "snapkv": SnapKV, "pyramidkv": PyramidKV}
    if name == "quest":
        if not isinstance(keep, int):
            raise ValueError("quest takes a token budget (an int), e.g. quest:512")
        return Quest(keep, **{k: int(v) for k, v in kwargs.items()})
    if name == "adakv":
        return AdaKV(SnapKV(keep, **kwargs))
    if name not in classes:
        raise ValueError(f"unknown policy {name!r}; one of {sorted(classes) + ['adakv', 'quest']}")
    return classes[name](keep, **kwargs)
