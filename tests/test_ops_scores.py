"""Per-token attention scores of decode_attention / prefill_attention (H2O, TOVA, SnapKV statistics)
against reference.attention's `scores` in float64: modes "add" / "replace", the last-w-queries
window, GQA groups, per-head lengths, windows, soft-cap, quantized caches, row ids, entries past
each length untouched bit for bit, bad inputs, opcheck, vattn.attention. cpu; cuda marked gpu."""

from __future__ import annotations

import pytest
import torch

import vattn
from vattn import reference
from helpers import Case, build, device_impls, skip_unsupported

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _lengths(case: Case):
    """L(b, h) of every batch row and kv head."""
    if case.head_lens is not None:
        return [list(h) for h in case.head_lens]
    return [[n] * case.hkv for n in case.lens]


def _initial_scores(rows, hkv, seq, device, seed):
    """A score buffer with random values (the "add" baseline) and a few NaN, some with distinct
    payloads, so "untouched" can be checked bit for bit."""
    gen = torch.Generator().manual_seed(seed)
    sc = torch.randn(rows, hkv, seq + 5, generator=gen)
    bits = sc.view(torch.int32)
    nan_mask = torch.rand(sc.shape, generator=gen) < 0.2
    bits[nan_mask] = 0x7FC00000 | (torch.arange(int(nan_mask.sum())) & 0xFFFF).to(torch.int32)
    return sc.to(device)


def _call(q, kc, vc, kw, scores, mode, w, k_scale=None, v_scale=None):
    kw = dict(kw)
    extra = dict(scores=scores, score_mode=mode, score_last_queries=w, k_scale=k_scale, v_scale=v_scale)
    if "cu_seqlens_q" not in kw:
        return vattn.decode_attention(q, kc, vc, kw.pop("seqlens_k"), return_lse=True, **kw, **extra)
    return vattn.prefill_attention(
        q, kc, vc, kw.pop("cu_seqlens_q"), kw.pop("seqlens_k"), return_lse=True, **kw, **extra
    )


def _ref_scores(q, kd, vd, kw, init, mode, w, compute_dtype):
    ref = init.cpu().to(torch.float64 if compute_dtype == torch.float64 else torch.float32).clone()
    cpu = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    reference.attention(
        q.cpu(),
        kd.cpu(),
        vd.cpu(),
        compute_dtype=compute_dtype,
        scores=ref,
        score_mode=mode,
        score_last_queries=w,
        **cpu,
    )
    return ref


def _written_mask(shape, row_ids, lengths):
    m = torch.zeros(shape, dtype=torch.bool)
    for b, row in enumerate(row_ids):
        for h, n in enumerate(lengths[b]):
            m[row, h, :n] = True
    return m


def check_scores(got, init, q, kd, vd, kw, mode, w, lengths, what=""):
    """got against the float64 reference (FlashAttention's rule against the reference run in q's
    dtype), everything outside [0, L(b, h)) of the batch's cache rows bit-identical to init."""
    got = got.cpu()
    init = init.cpu()
    row_ids = kw["row_ids"].tolist()
    written = _written_mask(got.shape, row_ids, lengths)
    assert torch.equal(got.view(torch.int32)[~written], init.view(torch.int32)[~written]), (
        f"{what}: scores outside [0, L) were touched"
    )
    ref = _ref_scores(q, kd, vd, kw, init, mode, w, torch.float64)
    low = _ref_scores(q, kd, vd, kw, init, mode, w, q.dtype)
    g, r, lo = got.double()[written], ref[written], low.double()[written]
    if mode == "replace":
        assert torch.isfinite(g).all(), f"{what}: non-finite score"
    else:
        assert torch.equal(torch.isnan(g), torch.isnan(r)), f"{what}: NaN pattern of 'add' differs"
    fin = torch.isfinite(r)
    err = (g[fin] - r[fin]).abs()
    base = (lo[fin] - r[fin]).abs().max().item() if fin.any() else 0.0
    tol = 2 * base + 1e-5 * (1 + r[fin].abs())
    assert (err <= tol).all(), f"{what}: max score error {err.max().item():.3g} (torch {q.dtype} error {base:.3g})"


def _run_case(case, dtype, layout, device, impl, mode, w, seed=0):
    skip_unsupported(device, dtype, case.dim, prefill=case.q_lens is not None)
    q, kc, vc, kw = build(case, dtype, layout, device, seed)
    init = _initial_scores(kc.shape[0], case.hkv, kc.shape[1], device, seed)
    scores = init.clone()
    with vattn.ops.attention_impl(impl):
        out, lse = _call(q, kc, vc, kw, scores, mode, w)
    check_scores(scores, init, q, kc, vc, kw, mode, w, _lengths(case), f"{case.describe()}-{mode}-w{w}")
    return q, kc, vc, kw, out, lse


DECODE_CASES = [
    Case(lens=[5, 700, 33, 1], hkv=2, group=1, dim=64),
    Case(lens=[5, 700, 33, 1], hkv=2, group=3, dim=64),
    Case(lens=[1500], hkv=2, group=3, dim=64),  # long row: split over key ranges
    Case(lens=[90, 300, 2], hkv=3, group=3, dim=128, window_left=40, softcap=5.0),
    Case(lens=[90, 300, 2], hkv=2, group=3, dim=64, head_lens=[[0, 90], [300, 17], [1, 2]]),
    # Few short rows with work enough for the team: kv heads in separate items (3 heads: 2 + 1).
    Case(lens=[500, 480], hkv=3, group=4, dim=64, head_lens=[[500, 2, 499], [480, 480, 0]]),
]
PREFILL_CASES = [
    # Rows with a cached prefix (L > n), a full prompt, a one-query chunk, a row with no query.
    Case(lens=[300, 50, 7, 40], hkv=2, group=1, dim=64, q_lens=[100, 50, 1, 0]),
    Case(lens=[300, 50, 7, 40], hkv=2, group=3, dim=64, q_lens=[100, 50, 1, 0]),
    Case(lens=[200, 77], hkv=1, group=3, dim=128, q_lens=[200, 30], window_left=25, softcap=10.0),
    Case(lens=[120, 64], hkv=2, group=3, dim=64, q_lens=[120, 5], head_lens=[[120, 60], [0, 64]]),
]


@pytest.mark.parametrize("device,impl", device_impls())
@pytest.mark.parametrize("mode", ["add", "replace"])
@pytest.mark.parametrize("idx", range(len(DECODE_CASES)))
def test_decode_scores(device, impl, mode, idx):
    case = DECODE_CASES[idx]
    dtype = DTYPES[idx % 3] if device == "cpu" else torch.float16
    _run_case(case, dtype, ["plain", "token_major", "layer_major"][idx % 3], device, impl, mode, None, seed=idx)


@pytest.mark.parametrize("device,impl", device_impls())
@pytest.mark.parametrize("mode", ["add", "replace"])
@pytest.mark.parametrize("w", [1, 3, None, 0])
@pytest.mark.parametrize("idx", range(len(PREFILL_CASES)))
def test_prefill_scores(device, impl, mode, w, idx):
    case = PREFILL_CASES[idx]
    dtype = DTYPES[idx % 3] if device == "cpu" else [torch.float16, torch.bfloat16][idx % 2]
    _run_case(case, dtype, ["plain", "token_major", "head_major"][idx % 3], device, impl, mode, w, seed=10 + idx)


@pytest.mark.parametrize("device,impl", device_impls())
def test_scores_do_not_change_the_output(device, impl):
    """Emitting scores leaves out and lse as they are without."""
    case = PREFILL_CASES[1]
    dtype = torch.float16
    skip_unsupported(device, dtype, case.dim)
    q, kc, vc, kw = build(case, dtype, "plain", device, seed=3)
    with vattn.ops.attention_impl(impl):
        base, base_lse = _call(q, kc, vc, kw, None, "add", None)
        sc = torch.zeros(kc.shape[0], case.hkv, kc.shape[1], device=device)
        out, lse = _call(q, kc, vc, kw, sc, "add", 7)
    assert torch.equal(out, base) and torch.equal(lse, base_lse)  # same kernels; the score pass comes after


@pytest.mark.parametrize("device,impl", device_impls())
@pytest.mark.parametrize("group", [1, 3])
def test_probabilities_sum_to_one(device, impl, group):
    """Full causal rows, all queries: per kv head, the scores sum to group * queries (decode:
    group); replace over a garbage buffer gives exactly that."""
    dtype = torch.float16
    skip_unsupported(device, dtype, 64)
    with vattn.ops.attention_impl(impl):
        for case in (
            Case(lens=[130, 1, 64], hkv=2, group=group, dim=64, q_lens=[130, 1, 64]),
            Case(lens=[130, 1, 2000], hkv=2, group=group, dim=64),
        ):
            q, kc, vc, kw = build(case, dtype, "plain", device, seed=group)
            sc = torch.full((kc.shape[0], case.hkv, kc.shape[1]), float("nan"), device=device)
            _call(q, kc, vc, kw, sc, "replace", None)
            n_q = case.q_lens if case.q_lens is not None else [1] * len(case.lens)
            for b, row in enumerate(kw["row_ids"].tolist()):
                for h in range(case.hkv):
                    total = sc[row, h, : case.lens[b]].double().sum().item()
                    assert abs(total - group * n_q[b]) < 1e-4 * group * n_q[b], (case.describe(), b, h, total)
                    assert torch.isnan(sc[row, h, case.lens[b] :]).all()


@pytest.mark.parametrize("device,impl", device_impls())
def test_decode_add_accumulates(device, impl):
    """Two "add" calls accumulate (H2O over decode steps); "replace" keeps only the last (TOVA)."""
    case = Case(lens=[40, 600], hkv=2, group=3, dim=64)
    dtype = torch.float16
    skip_unsupported(device, dtype, 64, prefill=False)
    q, kc, vc, kw = build(case, dtype, "token_major", device, seed=4)
    with vattn.ops.attention_impl(impl):
        one = torch.zeros(kc.shape[0], 2, kc.shape[1], device=device)
        _call(q, kc, vc, kw, one, "add", None)
        two = torch.zeros_like(one)
        _call(q, kc, vc, kw, two, "add", None)
        _call(q, kc, vc, kw, two, "add", None)
        torch.testing.assert_close(two, 2 * one, atol=1e-6, rtol=1e-6)
        _call(q, kc, vc, kw, two, "replace", None)
        torch.testing.assert_close(two, one, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("device,impl", device_impls())
@pytest.mark.parametrize("mode", ["add", "replace"])
def test_prefill_without_any_query_scores(device, impl, mode):
    """A prefill call with no query at all (every row's query set empty, so q has no storage):
    "replace" zeroes each row's scores[r, h, :L] as the reference does (and so still checks the
    lengths), "add" leaves them."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    g = torch.Generator().manual_seed(5)
    kc = torch.randn(3, 16, 2, 64, generator=g).to(device)
    vc = torch.randn(3, 16, 2, 64, generator=g).to(device)
    q = torch.empty(0, 4, 64, device=device)
    cu = torch.zeros(3, dtype=torch.int32, device=device)
    lens, rows = torch.tensor([5, 9], dtype=torch.int32, device=device), torch.tensor([2, 0], device=device)
    scores = torch.rand(3, 2, 16, generator=g).to(device)
    want = scores.cpu().clone()
    reference.attention(q.cpu(), kc.cpu(), vc.cpu(), lens.cpu(), cu.cpu(), row_ids=rows.cpu(), scores=want,
                        score_mode=mode)  # fmt: skip
    with vattn.ops.attention_impl(impl):
        out = vattn.prefill_attention(q, kc, vc, cu, lens, row_ids=rows, scores=scores, score_mode=mode)
    assert out.shape == (0, 4, 64)
    assert torch.equal(scores.cpu(), want)
    if mode == "replace":
        assert not want[2, :, :5].any() and not want[0, :, :9].any() and want[1].all()
    if device == "cpu" and mode == "replace":
        before = scores.clone()
        with pytest.raises(ValueError):
            vattn.prefill_attention(q, kc, vc, cu, torch.tensor([5, 17], dtype=torch.int32), row_ids=rows,
                                    scores=scores, score_mode=mode)  # fmt: skip
        assert torch.equal(scores, before)


# ----------------------------------------------------------------------------- quantized caches


@pytest.mark.parametrize("device,impl", device_impls())
@pytest.mark.parametrize("spec", ["int8", ("fp8_e4m3", "int4"), "int4"], ids=str)
@pytest.mark.parametrize("kind", ["decode", "prefill"])
def test_scores_on_quantized_cache(device, impl, spec, kind):
    """The scores are over the dequantized keys, as the attention uses them."""
    from test_kv_formats import _quant_ok, build_quantized

    if kind == "decode":
        case = Case(lens=[3, 700, 64], hkv=2, group=3, dim=64, window_left=100)
    else:
        case = Case(lens=[150, 40], hkv=2, group=3, dim=64, q_lens=[60, 40], softcap=8.0)
    dtype = torch.float16
    _quant_ok(device, dtype, case.dim, spec, prefill=kind == "prefill")
    q, (kc, vc, ks, vs), (kd, vd), _, kw = build_quantized(case, spec, dtype, "record", device, seed=7)
    for mode, w in (("add", None), ("replace", 3)):
        init = _initial_scores(kc.shape[0], case.hkv, kc.shape[1], device, seed=8)
        sc = init.clone()
        with vattn.ops.attention_impl(impl):
            _call(q, kc, vc, kw, sc, mode, w, k_scale=ks, v_scale=vs)
        check_scores(sc, init, q, kd, vd, kw, mode, w, _lengths(case), f"{spec}-{kind}-{mode}")


# ----------------------------------------------------------------------------- vattn.attention on a KVCache


def test_attention_api_forwards_scores():
    cache = vattn.KVCache(
        num_layers=2, num_kv_heads=2, head_dim=64, max_batch=4, max_seq_len=256, dtype=torch.float32, device="cpu"
    )
    gen = torch.Generator().manual_seed(1)
    slots = [cache.alloc() for _ in range(3)]
    order = [slots[2], slots[0]]
    sc = torch.zeros(4, 2, 256)
    step = cache.begin_step(slots=order, new_tokens=[20, 9])
    k = torch.randn(29, 2, 64, generator=gen)
    v = torch.randn(29, 2, 64, generator=gen)
    q = torch.randn(29, 6, 64, generator=gen)
    vattn.append_kv(cache, 1, step, k, v)
    vattn.attention(q, cache, 1, step, scores=sc, score_mode="replace", score_last_queries=4)
    k_view, v_view = cache.kv(1)
    ref = torch.zeros(4, 2, 256, dtype=torch.float64)
    reference.attention(
        q,
        k_view,
        v_view,
        step.seqlens,
        cu_seqlens_q=step.cu_seqlens_q,
        row_ids=step.slot_ids,
        scores=ref,
        score_mode="replace",
        score_last_queries=4,
    )
    torch.testing.assert_close(sc.double(), ref, atol=1e-5, rtol=1e-5)
    assert sc[slots[1]].abs().sum() == 0 and sc[slots[2], :, 20:].abs().sum() == 0
    cache.end_step(step)
    step = cache.begin_step(slots=order, new_tokens=[1, 1])
    assert step.is_decode
    vattn.append_kv(cache, 1, step, k[:2], v[:2])
    vattn.attention(q[:2], cache, 1, step, scores=sc)  # "add" on top
    reference.attention(q[:2], k_view, v_view, step.seqlens, row_ids=step.slot_ids, scores=ref)
    torch.testing.assert_close(sc.double(), ref, atol=1e-5, rtol=1e-5)
    cache.end_step(step)


# ----------------------------------------------------------------------------- bad inputs


def test_bad_score_inputs():
    case = Case(lens=[10, 30], hkv=2, group=3, dim=64, q_lens=[10, 3])
    q, kc, vc, kw = build(case, torch.float32, "plain", "cpu", seed=1)
    rows, seq = kc.shape[0], kc.shape[1]
    good = torch.zeros(rows, 2, seq)
    bad = {
        "float64": torch.zeros(rows, 2, seq, dtype=torch.float64),
        "float16": torch.zeros(rows, 2, seq, dtype=torch.float16),
        "few rows": torch.zeros(rows - 1, 2, seq),
        "heads": torch.zeros(rows, 3, seq),
        "short": torch.zeros(rows, 2, seq - 1),
        "2-D": torch.zeros(rows, 2 * seq),
        "strided tokens": torch.zeros(rows, 2, 2 * seq)[:, :, ::2],
    }
    for what, sc in bad.items():
        for decode in (True, False):
            kwd = dict(kw)
            if decode:
                kwd.pop("cu_seqlens_q")
                qq = q[:2]
            else:
                qq = q
            with pytest.raises(ValueError):
                _call(qq, kc, vc, kwd, sc, "add", None)
            assert what  # every case raised
    with pytest.raises(ValueError, match="score_mode"):
        _call(q, kc, vc, kw, good, "sum", None)
    with pytest.raises(TypeError, match="score_last_queries"):
        _call(q, kc, vc, kw, good, "add", 1.5)
    # Two batch rows on one cache row would write the same scores.
    kwd = dict(kw, row_ids=torch.tensor([1, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match="distinct"):
        _call(q, kc, vc, kwd, good, "add", None)
    # Larger buffers are fine (more rows, more tokens); the extra entries stay as they were.
    big = torch.full((rows + 2, 2, seq + 7), 3.0)
    _call(q, kc, vc, kw, big, "add", None)
    assert (big[:, :, seq:] == 3.0).all()
    if torch.cuda.is_available() and vattn._C.built_with_cuda:
        with pytest.raises(ValueError, match="device"):
            _call(q, kc, vc, kw, good.cuda(), "add", None)


# ----------------------------------------------------------------------------- torch.library


@pytest.mark.parametrize("device,impl", device_impls())
def test_opcheck_scores(device, impl):
    case = Case(lens=[3, 70, 17], hkv=2, group=3, dim=64, q_lens=[3, 5, 1])
    q, kc, vc, kw = build(case, torch.float16, "token_major", device, seed=1)
    kc.nan_to_num_(0.0)
    vc.nan_to_num_(0.0)
    sc = torch.rand(kc.shape[0], 2, kc.shape[1], device=device)
    with vattn.ops.attention_impl(impl):
        torch.library.opcheck(
            torch.ops.vattn.decode_attention.default,
            (q[:3], kc, vc, kw["seqlens_k"], kw["row_ids"]),
            dict(scores=sc, score_mode="replace"),
        )
        torch.library.opcheck(
            torch.ops.vattn.prefill_attention.default,
            (q, kc, vc, kw["cu_seqlens_q"], kw["seqlens_k"], kw["row_ids"]),
            dict(scores=sc, score_mode="replace", score_last_queries=2),
        )
