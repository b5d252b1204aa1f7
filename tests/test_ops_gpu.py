"""Long contexts, CUDA graphs, torch.compile and CuPy inputs (cuda parts marked gpu; the compile
test also runs on cpu with the aot_eager backend, which exercises the fake implementations)."""

import importlib.util

import pytest
import torch

import vattn
from helpers import Case, assert_attention_close, assert_same_kv_bytes, build, capture_cuda_graph, randn

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
        graph, (out, lse) = capture_cuda_graph(body)
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


@pytest.mark.gpu
@pytest.mark.parametrize("impl", IMPLS)
def test_cuda_graph_compaction_then_decode_replayed(impl):
    """compact_kv + decode over the per-head lengths it leaves, captured once with fixed device
    buffers (keep, keep_lens, head lengths); each replay compacts a fresh copy of the cache with
    other kept tokens: the moved records equal reference.compact_kv's, decode the reference's."""
    from vattn import reference

    dtype, dev = torch.bfloat16, "cuda"
    rows, seq, hkv, group, dim, max_keep = 3, 1024, 2, 4, 128, 256
    gen = torch.Generator().manual_seed(11)
    k0 = randn((rows, seq, hkv, dim), gen, dtype)
    v0 = randn((rows, seq, hkv, dim), gen, dtype)
    kc, vc = k0.to(dev, copy=True), v0.to(dev, copy=True)
    row_ids = torch.tensor([2, 0, 1], dtype=torch.int32, device=dev)
    stored = [1000, 700, 300]  # tokens per row (every head) before compaction
    keep = torch.zeros(rows, hkv, max_keep, dtype=torch.int32, device=dev)
    keep_lens = torch.zeros(rows, hkv, dtype=torch.int32, device=dev)
    head_lens = torch.zeros(rows, hkv, dtype=torch.int32, device=dev)
    seqlens = torch.zeros(rows, dtype=torch.int32, device=dev)
    q = torch.zeros(rows, hkv * group, dim, dtype=dtype, device=dev)

    def new_request(step):
        kc.copy_(k0.to(dev))
        vc.copy_(v0.to(dev))
        kp = torch.zeros(rows, hkv, max_keep, dtype=torch.int32)
        kl = torch.zeros(rows, hkv, dtype=torch.int32)
        for b, r in enumerate(row_ids.tolist()):
            for h in range(hkv):
                n = int(torch.randint(0 if step else 1, max_keep + 1, (1,), generator=gen))
                idx = torch.randperm(stored[r], generator=gen)[:n].sort().values
                kp[b, h, : idx.numel()] = idx.to(torch.int32)
                kl[b, h] = idx.numel()
        keep.copy_(kp)
        keep_lens.copy_(kl)
        seqlens.copy_(kl.amax(1))
        q.copy_(randn(q.shape, gen, dtype))
        return kp, kl

    def body():
        torch.ops.vattn.compact_kv(kc, vc, row_ids, keep, keep_lens)
        head_lens.copy_(keep_lens)
        return torch.ops.vattn.decode_attention(q, kc, vc, seqlens, row_ids, head_lens, None, -1, 0.0, seq)

    with vattn.ops.attention_impl(impl):
        new_request(0)
        graph, (out, lse) = capture_cuda_graph(body)
        for step in range(4):
            kp, kl = new_request(step)
            graph.replay()
            torch.cuda.synchronize()
            rk, rv = k0.clone(), v0.clone()
            reference.compact_kv(rk, rv, row_ids.cpu(), kp, kl)
            got_k, got_v = kc.cpu(), vc.cpu()
            for b, r in enumerate(row_ids.tolist()):
                for h in range(hkv):
                    n = int(kl[b, h])
                    assert torch.equal(got_k[r, :n, h], rk[r, :n, h]), f"step {step}: K of row {r} head {h}"
                    assert torch.equal(got_v[r, :n, h], rv[r, :n, h]), f"step {step}: V of row {r} head {h}"
            kw = dict(seqlens_k=kl.amax(1), row_ids=row_ids, head_seqlens_k=kl, scale=None, window_left=-1)
            assert_attention_close(out.clone(), lse.clone(), q, rk, rv, kw, f"graph step {step}")


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


# ----------------------------------------------------------------------------- int4_ch keys on CUDA
# int4_ch (keys per (kv head, channel) over groups of G = head_dim / 2 tokens): the CUDA kernels
# against the CPU op (itself tested against reference.py in test_int4_ch.py): append_kv and
# compact_kv store the same bytes, block_minmax the same metadata, attention the same values.


def _i4_caches(rows, seq, heads, dim):
    """int4_ch K / int4 V over garbage storage (0xff codes, NaN words), on CPU."""
    kc = torch.full((rows, seq, heads, dim // 2), 0xFF, dtype=torch.uint8)
    vc = torch.full_like(kc, 0xFF)
    ks = torch.full((rows, seq, heads, 4), float("nan"))
    vs = torch.full((rows, seq, heads, 2), float("nan"))
    return [kc, vc, ks, vs]


def _i4_append(cpu, gpu, k, v, row_ids, pos, head_positions=None):
    kc, vc, ks, vs = cpu
    vattn.append_kv_raw(kc, vc, k, v, row_ids, pos, k_scale=ks, v_scale=vs, head_positions=head_positions)
    kc, vc, ks, vs = gpu
    hp = None if head_positions is None else head_positions.cuda()
    vattn.append_kv_raw(
        kc, vc, k.cuda(), v.cuda(), row_ids.cuda(), pos.cuda(), k_scale=ks, v_scale=vs, head_positions=hp
    )


def _i4_filled(rows, lens, heads, dim, seed, dtype=torch.float32):
    """(cpu caches, gpu caches) holding lens[r] tokens per row, appended by one ragged prefill."""
    g = dim // 2
    seq = -(-max(lens) // g) * g + 2 * g
    cpu = _i4_caches(rows, seq, heads, dim)
    gpu = [t.cuda() for t in cpu]
    gen = torch.Generator().manual_seed(seed)
    row_ids = torch.tensor([r for r, n in enumerate(lens) for _ in range(n)], dtype=torch.int32)
    pos = torch.tensor([t for n in lens for t in range(n)], dtype=torch.int32)
    k = randn((len(pos), heads, dim), gen, dtype) * (1 + 3 * torch.rand(1, 1, dim, generator=gen)).to(dtype)
    v = randn((len(pos), heads, dim), gen, dtype)
    _i4_append(cpu, gpu, k, v, row_ids, pos)
    return cpu, gpu


@pytest.mark.gpu
@pytest.mark.parametrize("dim", [16, 64, 128, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_int4_ch_append_bit_identical_to_cpu(dim, dtype):
    """Ragged prefill, decode steps filling groups token by token, chunks crossing groups, a
    shuffled call and per-head positions: the CUDA bytes equal the CPU op's after every call."""
    g = dim // 2
    rows, heads = 4, 3
    seq = 6 * g
    cpu = _i4_caches(rows, seq, heads, dim)
    gpu = [t.cuda() for t in cpu]
    gen = torch.Generator().manual_seed(dim)
    lens = [0] * rows
    steps = [{0: g + 3, 1: 1, 3: 2 * g}, {0: 1, 1: 1, 2: 1, 3: 1}, {0: 1, 1: g - 2, 2: 3}, {0: g + 5, 3: 1}]
    steps += [{r: 1 for r in range(rows)} for _ in range(g + 1)]
    for i, step in enumerate(steps):
        row_ids, pos = [], []
        for r, n in step.items():
            row_ids += [r] * n
            pos += list(range(lens[r], lens[r] + n))
            lens[r] += n
        if i == 3:  # any order of the call's entries
            perm = torch.randperm(len(pos), generator=gen).tolist()
            row_ids, pos = [row_ids[j] for j in perm], [pos[j] for j in perm]
        k = randn((len(pos), heads, dim), gen, dtype) * (1 + 4 * torch.rand(1, 1, dim, generator=gen)).to(dtype)
        v = randn((len(pos), heads, dim), gen, dtype)
        _i4_append(cpu, gpu, k, v, torch.tensor(row_ids, dtype=torch.int32), torch.tensor(pos, dtype=torch.int32))
        assert_same_kv_bytes(gpu, cpu, f"step {i}")
    # Per-head positions (heads of a row at different lengths), two decode steps.
    for step in range(2):
        hp = torch.tensor([[lens[r] + step + h for h in range(heads)] for r in range(rows)], dtype=torch.int32)
        k = randn((rows, heads, dim), gen, dtype)
        _i4_append(cpu, gpu, k, k, torch.arange(rows, dtype=torch.int32), torch.zeros(rows, dtype=torch.int32), hp)
        assert_same_kv_bytes(gpu, cpu, f"head positions {step}")


@pytest.mark.gpu
def test_int4_ch_append_edge_values_and_rejects():
    dim, heads = 16, 1
    g = dim // 2
    cpu = _i4_caches(1, 2 * g, heads, dim)
    gpu = [t.cuda() for t in cpu]
    x = randn((2 * g, heads, dim), torch.Generator().manual_seed(2))
    x[1, 0, 0], x[2, 0, 1], x[3, 0, 2] = float("nan"), float("inf"), float("-inf")
    x[:, 0, 3] = 0.75
    x[:, 0, 4] = 1.0e-40
    x[4, 0, 5] = 3.0e4
    for a, b in ((0, 3), (3, 4), (4, 2 * g)):
        _i4_append(
            cpu, gpu, x[a:b], x[a:b], torch.zeros(b - a, dtype=torch.int32), torch.arange(a, b, dtype=torch.int32)
        )
        assert_same_kv_bytes(gpu, cpu, f"tokens {a}..{b}")
    # A seq that is not a multiple of the group: rejected on the host.
    kc = torch.zeros(1, g + 1, heads, dim // 2, dtype=torch.uint8, device="cuda")
    ks = torch.zeros(1, g + 1, heads, 4, device="cuda")
    vs = torch.zeros(1, g + 1, heads, 2, device="cuda")
    with pytest.raises(ValueError, match="multiple"):
        vattn.append_kv_raw(kc, kc.clone(), x[:1].cuda(), x[:1].cuda(), [0], [0], k_scale=ks, v_scale=vs)


I4_ATTN_CASES = [
    Case(lens=[1, 31, 32, 33, 200], hkv=2, group=3, dim=64),
    Case(lens=[700, 5], hkv=1, group=4, dim=128, window_left=100),
    Case(lens=[64, 129], hkv=2, group=1, dim=64, softcap=30.0),
    Case(lens=[300, 17, 90], hkv=2, group=2, dim=128, head_lens=[[300, 7], [0, 17], [45, 90]]),
    Case(lens=[2000], hkv=1, group=8, dim=256, scale=0.3),
    Case(lens=[1, 31, 32, 33, 200], hkv=2, group=3, dim=64),
]
# q dtype per case: 16-bit ones reach the fast kernels (split-KV decode at head dims 64-256,
# tensor-core prefill at 64 / 128) under impl "fast"; float32 runs the plain kernels.
I4_ATTN_DTYPES = [torch.bfloat16, torch.float16, torch.bfloat16, torch.float16, torch.bfloat16, torch.float32]


@pytest.mark.gpu
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("prefill", [False, True], ids=["decode", "prefill"])
@pytest.mark.parametrize("idx", range(len(I4_ATTN_CASES)))
def test_int4_ch_attention_matches_cpu(impl, prefill, idx):
    """Decode / prefill over int4_ch keys, fast (split-KV decode folding the group parameters into
    q, the tensor-core prefill's int4_ch tile loader) and plain kernels: the CPU op's values."""
    case = I4_ATTN_CASES[idx]
    dtype = I4_ATTN_DTYPES[idx]
    lens = case.lens
    heads, dim = case.hkv, case.dim
    cpu, gpu = _i4_filled(len(lens), lens, heads, dim, seed=idx, dtype=dtype)
    gen = torch.Generator().manual_seed(100 + idx)
    q_lens = [min(n, [n, 1, 40, 3][i % 4]) for i, n in enumerate(lens)] if prefill else [1] * len(lens)
    q = randn((sum(q_lens), heads * case.group, dim), gen, dtype)
    kw = dict(row_ids=torch.arange(len(lens), dtype=torch.int32), scale=case.scale, window_left=case.window_left)
    kw["softcap"] = case.softcap
    seqlens = torch.tensor(lens, dtype=torch.int32)
    if case.head_lens is not None:
        kw["head_seqlens_k"] = torch.tensor(case.head_lens, dtype=torch.int32)
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)

    def run(caches, dev):
        kc, vc, ks, vs = caches
        kd = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        if prefill:
            return vattn.prefill_attention(
                q.to(dev), kc, vc, cu.to(dev), seqlens.to(dev), k_scale=ks, v_scale=vs, return_lse=True, **kd
            )
        return vattn.decode_attention(q.to(dev), kc, vc, seqlens.to(dev), k_scale=ks, v_scale=vs, return_lse=True, **kd)

    want, want_lse = run(cpu, "cpu")
    with vattn.ops.attention_impl(impl):
        out, lse = run(gpu, "cuda")
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.cpu().float(), want.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(lse.cpu(), want_lse, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_int4_ch_scores_match_cpu():
    """Decode scores (H2O) and prefill observation scores over int4_ch keys."""
    heads, dim, group = 2, 64, 3
    lens = [90, 40]
    cpu, gpu = _i4_filled(2, lens, heads, dim, seed=3)
    seq = cpu[0].shape[1]
    gen = torch.Generator().manual_seed(4)
    q = randn((50, heads * group, dim), gen)
    cu = torch.tensor([0, 10, 50], dtype=torch.int32)
    seqlens = torch.tensor(lens, dtype=torch.int32)
    for decode in (True, False):
        got = []
        for caches, dev in ((cpu, "cpu"), (gpu, "cuda")):
            kc, vc, ks, vs = caches
            sc = torch.zeros(2, heads, seq, device=dev)
            if decode:
                vattn.decode_attention(q[[9, 49]].to(dev), kc, vc, seqlens.to(dev), k_scale=ks, v_scale=vs, scores=sc)
            else:
                vattn.prefill_attention(q.to(dev), kc, vc, cu.to(dev), seqlens.to(dev), k_scale=ks, v_scale=vs,
                                        scores=sc, score_last_queries=4)  # fmt: skip
            got.append(sc.cpu())
        torch.testing.assert_close(got[1], got[0], rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_int4_ch_values_are_rejected_by_cuda_attention():
    """int4_ch is a key format: a CUDA attention call with int4_ch values raises before launching."""
    dim, g = 64, 32
    kc = torch.zeros(1, g, 1, dim // 2, dtype=torch.uint8, device="cuda")
    ks = torch.zeros(1, g, 1, 4, device="cuda")
    q = torch.zeros(1, 1, dim, device="cuda")
    with pytest.raises((ValueError, TypeError)):
        vattn.decode_attention(q, kc, kc.clone(), torch.tensor([3], dtype=torch.int32, device="cuda"), k_scale=ks,
                               v_scale=ks.clone())  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("dim", [16, 64, 256])
def test_int4_ch_compact_bit_identical_to_cpu(dim):
    """compact_kv re-encodes the kept keys in the groups of their new positions: the CPU op's bytes
    (and so reference.compact_kv(k_format="int4_ch")); V words and scores move as usual."""
    g = dim // 2
    heads = 2
    lens = [5 * g + 3, 7, 2 * g, 8 * g]
    cpu, gpu = _i4_filled(4, lens, heads, dim, seed=dim)
    seq = cpu[0].shape[1]
    rng = torch.Generator().manual_seed(dim + 1)
    sel = [3, 0, 1, 2]
    max_keep = max(lens)
    keep = torch.zeros(len(sel), heads, max_keep, dtype=torch.int32)
    keep_lens = torch.zeros(len(sel), heads, dtype=torch.int32)
    for i, r in enumerate(sel):
        for h in range(heads):
            choices = [0, 1, g, lens[r], int(torch.randint(1, lens[r] + 1, (1,), generator=rng))]
            n = min(choices[(i + 2 * h) % len(choices)], lens[r]) if (i, h) != (0, 0) else lens[r]
            idx = torch.randperm(lens[r], generator=rng)[:n].sort().values
            keep[i, h, :n] = idx.to(torch.int32)
            keep_lens[i, h] = n
    scores = torch.randn(4, heads, seq, generator=rng)
    s_gpu = scores.cuda()
    kc, vc, ks, vs = cpu
    vattn.compact_kv(kc, vc, torch.tensor(sel, dtype=torch.int32), keep, keep_lens, k_scale=ks, v_scale=vs,
                     scores=scores)  # fmt: skip
    kc, vc, ks, vs = gpu
    vattn.compact_kv(kc, vc, torch.tensor(sel, dtype=torch.int32, device="cuda"), keep.cuda(), keep_lens.cuda(),
                     k_scale=ks, v_scale=vs, scores=s_gpu)  # fmt: skip
    assert_same_kv_bytes(gpu, cpu, "compact")
    assert torch.equal(s_gpu.cpu(), scores)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", IMPLS)
def test_int4_ch_quest_matches_cpu(impl):
    """block_minmax over int4_ch keys (exact: the same dequantized values) and sparse decode."""
    from vattn.quest_ops import block_minmax, sparse_decode_attention

    dim, heads, group, block = 64, 2, 3, 16
    lens = [100, 17, 50]
    hl = torch.tensor([[100, 60], [17, 1], [33, 50]], dtype=torch.int32)
    cpu, gpu = _i4_filled(3, lens, heads, dim, seed=4)
    seq = cpu[0].shape[1]
    nb = -(-seq // block)
    row_ids = torch.arange(3, dtype=torch.int32)
    seqlens = torch.tensor(lens, dtype=torch.int32)
    first = torch.tensor([0, 0, 1], dtype=torch.int32)
    q = randn((3, heads * group, dim), torch.Generator().manual_seed(5), torch.float16)
    sel = torch.zeros(3, heads, nb, dtype=torch.int32)
    cnt = torch.zeros(3, heads, dtype=torch.int32)
    for b in range(3):
        for h in range(heads):
            nbh = -(-int(hl[b, h]) // block)
            ids = [i for i in range(nbh) if i % 2 == 0 or i == nbh - 1]
            sel[b, h, : len(ids)] = torch.tensor(ids, dtype=torch.int32)
            cnt[b, h] = len(ids)
    res = []
    for caches, dev in ((cpu, "cpu"), (gpu, "cuda")):
        kc, vc, ks, vs = caches
        meta = torch.full((3, nb, heads, 2, dim), 7.0, device=dev)
        block_minmax(kc, meta, row_ids.to(dev), seqlens.to(dev), first.to(dev), head_lengths=hl.to(dev), block=block,
                     k_scale=ks)  # fmt: skip
        with vattn.ops.attention_impl(impl):
            out = sparse_decode_attention(q.to(dev), kc, vc, row_ids.to(dev), seqlens.to(dev), sel.to(dev),
                                          cnt.to(dev), block=block, head_lengths=hl.to(dev), k_scale=ks,
                                          v_scale=vs)  # fmt: skip
        res.append((meta.cpu(), out.cpu().float()))
    assert torch.equal(res[1][0], res[0][0])
    torch.testing.assert_close(res[1][1], res[0][1], rtol=2e-3, atol=2e-3)
