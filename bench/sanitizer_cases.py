#!/usr/bin/env python
"""Small, covering run of every CUDA kernel family, for compute-sanitizer (memcheck, racecheck).

    compute-sanitizer --tool memcheck python bench/sanitizer_cases.py [--device cuda]

Covers append_kv, decode (fast + simple kernels, split-KV included), prefill / chunked prefill
(fast + simple), merge_states, and a KVCache on the CUDA backend growing across pages while a
few decode steps run through the high-level API. Shapes are tiny (sanitizers run kernels 10-100x
slower) but hit the edges: lengths that are not tile multiples, a row ending exactly at the cache
capacity (reads past it leave the allocation), GQA groups 1/3/4, head dims 64/128, fp16 + bf16,
window and soft-cap. Every result is also checked against vattn.reference (the run fails on a
mismatch), so a kernel the sanitizer silences by skipping work is still caught.
Set PYTORCH_NO_CUDA_MEMORY_CACHING=1 so out-of-bounds reads land outside an allocation.
`--device cpu` runs the same script on the CPU kernels (a quick self-test of this file).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import vattn
from vattn import reference

FAILURES = []


def check(name: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    err = float((got.double() - want.double()).abs().max()) if got.numel() else 0.0
    ok = bool(torch.isfinite(got.double()).all()) and err <= tol
    print(f"  {'ok  ' if ok else 'FAIL'} {name}: max abs err {err:.2e} (tol {tol:.0e})", flush=True)
    if not ok:
        FAILURES.append(name)


def tol_of(dtype: torch.dtype) -> float:
    return {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 4e-2}[dtype]


def nan_cache(rows: int, cap: int, hkv: int, d: int, lens, dtype, dev, g):
    """K/V caches of random values up to each row's length and NaN beyond (a read past a length
    turns the output into NaN)."""
    k = torch.randn(rows, cap, hkv, d, generator=g, device=dev).to(dtype)
    v = torch.randn(rows, cap, hkv, d, generator=g, device=dev).to(dtype)
    for r, n in enumerate(lens):
        k[r, n:] = float("nan")
        v[r, n:] = float("nan")
    return k, v


def attention_cases(dev: str, impls) -> None:
    g = torch.Generator(device=dev).manual_seed(0)
    dtypes = [torch.float16, torch.bfloat16] if dev == "cuda" else [torch.float32]
    configs = [  # (q heads, kv heads, dim, lengths, window, softcap)
        (8, 8, 64, [1, 37, 129], -1, 0.0),
        (9, 3, 64, [300, 5, 64], -1, 0.0),
        (32, 8, 128, [1000, 17], 100, 0.0),
        (4, 1, 128, [2100], -1, 30.0),  # long enough for split-KV decode
    ]
    for impl in impls:
        vattn.ops.set_attention_impl(impl)
        for dtype in dtypes:
            for hq, hkv, d, lens, window, softcap in configs:
                b = len(lens)
                cap = max(lens)  # the longest row ends exactly at the capacity
                # Cache row r holds lens[r]; the extra last row is all NaN and never read. Batch rows
                # read cache rows in reverse order (row_ids) to exercise the mapping.
                kc, vc = nan_cache(b + 1, cap, hkv, d, lens + [0], dtype, dev, g)
                order = list(range(b))[::-1]
                row_ids = torch.tensor(order, dtype=torch.int32, device=dev)
                seqlens = torch.tensor([lens[r] for r in order], dtype=torch.int32, device=dev)
                tag = f"{impl} {str(dtype)[6:]} {hq}/{hkv}x{d} lens={lens} w={window} cap={softcap}"
                # decode
                q = torch.randn(b, hq, d, generator=g, device=dev).to(dtype)
                out, lse = vattn.decode_attention(
                    q,
                    kc,
                    vc,
                    seqlens,
                    row_ids=row_ids,
                    window_left=window,
                    softcap=softcap,
                    max_seqlen_k=cap,
                    return_lse=True,
                )
                ref, ref_lse = reference.attention(
                    q.cpu(),
                    kc.cpu(),
                    vc.cpu(),
                    seqlens.cpu(),
                    row_ids=row_ids.cpu(),
                    window_left=window,
                    softcap=softcap,
                )
                check("decode " + tag, out.cpu(), ref, tol_of(dtype))
                check("decode lse " + tag, lse.cpu(), ref_lse, 1e-2)
                # prefill / chunked prefill: the last n tokens of each row are new
                qlens = [min(lens[r], x) for r, x in zip(order, [1, 64, 33, 200])]
                cu = torch.tensor([0] + torch.tensor(qlens).cumsum(0).tolist(), dtype=torch.int32, device=dev)
                qp = torch.randn(int(cu[-1]), hq, d, generator=g, device=dev).to(dtype)
                out = vattn.prefill_attention(
                    qp,
                    kc,
                    vc,
                    cu,
                    seqlens,
                    row_ids=row_ids,
                    window_left=window,
                    softcap=softcap,
                    max_seqlen_q=max(qlens),
                    max_seqlen_k=cap,
                )
                ref, _ = reference.attention(
                    qp.cpu(),
                    kc.cpu(),
                    vc.cpu(),
                    seqlens.cpu(),
                    cu_seqlens_q=cu.cpu(),
                    row_ids=row_ids.cpu(),
                    window_left=window,
                    softcap=softcap,
                )
                check("prefill " + tag, out.cpu(), ref, tol_of(dtype))
    vattn.ops.set_attention_impl("fast")


def append_and_merge(dev: str) -> None:
    g = torch.Generator(device=dev).manual_seed(1)
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    for hkv, d in ((3, 64), (8, 128)):
        kc = torch.randn(3, 50, hkv, d, generator=g, device=dev).to(dtype)
        vc = torch.randn(3, 50, hkv, d, generator=g, device=dev).to(dtype)
        n = 23
        k = torch.randn(n, hkv, d, generator=g, device=dev).to(dtype)
        v = torch.randn(n, hkv, d, generator=g, device=dev).to(dtype)
        rows = torch.tensor([2, 0, 1] * 7 + [2, 0], dtype=torch.int32, device=dev)
        pos = torch.tensor(list(range(7, 7 + n))[::-1], dtype=torch.int32, device=dev) % 50
        pos[-1] = 49  # last position of a row
        kr, vr = kc.clone(), vc.clone()
        vattn.append_kv_raw(kc, vc, k, v, rows, pos)
        reference.append_kv(kr, vr, k, v, rows, pos)
        check(f"append_kv {hkv}x{d}", kc.cpu(), kr.cpu(), 0.0)
        check(f"append_kv v {hkv}x{d}", vc.cpu(), vr.cpu(), 0.0)
        oa = torch.randn(37, 5, d, generator=g, device=dev).to(dtype)
        ob = torch.randn(37, 5, d, generator=g, device=dev).to(dtype)
        la = torch.randn(37, 5, generator=g, device=dev) * 4
        lb = torch.randn(37, 5, generator=g, device=dev) * 4
        la[0] = float("-inf")
        la[1] = float("-inf")
        lb[1] = float("-inf")
        out, lse = vattn.merge_states(oa, la, ob, lb)
        ref, ref_lse = reference.merge_states(oa.cpu(), la.cpu(), ob.cpu(), lb.cpu())
        check(f"merge_states d={d}", out.cpu(), ref, tol_of(dtype))


def cache_growth(dev: str) -> None:
    """A KVCache on the device backend: a prompt, then decode steps crossing page boundaries, with
    append + attention through the high-level API, checked against the reference each step."""
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    layers, hkv, hq, d = 2, 2, 4, 64
    cache = vattn.KVCache(
        num_layers=layers, num_kv_heads=hkv, head_dim=d, max_batch=3, max_seq_len=4096, dtype=dtype, device=dev
    )
    g = torch.Generator(device=dev).manual_seed(2)
    slots = [cache.alloc(), cache.alloc()]
    page = int(cache.stats()["page_bytes"])
    tok_bytes = cache.token_bytes
    prompt = [max(1, page // tok_bytes - 2), 5]  # the first slot crosses a page boundary while decoding
    hist_k = {s: [[] for _ in range(layers)] for s in slots}
    hist_v = {s: [[] for _ in range(layers)] for s in slots}
    for step_i in range(6):
        new = prompt if step_i == 0 else [1, 1]
        step = cache.begin_step(slots=slots, new_tokens=new)
        for layer in range(layers):
            k = torch.randn(sum(new), hkv, d, generator=g, device=dev).to(dtype)
            v = torch.randn(sum(new), hkv, d, generator=g, device=dev).to(dtype)
            q = torch.randn(sum(new), hq, d, generator=g, device=dev).to(dtype)
            vattn.append_kv(cache, layer, step, k, v)
            out = vattn.attention(q, cache, layer, step)
            o = 0
            refs = []
            for s, n in zip(slots, new):
                hist_k[s][layer].append(k[o : o + n].cpu())
                hist_v[s][layer].append(v[o : o + n].cpu())
                kk = torch.cat(hist_k[s][layer])[None]
                vv = torch.cat(hist_v[s][layer])[None]
                r, _ = reference.attention(
                    q[o : o + n].cpu(),
                    kk,
                    vv,
                    torch.tensor([kk.shape[1]], dtype=torch.int32),
                    cu_seqlens_q=torch.tensor([0, n], dtype=torch.int32),
                )
                refs.append(r)
                o += n
            check(f"cache step {step_i} layer {layer}", out.cpu(), torch.cat(refs), tol_of(dtype))
        cache.end_step(step)
    st = cache.stats()
    print(f"  cache: {st['pages_mapped']} pages mapped, {st['mapped_bytes']} bytes", flush=True)
    cache.shrink(slots[0], 3)
    cache.free(slots[1])
    if dev == "cuda":
        torch.cuda.synchronize()


def quantized_cases(dev: str, impls) -> None:
    """Quantized caches (fp8_e4m3, int8, int4, int8 K + int4 V): append_kv quantizing into a cache
    whose last row ends at the capacity, then decode and prefill (fast + simple) against the
    reference over the dequantized values."""
    from vattn import formats

    g = torch.Generator().manual_seed(4)
    for spec in ("fp8_e4m3", "int8", "int4", ("int8", "int4")):
        kname, vname = (spec, spec) if isinstance(spec, str) else spec
        kf, vf = formats.get(kname), formats.get(vname)
        for d, dtype in ((64, torch.float16), (128, torch.bfloat16)):
            rows, cap, hkv, group = 3, 300, 2, 3
            lens = [1, 77, cap]
            sides = []
            for fmt in (kf, vf):
                c = torch.zeros((rows, cap, hkv, fmt.storage_elems(d)), dtype=torch.uint8, device=dev)
                sides.append((c.view(fmt.storage_dtype), torch.zeros((rows, cap, hkv, fmt.scale_words), device=dev)))
            (kc, ks), (vc, vs) = sides
            rid = [r for r, n in enumerate(lens) for _ in range(n)]
            pos = [p for n in lens for p in range(n)]
            k = torch.randn(len(rid), hkv, d, generator=g).to(dtype).to(dev)
            v = torch.randn(len(rid), hkv, d, generator=g).to(dtype).to(dev)
            vattn.append_kv_raw(kc, vc, k, v, rid, pos, k_scale=ks, v_scale=vs)
            kd = reference.dequantize(kc.cpu(), ks.cpu(), kname, d)
            vd = reference.dequantize(vc.cpu(), vs.cpu(), vname, d)
            seqlens = torch.tensor(lens, dtype=torch.int32, device=dev)
            q = torch.randn(rows, hkv * group, d, generator=g).to(dtype).to(dev)
            qn = [1, 9, 40]
            qp = torch.randn(sum(qn), hkv * group, d, generator=g).to(dtype).to(dev)
            cu = torch.tensor([0, 1, 10, 50], dtype=torch.int32, device=dev)
            for impl in impls:
                with vattn.ops.attention_impl(impl):
                    out = vattn.decode_attention(q, kc, vc, seqlens, k_scale=ks, v_scale=vs, max_seqlen_k=cap)
                    pre = vattn.prefill_attention(qp, kc, vc, cu, seqlens, k_scale=ks, v_scale=vs)
                want, _ = reference.attention(q.cpu(), kd, vd, seqlens.cpu())
                wantp, _ = reference.attention(qp.cpu(), kd, vd, seqlens.cpu(), cu_seqlens_q=cu.cpu())
                name = f"{kname}/{vname} d{d} {impl}"
                check(f"quant decode {name}", out.cpu(), want, tol_of(dtype))
                check(f"quant prefill {name}", pre.cpu(), wantp, tol_of(dtype))


def eviction_cases(dev: str, impls) -> None:
    """Eviction (issue 10): attention scores (decode + prefill, add + replace, fast + simple) against
    the reference, compact_kv on a quantized cache whose last row ends at the capacity, append_kv
    with per-head positions, and a KVCache compacted by a policy, then decoded with per-head lengths."""
    g = torch.Generator().manual_seed(6)
    rows, cap, hkv, group, d = 3, 300, 2, 3, 64
    dtype = torch.float16 if dev == "cuda" else torch.float32
    lens = [1, 77, cap]
    k, v = nan_cache(rows, cap, hkv, d, lens, dtype, "cpu", g)
    k, v = k.to(dev), v.to(dev)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=dev)
    q = torch.randn(rows, hkv * group, d, generator=g).to(dtype).to(dev)
    qp = torch.randn(50, hkv * group, d, generator=g).to(dtype).to(dev)
    cu = torch.tensor([0, 1, 10, 50], dtype=torch.int32, device=dev)
    for impl in impls:
        for mode, last in (("add", None), ("replace", 4)):
            sc = torch.zeros(rows, hkv, cap, device=dev)
            scp = torch.zeros(rows, hkv, cap, device=dev)
            with vattn.ops.attention_impl(impl):
                vattn.decode_attention(q, k, v, seqlens, max_seqlen_k=cap, scores=sc, score_mode=mode)
                vattn.prefill_attention(qp, k, v, cu, seqlens, scores=scp, score_mode=mode, score_last_queries=last)
            want, wantp = (
                torch.zeros(rows, hkv, cap, dtype=torch.float64),
                torch.zeros(rows, hkv, cap, dtype=torch.float64),
            )
            reference.attention(q.cpu(), k.cpu(), v.cpu(), seqlens.cpu(), scores=want, score_mode=mode)
            reference.attention(
                qp.cpu(), k.cpu(), v.cpu(), seqlens.cpu(), cu_seqlens_q=cu.cpu(), scores=wantp, score_mode=mode,
                score_last_queries=last,
            )  # fmt: skip
            check(f"scores decode {mode} {impl}", sc.cpu(), want, 1e-3)
            check(f"scores prefill {mode} {impl}", scp.cpu(), wantp, 1e-3)
    # compact_kv on an int8 cache, the last row full to the capacity
    from vattn import formats

    fmt = formats.get("int8")
    kc = torch.zeros((rows, cap, hkv, fmt.storage_elems(d)), dtype=torch.int8, device=dev)
    vc = torch.zeros_like(kc)
    ks = torch.zeros((rows, cap, hkv, fmt.scale_words), device=dev)
    vs = torch.zeros_like(ks)
    rid = [r for r, n in enumerate(lens) for _ in range(n)]
    pos = [p for n in lens for p in range(n)]
    kn = torch.randn(len(rid), hkv, d, generator=g).to(dtype).to(dev)
    vn = torch.randn(len(rid), hkv, d, generator=g).to(dtype).to(dev)
    vattn.append_kv_raw(kc, vc, kn, vn, rid, pos, k_scale=ks, v_scale=vs)
    before = [t.cpu().clone() for t in (kc, vc, ks, vs)]
    keep = torch.zeros(rows, hkv, 100, dtype=torch.int32)
    keep_lens = torch.zeros(rows, hkv, dtype=torch.int32)
    for r, n in enumerate(lens):
        for h in range(hkv):
            idx = torch.randperm(n, generator=g)[: min(n, 60 + 20 * h)].sort().values
            keep[r, h, : idx.numel()] = idx.to(torch.int32)
            keep_lens[r, h] = idx.numel()
    want = [reference_t.clone() for reference_t in before]
    reference.compact_kv(want[0], want[1], torch.arange(rows), keep, keep_lens, k_scale=want[2], v_scale=want[3])
    vattn.compact_kv(kc, vc, list(range(rows)), keep.to(dev), keep_lens.to(dev), k_scale=ks, v_scale=vs)
    for name, got, w in zip(("k", "v", "k_scale", "v_scale"), (kc, vc, ks, vs), want):
        check(f"compact_kv int8 {name}", got.cpu().float(), w.float(), 0.0)
    # append with per-head positions into a plain cache
    kp, vp = nan_cache(rows, cap, hkv, d, [0, 0, 0], dtype, "cpu", g)
    kp, vp = kp.to(dev), vp.to(dev)
    hpos = torch.tensor([[0, cap - 1], [5, 3], [cap - 1, 0]], dtype=torch.int32, device=dev)
    kt = torch.randn(3, hkv, d, generator=g).to(dtype).to(dev)
    vattn.append_kv_raw(kp, vp, kt, kt, [0, 1, 2], [0, 0, 0], head_positions=hpos)
    got = torch.stack([kp[r, int(hpos[r, h]), h] for r in range(3) for h in range(hkv)])
    check("append_kv head_positions", got.cpu().float(), kt.cpu().float().reshape(-1, d), 0.0)
    # a KVCache compacted by a policy, then a decode step with per-head lengths
    from vattn import policies

    cache = vattn.KVCache(num_layers=2, num_kv_heads=hkv, head_dim=d, max_batch=2, max_seq_len=512,
                          dtype=dtype, device=dev)  # fmt: skip
    cache.enable_scores()
    slots = [cache.alloc(), cache.alloc()]
    pol = policies.AdaKV(policies.SnapKV(keep=0.5, window=8))
    st = cache.begin_step(slots, [200, 130])
    for layer in range(2):
        kk = torch.randn(330, hkv, d, generator=g).to(dtype).to(dev)
        vattn.append_kv(cache, layer, st, kk, kk)
        vattn.attention(torch.randn(330, hkv * group, d, generator=g).to(dtype).to(dev), cache, layer, st,
                        **pol.attention_kwargs(cache, layer, st))  # fmt: skip
    cache.end_step(st)
    pol.apply(cache, slots)
    st = cache.begin_step(slots, [1, 1])
    for layer in range(2):
        kk = torch.randn(2, hkv, d, generator=g).to(dtype).to(dev)
        vattn.append_kv(cache, layer, st, kk, kk)
        qq = torch.randn(2, hkv * group, d, generator=g).to(dtype).to(dev)
        out = vattn.attention(qq, cache, layer, st)
        kv_k, kv_v = cache.kv(layer)
        hs = st.head_seqlens[layer] if st.head_seqlens is not None else None
        want, _ = reference.attention(qq.cpu(), kv_k.cpu(), kv_v.cpu(), st.seqlens.cpu(), None, st.slot_ids.cpu(),
                                      None if hs is None else hs.cpu())  # fmt: skip
        check(f"decode after compaction layer {layer}", out.cpu(), want, tol_of(dtype))
    cache.end_step(st)
    cache.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument(
        "--only",
        choices=["attention", "kv", "cache", "quant", "evict"],
        action="append",
        help="run only these groups (default: all)",
    )
    args = ap.parse_args()
    if args.device == "cuda" and not (torch.cuda.is_available() and vattn._C.built_with_cuda):
        print("sanitizer_cases.py: needs a CUDA device and a CUDA build of vattn", file=sys.stderr)
        return 2
    groups = args.only or ["attention", "kv", "cache", "quant", "evict"]
    t0 = time.perf_counter()
    impls = ["fast", "simple"]
    for name in groups:
        print(f"[{name}]", flush=True)
        try:
            {
                "attention": lambda: attention_cases(args.device, impls),
                "kv": lambda: append_and_merge(args.device),
                "cache": lambda: cache_growth(args.device),
                "quant": lambda: quantized_cases(args.device, impls),
                "evict": lambda: eviction_cases(args.device, impls),
            }[name]()
        except Exception as e:  # noqa: BLE001 - report and go on to the other groups
            print(f"  FAIL {name}: {type(e).__name__}: {e}", flush=True)
            FAILURES.append(name)
    if args.device == "cuda":
        torch.cuda.synchronize()
    print(
        f"sanitizer_cases: {len(FAILURES)} failure(s) in {time.perf_counter() - t0:.1f} s"
        + (": " + ", ".join(FAILURES) if FAILURES else "")
    )
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
