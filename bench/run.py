#!/usr/bin/env python
"""Runs every vattn microbenchmark on one device and prints one table.

    python bench/run.py --device cpu [--quick] [--json PATH] [--markdown PATH]
    python bench/run.py --device cuda --json out.json

Columns: op, shape, vattn time, anchor, anchor time, ratio (anchor / vattn: > 1 means vattn is
faster), achieved GB/s (decode, append, merge: bytes actually moved) or TFLOP/s (prefill: 4 * d *
visible causal pairs * q heads), and the percent of the ceiling measured in the same run
(CPU: torch.sum read bandwidth, fp32 matmul; CUDA: device-to-device copy, bf16 matmul).
On CUDA decode is also timed as a CUDA-graph replay (column graph). With --busy-cores the table
adds the mean times and their ratio: under contention a call's time is bimodal (a thread preempted
while it holds work makes the call wait a scheduler slice), a median hides those calls and a
server's throughput is the mean.
Nothing here asserts speed; correctness against each anchor is checked (column err) and a
mismatch is flagged in the table and the exit status.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sys
import time
import traceback
from typing import Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import bench_utils as bu  # noqa: E402


class Runner:
    def __init__(
        self,
        device: str,
        quick: bool,
        time_budget_s: float,
        with_flex: bool,
        only: Optional[str] = None,
        busy: bool = False,
    ):
        self.only = only
        # Under contention a call's time is bimodal (most calls quick, some waiting a scheduler
        # slice of milliseconds for a preempted thread): the mean then says what a server gets, and
        # the samples must span many slices, so they are bounded by time, not by a count.
        self.busy = busy
        self.device = device
        self.quick = quick
        self.deadline = time.perf_counter() + time_budget_s
        self.with_flex = with_flex
        self.rows: List[Dict] = []
        self.flusher = bu.L2Flusher() if device == "cuda" else None
        self.ceilings: Dict[str, Dict] = {}

    # -- timing dispatch
    def time(self, fn) -> Dict[str, float]:
        if self.device == "cpu":
            budget = 0.12 if self.quick else 0.35
            return bu.time_cpu(
                fn, budget_s=budget, min_reps=3 if self.quick else 5, max_reps=100_000 if self.busy else 200
            )
        return bu.time_cuda(fn, reps=20 if self.quick else 60, flusher=self.flusher)

    def out_of_time(self) -> bool:
        return time.perf_counter() > self.deadline

    def measure_ceilings(self) -> None:
        if self.device == "cpu":
            self.ceilings["bandwidth"] = bu.cpu_read_bandwidth(
                256 * 2**20 if self.quick else 512 * 2**20, budget_s=0.3 if self.quick else 1.0
            )
            self.ceilings["compute"] = bu.cpu_matmul_flops(
                768 if self.quick else 1024, budget_s=0.3 if self.quick else 1.0
            )
        else:
            self.ceilings["bandwidth"] = bu.gpu_copy_bandwidth()
            self.ceilings["compute"] = bu.gpu_matmul_flops()

    # -- rows
    def add(
        self,
        op: str,
        shape: str,
        vt: Optional[Dict],
        anchor: Optional[bu.Anchor],
        at: Optional[Dict],
        metric: str,
        work: float,
        err: Optional[float] = None,
        ok: Optional[bool] = None,
        note: str = "",
        graph: Optional[Dict] = None,
        params: Optional[Dict] = None,
    ) -> None:
        vms = vt["median_ms"] if vt else None
        ams = at["median_ms"] if at else None
        scale = 1e9 if metric == "GB/s" else 1e12
        value = (work / (vms * 1e-3) / scale) if vms else None
        anchor_value = (work / (ams * 1e-3) / scale) if ams else None
        pct = None
        if value is not None:
            ceiling = self.ceilings["bandwidth"]["GBps"] if metric == "GB/s" else self.ceilings["compute"]["TFLOPs"]
            pct = 100 * value / ceiling
        vmean = vt.get("mean_ms") if vt else None
        amean = at.get("mean_ms") if at else None
        self.rows.append(
            {
                "op": op,
                "shape": shape,
                "vattn_ms": vms,
                "vattn_mean_ms": vmean,
                "anchor_mean_ms": amean,
                "mean_ratio": (amean / vmean) if (vmean and amean) else None,
                "anchor": anchor.name if anchor else None,
                "anchor_ms": ams,
                "ratio": (ams / vms) if (vms and ams) else None,
                "metric": metric,
                "value": value,
                "pct_ceiling": pct,
                "anchor_value": anchor_value,
                "work": work,
                "params": params or {},
                "graph_ms": graph["median_ms"] if graph else None,
                "max_err": err,
                "ok": ok,
                "note": "; ".join(x for x in (note, anchor.note if anchor else "") if x),
                "vattn_timing": vt,
                "anchor_timing": at,
                "graph_timing": graph,
            }
        )

    def _no_result(self, op: str, shape: str, metric: str, ok: Optional[bool], note: str) -> None:
        """A row without a measurement (failed or skipped)."""
        empty = (
            "vattn_ms",
            "vattn_mean_ms",
            "anchor",
            "anchor_ms",
            "anchor_mean_ms",
            "ratio",
            "mean_ratio",
            "value",
            "pct_ceiling",
            "graph_ms",
            "max_err",
        )
        self.rows.append({"op": op, "shape": shape, "metric": metric, **dict.fromkeys(empty), "ok": ok, "note": note})

    def failed(self, op: str, shape: str, metric: str, e: BaseException) -> None:
        msg = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        self._no_result(op, shape, metric, False, "FAILED " + msg)
        if os.environ.get("VATTN_BENCH_TRACEBACK"):
            traceback.print_exc()

    def skipped(self, op: str, shape: str, metric: str, why: str) -> None:
        self._no_result(op, shape, metric, None, "skipped: " + why)

    def compare_and_add(self, op, shape, metric, work, vfn, vt, anchors, vout, graph=None, params=None):
        tol = None
        added = False
        for a in anchors:
            if isinstance(a, str):
                self.add(
                    op, shape, vt, None, None, metric, work, note="anchor unavailable: " + a, graph=graph, params=params
                )
                added = True
                continue
            ref = a.to_vattn(a.fn())
            err = bu.max_abs_err(vout, ref)
            tol = bu.tolerance(vout.dtype)
            at = self.time(a.fn)
            self.add(op, shape, vt, a, at, metric, work, err=err, ok=err <= tol, graph=graph, params=params)
            added = True
        if not added:
            self.add(op, shape, vt, None, None, metric, work, graph=graph, params=params)

    # -- benchmarks
    def decode(self, case: bu.DecodeCase) -> None:
        import vattn

        hq, hkv, d = case.heads
        data = bu.make_decode(case, self.device)
        maxlen = max(data.lens)

        def vfn():
            return vattn.decode_attention(data.q, data.k_cache, data.v_cache, data.seqlens, max_seqlen_k=maxlen)

        vout = vfn()
        vt = self.time(vfn)
        graph = None
        if self.device == "cuda":
            try:
                graph = bu.time_cuda_graph(vfn, reps=20 if self.quick else 60, flusher=self.flusher)
            except Exception as e:  # noqa: BLE001 - reported, the eager number stands
                print(f"  graph capture failed for {case.name}: {e}", file=sys.stderr)
        work = bu.decode_bytes(data.lens, hq, hkv, d, bu.elem_size(case.dtype), bu.elem_size(case.dtype))
        anchors = bu.decode_anchors(data, self.device, with_flex=self.with_flex)
        params = {
            "model": case.model,
            "batch": case.batch,
            "ctx": case.ctx,
            "ragged": case.ragged,
            "dtype": bu._dt(case.dtype),
            "lens": data.lens,
        }
        self.compare_and_add("decode", case.name, "GB/s", work, vfn, vt, anchors, vout, graph, params)

    def prefill(self, case: bu.PrefillCase) -> None:
        import vattn

        hq, hkv, d = case.heads
        data = bu.make_prefill(case, self.device)

        def vfn():
            return vattn.prefill_attention(
                data.q,
                data.k_cache,
                data.v_cache,
                data.cu_seqlens_q,
                data.seqlens_k,
                max_seqlen_q=max(case.qlens),
                max_seqlen_k=max(case.klens),
            )

        vout = vfn()
        vt = self.time(vfn)
        work = bu.prefill_flops(case.qlens, case.klens, hq, d)
        anchors = bu.prefill_anchors(data, self.device, with_flex=self.with_flex)
        params = {"model": case.model, "qlens": case.qlens, "prefixes": case.prefixes, "dtype": bu._dt(case.dtype)}
        self.compare_and_add("prefill", case.name, "TFLOP/s", work, vfn, vt, anchors, vout, params=params)

    def paged(self, op: str, case, block_size: int) -> None:
        """The same op over the same data through a block table (vLLM's NHD blocks, permuted):
        the anchor is vattn's own contiguous view, so ratio = contiguous time / paged time."""
        import vattn

        hq, hkv, d = case.heads
        data = bu.make_decode(case, self.device) if op == "decode" else bu.make_prefill(case, self.device)
        kp, table = bu.paged_copy(data.k_cache, block_size)
        vp, _ = bu.paged_copy(data.v_cache, block_size)
        if op == "decode":
            maxlen = max(data.lens)

            def run(k, v, bt):
                return vattn.decode_attention(data.q, k, v, data.seqlens, max_seqlen_k=maxlen, block_table=bt)

            work = bu.decode_bytes(data.lens, hq, hkv, d, bu.elem_size(case.dtype), bu.elem_size(case.dtype))
            metric = "GB/s"
        else:

            def run(k, v, bt):
                return vattn.prefill_attention(
                    data.q, k, v, data.cu_seqlens_q, data.seqlens_k,
                    max_seqlen_q=max(case.qlens), max_seqlen_k=max(case.klens), block_table=bt,
                )  # fmt: skip

            work = bu.prefill_flops(case.qlens, case.klens, hq, d)
            metric = "TFLOP/s"

        def vfn():
            return run(kp, vp, table)

        vout = vfn()
        vt = self.time(vfn)
        contiguous = bu.Anchor("vattn contiguous", lambda: run(data.k_cache, data.v_cache, None), lambda o: o)
        params = {"block_size": block_size, "dtype": bu._dt(case.dtype)}
        self.compare_and_add(op + "[paged]", f"{case.name} block={block_size}", metric, work, vfn, vt,
                             [contiguous], vout, params=params)  # fmt: skip

    def quantized(self, op: str, model: str, batch: int, ctx: int, qlen: int, kv_format: str) -> None:
        """decode (qlen 0) or prefill (qlen queries on a ctx - qlen prefix) on a cache of kv_format
        (one name, or K,V), against vattn on the same K/V stored in the q dtype, timed in the same
        run: the ratio says how much the fewer bytes buy. GB/s counts the bytes really read."""
        import vattn

        dt = torch.bfloat16
        hq, hkv, d = bu.MODELS[model]
        kname, vname = (kv_format.split(",") + [kv_format])[:2]
        g = bu.seeded(7, self.device)
        q = torch.randn(batch * max(qlen, 1), hq, d, generator=g, device=self.device, dtype=dt)
        k = torch.randn(batch, ctx, hkv, d, generator=g, device=self.device, dtype=dt)
        v = torch.randn(batch, ctx, hkv, d, generator=g, device=self.device, dtype=dt)
        kc, ks = bu.quantize_cache(k, kname)
        vc, vs = bu.quantize_cache(v, vname)
        lens = torch.full((batch,), ctx, dtype=torch.int32, device=self.device)
        cu = torch.arange(0, batch * qlen + 1, max(qlen, 1), dtype=torch.int32, device=self.device)

        def run(kk, vv, kss, vss):
            if op == "decode":
                return vattn.decode_attention(q, kk, vv, lens, max_seqlen_k=ctx, k_scale=kss, v_scale=vss)
            return vattn.prefill_attention(
                q, kk, vv, cu, lens, max_seqlen_q=qlen, max_seqlen_k=ctx, k_scale=kss, v_scale=vss
            )

        vout = run(kc, vc, ks, vs)
        vt = self.time(lambda: run(kc, vc, ks, vs))
        ref = run(k, v, None, None)
        at = self.time(lambda: run(k, v, None, None))
        anchor = bu.Anchor("vattn bf16 cache", lambda: ref, lambda x: x, note="same shape, unquantized, same run")
        if op == "decode":
            work = bu.quantized_decode_bytes([ctx] * batch, hq, hkv, d, kname, vname, 2)
            metric = "GB/s"
        else:
            work = bu.prefill_flops([qlen] * batch, [ctx] * batch, hq, d)
            metric = "TFLOP/s"
        err = bu.max_abs_err(vout, ref)
        shape = (
            f"{model} b={batch} ctx={ctx}" + (f" q={qlen}" if qlen else "") + f" kv={kv_format} bf16 ({hq}/{hkv}x{d})"
        )
        params = {"model": model, "batch": batch, "ctx": ctx, "qlen": qlen, "kv_format": kv_format, "dtype": "bf16"}
        self.add(
            op + "[quant]", shape, vt, anchor, at, metric, work, err=err, note="err: vs unquantized", params=params
        )

    def eviction(self, kind: str, model: str, batch: int, ctx: int, keep: float) -> None:
        """Eviction rows (issue 10), all timed against full-cache decode in the same run:
        decode[evicted]  decode over a cache compacted to `keep` with per-(row, kv head) lengths that
                         differ by head (as AdaKV leaves them), vs decode over the full ctx;
        decode[scores]   decode that also adds each token's probability into a score buffer (H2O),
                         vs the same decode without scores (the emission overhead);
        compact_kv       compacting every row of one layer to `keep` (in place, order kept), vs one
                         full decode step of that layer (what one compaction costs in decode steps)."""
        import vattn

        dt = torch.float32 if self.device == "cpu" else torch.bfloat16
        hq, hkv, d = bu.MODELS[model]
        g = bu.seeded(11, self.device)
        dev = self.device
        q = torch.randn(batch, hq, d, generator=g, device=dev, dtype=dt)
        k = torch.randn(batch, ctx, hkv, d, generator=g, device=dev, dtype=dt)
        v = torch.randn(batch, ctx, hkv, d, generator=g, device=dev, dtype=dt)
        lens = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
        kept = max(1, int(ctx * keep))
        # Per-head lengths around kept (+-20%, the mean stays kept), as a head-wise budget leaves them.
        spread = torch.linspace(0.8, 1.2, hkv, device=dev)
        head_lens = (kept * spread).round().clamp(1, ctx).to(torch.int32).expand(batch, hkv).contiguous()

        def full():
            return vattn.decode_attention(q, k, v, lens, max_seqlen_k=ctx)

        ft = self.time(full)
        anchor = bu.Anchor("full-cache decode", full, lambda x: x, note="same shapes, same run")
        es = bu.elem_size(dt)
        shape = f"{model} b={batch} ctx={ctx} keep={keep} {bu._dt(dt)} ({hq}/{hkv}x{d})"
        params = {"model": model, "batch": batch, "ctx": ctx, "keep": keep}
        if kind == "decode[evicted]":

            def sparse():
                return vattn.decode_attention(q, k, v, lens, head_seqlens_k=head_lens, max_seqlen_k=ctx)

            vt = self.time(sparse)
            work = int(head_lens.sum()) * d * 2 * es + 2 * batch * hq * d * es
            self.add(kind, shape, vt, anchor, ft, "GB/s", work, note="per-head lengths", params=params)
        elif kind == "decode[scores]":
            scores = torch.zeros(batch, hkv, ctx, dtype=torch.float32, device=dev)

            def with_scores():
                return vattn.decode_attention(q, k, v, lens, max_seqlen_k=ctx, scores=scores, score_mode="add")

            vt = self.time(with_scores)
            work = bu.decode_bytes([ctx] * batch, hq, hkv, d, es, es) + 2 * batch * hkv * ctx * 4
            anchor = bu.Anchor("decode without scores", full, lambda x: x, note="ratio < 1: the emission cost")
            self.add(kind, shape, vt, anchor, ft, "GB/s", work, params=params)
        elif kind == "decode[quest]":
            # Quest with 1/8 of the blocks (keep = 1/8): block scores + selection + sparse decode,
            # timed together, vs the dense decode over everything.
            block = 16
            meta = torch.zeros(batch, -(-ctx // block), hkv, 2, d, device=dev)
            rows = torch.arange(batch, dtype=torch.int32, device=dev)
            vattn.block_minmax(k, meta, rows, lens, torch.zeros_like(rows), block=block)
            budget = max(block, int(ctx * keep))

            def quest():
                ids, counts = vattn.quest_select(
                    q, meta, rows, lens, token_budget=budget, block=block, max_blocks_hint=-(-ctx // block)
                )
                return vattn.sparse_decode_attention(q, k, v, rows, lens, ids, counts, block=block, check=False)

            vt = self.time(quest)
            work = batch * budget * hkv * d * 2 * es + meta.numel() * 4  # chosen K/V + block metadata read
            self.add(kind, shape, vt, anchor, ft, "GB/s", work, note="select + sparse decode", params=params)
        else:  # compact_kv
            rows = torch.arange(batch, dtype=torch.int32, device=dev)
            keep_idx = torch.stack(
                [
                    torch.randperm(ctx, generator=torch.Generator().manual_seed(h))[:kept].sort().values
                    for h in range(hkv)
                ]
            ).to(device=dev, dtype=torch.int32)
            keep_idx = keep_idx.expand(batch, hkv, kept).contiguous()
            keep_lens = torch.full((batch, hkv), kept, dtype=torch.int32, device=dev)
            kc, vc = k.clone(), v.clone()

            def compact():
                vattn.compact_kv(kc, vc, rows, keep_idx, keep_lens)

            vt = self.time(compact)
            work = 2 * 2 * batch * hkv * kept * d * es  # read + write the kept K and V
            self.add(
                kind, shape, vt, anchor, ft, "GB/s", work, note="ratio: decode steps per compaction", params=params
            )

    def append(self, model: str, rows: int, tokens_per_row: int, dtype: torch.dtype) -> None:
        """append_kv: decode-style (one token per row) or prefill-style (many tokens, one row).
        Anchor: torch advanced-index assignment (what reference.append_kv does)."""
        import vattn

        hq, hkv, d = bu.MODELS[model]
        dev = self.device
        cap = max(2 * tokens_per_row, 1024)
        g = bu.seeded(3, dev)
        kc = torch.randn(rows, cap, hkv, d, generator=g, device=dev, dtype=dtype)
        vc = torch.randn_like(kc)
        n = rows * tokens_per_row
        k = torch.randn(n, hkv, d, generator=g, device=dev, dtype=dtype)
        v = torch.randn_like(k)
        row_ids = torch.arange(rows, device=dev, dtype=torch.int32).repeat_interleave(tokens_per_row)
        pos = (torch.arange(tokens_per_row, device=dev, dtype=torch.int32) + 7).repeat(rows)
        rl, pl = row_ids.long(), pos.long()
        kc2, vc2 = kc.clone(), vc.clone()

        def vfn():
            vattn.append_kv_raw(kc, vc, k, v, row_ids, pos)

        def afn():
            kc2[rl, pl] = k
            vc2[rl, pl] = v

        vfn()
        afn()
        err = max(bu.max_abs_err(kc, kc2), bu.max_abs_err(vc, vc2))
        vt, at = self.time(vfn), self.time(afn)
        work = 2 * 2 * n * hkv * d * bu.elem_size(dtype)  # read new K/V + write them
        shape = f"{model} rows={rows} tokens/row={tokens_per_row} {bu._dt(dtype)}"
        self.add(
            "append_kv",
            shape,
            vt,
            bu.Anchor("torch index_put", afn, lambda x: x),
            at,
            "GB/s",
            work,
            err=err,
            ok=err == 0.0,
        )

    def merge(self, n: int, heads: int, d: int, dtype: torch.dtype) -> None:
        """merge_states against the same formula written in torch eager ops (fp32 math)."""
        import vattn

        dev = self.device
        g = bu.seeded(5, dev)
        oa = torch.randn(n, heads, d, generator=g, device=dev, dtype=dtype)
        ob = torch.randn(n, heads, d, generator=g, device=dev, dtype=dtype)
        la = torch.randn(n, heads, generator=g, device=dev) * 3
        lb = torch.randn(n, heads, generator=g, device=dev) * 3

        def vfn():
            return vattn.merge_states(oa, la, ob, lb)

        def afn():
            return bu.merge_states_eager(oa, la, ob, lb)

        vo = vfn()
        vo = vo[0] if isinstance(vo, (tuple, list)) else vo
        ao = afn()[0]
        err = bu.max_abs_err(vo, ao)
        vt, at = self.time(vfn), self.time(afn)
        es = bu.elem_size(dtype)
        work = 3 * n * heads * d * es + 3 * n * heads * 4
        self.add(
            "merge_states",
            f"n={n} heads={heads} d={d} {bu._dt(dtype)}",
            vt,
            bu.Anchor("torch eager", afn, lambda x: x),
            at,
            "GB/s",
            work,
            err=err,
            ok=err <= bu.tolerance(dtype),
        )

    def run_all(self) -> None:
        dt = torch.float32 if self.device == "cpu" else torch.bfloat16
        jobs = []
        for c in bu.decode_cases(self.device, self.quick):
            jobs.append(("decode", c.name, "GB/s", lambda c=c: self.decode(c)))
        for c in bu.prefill_cases(self.device, self.quick):
            jobs.append(("prefill", c.name, "TFLOP/s", lambda c=c: self.prefill(c)))
        if self.device == "cpu":
            extra = [("llama3-8b", 64, 1), ("llama3-8b", 1, 1024)] if not self.quick else [("llama3-8b", 16, 1)]
            merges = [(4096, 32, 128)] if not self.quick else [(1024, 32, 128)]
        else:
            extra = [("llama3-8b", 64, 1), ("llama3-8b", 1, 8192)]
            merges = [(16384, 32, 128)]
        for m, r, t in extra:
            jobs.append(
                ("append_kv", f"{m} rows={r} tokens/row={t}", "GB/s", lambda m=m, r=r, t=t: self.append(m, r, t, dt))
            )
        for n, h, d in merges:
            jobs.append(
                ("merge_states", f"n={n} heads={h} d={d}", "GB/s", lambda n=n, h=h, d=d: self.merge(n, h, d, dt))
            )
        for case in bu.paged_cases(self.device, self.quick):
            op = "decode" if isinstance(case, bu.DecodeCase) else "prefill"
            for bs in (16, 256) if not self.quick else (16,):
                jobs.append(
                    (
                        op + "[paged]",
                        f"{case.name} block={bs}",
                        "GB/s" if op == "decode" else "TFLOP/s",
                        lambda op=op, c=case, bs=bs: self.paged(op, c, bs),
                    )
                )
        for op, model, b, ctx, qlen in bu.quantized_cases(self.device, self.quick):
            for fmt in ("fp8_e4m3", "int8", "int4", "int8,int4", "int4_ch,int4"):  # int4_ch,int4: KVCache "int4"
                jobs.append(
                    (
                        op + "[quant]",
                        f"{model} b={b} ctx={ctx} q={qlen} kv={fmt}",
                        "GB/s" if op == "decode" else "TFLOP/s",
                        lambda op=op, m=model, b=b, c=ctx, q=qlen, f=fmt: self.quantized(op, m, b, c, q, f),
                    )
                )
        ev = [("llama3-8b", 4, 16384), ("llama3-8b", 1, 32768)] if not self.quick else [("llama3-8b", 1, 4096)]
        if self.device == "cuda":
            ev = [("llama3-8b", 16, 16384), ("llama3-8b", 4, 32768)] if not self.quick else [("llama3-8b", 4, 8192)]
        for kind in ("decode[evicted]", "decode[scores]", "compact_kv", "decode[quest]"):
            keep = 0.125 if kind == "decode[quest]" else 0.25
            for m, b, c in ev:
                jobs.append(
                    (
                        kind,
                        f"{m} b={b} ctx={c} keep={keep}",
                        "GB/s",
                        lambda kind=kind, m=m, b=b, c=c, keep=keep: self.eviction(kind, m, b, c, keep),
                    )
                )
        if self.only:
            pat = re.compile(self.only)
            jobs = [j for j in jobs if pat.search(f"{j[0]} {j[1]}")]
        # Cases with a FlexAttention anchor compile it per shape (seconds each): run them last so a
        # time budget spent on compiling never costs the plain cases.
        jobs.sort(key=lambda j: self.with_flex and self.device == "cuda" and _wants_flex(j[1]))
        for op, shape, metric, job in jobs:
            if self.out_of_time():
                self.skipped(op, shape, metric, "time budget spent")
                continue
            t0 = time.perf_counter()
            try:
                job()
            except Exception as e:  # noqa: BLE001 - one failing op must not hide the others
                self.failed(op, shape, metric, e)
            finally:
                if self.device == "cuda":
                    torch.cuda.empty_cache()
            print(f"  [{time.perf_counter() - t0:5.1f}s] {op} {shape}", file=sys.stderr, flush=True)


def _wants_flex(shape: str) -> bool:
    return "ragged" in shape or "prefix=" in shape or "/" in shape.split("(")[0]


# --------------------------------------------------------------------------- output


def _f(x, spec):
    return "-" if x is None else format(x, spec)


def _time(ms):
    if ms is None:
        return "-"
    return f"{ms * 1e3:.1f} us" if ms < 1 else f"{ms:.2f} ms"


def table_rows(rows: List[Dict], with_graph: bool, with_mean: bool = False) -> List[List[str]]:
    out = []
    for r in rows:
        ok = {True: "ok", False: "MISMATCH", None: ""}[r["ok"]]
        line = [r["op"], r["shape"], _time(r["vattn_ms"])]
        if with_graph:
            line.append(_time(r.get("graph_ms")))
        line += [
            r["anchor"] or "-",
            _time(r["anchor_ms"]),
            _f(r["ratio"], ".2f"),
        ]
        if with_mean:
            line += [_time(r.get("vattn_mean_ms")), _time(r.get("anchor_mean_ms")), _f(r.get("mean_ratio"), ".2f")]
        line += [
            (_f(r["value"], ".1f" if r["metric"] == "GB/s" else ".3f") + " " + r["metric"]) if r["value"] else "-",
            _f(r["pct_ceiling"], ".0f") + ("%" if r["pct_ceiling"] is not None else ""),
            (_f(r["max_err"], ".1e") + " " + ok).strip() if r["max_err"] is not None else ok,
            r["note"],
        ]
        out.append(line)
    return out


def headers(with_graph: bool, with_mean: bool = False) -> List[str]:
    h = ["op", "shape", "vattn"]
    if with_graph:
        h.append("vattn graph")
    h += ["anchor", "anchor time", "ratio"]
    if with_mean:
        h += ["vattn mean", "anchor mean", "mean ratio"]
    return h + ["achieved", "% ceiling", "err", "note"]


def format_text(rows, with_graph, with_mean: bool = False) -> str:
    hs = headers(with_graph, with_mean)
    body = table_rows(rows, with_graph, with_mean)
    widths = [max(len(hs[i]), *(len(b[i]) for b in body)) if body else len(hs[i]) for i in range(len(hs))]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(hs), fmt(["-" * w for w in widths])] + [fmt(b) for b in body])


def format_markdown(rows, with_graph, with_mean: bool = False) -> str:
    hs = headers(with_graph, with_mean)
    lines = ["| " + " | ".join(hs) + " |", "|" + "---|" * len(hs)]
    for b in table_rows(rows, with_graph, with_mean):
        lines.append("| " + " | ".join(c.replace("|", "/") for c in b) + " |")
    return "\n".join(lines)


def machine_info(device: str) -> Dict[str, str]:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
        "loadavg_1m": f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "?",
    }
    try:
        import subprocess

        here = os.path.dirname(os.path.abspath(__file__))
        rev = subprocess.run(
            ["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        )
        info["commit"] = rev.stdout.strip() or "?"
    except Exception:  # noqa: BLE001 - not a git checkout
        info["commit"] = "?"
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = p.name
        info["gpu_cc"] = f"{p.major}.{p.minor}"
        info["cuda"] = str(torch.version.cuda)
    try:
        import vattn

        info["vattn"] = getattr(vattn, "__version__", "") or "?"
        info["vattn_built_with_cuda"] = str(getattr(vattn._C, "built_with_cuda", "?"))
    except Exception as e:  # noqa: BLE001
        info["vattn"] = f"import failed: {e}"
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def start_spinners(n: int) -> list:
    """n processes that spin (pure Python loop), each pinned to one of the last n CPUs: the
    "one core busy" condition of a shared machine. The caller kills them."""
    import subprocess

    procs = []
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    for i in range(n):
        cpu = cpus[-1 - (i % len(cpus))]
        code = f"import os\nos.sched_setaffinity(0, {{{cpu}}})\nwhile True:\n    pass\n"
        procs.append(subprocess.Popen([sys.executable, "-c", code]))
    if procs:
        time.sleep(0.5)  # let them start spinning
    return procs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="few small shapes, few repetitions")
    ap.add_argument("--json", help="write rows, ceilings and machine info here")
    ap.add_argument("--markdown", help="write the table (markdown) here")
    ap.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="seconds after which remaining cases are skipped (default 170 cpu, 240 cuda; quick 25 / 120)",
    )
    ap.add_argument("--no-flex", action="store_true", help="skip FlexAttention anchors (each shape compiles)")
    ap.add_argument("--only", help="regex on 'op shape': run only the matching cases")
    ap.add_argument("--impl", choices=["fast", "simple"], default="fast", help="vattn attention kernel variant")
    ap.add_argument(
        "--busy-cores",
        type=int,
        default=0,
        help="start this many processes that spin on the last CPUs (one each, pinned) for the whole run: "
        "the contention case (vattn and its anchor both measured under it; the table adds mean times)",
    )
    args = ap.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        print("run.py: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    try:
        import vattn

        if hasattr(vattn, "ops") and hasattr(vattn.ops, "set_attention_impl"):
            vattn.ops.set_attention_impl(args.impl)
    except Exception as e:  # noqa: BLE001
        print(f"run.py: cannot import vattn: {type(e).__name__}: {e}", file=sys.stderr)
        return 2

    budget = args.time_budget
    if budget is None:
        budget = {("cpu", False): 170, ("cpu", True): 25, ("cuda", False): 240, ("cuda", True): 120}[
            (args.device, args.quick)
        ]
    load_start = f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "?"
    spinners = start_spinners(args.busy_cores)
    try:
        t0 = time.perf_counter()
        runner = Runner(
            args.device, args.quick, budget, with_flex=not args.no_flex, only=args.only, busy=args.busy_cores > 0
        )
        runner.measure_ceilings()
        runner.run_all()
        elapsed = time.perf_counter() - t0
    finally:
        for sp in spinners:
            sp.kill()
            sp.wait()

    with_graph = args.device == "cuda"
    with_mean = runner.busy  # the contention run adds mean times (see Runner.busy)
    bw, fl = runner.ceilings["bandwidth"], runner.ceilings["compute"]
    ceil_line = (
        f"ceilings: bandwidth {bw['GBps']:.1f} GB/s ({bw['op']}), compute {fl['TFLOPs']:.3f} TFLOP/s ({fl['op']}, "
        f"n={fl['n']})"
    )
    cmd = "python bench/run.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(format_text(runner.rows, with_graph, with_mean))
    print(ceil_line)
    print(f"ratio = anchor time / vattn time (> 1: vattn faster); run took {elapsed:.0f} s")
    info = machine_info(args.device)
    info["loadavg_1m_start"] = load_start
    info["busy_cores"] = str(args.busy_cores)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(
                {
                    "device": args.device,
                    "quick": args.quick,
                    "impl": args.impl,
                    "command": cmd,
                    "date": stamp,
                    "elapsed_s": elapsed,
                    "machine": info,
                    "ceilings": runner.ceilings,
                    "rows": runner.rows,
                },
                f,
                indent=1,
                default=str,
            )
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(f"Command: `{cmd}` ({stamp}, {elapsed:.0f} s)\n\n")
            f.write("Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()) + "\n\n")
            f.write(format_markdown(runner.rows, with_graph, with_mean) + "\n\n")
            f.write(ceil_line + "\n")
    mismatches = [r for r in runner.rows if r["ok"] is False]
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
