"""Timing helpers, ceilings and benchmark cases shared by bench/run.py and bench/test_bench_*.py.

Everything here measures; nothing asserts performance. The rules:
  CPU  time.perf_counter, warm-up, median over repetitions (bounded by a time budget).
  CUDA CUDA events around the op alone, median of many runs, L2 flushed before each run by
       writing a buffer of >= 2x the L2 size (flush is outside the events); decode steps are
       also timed as CUDA-graph replays.
Work counts:
  decode  bytes = K/V bytes actually read (tokens each row holds) + q + out
  prefill FLOPs = 4 * head_dim * visible (query, key) pairs * q_heads (causal pairs only)
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

# Head layouts of the two models the project cares about: (q_heads, kv_heads, head_dim).
MODELS = {
    "llama3-8b": (32, 8, 128),
    "smollm2": (9, 3, 64),
    # GQA group 1 (multi-head attention) and 8: the ends of the range issue 12's batched decode covers.
    "llama2-7b": (32, 32, 128),
    "llama3-70b": (64, 8, 128),
}


# --------------------------------------------------------------------------- timing


def _summary(samples_s: Sequence[float], method: str) -> Dict[str, float]:
    ms = sorted(s * 1e3 for s in samples_s)
    return {
        "median_ms": statistics.median(ms),
        "mean_ms": statistics.fmean(ms),
        "min_ms": ms[0],
        "p90_ms": ms[min(len(ms) - 1, int(math.ceil(0.9 * len(ms))) - 1)],
        "reps": len(ms),
        "method": method,
    }


def time_cpu(
    fn: Callable[[], object], *, warmup: int = 2, min_reps: int = 5, max_reps: int = 200, budget_s: float = 0.5
) -> Dict[str, float]:
    """Median wall time of fn() with time.perf_counter; stops after max_reps or once the budget is
    spent (but never before min_reps), so slow anchors do not blow up the run."""
    for _ in range(warmup):
        fn()
    samples: List[float] = []
    start = time.perf_counter()
    while len(samples) < max_reps:
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
        if len(samples) >= min_reps and time.perf_counter() - start > budget_s:
            break
    return _summary(samples, "perf_counter")


class L2Flusher:
    """Writes a buffer of at least 2x the L2 size, so each timed run starts with a cold L2 and
    decode is not flattered by K/V left in cache by the previous repetition."""

    def __init__(self, device: Optional[torch.device] = None):
        props = torch.cuda.get_device_properties(device or torch.cuda.current_device())
        l2 = int(getattr(props, "L2_cache_size", 0) or 64 * 2**20)
        self.nbytes = max(2 * l2, 128 * 2**20)
        self.buf = torch.empty(self.nbytes // 4, dtype=torch.int32, device=device or "cuda")

    def __call__(self) -> None:
        self.buf.zero_()


def time_cuda(
    fn: Callable[[], object],
    *,
    warmup: int = 5,
    reps: int = 50,
    flusher: Optional[L2Flusher] = None,
    budget_s: float = 2.0,
) -> Dict[str, float]:
    """Median of CUDA-event times of fn() alone; the L2 flush runs between the events of two runs."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    wall0 = time.perf_counter()
    done = 0
    for i in range(reps):
        if flusher is not None:
            flusher()
        starts[i].record()
        fn()
        ends[i].record()
        done += 1
        # Bound the wall time for slow anchors (checked every few runs to keep the queue full).
        if done >= 5 and done % 5 == 0:
            torch.cuda.synchronize()
            if time.perf_counter() - wall0 > budget_s:
                break
    torch.cuda.synchronize()
    samples = [starts[i].elapsed_time(ends[i]) / 1e3 for i in range(done)]
    return _summary(samples, "cuda_events" + ("+l2flush" if flusher is not None else ""))


def time_cuda_graph(
    fn: Callable[[], object], *, reps: int = 50, flusher: Optional[L2Flusher] = None
) -> Dict[str, float]:
    """Captures fn() in a CUDA graph (as a decode step would be) and times replays with events.
    Raises whatever capture raises (e.g. an op that synchronizes): callers report it."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up on a side stream, as torch's capture docs require
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    for _ in range(3):
        graph.replay()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        if flusher is not None:
            flusher()
        starts[i].record()
        graph.replay()
        ends[i].record()
    torch.cuda.synchronize()
    samples = [starts[i].elapsed_time(ends[i]) / 1e3 for i in range(reps)]
    return _summary(samples, "cuda_graph" + ("+l2flush" if flusher is not None else ""))


# --------------------------------------------------------------------------- ceilings


def cpu_read_bandwidth(nbytes: int = 512 * 2**20, budget_s: float = 1.0) -> Dict[str, float]:
    """Memory-read ceiling on CPU: torch.sum over a large fp32 tensor (far beyond the caches),
    with torch's own thread count. Reported as bytes read / median time."""
    x = torch.rand(nbytes // 4, dtype=torch.float32)
    t = time_cpu(lambda: x.sum(), warmup=2, min_reps=5, budget_s=budget_s)
    return {"GBps": nbytes / (t["median_ms"] * 1e-3) / 1e9, "bytes": nbytes, "op": "torch.sum fp32", **t}


def cpu_matmul_flops(n: int = 1024, budget_s: float = 1.0) -> Dict[str, float]:
    """Compute ceiling on CPU: an fp32 n x n x n matmul (2 n^3 FLOPs)."""
    a = torch.randn(n, n)
    b = torch.randn(n, n)
    t = time_cpu(lambda: a @ b, warmup=2, min_reps=5, budget_s=budget_s)
    return {"TFLOPs": 2 * n**3 / (t["median_ms"] * 1e-3) / 1e12, "n": n, "op": "matmul fp32", **t}


def gpu_copy_bandwidth(nbytes: int = 1 << 30) -> Dict[str, float]:
    """Bandwidth ceiling on GPU: device-to-device copy; counted as read + write (2 x nbytes)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").uniform_()
    dst = torch.empty_like(src)
    t = time_cuda(lambda: dst.copy_(src), warmup=3, reps=20)
    return {"GBps": 2 * nbytes / (t["median_ms"] * 1e-3) / 1e9, "bytes": nbytes, "op": "d2d copy", **t}


def gpu_matmul_flops(n: int = 8192) -> Dict[str, float]:
    """Compute ceiling on GPU: a bf16 n x n x n matmul (2 n^3 FLOPs)."""
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    t = time_cuda(lambda: a @ b, warmup=3, reps=20)
    return {"TFLOPs": 2 * n**3 / (t["median_ms"] * 1e-3) / 1e12, "n": n, "op": "matmul bf16", **t}


# --------------------------------------------------------------------------- work counts


def decode_bytes(seqlens: Sequence[int], hq: int, hkv: int, d: int, kv_elem: int, q_elem: int) -> int:
    kv = sum(int(l) for l in seqlens) * hkv * d * 2 * kv_elem
    return kv + 2 * len(seqlens) * hq * d * q_elem


def quantized_decode_bytes(
    seqlens: Sequence[int], hq: int, hkv: int, d: int, k_format: str, v_format: str, q_elem: int
) -> int:
    """Bytes a decode really reads from a cache of these KV formats: each visible (token, kv_head)
    vector's codes and scale words (vattn.formats), plus q and out."""
    from vattn import formats

    per_vec = formats.get(k_format).vector_bytes(d) + formats.get(v_format).vector_bytes(d)
    return sum(int(n) for n in seqlens) * hkv * per_vec + 2 * len(seqlens) * hq * d * q_elem


def quantize_cache(cache: torch.Tensor, kv_format: str):
    """(codes, scales) of a dense [rows, seq, heads, d] cache in a quantized format, via vattn's own
    append_kv (the same bytes as reference.quantize)."""
    import vattn
    from vattn import formats

    fmt = formats.get(kv_format)
    rows, seq, heads, d = cache.shape
    codes = torch.zeros((rows, seq, heads, fmt.storage_elems(d)), dtype=torch.uint8, device=cache.device)
    codes = codes.view(fmt.storage_dtype)
    scales = torch.zeros((rows, seq, heads, fmt.scale_words), dtype=torch.float32, device=cache.device)
    dummy = torch.zeros_like(codes)
    dummy_s = torch.zeros_like(scales)
    row_ids = torch.arange(rows, dtype=torch.int32, device=cache.device).repeat_interleave(seq)
    pos = torch.arange(seq, dtype=torch.int32, device=cache.device).repeat(rows)
    x = cache.reshape(rows * seq, heads, d)
    vattn.append_kv_raw(codes, dummy, x, x, row_ids, pos, k_scale=scales, v_scale=dummy_s)
    return codes, scales


def visible_pairs(qlens: Sequence[int], klens: Sequence[int], window_left: int = -1) -> int:
    """(query, key) pairs a causal mask aligned to the end of each row lets through."""
    total = 0
    for n, length in zip(qlens, klens):
        for i in range(n):
            pos = length - n + i
            lo = 0 if window_left < 0 else max(0, pos - window_left)
            total += max(0, pos - lo + 1)
    return total


def prefill_flops(qlens: Sequence[int], klens: Sequence[int], hq: int, d: int) -> int:
    return 4 * d * hq * visible_pairs(qlens, klens)


# --------------------------------------------------------------------------- cases


@dataclass
class DecodeCase:
    model: str
    batch: int
    ctx: int
    dtype: torch.dtype
    ragged: bool = False  # lengths drawn in [ctx/4, ctx] instead of all = ctx

    @property
    def heads(self):
        return MODELS[self.model]

    @property
    def name(self) -> str:
        hq, hkv, d = self.heads
        kind = "ragged" if self.ragged else "uniform"
        return f"{self.model} b={self.batch} ctx={self.ctx} {kind} {_dt(self.dtype)} ({hq}/{hkv}x{d})"


@dataclass
class PrefillCase:
    model: str
    qlens: List[int]
    prefixes: List[int]  # tokens already cached before this chunk, per row
    dtype: torch.dtype

    @property
    def heads(self):
        return MODELS[self.model]

    @property
    def klens(self) -> List[int]:
        return [p + n for p, n in zip(self.prefixes, self.qlens)]

    @property
    def uniform(self) -> bool:
        return len(set(self.qlens)) == 1 and len(set(self.prefixes)) == 1

    @property
    def name(self) -> str:
        hq, hkv, d = self.heads
        b = len(self.qlens)
        if self.uniform:
            shape = f"b={b} q={self.qlens[0]}" + (f" prefix={self.prefixes[0]}" if self.prefixes[0] else "")
        else:
            shape = f"b={b} q={'/'.join(map(str, self.qlens))}" + (
                f" prefix={'/'.join(map(str, self.prefixes))}" if any(self.prefixes) else ""
            )
        return f"{self.model} {shape} {_dt(self.dtype)} ({hq}/{hkv}x{d})"


def _dt(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def decode_cases(device: str, quick: bool) -> List[DecodeCase]:
    if device == "cpu":
        # Modest on purpose (2 cores): fp32 is the CPU's native attention precision; one bf16 case.
        f32, bf = torch.float32, torch.bfloat16
        # Batch-1 context sweep (the GB/s-vs-context plot), then batches, ragged, SmolLM2 heads, bf16.
        cases = [DecodeCase("llama3-8b", 1, c, f32) for c in (512, 1024, 2048, 4096, 8192, 16384, 32768)]
        cases += [
            DecodeCase("llama3-8b", 8, 2048, f32),
            DecodeCase("llama3-8b", 16, 1024, f32),
            DecodeCase("llama3-8b", 64, 512, f32),
            DecodeCase("llama3-8b", 4, 4096, f32, ragged=True),
            DecodeCase("smollm2", 1, 8192, f32),
            DecodeCase("smollm2", 16, 2048, f32),
            DecodeCase("smollm2", 32, 1024, f32),  # issue 12's batched-decode case
            DecodeCase("smollm2", 8, 4096, f32),
            DecodeCase("llama2-7b", 8, 512, f32),  # GQA group 1
            DecodeCase("llama3-70b", 8, 2048, f32),  # GQA group 8
            DecodeCase("smollm2", 64, 512, f32),
            DecodeCase("llama3-8b", 1, 8192, bf),
        ]
        if quick:
            cases = [
                DecodeCase("llama3-8b", 1, 512, f32),
                DecodeCase("llama3-8b", 1, 8192, f32),
                DecodeCase("llama3-8b", 4, 2048, f32, ragged=True),
                DecodeCase("smollm2", 8, 1024, f32),
            ]
        return cases
    bf = torch.bfloat16
    cases = [DecodeCase("llama3-8b", 1, c, bf) for c in (512, 1024, 2048, 4096, 8192, 16384, 32768)]
    cases += [
        DecodeCase("llama3-8b", 8, 8192, bf),
        DecodeCase("llama3-8b", 32, 4096, bf),
        DecodeCase("llama3-8b", 64, 2048, bf),
        DecodeCase("llama3-8b", 16, 32768, bf),
        DecodeCase("smollm2", 1, 32768, bf),
        DecodeCase("smollm2", 64, 4096, bf),
        DecodeCase("llama3-8b", 32, 8192, bf, ragged=True),
        DecodeCase("llama3-8b", 8, 32768, bf, ragged=True),
        DecodeCase("smollm2", 64, 8192, bf, ragged=True),
    ]
    if quick:
        cases = [
            DecodeCase("llama3-8b", 1, 8192, bf),
            DecodeCase("llama3-8b", 16, 32768, bf),
            DecodeCase("llama3-8b", 32, 8192, bf, ragged=True),
            DecodeCase("smollm2", 64, 4096, bf),
        ]
    return cases


def quantized_cases(device: str, quick: bool) -> List[tuple]:
    """(op, model, batch, ctx, qlen) of the per-KV-format rows (decode: qlen 0)."""
    if device == "cpu":
        cases = [
            ("decode", "llama3-8b", 1, 8192, 0),
            ("decode", "llama3-8b", 1, 32768, 0),
            ("prefill", "llama3-8b", 1, 1024, 512),
        ]
        return cases[:1] if quick else cases
    cases = [
        ("decode", "llama3-8b", 1, 32768, 0),
        ("decode", "llama3-8b", 16, 8192, 0),
        ("prefill", "llama3-8b", 1, 4096, 4096),
    ]
    return cases[:1] if quick else cases


def paged_cases(device: str, quick: bool) -> list:
    """Decode and prefill cases run once more through a block table (issue 14: the paged view
    beside the contiguous one, same data, same run)."""
    f32 = torch.float32 if device == "cpu" else torch.bfloat16
    cases = [
        DecodeCase("llama3-8b", 8, 2048, f32),
        DecodeCase("llama3-8b", 1, 8192, f32),
        DecodeCase("smollm2", 16, 2048, f32),
        DecodeCase("llama3-8b", 4, 4096, f32, ragged=True),
        PrefillCase("llama3-8b", [512], [0], f32),
        PrefillCase("llama3-8b", [256], [2048], f32),
    ]
    if device == "cuda":
        cases = [
            DecodeCase("llama3-8b", 16, 8192, f32),
            DecodeCase("llama3-8b", 1, 32768, f32),
            PrefillCase("llama3-8b", [2048], [0], f32),
            PrefillCase("llama3-8b", [512], [4096], f32),
        ]
    return cases[:1] if quick else cases


def prefill_cases(device: str, quick: bool) -> List[PrefillCase]:
    if device == "cpu":
        f32 = torch.float32
        cases = [
            PrefillCase("llama3-8b", [512], [0], f32),
            PrefillCase("llama3-8b", [2048], [0], f32),
            PrefillCase("llama3-8b", [256], [2048], f32),  # chunked prefill on a prefix
            PrefillCase("llama3-8b", [100, 300, 37, 75], [0, 0, 500, 64], f32),  # ragged batch
            PrefillCase("smollm2", [1024], [0], f32),
            PrefillCase("llama3-8b", [512], [0], torch.bfloat16),
        ]
        if quick:
            cases = [PrefillCase("llama3-8b", [256], [0], f32), PrefillCase("llama3-8b", [128], [1024], f32)]
        return cases
    bf = torch.bfloat16
    cases = [
        PrefillCase("llama3-8b", [4096], [0], bf),
        PrefillCase("llama3-8b", [1024] * 8, [0] * 8, bf),
        PrefillCase("llama3-8b", [2048], [6144], bf),  # chunked prefill: 2K chunk on a 6K prefix
        PrefillCase("llama3-8b", [512] * 4, [3584] * 4, bf),
        PrefillCase("llama3-8b", [1000, 3000, 370, 2500], [0, 1024, 4000, 0], bf),  # ragged
        PrefillCase("smollm2", [2048] * 4, [0] * 4, bf),
    ]
    if quick:
        cases = [cases[0], cases[2], cases[4]]
    return cases


def elem_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def seeded(seed: int, device: str) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


@dataclass
class DecodeData:
    case: DecodeCase
    q: torch.Tensor  # [b, hq, d]
    k_cache: torch.Tensor  # [b, cap, hkv, d]
    v_cache: torch.Tensor
    seqlens: torch.Tensor  # int32 [b]
    lens: List[int]
    extras: Dict[str, object] = field(default_factory=dict)


def make_decode(case: DecodeCase, device: str, seed: int = 0) -> DecodeData:
    hq, hkv, d = case.heads
    g = seeded(seed, "cpu")
    if case.ragged:
        lens = torch.randint(max(1, case.ctx // 4), case.ctx + 1, (case.batch,), generator=g)
        lens[0] = case.ctx  # the longest row sets the cache width
    else:
        lens = torch.full((case.batch,), case.ctx)
    cap = int(lens.max())
    # Generated on the target device (fast on GPU) in the target dtype.
    gd = seeded(seed + 1, device)
    q = torch.randn(case.batch, hq, d, generator=gd, device=device, dtype=case.dtype)
    k = torch.randn(case.batch, cap, hkv, d, generator=gd, device=device, dtype=case.dtype)
    v = torch.randn(case.batch, cap, hkv, d, generator=gd, device=device, dtype=case.dtype)
    return DecodeData(case, q, k, v, lens.to(torch.int32).to(device), [int(x) for x in lens])


@dataclass
class PrefillData:
    case: PrefillCase
    q: torch.Tensor  # [total_q, hq, d]
    k_cache: torch.Tensor  # [b, cap, hkv, d]
    v_cache: torch.Tensor
    cu_seqlens_q: torch.Tensor
    seqlens_k: torch.Tensor


def make_prefill(case: PrefillCase, device: str, seed: int = 0) -> PrefillData:
    hq, hkv, d = case.heads
    klens = case.klens
    cap = max(klens)
    gd = seeded(seed, device)
    total = sum(case.qlens)
    q = torch.randn(total, hq, d, generator=gd, device=device, dtype=case.dtype)
    k = torch.randn(len(klens), cap, hkv, d, generator=gd, device=device, dtype=case.dtype)
    v = torch.randn(len(klens), cap, hkv, d, generator=gd, device=device, dtype=case.dtype)
    cu = torch.tensor([0] + list(_cumsum(case.qlens)), dtype=torch.int32, device=device)
    return PrefillData(case, q, k, v, cu, torch.tensor(klens, dtype=torch.int32, device=device))


def _cumsum(xs):
    s = 0
    for x in xs:
        s += x
        yield s


def tolerance(dtype: torch.dtype) -> float:
    """Max abs error allowed between vattn and an anchor on unit-variance random data (outputs are
    averages of V rows, |out| < ~1): anchors themselves compute in the same low precision."""
    return {torch.float32: 2e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]


# --------------------------------------------------------------------------- anchors
# Every anchor gets the same data as vattn, converted outside the timed region to the layout it
# likes best ([b, heads, seq, dim] contiguous): a conservative comparison for vattn, which reads
# the [rows, seq, kv_heads, dim] cache in place.


@dataclass
class Anchor:
    name: str
    fn: Callable[[], torch.Tensor]
    # Maps the anchor's output to vattn's layout ([total_q, hq, d]) for the correctness check.
    to_vattn: Callable[[torch.Tensor], torch.Tensor]
    note: str = ""


def _bhsd(cache: torch.Tensor, length: Optional[int] = None) -> torch.Tensor:
    x = cache if length is None else cache[:, :length]
    return x.transpose(1, 2).contiguous()


def _sdpa(*args, backend: Optional[str] = None, **kwargs):
    import torch.nn.functional as F

    if backend is None:
        return F.scaled_dot_product_attention(*args, **kwargs)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(getattr(SDPBackend, backend)):
        return F.scaled_dot_product_attention(*args, **kwargs)


def _gqa_variants(q4, k4, v4, call):
    """Yields (fn, note): native GQA first (enable_gqa), then K/V repeated per q head (done here,
    outside the timed region) for backends without GQA support."""
    yield (lambda: call(q4, k4, v4, enable_gqa=True)), ""
    group = q4.shape[1] // k4.shape[1]
    kr = k4.repeat_interleave(group, dim=1)
    vr = v4.repeat_interleave(group, dim=1)
    yield (lambda: call(q4, kr, vr)), "K/V repeated to q heads (no native GQA)"


def first_working(name: str, variants, to_vattn) -> Anchor:
    """The first variant that runs; raises the last error when none does."""
    err: Optional[BaseException] = None
    for fn, note in variants:
        try:
            fn()
            return Anchor(name, fn, to_vattn, note)
        except Exception as e:  # noqa: BLE001 - an anchor that cannot run is skipped, not fatal
            err = e
    raise RuntimeError(f"anchor {name} unavailable: {err}")


def decode_anchors(data: DecodeData, device: str, with_flex: bool = True) -> List[object]:
    """Anchors for a decode case; an entry is an Anchor or a string saying why one is missing."""
    q4 = data.q[:, :, None, :]
    squeeze = lambda o: o[:, :, 0, :]  # noqa: E731
    out: List[object] = []
    if device == "cpu":
        k4, v4 = _bhsd(data.k_cache), _bhsd(data.v_cache)
        if data.case.ragged:
            cap = k4.shape[2]
            mask = (torch.arange(cap)[None, :] < torch.tensor(data.lens)[:, None])[:, None, None, :]
            call = lambda q, k, v, **kw: _sdpa(q, k, v, attn_mask=mask, **kw)  # noqa: E731
            name = "sdpa+mask"
        else:
            call, name = _sdpa, "sdpa"
        out.append(_try(lambda: first_working(name, _gqa_variants(q4, k4, v4, call), squeeze)))
        return out
    if not data.case.ragged:
        k4, v4 = _bhsd(data.k_cache), _bhsd(data.v_cache)
        call = lambda q, k, v, **kw: _sdpa(q, k, v, backend="FLASH_ATTENTION", **kw)  # noqa: E731
        out.append(_try(lambda: first_working("sdpa-flash", _gqa_variants(q4, k4, v4, call), squeeze)))
    if with_flex and data.case.ragged:
        out.append(_try(lambda: flex_decode_anchor(data, q4, squeeze)))
    return out


def _try(make):
    try:
        return make()
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"


_FLEX = None


def _flex():
    global _FLEX
    if _FLEX is None:
        import torch._dynamo
        from torch.nn.attention.flex_attention import flex_attention

        # One compiled kernel per benchmark shape: lift the recompile limit (default 8) so later
        # shapes do not silently fall back to the slow eager flex_attention.
        for knob in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, 64)
        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


def flex_decode_anchor(data: DecodeData, q4, squeeze) -> Anchor:
    """FlexAttention (compiled) on the ragged batch: a block mask built from the row lengths lets
    it skip the blocks past each row's end, as a serious ragged-batch baseline should."""
    from torch.nn.attention.flex_attention import create_block_mask

    lens = data.seqlens.to(torch.int64)
    k4, v4 = _bhsd(data.k_cache), _bhsd(data.v_cache)

    def mask_mod(b, h, q_idx, kv_idx):
        return kv_idx < lens[b]

    bm = create_block_mask(mask_mod, data.case.batch, None, 1, k4.shape[2], device=data.q.device)
    flex = _flex()
    return first_working(
        "flex", [(lambda: flex(q4, k4, v4, block_mask=bm, enable_gqa=True), "compiled, block mask")], squeeze
    )


def prefill_anchors(data: PrefillData, device: str, with_flex: bool = True) -> List[object]:
    case = data.case
    hq = case.heads[0]
    out: List[object] = []
    backend = None if device == "cpu" else "FLASH_ATTENTION"
    if case.uniform:
        b, n, p = len(case.qlens), case.qlens[0], case.prefixes[0]
        q4 = data.q.view(b, n, hq, -1).transpose(1, 2).contiguous()
        k4, v4 = _bhsd(data.k_cache, p + n), _bhsd(data.v_cache, p + n)
        to_v = lambda o: o.transpose(1, 2).reshape(b * n, hq, -1)  # noqa: E731
        if p == 0:
            call = lambda q, k, v, **kw: _sdpa(q, k, v, is_causal=True, backend=backend, **kw)  # noqa: E731
            name = "sdpa" if device == "cpu" else "sdpa-flash"
        else:
            # Causal aligned to the end of the row (the chunk's queries sit after the prefix).
            from torch.nn.attention.bias import causal_lower_right

            bias = causal_lower_right(n, p + n)
            call = lambda q, k, v, **kw: _sdpa(q, k, v, attn_mask=bias, **kw)  # noqa: E731
            name = "sdpa-lower-right"
        out.append(_try(lambda: first_working(name, _gqa_variants(q4, k4, v4, call), to_v)))
    elif device == "cpu":
        out.append(_try(lambda: sdpa_loop_anchor(data)))
    if device != "cpu" and with_flex and (not case.uniform or case.prefixes[0] > 0):
        out.append(_try(lambda: flex_prefill_anchor(data)))
    return out


def sdpa_loop_anchor(data: PrefillData) -> Anchor:
    """Ragged batch without a varlen kernel: one SDPA call per row, as users do."""
    from torch.nn.attention.bias import causal_lower_right

    case = data.case
    hq = case.heads[0]
    per_row = []
    cu = [0] + list(_cumsum(case.qlens))
    for b, (n, length) in enumerate(zip(case.qlens, case.klens)):
        q4 = data.q[cu[b] : cu[b + 1]].transpose(0, 1)[None].contiguous()
        k4 = _bhsd(data.k_cache[b : b + 1], length)
        v4 = _bhsd(data.v_cache[b : b + 1], length)
        per_row.append((q4, k4, v4, causal_lower_right(n, length) if n != length else None))

    def run():
        outs = []
        for q4, k4, v4, bias in per_row:
            if bias is None:
                outs.append(_sdpa(q4, k4, v4, is_causal=True, enable_gqa=True))
            else:
                outs.append(_sdpa(q4, k4, v4, attn_mask=bias, enable_gqa=True))
        return outs

    to_v = lambda outs: torch.cat([o[0].transpose(0, 1) for o in outs]).reshape(-1, hq, outs[0].shape[-1])  # noqa: E731
    return first_working("sdpa-loop", [(run, "one call per row")], to_v)


def flex_prefill_anchor(data: PrefillData) -> Anchor:
    """FlexAttention (compiled) on the padded ragged batch; the block mask skips padding and
    the blocks above each row's (end-aligned) diagonal."""
    from torch.nn.attention.flex_attention import create_block_mask

    case = data.case
    hq = case.heads[0]
    b, maxq = len(case.qlens), max(case.qlens)
    dev = data.q.device
    qpad = torch.zeros(b, maxq, hq, data.q.shape[-1], dtype=data.q.dtype, device=dev)
    cu = [0] + list(_cumsum(case.qlens))
    for i, n in enumerate(case.qlens):
        qpad[i, :n] = data.q[cu[i] : cu[i + 1]]
    q4 = qpad.transpose(1, 2).contiguous()
    k4, v4 = _bhsd(data.k_cache), _bhsd(data.v_cache)
    qlens = torch.tensor(case.qlens, device=dev)
    prefix = torch.tensor(case.prefixes, device=dev)

    def mask_mod(bi, h, q_idx, kv_idx):
        return (q_idx < qlens[bi]) & (kv_idx <= q_idx + prefix[bi])

    bm = create_block_mask(mask_mod, b, None, maxq, k4.shape[2], device=dev)
    flex = _flex()

    def to_v(o):
        return torch.cat([o[i, :, :n].transpose(0, 1) for i, n in enumerate(case.qlens)])

    return first_working(
        "flex", [(lambda: flex(q4, k4, v4, block_mask=bm, enable_gqa=True), "compiled, block mask")], to_v
    )


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def devices():
    """Devices each pytest benchmark runs on: cpu always, cuda marked gpu."""
    import pytest

    return ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def merge_states_eager(oa, la, ob, lb):
    """The merge_states anchor: the plain formula in torch eager ops (fp32 weights, output in oa's
    dtype). Lean on purpose (no -inf handling) so it times what a user would write."""
    import torch

    m = torch.maximum(la, lb)
    wa, wb = torch.exp(la - m), torch.exp(lb - m)
    s = wa + wb
    return (oa.float() * (wa / s)[..., None] + ob.float() * (wb / s)[..., None]).to(oa.dtype), m + torch.log(s)


def paged_copy(cache: torch.Tensor, block_size: int, seed: int = 0):
    """The contiguous [b, cap, hkv, d] cache as a paged one (vLLM's NHD blocks): physical blocks
    [b * ceil(cap / block_size), block_size, hkv, d] in a random order, and the int32 block table
    [b, blocks per row] that finds each row's tokens (token t of row r sits in block
    table[r][t // block_size] at slot t % block_size)."""
    b, cap, hkv, d = cache.shape
    per_row = -(-cap // block_size)
    padded = cache.new_zeros(b, per_row * block_size, hkv, d)
    padded[:, :cap] = cache
    logical = padded.view(b * per_row, block_size, hkv, d)
    perm = torch.randperm(b * per_row, generator=seeded(seed, "cpu")).to(cache.device)
    physical = torch.empty_like(logical)
    physical[perm] = logical
    table = perm.view(b, per_row).to(torch.int32)
    return physical, table
