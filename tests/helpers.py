"""Test utilities for the attention ops: NaN-filled strided caches, random cases, tolerances."""

from __future__ import annotations

import dataclasses
import random
from typing import List, Optional, Sequence

import pytest
import torch

import vattn
from vattn import reference

LAYOUTS = ("plain", "token_major", "layer_major", "head_major")


def device_impls():
    """(device, impl) pairs every attention test runs on: cpu, and cuda with both kernels (marked gpu)."""
    return [
        pytest.param("cpu", "fast", id="cpu"),
        pytest.param("cuda", "fast", id="cuda-fast", marks=pytest.mark.gpu),
        pytest.param("cuda", "simple", id="cuda-simple", marks=pytest.mark.gpu),
    ]


def cache_views(
    rows: int,
    seq: int,
    heads: int,
    dim: int,
    dtype: torch.dtype,
    layout: str,
    device="cpu",
    layers: int = 3,
    layer: int = 1,
):
    """Strided K and V views [rows, seq, heads, dim] over NaN-filled storage of one of the layouts.

    token_major: [slot, token, layer, K|V, head, dim] sliced at a layer (vattn.KVCache's default);
    layer_major: [layer, K|V, slot, token, head, dim]; head_major: [rows, heads, seq, dim] transposed;
    plain: ordinary contiguous tensors.
    """
    nan = float("nan")
    if layout == "plain":
        k = torch.full((rows, seq, heads, dim), nan, dtype=dtype, device=device)
        return k, torch.full_like(k, nan)
    if layout == "token_major":
        base = torch.full((rows, seq, layers, 2, heads, dim), nan, dtype=dtype, device=device)
        return base[:, :, layer, 0], base[:, :, layer, 1]
    if layout == "layer_major":
        base = torch.full((layers, 2, rows, seq, heads, dim), nan, dtype=dtype, device=device)
        return base[layer, 0], base[layer, 1]
    if layout == "head_major":
        k = torch.full((rows, heads, seq, dim), nan, dtype=dtype, device=device).transpose(1, 2)
        v = torch.full((rows, heads, seq, dim), nan, dtype=dtype, device=device).transpose(1, 2)
        return k, v
    raise ValueError(layout)


def fill_cache(
    k_cache: torch.Tensor, v_cache: torch.Tensor, row_ids: Sequence[int], lengths: Sequence, gen: torch.Generator
) -> None:
    """Random values in the first lengths[b] tokens of cache row row_ids[b] (per head when lengths[b]
    is a list); everything else stays NaN so reading past a length shows up in the output."""
    heads, dim = k_cache.shape[2], k_cache.shape[3]
    for b, row in enumerate(row_ids):
        per_head = lengths[b] if isinstance(lengths[b], (list, tuple)) else [lengths[b]] * heads
        for h, n in enumerate(per_head):
            if n:
                k_cache[row, :n, h] = randn((n, dim), gen).to(k_cache.dtype).to(k_cache.device)
                v_cache[row, :n, h] = randn((n, dim), gen).to(v_cache.dtype).to(v_cache.device)


def randn(shape, gen: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    """Random normal values, never zero."""
    x = torch.randn(shape, generator=gen)
    x = torch.where(x == 0, torch.full_like(x, 0.5), x)
    return x.to(dtype)


@dataclasses.dataclass
class Case:
    """One attention problem (decode when q_lens is None)."""

    lens: List[int]  # seqlens_k per batch row
    hkv: int
    group: int
    dim: int
    q_lens: Optional[List[int]] = None  # queries per row (prefill)
    head_lens: Optional[List[List[int]]] = None
    window_left: int = -1
    softcap: float = 0.0
    scale: Optional[float] = None
    extra_rows: int = 2  # cache rows beyond the batch (row ids are a permutation)

    def describe(self) -> str:
        kind = "decode" if self.q_lens is None else "prefill"
        return (
            f"{kind}-b{len(self.lens)}-h{self.hkv}x{self.group}-d{self.dim}-L{max(self.lens)}"
            f"-w{self.window_left}-c{self.softcap:g}{'-ph' if self.head_lens else ''}"
        )


def case_rows(case: Case, seed: int):
    """(value generator, cache rows, row id of each batch row, cache capacity) of a case: the row ids
    are a random permutation, the capacity a little past the longest length."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    batch = len(case.lens)
    rows = batch + case.extra_rows
    row_ids = list(range(rows))
    rng.shuffle(row_ids)
    row_ids = row_ids[:batch]
    cap_lens = case.lens if case.head_lens is None else [max(max(h), l) for h, l in zip(case.head_lens, case.lens)]
    return gen, rows, row_ids, max(cap_lens) + rng.randint(1, 9)


def case_queries_and_kwargs(case: Case, row_ids, gen: torch.Generator, dtype: torch.dtype, device: str):
    """q and the op kwargs (lengths, row ids, options, cu_seqlens_q for prefill) of a case."""
    total_q = len(case.lens) if case.q_lens is None else sum(case.q_lens)
    q = randn((total_q, case.hkv * case.group, case.dim), gen, dtype).to(device)
    kw = dict(
        seqlens_k=torch.tensor(case.lens, dtype=torch.int32, device=device),
        row_ids=torch.tensor(row_ids, dtype=torch.int32, device=device),
        scale=case.scale,
        window_left=case.window_left,
        softcap=case.softcap,
    )
    if case.head_lens is not None:
        kw["head_seqlens_k"] = torch.tensor(case.head_lens, dtype=torch.int32, device=device)
    if case.q_lens is not None:
        cu = [0]
        for n in case.q_lens:
            cu.append(cu[-1] + n)
        kw["cu_seqlens_q"] = torch.tensor(cu, dtype=torch.int32, device=device)
    return q, kw


def build(case: Case, dtype: torch.dtype, layout: str, device: str, seed: int):
    """Tensors of a case: (q, k_cache, v_cache, kwargs of the op without q/caches), all on device."""
    gen, rows, row_ids, seq = case_rows(case, seed)
    k_cache, v_cache = cache_views(rows, seq, case.hkv, case.dim, dtype, layout, device)
    fill_cache(k_cache, v_cache, row_ids, case.head_lens if case.head_lens is not None else case.lens, gen)
    q, kw = case_queries_and_kwargs(case, row_ids, gen, dtype, device)
    return q, k_cache, v_cache, kw


def run_attention(q, k_cache, v_cache, kw, **extra):
    """vattn's op for build()'s kwargs, returning (out, lse): prefill where they hold cu_seqlens_q,
    decode otherwise."""
    kw = dict(kw)
    if "cu_seqlens_q" not in kw:
        return vattn.decode_attention(q, k_cache, v_cache, kw.pop("seqlens_k"), return_lse=True, **kw, **extra)
    cu, lens = kw.pop("cu_seqlens_q"), kw.pop("seqlens_k")
    return vattn.prefill_attention(q, k_cache, v_cache, cu, lens, return_lse=True, **kw, **extra)


def run_reference(q, k_cache, v_cache, kw, compute_dtype):
    cpu = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    return reference.attention(q.cpu(), k_cache.cpu(), v_cache.cpu(), compute_dtype=compute_dtype, **cpu)


def assert_attention_close(
    out: torch.Tensor, lse: Optional[torch.Tensor], q, k_cache, v_cache, kw, what: str = ""
) -> None:
    """FlashAttention's rule: error(vattn vs float64 reference) <= 2 * error(the reference run by
    PyTorch in q's dtype vs float64) + a small eps; LSE the same way; empty queries exactly 0 / -inf."""
    ref, ref_lse = run_reference(q, k_cache, v_cache, kw, torch.float64)
    low, low_lse = run_reference(q, k_cache, v_cache, kw, q.dtype)
    out = out.detach().cpu().double()
    assert torch.isfinite(out).all(), f"{what}: non-finite output (read past a length?)"
    eps = 1e-5 if q.dtype == torch.float32 else 1e-4
    err = (out - ref).abs().max().item() if out.numel() else 0.0
    base = (low.double() - ref).abs().max().item() if out.numel() else 0.0
    assert err <= 2 * base + eps, f"{what}: max error {err:.3g} vs torch {q.dtype} error {base:.3g}"
    if lse is None:
        return
    lse = lse.detach().cpu()
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse) & (lse < 0), empty), f"{what}: -inf LSE pattern differs"
    assert (out[empty] == 0).all(), f"{what}: a query that sees no key must output zeros"
    if (~empty).any():
        lerr = (lse[~empty].double() - ref_lse[~empty].double()).abs().max().item()
        lbase = (low_lse[~empty].double() - ref_lse[~empty].double()).abs().max().item()
        assert lerr <= 2 * lbase + 1e-4, f"{what}: LSE error {lerr:.3g} vs torch {lbase:.3g}"


def random_cases(kind: str, n: int, seed: int, long_len: int = 3000) -> List[Case]:
    """A spread of shapes: 1..17 rows, lengths 1..long_len (tile-unfriendly values included), GQA
    groups 1/3/4/8, head dims 64/128 plus odd ones, windows, soft-caps, per-head lengths."""
    rng = random.Random(seed)
    special = [1, 2, 15, 63, 64, 65, 127, 129, 255, 513, 1000, 2049]
    cases = []
    for i in range(n):
        batch = rng.choice([1, 2, 3, 5, 8, 11, 17])
        max_len = long_len if batch <= 3 else (700 if batch <= 8 else 300)
        lens = [
            rng.choice([rng.randint(1, max_len), rng.choice([s for s in special if s <= max_len])])
            for _ in range(batch)
        ]
        if i % 4 == 0:
            lens[rng.randrange(batch)] = max_len  # one long row among short ones
        hkv = rng.choice([1, 2, 4]) if batch < 11 else 1
        group = [1, 3, 4, 8][i % 4]
        dim = [64, 128, 64, 128, 40, 96][i % 6]
        case = Case(lens=lens, hkv=hkv, group=group, dim=dim)
        if i % 3 == 1:
            case.window_left = rng.choice([0, 1, 17, 100, 1000])
        if i % 5 == 2:
            case.softcap = rng.choice([5.0, 30.0])
        if i % 7 == 3:
            case.scale = 0.3
        if kind == "prefill":
            # Full prompts, chunks on top of a cached prefix, and rows with no new token.
            case.q_lens = [
                rng.choice([length, rng.randint(1, min(length, 80)), min(length, rng.randint(1, 3)), 0])
                for length in lens
            ]
            if sum(case.q_lens) == 0:
                case.q_lens[0] = lens[0]
            # Keep the CPU reference cheap: long rows prefill at most a few hundred queries.
            case.q_lens = [min(n, 256) for n in case.q_lens]
        if i % 6 == 5:
            case.head_lens = [[rng.choice([0, 1, rng.randint(1, length)]) for _ in range(hkv)] for length in lens]
        cases.append(case)
    return cases


def skip_unsupported(device: str, dtype: torch.dtype, dim: int, prefill: bool = True, kv_format=None) -> None:
    """Skips a case the device does not run, as the support table (vattn/_support.py) says."""
    from vattn import _support

    op = "prefill" if prefill else "decode"
    if not _support.supported(op, device, dtype, dim, kv_format):
        e = _support.table()[device][op]
        pytest.skip(
            f"{device} {op}: {', '.join(str(d) for d in e.dtypes)}, {e.head_dim_rule()}, formats {e.kv_formats}"
        )


def assert_same_kv_bytes(got, want, what):
    """(k codes, v codes, k words, v words) of two quantized caches hold the same bits (float words
    compared as int32, so NaN payloads and signed zeros count; any device)."""

    def bits(t):
        t = t.detach().cpu().contiguous()
        return t if t.dtype == torch.uint8 else t.view(torch.int32)

    for name, a, b in zip(("k codes", "v codes", "k words", "v words"), got, want):
        assert torch.equal(bits(a), bits(b)), f"{what}: {name} differ"


def capture_cuda_graph(body):
    """(graph, outputs): body() warmed up once on a side stream (allocations, lazy init, as CUDA
    graphs require), then captured; graph.replay() reruns it on the captured buffers."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        body()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = body()
    return graph, outputs
