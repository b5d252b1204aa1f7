"""Quantized KV formats (fp8_e4m3, int8, int4, and K/V pairs): bytes bit for bit against
reference.quantize, attention on quantized caches against the float64 reference over the dequantized
values, a derived bound against unquantized attention, the physical memory each format maps, and the
torch ops (opcheck, torch.compile) on quantized caches a user allocates. cpu; cuda marked gpu."""

from __future__ import annotations

import math

import pytest
import torch

import vattn
from vattn import formats, reference
from helpers import (
    Case,
    assert_attention_close,
    capture_cuda_graph,
    case_queries_and_kwargs,
    case_rows,
    device_impls,
    random_cases,
    randn,
    skip_unsupported,
)

FORMAT_SPECS = ["fp8_e4m3", "int8", "int4", ("int8", "int4"), ("fp8_e4m3", "int8")]
QLAYOUTS = ("plain", "record", "head_major")


def _pair(spec):
    return (spec, spec) if isinstance(spec, str) else tuple(spec)


def _spec_id(spec):
    return spec if isinstance(spec, str) else "-".join(spec)


# ----------------------------------------------------------------------------- quantized cache views


def quant_side_views(rows, seq, heads, dim, fmt: formats.KVFormat, layout, device, other_bytes=0):
    """Data [rows, seq, heads, storage elems] and scales [rows, seq, heads, words] of one side, over
    storage whose bytes past anything written are garbage: 0xff codes (fp8 NaN, int8 -1, int4 15) and
    NaN scales, so a kernel that reads past a length produces NaN."""
    elems = fmt.storage_elems(dim)
    if layout == "plain":
        data = torch.full((rows, seq, heads, elems), 0xFF, dtype=torch.uint8, device=device).view(fmt.storage_dtype)
        scales = torch.full((rows, seq, heads, fmt.scale_words), float("nan"), device=device)
        return data, scales
    if layout == "head_major":
        data = torch.full((rows, heads, seq, elems), 0xFF, dtype=torch.uint8, device=device).view(fmt.storage_dtype)
        scales = torch.full((rows, heads, seq, fmt.scale_words), float("nan"), device=device)
        return data.transpose(1, 2), scales.transpose(1, 2)
    # "record": KVCache's token_major records, [row, token, record of 3 layers x (K | V)], layer 1.
    rec = fmt.record_bytes(heads, dim)
    tok = 3 * (rec + other_bytes)
    raw = torch.full((rows * seq * tok,), 0xFF, dtype=torch.uint8, device=device)
    nan = torch.tensor([float("nan")], dtype=torch.float32).view(torch.uint8).to(device)
    raw.view(-1, 4)[:] = nan  # every aligned word NaN; codes read as 0xff-like garbage too
    off = 1 * (rec + other_bytes)
    isz = fmt.storage_dtype.itemsize
    data = raw.view(fmt.storage_dtype).as_strided(
        (rows, seq, heads, elems), (seq * tok // isz, tok // isz, elems, 1), off // isz
    )
    soff = off + fmt.scale_offset(heads, dim)
    scales = raw.view(torch.float32).as_strided(
        (rows, seq, heads, fmt.scale_words), (seq * tok // 4, tok // 4, fmt.scale_words, 1), soff // 4
    )
    return data, scales


def build_quantized(case: Case, spec, dtype, layout, device, seed):
    """(q, (kc, vc, ks, vs), (kd, vd) dequantized fp32 dense with NaN past lengths, (k_raw, v_raw)
    the unquantized values (NaN past lengths), kwargs)."""
    kf, vf = (formats.get(n) for n in _pair(spec))
    gen, rows, row_ids, seq = case_rows(case, seed)
    heads, dim = case.hkv, case.dim
    kc, ks = quant_side_views(rows, seq, heads, dim, kf, layout, device)
    vc, vs = quant_side_views(rows, seq, heads, dim, vf, layout, device)
    k_raw = torch.full((rows, seq, heads, dim), float("nan"))
    v_raw = torch.full((rows, seq, heads, dim), float("nan"))
    lens = case.head_lens if case.head_lens is not None else case.lens
    for b, row in enumerate(row_ids):
        per_head = lens[b] if isinstance(lens[b], (list, tuple)) else [lens[b]] * heads
        for h, n in enumerate(per_head):
            if not n:
                continue
            for raw, cache, scales, fmt in ((k_raw, kc, ks, kf), (v_raw, vc, vs, vf)):
                x = randn((n, dim), gen).to(dtype).float()
                raw[row, :n, h] = x
                codes, sc = reference.quantize(x, fmt.name)
                cache[row, :n, h] = codes.to(device)
                scales[row, :n, h] = sc.to(device)
    kd = reference.dequantize(kc.cpu(), ks.cpu(), kf.name, dim)
    vd = reference.dequantize(vc.cpu(), vs.cpu(), vf.name, dim)
    q, kw = case_queries_and_kwargs(case, row_ids, gen, dtype, device)
    return q, (kc, vc, ks, vs), (kd, vd), (k_raw, v_raw), kw


def _run(q, caches, kw):
    kc, vc, ks, vs = caches
    kw = dict(kw)
    if "cu_seqlens_q" not in kw:
        return vattn.decode_attention(q, kc, vc, kw.pop("seqlens_k"), return_lse=True, k_scale=ks, v_scale=vs, **kw)
    return vattn.prefill_attention(
        q, kc, vc, kw.pop("cu_seqlens_q"), kw.pop("seqlens_k"), return_lse=True, k_scale=ks, v_scale=vs, **kw
    )


def _quant_ok(device, dtype, dim, spec, prefill):
    for name in _pair(spec):
        if not formats.get(name).storage_elems(dim) or dim % formats.get(name).elems_per_storage:
            pytest.skip(f"{name} needs an even head_dim")
        skip_unsupported(device, dtype, dim, prefill=prefill, kv_format=name)


DECODE_CASES = [c for c in random_cases("decode", 12, seed=11, long_len=1500) if c.dim % 2 == 0]
PREFILL_CASES = [c for c in random_cases("prefill", 12, seed=12, long_len=700) if c.dim % 2 == 0]


# ----------------------------------------------------------------------------- attention on quantized caches


@pytest.mark.parametrize("device,impl", device_impls())
@pytest.mark.parametrize("spec", FORMAT_SPECS, ids=_spec_id)
@pytest.mark.parametrize("idx", range(len(DECODE_CASES)))
def test_decode_quantized_matrix(device, impl, spec, idx):
    case = DECODE_CASES[idx]
    dtype = [torch.float32, torch.float16, torch.bfloat16][idx % 3]
    _quant_ok(device, dtype, case.dim, spec, prefill=False)
    layout = QLAYOUTS[idx % len(QLAYOUTS)]
    with vattn.ops.attention_impl(impl):
        q, caches, (kd, vd), _, kw = build_quantized(case, spec, dtype, layout, device, seed=idx)
        out, lse = _run(q, caches, kw)
        assert out.dtype == dtype and out.shape == q.shape
        assert_attention_close(out, lse, q, kd, vd, kw, f"{_spec_id(spec)}-{case.describe()}-{layout}")


@pytest.mark.parametrize("device,impl", device_impls())
@pytest.mark.parametrize("spec", FORMAT_SPECS, ids=_spec_id)
@pytest.mark.parametrize("idx", range(len(PREFILL_CASES)))
def test_prefill_quantized_matrix(device, impl, spec, idx):
    case = PREFILL_CASES[idx]
    dtype = [torch.float32, torch.float16, torch.bfloat16][(idx + 1) % 3]
    _quant_ok(device, dtype, case.dim, spec, prefill=True)
    layout = QLAYOUTS[(idx + 1) % len(QLAYOUTS)]
    with vattn.ops.attention_impl(impl):
        q, caches, (kd, vd), _, kw = build_quantized(case, spec, dtype, layout, device, seed=100 + idx)
        out, lse = _run(q, caches, kw)
        assert_attention_close(out, lse, q, kd, vd, kw, f"{_spec_id(spec)}-{case.describe()}-{layout}")


@pytest.mark.parametrize("spec", FORMAT_SPECS, ids=_spec_id)
@pytest.mark.parametrize("layout", QLAYOUTS)
def test_prefill_quantized_heads_packed_once_cpu(spec, layout):
    """CPU prefill whose kv heads are walked by several query tiles converts each head's quantized
    K and V once into packed fp32 blocks (attention_cpu.cpp pack_heads): a full prompt, a chunk on a
    prefix, a window, against the reference over the dequantized cache."""
    case = Case(lens=[420, 300], hkv=2, group=4, dim=64, q_lens=[420, 130], window_left=150)
    q, caches, (kd, vd), _, kw = build_quantized(case, spec, torch.bfloat16, layout, "cpu", seed=7)
    out, lse = _run(q, caches, kw)
    assert_attention_close(out, lse, q, kd, vd, kw, f"{_spec_id(spec)}-{layout}")


def _quant_error_bound(q, kd, vd, k_raw, v_raw, kw):
    """A bound on |attention over dequantized K/V - attention over the exact values|, from the data:
    with dv = max |v - deq(v)| and ds = max |logit error| = max scale * |q . (k - deq(k))| over the keys
    each query sees, the softmax weights move by at most a factor exp(+-2 ds) in total variation
    (|p' - p|_1 <= exp(2 ds) - 1), so |o' - o| <= dv + (exp(2 ds) - 1) * max |v|. The soft-cap is
    1-Lipschitz, so it keeps the bound."""
    rows = kw["row_ids"].tolist()
    lens = kw["seqlens_k"].tolist()
    hq, dim = q.shape[1], q.shape[2]
    hkv = kd.shape[2]
    scale = kw.get("scale") or 1.0 / math.sqrt(dim)
    dv, ds, vmax = 0.0, 0.0, 0.0
    qf = q.double().cpu()
    cu = kw["cu_seqlens_q"].tolist() if "cu_seqlens_q" in kw else list(range(len(lens) + 1))
    head_lens = kw["head_seqlens_k"].tolist() if "head_seqlens_k" in kw else None
    for b, (row, n) in enumerate(zip(rows, lens)):
        for h in range(hkv):
            length = n if head_lens is None else head_lens[b][h]
            if length == 0:
                continue
            dk = (k_raw[row, :length, h] - kd[row, :length, h]).double()
            dv = max(dv, (v_raw[row, :length, h] - vd[row, :length, h]).abs().max().item())
            vmax = max(vmax, v_raw[row, :length, h].abs().max().item())
            group = hq // hkv
            qs = qf[cu[b] : cu[b + 1], h * group : (h + 1) * group].reshape(-1, dim)
            if qs.numel():
                ds = max(ds, (scale * (qs @ dk.T)).abs().max().item())
    return dv + (math.exp(2 * ds) - 1) * vmax


@pytest.mark.parametrize("device,impl", device_impls())
@pytest.mark.parametrize("spec", FORMAT_SPECS, ids=_spec_id)
@pytest.mark.parametrize("prefill", [False, True], ids=["decode", "prefill"])
def test_quantized_within_derived_bound_of_exact(device, impl, spec, prefill):
    """Quantized attention stays within the bound derived in _quant_error_bound of attention over the
    exact (unquantized) values. The bound is a worst case (every logit error at its maximum, all in
    one direction); the typical error is far smaller, which the second check states per format."""
    dtype = torch.float16
    case = Case(lens=[1, 200, 777], hkv=2, group=4, dim=64, q_lens=[1, 50, 7] if prefill else None)
    _quant_ok(device, dtype, 64, spec, prefill)
    with vattn.ops.attention_impl(impl):
        q, caches, (kd, vd), (k_raw, v_raw), kw = build_quantized(case, spec, dtype, "plain", device, seed=7)
        out, _ = _run(q, caches, kw)
    exact, _ = reference.attention(
        q.cpu(),
        k_raw,
        v_raw,
        compute_dtype=torch.float64,
        **{k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()},
    )
    bound = _quant_error_bound(q, kd, vd, k_raw, v_raw, kw)
    err = (out.cpu().double() - exact).abs().max().item()
    assert err <= bound + 2e-3, f"{_spec_id(spec)}: error {err:.4g} exceeds the derived bound {bound:.4g}"
    # One-key rows show the element error itself: int8 amax/254, fp8 2^-4 relative, int4 range/30.
    typical = {"int8": 0.03, "fp8_e4m3": 0.2, "int4": 0.35}
    assert err <= max(typical[n] for n in _pair(spec)), f"{_spec_id(spec)}: error {err:.4g}"


# ----------------------------------------------------------------------------- append: bytes bit for bit


def _edge_vectors(dim: int) -> torch.Tensor:
    """Random vectors and the edge cases every format must handle: all zeros, one huge outlier,
    fp32 subnormals, values past the fp8 range, a constant vector, tiny values, NaN and +-inf."""
    g = torch.Generator().manual_seed(3)
    rows = [torch.randn(dim, generator=g) for _ in range(6)]
    rows.append(torch.zeros(dim))
    outlier = torch.randn(dim, generator=g) * 0.01
    outlier[dim // 3] = 3.0e4
    rows.append(outlier)
    rows.append(torch.full((dim,), 1.0e-40) * torch.sign(torch.randn(dim, generator=g)))  # subnormal fp32
    rows.append(torch.randn(dim, generator=g) * 1.0e6)  # past fp8's 448 before scaling
    rows.append(torch.full((dim,), 0.75))  # constant (int4 range 0)
    rows.append(torch.randn(dim, generator=g) * 1.0e-20)  # below the tiny threshold
    special = torch.randn(dim, generator=g)
    special[0], special[1], special[2] = float("nan"), float("inf"), float("-inf")
    rows.append(special)
    mixed = torch.randn(dim, generator=g)
    mixed[5] = 1.0e-40
    rows.append(mixed)
    return torch.stack(rows)


@pytest.mark.parametrize("device,impl", device_impls())
@pytest.mark.parametrize("spec", FORMAT_SPECS, ids=_spec_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_append_bytes_equal_reference(device, impl, spec, dtype):
    """append_kv writes exactly reference.quantize's codes and scale words (NaN / inf included: a
    documented behaviour, never a NaN in the cache)."""
    dim, heads = 64, 2
    kf, vf = (formats.get(n) for n in _pair(spec))
    skip_unsupported(device, dtype, dim, prefill=False, kv_format=kf.name)
    skip_unsupported(device, dtype, dim, prefill=False, kv_format=vf.name)
    vecs = _edge_vectors(dim)
    if dtype != torch.float32:  # keep the edge rows meaningful in 16-bit inputs
        vecs = torch.nan_to_num(vecs, nan=float("nan"), posinf=float("inf"), neginf=float("-inf"))
    x = vecs.to(dtype)
    n = x.shape[0] // heads * heads
    k = x[:n].reshape(-1, heads, dim).to(device)
    v = torch.flip(x[:n], dims=[0]).reshape(-1, heads, dim).to(device)
    tokens = k.shape[0]
    rows, seq = 3, tokens + 4
    kc, ks = quant_side_views(rows, seq, heads, dim, kf, "record", device)
    vc, vs = quant_side_views(rows, seq, heads, dim, vf, "record", device)
    row_ids = torch.tensor([i % rows for i in range(tokens)], dtype=torch.int32, device=device)
    pos = torch.tensor([i // rows + 2 for i in range(tokens)], dtype=torch.int32, device=device)
    vattn.append_kv_raw(kc, vc, k, v, row_ids, pos, k_scale=ks, v_scale=vs)
    for name, cache, scales, src, fmt in (("K", kc, ks, k, kf), ("V", vc, vs, v, vf)):
        codes, sc = reference.quantize(src.cpu(), fmt.name)
        got = cache[row_ids.long(), pos.long()].cpu()
        got_s = scales[row_ids.long(), pos.long()].cpu()
        assert torch.equal(got.view(torch.uint8), codes.view(torch.uint8)), f"{name} codes differ ({fmt.name})"
        assert torch.equal(got_s.view(torch.int32), sc.view(torch.int32)), f"{name} scales differ ({fmt.name})"
        assert torch.isfinite(got_s).all()
        deq = reference.dequantize(got, got_s, fmt.name, dim)
        assert torch.isfinite(deq).all(), f"{name}: a non-finite input poisoned the cache"


def test_reference_format_definitions():
    """Spot checks of the definitions themselves (what the formats promise)."""
    x = torch.tensor([[1.0, -2.0, 0.5, 4.0]])
    codes, sc = reference.quantize(x, "int8")
    assert sc.item() == pytest.approx(4.0 / 127) and codes.tolist() == [[32, -64, 16, 127]]
    codes, sc = reference.quantize(x, "fp8_e4m3")
    assert sc.item() == pytest.approx(4.0 / 448)
    assert reference.dequantize(codes, sc, "fp8_e4m3").tolist()[0][3] == pytest.approx(4.0)
    codes, w = reference.quantize(x, "int4")
    assert codes.shape == (1, 2) and w.tolist()[0] == pytest.approx([6.0 / 15, -2.0])
    deq = reference.dequantize(codes, w, "int4")
    assert (deq - x).abs().max().item() <= 6.0 / 15 / 2 + 1e-6
    z, zs = reference.quantize(torch.zeros(1, 8), "int8")
    assert (z == 0).all() and (zs == 0).all()


# ----------------------------------------------------------------------------- KVCache: memory and steps


@pytest.mark.parametrize("layout", ["token_major", "layer_major", "head_major"])
def test_physical_memory_per_format(layout):
    """The same tokens map the expected fraction of a bf16 cache's pages: fp8 / int8 about 1/2, int4
    about 1/4 plus its scale words (heads x 2 fp32 per token, keys int4_ch 4), a (int8, int4) pair
    in between."""
    heads, dim, layers, n = 4, 128, 4, 3000
    mapped = {}
    for spec in ["auto", "fp8_e4m3", "int8", "int4", ("int8", "int4")]:
        c = vattn.KVCache(
            num_layers=layers,
            num_kv_heads=heads,
            head_dim=dim,
            max_batch=2,
            max_seq_len=4096,
            dtype=torch.bfloat16,
            kv_format=spec,
            layout=layout,
            device="cpu",
            page_bytes=64 << 10,
        )
        s = c.alloc()
        c.reserve(s, n)
        mapped[_spec_id(spec)] = c.stats()["mapped_bytes"]
        if spec != "auto":
            kf, vf = formats.resolve(spec, torch.bfloat16)  # "int4": keys int4_ch, values int4
            if layout == "head_major":  # a record per head, each padded to 16 bytes
                assert c.token_bytes == layers * heads * (kf.record_bytes(1, dim) + vf.record_bytes(1, dim))
            else:
                assert c.token_bytes == layers * (kf.record_bytes(heads, dim) + vf.record_bytes(heads, dim))
        c.close()
    page = 64 << 10
    regions = {"token_major": 1, "layer_major": 2 * layers, "head_major": 2 * layers * heads}[layout]
    slack = regions * page  # at most one partial page per region
    base = mapped["auto"]
    # Bytes of one token-layer: K record + V record (layer_major pads both regions to the larger one).
    bf16 = 2 * heads * dim * 2
    expect = {}
    for name, (kb, vb) in {
        "fp8_e4m3": (dim + 4, dim + 4),
        "int8": (dim + 4, dim + 4),
        "int4": (dim // 2 + 16, dim // 2 + 8),  # keys int4_ch: 4 words per token
        "int8-int4": (dim + 4, dim // 2 + 8),
    }.items():
        if layout == "head_major":  # per-head records, padded to 16 bytes, both sides to the larger
            per = 2 * heads * max(-(-kb // 16) * 16, -(-vb // 16) * 16)
        else:
            per = heads * (kb + vb) if layout == "token_major" else 2 * heads * max(kb, vb)
        expect[name] = per / bf16
    for name, frac in expect.items():
        assert abs(mapped[name] - frac * base) <= slack + 16 * layers * n, (name, mapped[name], base)
    # head_major pads each head's record to 16 bytes (int8 at dim 128: 132 -> 144 bytes).
    assert mapped["int4"] < 0.35 * base and mapped["int8"] < (0.6 if layout == "head_major" else 0.55) * base


@pytest.mark.parametrize("spec", FORMAT_SPECS, ids=_spec_id)
@pytest.mark.parametrize("layout", ["token_major", "layer_major", "head_major"])
def test_kvcache_steps_quantized(spec, layout):
    """A quantized KVCache through prefill + decode steps: attention equals the op run on the cache's
    own views with their scales, the stored codes are the reference's, and kv(dequantize=True) gives
    the reference's dequantized values."""
    torch.manual_seed(0)
    heads, dim, hq = 2, 64, 6
    c = vattn.KVCache(
        num_layers=2,
        num_kv_heads=heads,
        head_dim=dim,
        max_batch=3,
        max_seq_len=256,
        dtype=torch.bfloat16,
        kv_format=spec,
        layout=layout,
        device="cpu",
        page_bytes=16 << 10,
        smooth_keys=False,  # the stored bytes are the keys' own (tests/test_key_smoothing.py: smoothed)
    )
    a, b = c.alloc(), c.alloc()
    hist = {a: [], b: []}
    for step_i, new in enumerate([[37, 5], [1, 1], [1, 1]]):
        st = c.begin_step([a, b], new)
        k = torch.randn(sum(new), heads, dim).bfloat16()
        v = torch.randn(sum(new), heads, dim).bfloat16()
        q = torch.randn(sum(new), hq, dim).bfloat16()
        vattn.append_kv(c, 1, st, k, v)
        out = vattn.attention(q, c, 1, st)
        c.end_step(st)
        kv_k, kv_v = c.kv(1)
        ks, vs = c.kv_scales(1)
        fn = vattn.decode_attention if step_i else None
        if fn is not None:
            want = vattn.decode_attention(q, kv_k, kv_v, st.seqlens, row_ids=st.slot_ids, k_scale=ks, v_scale=vs)
            assert torch.equal(out, want)
        hist[a].append(k[: new[0]])
        hist[b].append(k[new[0] :])
    kf = c.k_format  # "int4" stores keys as int4_ch (per channel over token groups)
    kd, _ = c.kv(1, dequantize=True)
    kv_k, _ = c.kv(1)
    ks, _ = c.kv_scales(1)
    for s in (a, b):
        allk = torch.cat(hist[s])
        n = allk.shape[0]
        if kf.name == "int4_ch":  # the reference's appends of the same steps into a fresh row
            codes = torch.zeros(1, c.max_seq_len, heads, dim // 2, dtype=torch.uint8)
            words = torch.zeros(1, c.max_seq_len, heads, 4)
            vdummy, vwords = torch.zeros_like(codes), torch.zeros(1, c.max_seq_len, heads, 2)
            t = 0
            for chunk in hist[s]:
                m = chunk.shape[0]
                if m:
                    rows, pos = torch.zeros(m, dtype=torch.long), torch.arange(t, t + m)
                    reference.append_kv(codes, vdummy, chunk, chunk, rows, pos, words, vwords, "int4_ch", "int4")
                t += m
            assert torch.equal(kv_k[s, :n].view(torch.uint8), codes[0, :n])
            assert torch.equal(kd[s, :n], reference.dequantize(codes[0, :n], words[0], kf.name, dim, torch.bfloat16))
            continue
        codes, sc = reference.quantize(allk, kf.name)
        assert torch.equal(kv_k[s, :n].view(torch.uint8), codes.view(torch.uint8))
        assert torch.equal(kd[s, :n], reference.dequantize(codes, sc, kf.name, dim, torch.bfloat16))
    st = c.stats()
    assert st["k_format"] == kf.name and st["k_bits_per_element"] == kf.bits_per_element(dim)


def test_kvcache_rejects_mixed_plain_and_quantized_and_bad_names():
    with pytest.raises(ValueError):
        vattn.KVCache(1, 1, 64, 1, 16, dtype=torch.float32, kv_format="int3", device="cpu")
    with pytest.raises(ValueError):
        vattn.KVCache(1, 1, 64, 1, 16, dtype=torch.float32, kv_format=("int8",), device="cpu")
    with pytest.raises(ValueError):
        vattn.KVCache(1, 1, 63, 1, 16, dtype=torch.float32, kv_format="int4", device="cpu")


# ----------------------------------------------------------------------------- torch ops on user caches


def _user_cache(spec, device, rows=3, seq=32, heads=2, dim=64):
    kf, vf = (formats.get(n) for n in _pair(spec))
    kc, ks = quant_side_views(rows, seq, heads, dim, kf, "plain", device)
    vc, vs = quant_side_views(rows, seq, heads, dim, vf, "plain", device)
    for t in (kc, vc):
        t.view(torch.uint8).zero_()
    ks.zero_()
    vs.zero_()
    return kc, vc, ks, vs


@pytest.mark.parametrize("device,impl", device_impls())
@pytest.mark.parametrize("spec", ["fp8_e4m3", "int4", ("int8", "int4")], ids=_spec_id)
def test_opcheck_quantized(device, impl, spec):
    skip_unsupported(device, torch.float16, 64, prefill=True, kv_format=_pair(spec)[0])
    skip_unsupported(device, torch.float16, 64, prefill=True, kv_format=_pair(spec)[1])
    kc, vc, ks, vs = _user_cache(spec, device)
    k = torch.randn(5, 2, 64, dtype=torch.float16, device=device)
    rows = torch.tensor([2, 0, 1, 2, 0], dtype=torch.int32, device=device)
    pos = torch.tensor([0, 3, 7, 5, 1], dtype=torch.int32, device=device)
    # opcheck's schema test compares tensors with arithmetic torch does not implement for float8 on
    # CPU ("mul_cpu_reduced_float"), so fp8 caches get the fake-tensor and AOT-dispatch checks only.
    utils = ("test_faketensor", "test_aot_dispatch_dynamic") if "fp8_e4m3" in _pair(spec) else "ALL"
    torch.library.opcheck(torch.ops.vattn.append_kv.default, (kc, vc, k, k * 2, rows, pos, ks, vs), test_utils=utils)
    vattn.append_kv_raw(kc, vc, k, k * 2, rows, pos, k_scale=ks, v_scale=vs)
    q = torch.randn(3, 6, 64, dtype=torch.float16, device=device)
    lens = torch.tensor([6, 4, 8], dtype=torch.int32, device=device)
    with vattn.ops.attention_impl(impl):
        torch.library.opcheck(
            torch.ops.vattn.decode_attention.default,
            (q, kc, vc, lens),
            dict(k_scale=ks, v_scale=vs, max_seqlen_k=8),
            test_utils=utils,
        )
        cu = torch.tensor([0, 1, 2, 3], dtype=torch.int32, device=device)
        torch.library.opcheck(
            torch.ops.vattn.prefill_attention.default,
            (q, kc, vc, cu, lens),
            dict(k_scale=ks, v_scale=vs),
            test_utils=utils,
        )


def test_quantized_ops_compile_and_checks():
    """torch.compile traces the ops on a quantized cache (fake implementations check the scales) and
    gives the eager result; missing or wrong scale tensors are clear errors."""
    kc, vc, ks, vs = _user_cache("int4", "cpu")
    k = torch.randn(4, 2, 64)
    rows = torch.tensor([0, 1, 2, 0], dtype=torch.int32)
    pos = torch.tensor([0, 0, 0, 1], dtype=torch.int32)
    vattn.append_kv_raw(kc, vc, k, -k, rows, pos, k_scale=ks, v_scale=vs)
    q = torch.randn(3, 4, 64)
    lens = torch.tensor([2, 1, 1], dtype=torch.int32)

    def f(q):
        return vattn.decode_attention(q, kc, vc, lens, k_scale=ks, v_scale=vs, max_seqlen_k=2)

    eager = f(q)
    compiled = torch.compile(f, fullgraph=True)(q)
    torch.testing.assert_close(compiled, eager)
    with pytest.raises(ValueError, match="scale"):
        vattn.decode_attention(q, kc, vc, lens)
    with pytest.raises(ValueError, match="shape"):
        vattn.decode_attention(q, kc, vc, lens, k_scale=ks[..., :1], v_scale=vs)
    with pytest.raises(TypeError):
        vattn.decode_attention(q, kc, vc, lens, k_scale=ks.double(), v_scale=vs)
    plain = torch.zeros(3, 32, 2, 64)
    with pytest.raises(TypeError):
        vattn.decode_attention(q, plain, vc, lens, v_scale=vs)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["fast", "simple"])
@pytest.mark.parametrize("spec", ["fp8_e4m3", "int4", ("int8", "int4")], ids=_spec_id)
def test_cuda_graph_quantized_append_decode(impl, spec):
    """append_kv (quantizing) + decode on a quantized cache captured once in a CUDA graph; replays with
    new positions, lengths and inputs match the reference over the dequantized cache."""
    dev, dtype = "cuda", torch.bfloat16
    rows, seq, heads, group, dim = 3, 1024, 2, 4, 128
    kc, vc, ks, vs = _user_cache(spec, dev, rows=rows, seq=seq, heads=heads, dim=dim)
    kf, vf = (formats.get(n) for n in _pair(spec))
    gen = torch.Generator().manual_seed(1)
    start = [100, 300, 1]
    for r, n in enumerate(start):  # a prefix quantized by the op itself
        k0 = randn((n, heads, dim), gen, dtype).to(dev)
        v0 = randn((n, heads, dim), gen, dtype).to(dev)
        vattn.append_kv_raw(kc, vc, k0, v0, [r] * n, list(range(n)), k_scale=ks, v_scale=vs)
    row_ids = torch.arange(rows, dtype=torch.int32, device=dev)
    positions = torch.tensor(start, dtype=torch.int32, device=dev)
    lens = positions + 1
    q = randn((rows, heads * group, dim), gen, dtype).to(dev)
    k_new = randn((rows, heads, dim), gen, dtype).to(dev)
    v_new = randn((rows, heads, dim), gen, dtype).to(dev)

    def body():
        torch.ops.vattn.append_kv(kc, vc, k_new, v_new, row_ids, positions, ks, vs)
        return torch.ops.vattn.decode_attention(q, kc, vc, lens, row_ids, None, None, -1, 0.0, seq, ks, vs)

    with vattn.ops.attention_impl(impl):
        graph, (out, lse) = capture_cuda_graph(body)
        cur = list(start)
        for step in range(4):
            positions.copy_(torch.tensor(cur, dtype=torch.int32))
            lens.copy_(positions + 1)
            q.copy_(randn(q.shape, gen, dtype))
            k_new.copy_(randn(k_new.shape, gen, dtype))
            v_new.copy_(randn(v_new.shape, gen, dtype))
            graph.replay()
            torch.cuda.synchronize()
            kd = reference.dequantize(kc.cpu(), ks.cpu(), kf.name, dim)
            vd = reference.dequantize(vc.cpu(), vs.cpu(), vf.name, dim)
            kw = dict(seqlens_k=lens.clone(), row_ids=row_ids, scale=None, window_left=-1, softcap=0.0)
            assert_attention_close(out.clone(), lse.clone(), q, kd, vd, kw, f"graph step {step}")
            cur = [c + 1 for c in cur]


def test_dequantize_kv_checks_codes_and_scale_words():
    """dequantize_kv(codes, scales, kv_format) refuses codes of another storage type, scale words of
    another count (an int4_ch key side read as int4, say) and shapes that do not pair up, instead of
    returning values made of the wrong words."""
    c = vattn.KVCache(
        num_layers=1,
        num_kv_heads=2,
        head_dim=64,
        max_batch=2,
        max_seq_len=64,
        dtype=torch.float32,
        kv_format="int4",
        device="cpu",
    )
    s = c.alloc()
    step = c.begin_step([s], [10])
    vattn.append_kv(c, 0, step, torch.randn(10, 2, 64), torch.randn(10, 2, 64))
    c.end_step(step)
    K, V = c.kv(0)
    ks, vs = c.kv_scales(0)
    assert c.k_format.name == "int4_ch" and c.v_format.name == "int4"
    assert vattn.dequantize_kv(K, ks, "int4_ch").shape == (2, 64, 2, 64)
    assert vattn.dequantize_kv(V, vs, "int4").shape == (2, 64, 2, 64)
    with pytest.raises(ValueError, match="scales of shape"):
        vattn.dequantize_kv(K, ks, "int4")  # 4 parameter words per token, int4 has 2
    codes = torch.zeros(2, 3, 64, dtype=torch.int8)
    with pytest.raises(ValueError, match="scales of shape"):
        vattn.dequantize_kv(codes, torch.ones(2, 3, 7), "int8")
    with pytest.raises(ValueError, match="scales of shape"):
        vattn.dequantize_kv(codes, torch.ones(2, 5, 1), "int8")
    with pytest.raises(TypeError, match="codes"):
        vattn.dequantize_kv(torch.randn(2, 3, 64), torch.ones(2, 3, 1), "int8")
    with pytest.raises(TypeError, match="float32"):
        vattn.dequantize_kv(codes, torch.ones(2, 3, 1, dtype=torch.float64), "int8")


@pytest.mark.parametrize("spec", [("auto", "int8"), ("float32", "int4"), ("fp8_e4m3", "auto"), ("int4", "float32")])
def test_a_plain_and_quantized_pair_is_refused_at_construction(spec):
    """The kernels take K and V both plain or both with scales: such a pair is refused by the
    constructor (it was accepted and then every op raised about arguments the user never passed)."""
    with pytest.raises(ValueError, match="plain side with a quantized one"):
        vattn.KVCache(1, 2, 16, 2, 64, dtype=torch.float32, kv_format=spec, device="cpu")
    with pytest.raises(ValueError, match="plain side with a quantized one"):
        formats.token_bytes(1, 2, 16, torch.float32, spec)


def test_dequantize_kv_of_int4_ch_with_a_partial_last_group():
    """int4_ch codes of n tokens take the scale words of their whole groups (as reference.dequantize
    does); the words of only n tokens are refused by a message that says what is needed."""
    D, G = 16, 8
    x = torch.randn(3, D, generator=torch.Generator().manual_seed(1))
    packed, words = reference.quantize_int4_ch_group(x)
    codes, scales = packed[None, :, None], words[None, :, None]  # [1, 3, 1, 8], [1, G, 1, 4]
    assert scales.shape[1] == G
    want = reference.dequantize(codes, scales, "int4_ch", D)
    assert torch.equal(vattn.dequantize_kv(codes, scales, "int4_ch"), want)
    assert (want[0, :, 0] - x).abs().max() < 0.2
    with pytest.raises(ValueError, match="whole groups"):
        vattn.dequantize_kv(codes, scales[:, :3], "int4_ch")


@pytest.mark.parametrize(
    "layout,kv_format,smooth",
    [("token_major", "int8", False), ("layer_major", "auto", False), ("head_major", "int8", True)],
)
def test_dequantized_view_is_zero_past_each_heads_tokens(layout, kv_format, smooth):
    """kv(layer, dequantize=True) after compaction: each head's kept tokens, zeros past them (it
    returned the evicted tokens, or the channel means, past a shorter head's end)."""
    c = vattn.KVCache(1, 2, 16, 2, 64, dtype=torch.float32, layout=layout, kv_format=kv_format,
                      device="cpu", page_bytes=4096, smooth_keys=smooth)  # fmt: skip
    s = c.alloc()
    st = c.begin_step([s], [10])
    k, v = torch.randn(10, 2, 16) + 2, torch.randn(10, 2, 16) + 2
    vattn.append_kv(c, 0, st, k, v)
    c.end_step(st)
    keep = torch.zeros(1, 1, 2, 10, dtype=torch.int64)
    keep[0, 0, 0] = torch.arange(10)
    keep[0, 0, 1, :3] = torch.tensor([1, 4, 9])
    c.compact([s], keep, torch.tensor([[[10, 3]]]))
    K, V = c.kv(0, dequantize=True)
    for t in (K, V):
        assert not t[s, 3:, 1].any() and not t[s, 10:].any()
    tol = 0 if kv_format == "auto" else 0.1
    assert (K[s, :3, 1] - k[[1, 4, 9], 1]).abs().max() <= tol
    assert (V[s, :10, 0] - v[:, 0]).abs().max() <= tol


@pytest.mark.parametrize("spec", ["int8", "fp8_e4m3", ("int8", "int4")], ids=str)
def test_raw_ops_on_a_default_quantized_caches_views_read_the_appended_keys(spec):
    """A KVCache built with only a kv_format stores reference.quantize of the appended keys (key
    smoothing is opt-in), so the raw ops on its kv() / kv_scales() views give the attention of the
    keys as appended (with smoothing on by default they silently read the smoothed keys)."""
    g = torch.Generator().manual_seed(11)
    c = vattn.KVCache(1, 3, 64, 2, 128, dtype=torch.float32, kv_format=spec, device="cpu")
    assert not c.smooth_keys
    s = c.alloc()
    k, v = torch.randn(20, 3, 64, generator=g) * 2 + 1, torch.randn(20, 3, 64, generator=g)
    st = c.begin_step([s], [20])
    vattn.append_kv(c, 0, st, k, v)
    c.end_step(st)
    kc, vc = c.kv(0)
    ks, vs = c.kv_scales(0)
    codes, words = reference.quantize(k, c.k_format.name)
    assert torch.equal(kc[s, :20], codes) and torch.equal(ks[s, :20], words)
    q = torch.randn(1, 9, 64, generator=g)
    rows, lens = torch.tensor([s], dtype=torch.int32), torch.tensor([20], dtype=torch.int32)
    got = vattn.decode_attention(q, kc, vc, lens, row_ids=rows, k_scale=ks, v_scale=vs)
    kd, vd = c.kv(0, dequantize=True)
    want, _ = reference.attention(q.double(), kd[s : s + 1].double(), vd[s : s + 1].double(), lens)
    assert (got.double() - want).abs().max() < 1e-5
