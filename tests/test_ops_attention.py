"""decode_attention / prefill_attention against reference.py over a matrix of shapes (cpu; cuda marked gpu)."""

import os
import subprocess
import sys

import pytest
import torch

import vattn
from helpers import Case, LAYOUTS, assert_attention_close, build, device_impls, random_cases, skip_unsupported

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DECODE_CASES = random_cases("decode", 12, seed=1)
PREFILL_CASES = random_cases("prefill", 12, seed=2)


def _seeds(dtype, idx):
    """Two seeds in bf16 (the least precise), one (different) seed in the other dtypes: keeps CI fast."""
    return {torch.float32: (idx,), torch.float16: (1000 + idx,), torch.bfloat16: (2000 + idx, 3000 + idx)}[dtype]


def _run(op, q, k_cache, v_cache, kw):
    if op == "decode":
        kw = {k: v for k, v in kw.items() if k != "cu_seqlens_q"}
        return vattn.decode_attention(q, k_cache, v_cache, kw.pop("seqlens_k"), return_lse=True, **kw)
    kw = dict(kw)
    return vattn.prefill_attention(
        q, k_cache, v_cache, kw.pop("cu_seqlens_q"), kw.pop("seqlens_k"), return_lse=True, **kw
    )


@pytest.mark.parametrize("device,impl", device_impls())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("idx", range(len(DECODE_CASES)))
def test_decode_matrix(device, impl, dtype, idx):
    case = DECODE_CASES[idx]
    skip_unsupported(device, dtype, case.dim, prefill=False)
    layout = LAYOUTS[idx % len(LAYOUTS)]
    with vattn.ops.attention_impl(impl):
        for seed in _seeds(dtype, idx):
            q, kc, vc, kw = build(case, dtype, layout, device, seed)
            out, lse = _run("decode", q, kc, vc, kw)
            assert out.dtype == dtype and out.shape == q.shape
            assert_attention_close(out, lse, q, kc, vc, kw, f"{case.describe()}-{layout}-s{seed}")


@pytest.mark.parametrize("device,impl", device_impls())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("idx", range(len(PREFILL_CASES)))
def test_prefill_matrix(device, impl, dtype, idx):
    case = PREFILL_CASES[idx]
    skip_unsupported(device, dtype, case.dim)
    layout = LAYOUTS[(idx + 1) % len(LAYOUTS)]
    with vattn.ops.attention_impl(impl):
        for seed in _seeds(dtype, 50 + idx):
            q, kc, vc, kw = build(case, dtype, layout, device, seed)
            out, lse = _run("prefill", q, kc, vc, kw)
            assert_attention_close(out, lse, q, kc, vc, kw, f"{case.describe()}-{layout}-s{seed}")


@pytest.mark.parametrize("device,impl", device_impls())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("group", [1, 3, 4, 8])
def test_decode_is_prefill_with_one_query(device, impl, dtype, dim, group):
    """Decode and a one-query-per-row prefill are the same computation."""
    case = Case(lens=[1, 64, 65, 777, 130], hkv=2, group=group, dim=dim, window_left=-1)
    skip_unsupported(device, dtype, dim)
    with vattn.ops.attention_impl(impl):
        q, kc, vc, kw = build(case, dtype, "token_major", device, seed=group * dim)
        out_d, lse_d = _run("decode", q, kc, vc, kw)
        kw["cu_seqlens_q"] = torch.arange(len(case.lens) + 1, dtype=torch.int32, device=device)
        out_p, lse_p = _run("prefill", q, kc, vc, kw)
        assert_attention_close(out_d, lse_d, q, kc, vc, kw, "decode")
        assert_attention_close(out_p, lse_p, q, kc, vc, kw, "prefill")


@pytest.mark.parametrize("device,impl", device_impls())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_chunked_prefill_equals_full_prefill(device, impl, dtype):
    """A prompt prefilled in chunks on top of its own prefix gives the outputs of one full prefill."""
    skip_unsupported(device, dtype, 64)
    L = 300
    case = Case(lens=[L, L], hkv=2, group=4, dim=64, q_lens=[L, L])
    with vattn.ops.attention_impl(impl):
        q, kc, vc, kw = build(case, dtype, "plain", device, seed=5)
        full, full_lse = _run("prefill", q, kc, vc, kw)
        for chunks in ([1, 99, 200], [128, 128, 44], [299, 1]):
            start = 0
            for n in chunks:
                end = start + n
                qs = torch.cat([q[start:end], q[L + start : L + end]])
                kw_c = dict(
                    kw,
                    seqlens_k=torch.tensor([end, end], dtype=torch.int32, device=device),
                    cu_seqlens_q=torch.tensor([0, n, 2 * n], dtype=torch.int32, device=device),
                )
                out, lse = _run("prefill", qs, kc, vc, kw_c)
                want = torch.cat([full[start:end], full[L + start : L + end]])
                want_lse = torch.cat([full_lse[start:end], full_lse[L + start : L + end]])
                tol = 1e-5 if dtype == torch.float32 else 1e-2
                torch.testing.assert_close(out.float(), want.float(), atol=tol, rtol=tol)
                torch.testing.assert_close(lse, want_lse, atol=1e-4, rtol=1e-4)
                start = end


@pytest.mark.parametrize("device,impl", device_impls())
def test_default_scale_and_int64_indices(device, impl):
    """scale=None is 1/sqrt(head_dim); int64 and list indices are accepted by the wrappers."""
    case = Case(lens=[5, 70, 33], hkv=1, group=3, dim=64)
    with vattn.ops.attention_impl(impl):
        q, kc, vc, kw = build(case, torch.float16, "plain", device, seed=3)
        a = vattn.decode_attention(q, kc, vc, kw["seqlens_k"], row_ids=kw["row_ids"])
        b = vattn.decode_attention(q, kc, vc, kw["seqlens_k"].long(), row_ids=kw["row_ids"].tolist(), scale=64**-0.5)
        assert torch.equal(a, b)
        c = vattn.decode_attention(q, kc, vc, kw["seqlens_k"], row_ids=kw["row_ids"], scale=0.01)
        assert not torch.equal(a, c)


@pytest.mark.parametrize("device,impl", device_impls())
def test_strided_q(device, impl):
    """q with non-contiguous token / head strides (a slice of a fused qkv projection)."""
    case = Case(lens=[10, 200], hkv=2, group=4, dim=64)
    with vattn.ops.attention_impl(impl):
        q, kc, vc, kw = build(case, torch.bfloat16, "layer_major", device, seed=9)
        fused = torch.randn(2, 3 * 8, 64, dtype=torch.bfloat16, device=device)
        fused[:, 8:16] = q
        qs = fused[:, 8:16]
        assert not qs.is_contiguous()
        out, lse = _run("decode", qs, kc, vc, kw)
        assert_attention_close(out, lse, q, kc, vc, kw, "strided q")


@pytest.mark.parametrize("device,impl", device_impls())
def test_edge_cases(device, impl):
    """Empty rows (length 0), more queries than keys (early queries see nothing), window 0, batch 0."""
    dtype = torch.float16
    with vattn.ops.attention_impl(impl):
        case = Case(lens=[0, 1, 40], hkv=2, group=2, dim=64, window_left=0)
        q, kc, vc, kw = build(case, dtype, "plain", device, seed=1)
        out, lse = _run("decode", q, kc, vc, kw)
        assert (out[0] == 0).all() and torch.isneginf(lse[0]).all()
        assert_attention_close(out, lse, q, kc, vc, kw, "decode edge")
        case = Case(lens=[3, 50], hkv=1, group=4, dim=64, q_lens=[5, 2])
        q, kc, vc, kw = build(case, dtype, "plain", device, seed=2)
        out, lse = _run("prefill", q, kc, vc, kw)
        assert (out[:2] == 0).all() and torch.isneginf(lse[:2]).all() and torch.isfinite(lse[2:]).all()
        assert_attention_close(out, lse, q, kc, vc, kw, "prefill edge")
        empty_q = q[:0]
        out = vattn.decode_attention(empty_q, kc, vc, torch.zeros(0, dtype=torch.int32, device=device))
        assert out.shape == (0, 4, 64)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dim", [8, 40, 72, 128])
@pytest.mark.parametrize("group", [1, 3, 8])
@pytest.mark.parametrize("window", [-1, 37])
def test_prefill_gemm_tiles_cpu(dtype, dim, group, window):
    """CPU prefill tiles of many rows take the packed GEMM path (attention_kernels_avx2.h): rows not
    a multiple of the 6-row tile, key blocks cut short by lengths, the causal diagonal and a window
    (blocks that start inside a 16-key panel), head dims below, between and at whole 16-lane panels,
    and a cached prefix under the chunk; bf16 / fp16 K and V are converted rows fed to the same tiles."""
    case = Case(lens=[131, 300, 17, 64], hkv=2, group=group, dim=dim, q_lens=[131, 97, 17, 1], window_left=window)
    q, kc, vc, kw = build(case, dtype, "token_major", "cpu", seed=dim * 10 + group)
    out, lse = _run("prefill", q, kc, vc, kw)
    assert_attention_close(out, lse, q, kc, vc, kw, f"gemm-{dim}-{group}-{window}")


# Rows whose kv heads are walked by several GEMM query tiles: each head's K and V are packed once for
# all of them (attention_cpu.cpp pack_heads). Full causal prompts, chunks on a cached prefix, windows
# that start inside a 16-key panel, soft-cap, per-head lengths (an empty head among them), group 1 and
# head dims that end in a partial 16-lane panel (80) or span many (256).
PACKED_CASES = [
    Case(lens=[600, 333], hkv=2, group=4, dim=80, q_lens=[600, 200]),
    Case(lens=[500, 260], hkv=3, group=1, dim=64, q_lens=[400, 260], window_left=90, softcap=10.0),
    Case(lens=[450, 300], hkv=2, group=3, dim=128, q_lens=[300, 290], head_lens=[[450, 320], [300, 0]]),
    Case(lens=[300], hkv=1, group=2, dim=256, q_lens=[300], window_left=200),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", PACKED_CASES, ids=lambda c: c.describe())
def test_prefill_heads_packed_once_cpu(dtype, case):
    """The query tiles of a kv head share one packing of its keys: every layout, against the
    reference, NaN past every length (a packed block must not pick up a key past its head's walk)."""
    for layout in LAYOUTS:
        q, kc, vc, kw = build(case, dtype, layout, "cpu", seed=case.dim + case.group)
        out, lse = _run("prefill", q, kc, vc, kw)
        assert_attention_close(out, lse, q, kc, vc, kw, f"{case.describe()}-{layout}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize(
    "case",
    [
        Case(lens=[512], hkv=8, group=4, dim=128, extra_rows=0),  # one row, every kv head its own item
        Case(lens=[500, 3, 300], hkv=5, group=2, dim=64),  # 5 heads in chunks of 2, 2, 1
        Case(lens=[400, 7], hkv=3, group=3, dim=64, head_lens=[[400, 0, 399], [7, 7, 1]], window_left=200),
        Case(lens=[450, 1, 90, 0], hkv=7, group=1, dim=72, softcap=8.0),  # an empty row stays one item
    ],
    ids=lambda c: c.describe(),
)
def test_decode_few_short_rows_cpu(dtype, threads, case):
    """Few decode rows too short to split by keys, with enough work for the team: each row's kv
    heads become separate items (attention_cpu.cpp decode_impl), each writing its own heads and
    LSEs. Head counts that do not divide evenly, per-head lengths, an empty row, windows, soft-cap,
    and 1-3 threads (one thread keeps the rows whole)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for layout in LAYOUTS:
            q, kc, vc, kw = build(case, dtype, layout, "cpu", seed=threads)
            out, lse = _run("decode", q, kc, vc, kw)
            assert_attention_close(out, lse, q, kc, vc, kw, f"{case.describe()}-{layout}-t{threads}")
    finally:
        torch.set_num_threads(before)


def test_cpu_simd_copy_is_reported():
    """vattn.info() names the copy of the CPU loops that runs; VATTN_CPU_NO_AVX512 and
    VATTN_CPU_GENERIC step it down (read once per process, so in subprocesses)."""
    got = vattn.info()["cpu_simd"]
    assert got in ("avx512", "avx2", "generic")
    code = "import vattn; print(vattn.info()['cpu_simd'])"
    for env, allowed in (
        ({"VATTN_CPU_NO_AVX512": "1"}, {"avx2", "generic"}),
        ({"VATTN_CPU_GENERIC": "1"}, {"generic"}),
    ):
        r = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        assert r.stdout.strip() in allowed, (env, r.stdout)


@pytest.mark.parametrize("switch", ["VATTN_CPU_NO_AVX512", "VATTN_CPU_GENERIC"])
def test_prefill_tiles_of_every_copy(switch):
    """The prefill GEMM tiles of the copies a machine with AVX-512 does not run by default (the AVX2
    tiles, the portable loops), in a subprocess, against the reference: the same shapes as
    test_prefill_gemm_tiles_cpu (partial panels, head dims below / between / at whole panels,
    windows, a cached prefix, 16-bit K and V)."""
    tests = os.path.dirname(os.path.abspath(__file__))
    code = (
        f"import sys; sys.path.insert(0, {tests!r})\n"
        "import torch, vattn\n"
        "from helpers import Case, assert_attention_close, build\n"
        "for dim, group, window, dtype in ((8, 3, -1, torch.float32), (40, 8, 37, torch.bfloat16),\n"
        "                                  (72, 1, -1, torch.float16), (128, 3, 37, torch.float32)):\n"
        "    case = Case(lens=[131, 300, 17, 64], hkv=2, group=group, dim=dim, q_lens=[131, 97, 17, 1],\n"
        "                window_left=window)\n"
        "    q, kc, vc, kw = build(case, dtype, 'token_major', 'cpu', seed=dim + group)\n"
        "    rest = dict(kw)\n"
        "    out, lse = vattn.prefill_attention(q, kc, vc, rest.pop('cu_seqlens_q'), rest.pop('seqlens_k'),\n"
        "                                       return_lse=True, **rest)\n"
        "    assert_attention_close(out, lse, q, kc, vc, kw, case.describe())\n"
        "print(vattn.info()['cpu_simd'])\n"
    )
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, switch: "1"}, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() in ({"avx2", "generic"} if switch == "VATTN_CPU_NO_AVX512" else {"generic"})
