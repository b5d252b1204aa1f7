"""Bad inputs to the attention ops raise clear Python exceptions and never reach the kernels."""

import pytest
import torch

import vattn
from helpers import Case, build


@pytest.fixture
def problem():
    return build(Case(lens=[5, 9], hkv=2, group=2, dim=64), torch.float32, "plain", "cpu", seed=0)


def _decode(q, kc, vc, kw, **over):
    args = {"row_ids": kw["row_ids"], **over}
    seqlens = args.pop("seqlens_k", kw["seqlens_k"])
    return vattn.decode_attention(q, kc, vc, seqlens, **args)


def test_dtype_errors(problem):
    q, kc, vc, kw = problem
    with pytest.raises(TypeError, match="dtype"):
        _decode(q.double(), kc, vc, kw)
    with pytest.raises(TypeError, match="cache dtype"):
        _decode(q.half(), kc, vc, kw)
    with pytest.raises(TypeError, match="seqlens_k"):
        _decode(q, kc, vc, kw, seqlens_k=kw["seqlens_k"].float())
    with pytest.raises(TypeError, match="int32"):
        torch.ops.vattn.decode_attention(q, kc, vc, kw["seqlens_k"].long())


def test_shape_and_stride_errors(problem):
    q, kc, vc, kw = problem
    with pytest.raises(ValueError, match="head_dim"):
        _decode(q[..., :32], kc, vc, kw)
    with pytest.raises(ValueError, match="multiple"):
        _decode(q[:, :3], kc, vc, kw)
    with pytest.raises(ValueError, match="one query per row"):
        _decode(q[:1], kc, vc, kw)
    with pytest.raises(ValueError, match="last dimension contiguous"):
        _decode(q, kc.transpose(1, 3).contiguous().transpose(1, 3), vc, kw)
    with pytest.raises(ValueError, match="shapes differ"):
        _decode(q, kc, vc[:, :3], kw)
    with pytest.raises(ValueError, match="row_ids"):
        _decode(q, kc, vc, kw, row_ids=kw["row_ids"][:1])
    with pytest.raises(ValueError, match="head_seqlens_k"):
        _decode(q, kc, vc, kw, head_seqlens_k=torch.ones(2, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        vattn.prefill_attention(q, kc, vc, torch.tensor([0, 2]), kw["seqlens_k"])
    with pytest.raises(ValueError, match="softcap"):
        _decode(q, kc, vc, kw, softcap=-1.0)


def test_value_errors_from_native(problem):
    q, kc, vc, kw = problem
    rows, seq = kc.shape[:2]
    with pytest.raises(ValueError, match="row id"):
        _decode(q, kc, vc, kw, row_ids=torch.tensor([0, rows]))
    with pytest.raises(ValueError, match="seqlens_k"):
        _decode(q, kc, vc, kw, seqlens_k=torch.tensor([1, seq + 1]))
    with pytest.raises(ValueError, match="seqlens_k"):
        _decode(q, kc, vc, kw, seqlens_k=torch.tensor([-1, 2]))
    with pytest.raises(ValueError, match="head_seqlens_k"):
        _decode(q, kc, vc, kw, head_seqlens_k=torch.tensor([[1, 2], [seq + 1, 0]]))
    with pytest.raises(ValueError, match="non-decreasing"):
        vattn.prefill_attention(q, kc, vc, torch.tensor([0, 2, 1]), kw["seqlens_k"])
    with pytest.raises(ValueError, match="number of queries"):
        vattn.prefill_attention(q, kc, vc, torch.tensor([0, 1, 1]), kw["seqlens_k"])


def test_device_mismatch(problem):
    q, kc, vc, kw = problem
    with pytest.raises(ValueError, match="meta|device|on"):
        _decode(q, kc, vc, kw, seqlens_k=kw["seqlens_k"].to("meta"))


def test_impl_selection():
    assert vattn.ops.get_attention_impl() in ("fast", "simple")
    before = vattn.ops.get_attention_impl()
    with vattn.ops.attention_impl("simple"):
        assert vattn.ops.get_attention_impl() == "simple"
    assert vattn.ops.get_attention_impl() == before
    with pytest.raises(ValueError):
        vattn.ops.set_attention_impl("fastest")


@pytest.mark.gpu
def test_cuda_limits_are_python_errors():
    case = Case(lens=[5, 9], hkv=1, group=2, dim=36)
    q, kc, vc, kw = build(case, torch.float16, "plain", "cuda", seed=0)
    with pytest.raises(ValueError, match="multiple of 8"):
        _decode(q, kc, vc, kw)
    q, kc, vc, kw = build(Case(lens=[5], hkv=1, group=1, dim=64), torch.float32, "plain", "cuda", seed=0)
    with pytest.raises(TypeError, match="float16"):
        vattn.prefill_attention(q, kc, vc, torch.tensor([0, 1], device="cuda"), kw["seqlens_k"])
    with pytest.raises(ValueError, match="device|on"):
        _decode(q, kc, vc, kw, seqlens_k=kw["seqlens_k"].cpu())


@pytest.mark.parametrize("as_list", [False, True])
def test_int64_indices_outside_int32_raise(as_list):
    """int64 lengths, row ids, cu_seqlens_q, positions and block tables are narrowed to int32 for the
    kernels: a value past int32 raises ValueError instead of wrapping onto another row / position
    (2**32 + 1 -> 1), and the append writes nothing."""
    big = 2**32 + 1
    K, V = torch.randn(3, 40, 2, 64), torch.randn(3, 40, 2, 64)
    q = torch.randn(3, 4, 64)

    def idx(x):
        return list(x) if as_list else torch.tensor(x, dtype=torch.int64)

    with pytest.raises(ValueError, match="int32"):
        vattn.decode_attention(q, K, V, idx([5, big + 4, 5]))
    with pytest.raises(ValueError, match="int32"):
        vattn.decode_attention(q, K, V, idx([5, 5, 5]), row_ids=idx([0, big, 2]))
    with pytest.raises(ValueError, match="int32"):
        vattn.prefill_attention(torch.randn(11, 4, 64), K, V, idx([0, 2 * big, 5, 11]), idx([10, 10, 10]))
    kc, vc = torch.zeros(3, 40, 2, 64), torch.zeros(3, 40, 2, 64)
    k, v = torch.randn(1, 2, 64), torch.randn(1, 2, 64)
    with pytest.raises(ValueError, match="int32"):
        vattn.append_kv_raw(kc, vc, k, v, idx([0]), idx([big + 2]))
    with pytest.raises(ValueError, match="int32"):
        vattn.append_kv_raw(kc, vc, k, v, idx([big]), idx([0]))
    assert not kc.any() and not vc.any()
    # in range, int64 works as int32 does
    want = vattn.decode_attention(q, K, V, torch.tensor([5, 7, 5], dtype=torch.int32))
    assert torch.equal(vattn.decode_attention(q, K, V, idx([5, 7, 5])), want)
    if not as_list:
        table = torch.tensor([[0, big], [1, 2]], dtype=torch.int64)
        pk, pv = torch.randn(3, 16, 2, 64), torch.randn(3, 16, 2, 64)
        with pytest.raises(ValueError, match="int32"):
            vattn.decode_attention(torch.randn(2, 4, 64), pk, pv, torch.tensor([20, 20]), block_table=table)


def test_prefill_max_seqlen_q_below_a_row_raises():
    """max_seqlen_q is an upper bound on every row's query count (the CUDA prefill sizes its grid
    from it): host index tensors show a low bound, which raises instead of leaving rows unwritten;
    an exact or generous bound gives the same output as none."""
    K, V = torch.randn(2, 40, 2, 64), torch.randn(2, 40, 2, 64)
    q = torch.randn(9, 4, 64)
    cu, lens = torch.tensor([0, 2, 9], dtype=torch.int32), torch.tensor([12, 30], dtype=torch.int32)
    with pytest.raises(ValueError, match="max_seqlen_q"):
        vattn.prefill_attention(q, K, V, cu, lens, max_seqlen_q=6)
    want = vattn.prefill_attention(q, K, V, cu, lens)
    for bound in (7, 40):
        assert torch.equal(vattn.prefill_attention(q, K, V, cu, lens, max_seqlen_q=bound), want)
    with pytest.raises(ValueError, match="max_seqlen_q"):
        torch.ops.vattn.prefill_attention(q, K, V, cu, lens, max_seqlen_q=1)


def test_cache_without_positions():
    """A [rows, 0, heads, dim] cache (no storage): every row is empty, so decode and prefill give
    zeros with lse -inf as the reference does; a length, row id or append position beyond it raises
    ValueError with the range, not a null-pointer message."""
    from vattn import reference

    K, V = torch.randn(2, 0, 2, 64), torch.randn(2, 0, 2, 64)
    q = torch.randn(2, 4, 64)
    zero = torch.zeros(2, dtype=torch.int32)
    want_o, want_lse = reference.attention(q, K, V, zero)
    out, lse = vattn.decode_attention(q, K, V, zero, return_lse=True)
    assert torch.equal(out, want_o.float()) and torch.equal(lse, want_lse)
    cu = torch.tensor([0, 1, 2], dtype=torch.int32)
    out, lse = vattn.prefill_attention(q, K, V, cu, zero, return_lse=True)
    assert torch.equal(out, want_o.float()) and torch.equal(lse, want_lse)
    with pytest.raises(ValueError, match=r"outside \[0, 0\]"):
        vattn.decode_attention(q, K, V, torch.tensor([0, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match="row id"):
        vattn.decode_attention(q, torch.randn(0, 5, 2, 64), torch.randn(0, 5, 2, 64), zero)
    with pytest.raises(ValueError, match=r"position 0 .*outside \[0, 0\)"):
        vattn.append_kv_raw(K, V, torch.randn(1, 2, 64), torch.randn(1, 2, 64), [0], [0])
    # a score buffer for such a cache is [rows, heads, 0]: valid, and there is nothing to update
    for mode in ("add", "replace"):
        scores = torch.zeros(2, 2, 0)
        out, lse = vattn.decode_attention(q, K, V, zero, return_lse=True, scores=scores, score_mode=mode)
        assert torch.equal(out, want_o.float()) and torch.equal(lse, want_lse)
        out, lse = vattn.prefill_attention(q, K, V, cu, zero, return_lse=True, scores=scores, score_mode=mode)
        assert torch.equal(out, want_o.float()) and torch.equal(lse, want_lse)
    with pytest.raises(ValueError, match="scores must have shape"):
        vattn.decode_attention(q, K, V, zero, scores=torch.zeros(1, 2, 0))


def test_missing_index_tensors_are_type_errors():
    """A required index tensor given as None is named in a TypeError (it was an AttributeError)."""
    kc, vc = torch.randn(2, 8, 2, 16), torch.randn(2, 8, 2, 16)
    k, v = torch.randn(1, 2, 16), torch.randn(1, 2, 16)
    one = torch.zeros(1, dtype=torch.int32)
    with pytest.raises(TypeError, match="positions is required"):
        vattn.append_kv_raw(kc, vc, k, v, one, None)
    with pytest.raises(TypeError, match="row_ids is required"):
        vattn.append_kv_raw(kc, vc, k, v, None, one)
    with pytest.raises(TypeError, match="block_counts is required"):
        vattn.sparse_decode_attention(
            torch.randn(1, 4, 16), kc, vc, one, torch.tensor([8], dtype=torch.int32),
            torch.zeros(1, 2, 1, dtype=torch.int32), None, block=4,
        )  # fmt: skip


def test_huge_windows_and_length_hints():
    """A window wider than any row is no window; length hints past int32 are refused by name."""
    g = torch.Generator().manual_seed(3)
    kc, vc = torch.randn(2, 8, 2, 16, generator=g), torch.randn(2, 8, 2, 16, generator=g)
    q = torch.randn(2, 4, 16, generator=g)
    lens = torch.tensor([5, 8], dtype=torch.int32)
    base = vattn.decode_attention(q, kc, vc, lens)
    for w in (2**31, 10**12):
        assert torch.equal(vattn.decode_attention(q, kc, vc, lens, window_left=w), base)
    cu = torch.tensor([0, 1, 2], dtype=torch.int32)
    assert torch.equal(
        vattn.prefill_attention(q, kc, vc, cu, lens, window_left=2**40), vattn.prefill_attention(q, kc, vc, cu, lens)
    )
    with pytest.raises(ValueError, match="max_seqlen_k must be at most"):
        vattn.decode_attention(q, kc, vc, lens, max_seqlen_k=2**40)
    with pytest.raises(ValueError, match="max_seqlen_q must be at most"):
        vattn.prefill_attention(q, kc, vc, cu, lens, max_seqlen_q=2**40)
