"""Long contexts, CUDA graphs, torch.compile and CuPy inputs (cuda parts marked gpu; the compile
test also runs on cpu with the aot_eager backend, which exercises the fake implementations)."""

import importlib.util

import pytest
import torch

import vattn
from helpers import Case, assert_attention_close, build, randn

IMPLS = ["fast", "simple"]


@pytest.mark.gpu
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_decode_32k(impl, dtype):
    case = Case(lens=[32768, 1000, 32001], hkv=2, group=4, dim=128, window_left=-1)
    with vattn.ops.attention_impl(impl):
        q, kc, vc, kw = build(case, dtype, "token_major", "cuda", seed=32)
        out, lse = vattn.decode_attention(
            q, kc, vc, kw.pop("seqlens_k"), return_lse=True, **{k: v for k, v in kw.items()}
        )
        kw["seqlens_k"] = torch.tensor(case.lens, dtype=torch.int32, device="cuda")
        assert_attention_close(out, lse, q, kc, vc, kw, "decode 32k")


@pytest.mark.gpu
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dim", [64, 128])
def test_prefill_32k_prefix(impl, dtype, dim):
    """A 32K-token row prefilled by a chunk of 256 queries on top of its prefix, plus a short row."""
    case = Case(lens=[32768, 300], hkv=1, group=8, dim=dim, q_lens=[256, 300], window_left=-1)
    with vattn.ops.attention_impl(impl):
        q, kc, vc, kw = build(case, dtype, "layer_major", "cuda", seed=dim)
        out, lse = vattn.prefill_attention(
            q,
            kc,
            vc,
            kw["cu_seqlens_q"],
            kw["seqlens_k"],
            row_ids=kw["row_ids"],
            max_seqlen_q=300,
            max_seqlen_k=32768,
            return_lse=True,
        )
        assert_attention_close(out, lse, q, kc, vc, kw, "prefill 32k")


@pytest.mark.gpu
@pytest.mark.parametrize("impl", IMPLS)
def test_cuda_graph_decode_replayed_with_growing_lengths(impl):
    """append_kv + decode captured once; replays with new lengths, positions and queries stay right."""
    dtype, dev = torch.bfloat16, "cuda"
    rows, seq, hkv, group, dim = 3, 2048, 2, 4, 128
    gen = torch.Generator().manual_seed(7)
    kc = torch.full((rows, seq, hkv, dim), float("nan"), dtype=dtype, device=dev)
    vc = torch.full_like(kc, float("nan"))
    start = [100, 513, 1]
    for r, n in enumerate(start):
        kc[r, :n] = randn((n, hkv, dim), gen, dtype).to(dev)
        vc[r, :n] = randn((n, hkv, dim), gen, dtype).to(dev)
    row_ids = torch.tensor([2, 0, 1], dtype=torch.int32, device=dev)
    lens = torch.zeros(rows, dtype=torch.int32, device=dev)
    q = torch.zeros(rows, hkv * group, dim, dtype=dtype, device=dev)
    k_new = torch.zeros(rows, hkv, dim, dtype=dtype, device=dev)
    v_new = torch.zeros_like(k_new)
    positions = torch.zeros(rows, dtype=torch.int32, device=dev)
    cur = [start[r] for r in row_ids.tolist()]
    # The warm-up call appends at the first step's positions (the first replay overwrites them).
    positions.copy_(torch.tensor(cur, dtype=torch.int32))
    lens.copy_(positions + 1)
    k_new.copy_(randn(k_new.shape, gen, dtype))
    v_new.copy_(randn(v_new.shape, gen, dtype))
    q.copy_(randn(q.shape, gen, dtype))

    def body():
        torch.ops.vattn.append_kv(kc, vc, k_new, v_new, row_ids, positions)
        return torch.ops.vattn.decode_attention(q, kc, vc, lens, row_ids, None, None, -1, 0.0, seq)

    with vattn.ops.attention_impl(impl):
        # Warm up on a side stream (allocations, lazy init) as CUDA graphs require.
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            body()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out, lse = body()
        for step in range(6):
            positions.copy_(torch.tensor(cur, dtype=torch.int32))
            lens.copy_(torch.tensor([c + 1 for c in cur], dtype=torch.int32))
            q.copy_(randn(q.shape, gen, dtype))
            k_new.copy_(randn(k_new.shape, gen, dtype))
            v_new.copy_(randn(v_new.shape, gen, dtype))
            graph.replay()
            torch.cuda.synchronize()
            kw = dict(seqlens_k=lens.clone(), row_ids=row_ids, scale=None, window_left=-1, softcap=0.0)
            assert_attention_close(out.clone(), lse.clone(), q, kc, vc, kw, f"graph step {step}")
            cur = [c + 1 + 37 * step for c in cur]  # lengths also jump (pages of a real cache would be mapped)
            for b, r in enumerate(row_ids.tolist()):  # fill the jumped-over tokens
                n0 = int(lens[b]), cur[b]
                kc[r, n0[0] : n0[1]] = randn((n0[1] - n0[0], hkv, dim), gen, dtype).to(dev)
                vc[r, n0[0] : n0[1]] = randn((n0[1] - n0[0], hkv, dim), gen, dtype).to(dev)


def _compile_devices():
    return [
        pytest.param("cpu", "aot_eager", id="cpu-aot_eager"),
        pytest.param("cuda", "inductor", id="cuda-inductor", marks=pytest.mark.gpu),
    ]


@pytest.mark.parametrize("device,backend", _compile_devices())
def test_torch_compile_decode_loop(device, backend):
    dtype = torch.float16 if device == "cuda" else torch.float32
    rows, seq, hkv, group, dim = 2, 64, 2, 3, 64
    gen = torch.Generator().manual_seed(3)
    kc = randn((rows, seq, hkv, dim), gen, dtype).to(device)
    vc = randn((rows, seq, hkv, dim), gen, dtype).to(device)
    kc_e, vc_e = kc.clone(), vc.clone()
    row_ids = torch.tensor([1, 0], dtype=torch.int32, device=device)

    def step(q, kc, vc, k, v, lens, positions):
        vattn.append_kv_raw(kc, vc, k, v, row_ids, positions)
        out = vattn.decode_attention(q, kc, vc, lens, row_ids=row_ids, max_seqlen_k=seq, softcap=20.0)
        return out.float() * 2 + 1

    torch._dynamo.reset()
    compiled = torch.compile(step, backend=backend, fullgraph=True, dynamic=False)
    for t in range(5, 12):
        q = randn((rows, hkv * group, dim), gen, dtype).to(device)
        k = randn((rows, hkv, dim), gen, dtype).to(device)
        v = randn((rows, hkv, dim), gen, dtype).to(device)
        lens = torch.tensor([t + 1, t + 3], dtype=torch.int32, device=device)
        positions = lens - 1
        got = compiled(q, kc, vc, k, v, lens, positions)
        want = step(q, kc_e, vc_e, k, v, lens, positions)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(kc, kc_e)


@pytest.mark.gpu
def test_cupy_inputs():
    if importlib.util.find_spec("cupy") is None:
        pytest.skip("cupy is not installed")
    import cupy as cp

    rows, seq, hkv, group, dim = 3, 300, 2, 4, 64
    rs = cp.random.RandomState(5)
    kc_cp = rs.standard_normal((rows, seq, hkv, dim)).astype(cp.float16)
    vc_cp = rs.standard_normal((rows, seq, hkv, dim)).astype(cp.float16)
    q_cp = rs.standard_normal((rows, hkv * group, dim)).astype(cp.float16)
    lens_cp = cp.asarray([300, 5, 129], dtype=cp.int32)
    kc, vc, q, lens = (torch.as_tensor(a, device="cuda") for a in (kc_cp, vc_cp, q_cp, lens_cp))
    out, lse = vattn.decode_attention(q, kc, vc, lens, return_lse=True)
    kw = dict(seqlens_k=lens, row_ids=None, scale=None, window_left=-1, softcap=0.0)
    assert_attention_close(out, lse, q, kc, vc, kw, "cupy")
    # append_kv writes into CuPy-owned memory.
    new_k = torch.as_tensor(rs.standard_normal((1, hkv, dim)).astype(cp.float16), device="cuda")
    vattn.append_kv_raw(kc, vc, new_k, new_k, torch.tensor([1], device="cuda"), torch.tensor([5], device="cuda"))
    assert cp.array_equal(kc_cp[1, 5], cp.asarray(new_k[0]))
