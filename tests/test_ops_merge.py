"""merge_states against reference.merge_states, including empty (-inf) states, and the split identity."""

import pytest
import torch

import vattn
from vattn import reference
from helpers import Case, build, device_impls, randn


@pytest.mark.parametrize("device,impl", device_impls())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dim", [64, 128, 33])
def test_merge_matches_reference(device, impl, dtype, dim):
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        n, heads = 37, 5
        o_a = randn((n, heads, dim), gen, dtype).to(device)
        o_b = randn((n, heads, dim), gen, dtype).to(device)
        lse_a = (randn((n, heads), gen) * 4).to(device)
        lse_b = (randn((n, heads), gen) * 4).to(device)
        inf = float("-inf")
        lse_a[0, :] = inf  # a empty
        lse_b[1, :] = inf  # b empty
        lse_a[2, :] = inf  # both empty
        lse_b[2, :] = inf
        o_a[0] = float("nan")  # an empty state's output must not leak
        out, lse = vattn.merge_states(o_a, lse_a, o_b, lse_b)
        ref, ref_lse = reference.merge_states(o_a.cpu(), lse_a.cpu(), o_b.cpu(), lse_b.cpu())
        low, _ = reference.merge_states(o_a.cpu(), lse_a.cpu(), o_b.cpu(), lse_b.cpu(), compute_dtype=dtype)
        out, lse = out.cpu(), lse.cpu()
        assert out.dtype == dtype
        err = (out.double() - ref).abs().max().item()
        base = (low.double() - ref).abs().max().item()
        assert err <= 2 * base + 1e-6
        assert (out[2] == 0).all() and torch.isneginf(lse[2]).all()
        assert torch.equal(out[0], o_b[0].cpu()) or err <= 2 * base + 1e-6
        finite = torch.isfinite(ref_lse)
        assert torch.equal(torch.isfinite(lse), finite)
        torch.testing.assert_close(lse[finite], ref_lse[finite], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device,impl", device_impls())
def test_merge_of_split_keys_is_full_attention(device, impl):
    """Attention over [0, L) == merge(attention over [0, s), attention over [s, L)) via per-head lengths
    on two cache views: the identity split-KV decode relies on."""
    case = Case(lens=[300, 41, 1000], hkv=2, group=4, dim=64)
    q, kc, vc, kw = build(case, torch.float16, "plain", device, seed=4)
    full, full_lse = vattn.decode_attention(q, kc, vc, kw["seqlens_k"], row_ids=kw["row_ids"], return_lse=True)
    split = 20
    # Part a: the first `split` keys, seen by a query placed at the end of the row with a window.
    lens = kw["seqlens_k"]
    a, lse_a = vattn.prefill_attention(
        q,
        kc[:, :split],
        vc[:, :split],
        torch.arange(4, dtype=torch.int32, device=device),
        torch.full_like(lens, split),
        row_ids=kw["row_ids"],
        return_lse=True,
    )
    # Part b: keys [split, L) as a shifted view of the cache.
    b, lse_b = vattn.decode_attention(
        q, kc[:, split:], vc[:, split:], lens - split, row_ids=kw["row_ids"], return_lse=True
    )
    out, lse = vattn.merge_states(a, lse_a, b, lse_b)
    torch.testing.assert_close(out.float(), full.float(), atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(lse, full_lse, atol=1e-4, rtol=1e-4)


def test_merge_rejects_bad_arguments():
    o = torch.randn(3, 2, 8)
    lse = torch.randn(3, 2)
    with pytest.raises(ValueError, match="shape"):
        vattn.merge_states(o, lse, o[:2], lse[:2])
    with pytest.raises(TypeError, match="float32"):
        vattn.merge_states(o, lse.double(), o, lse)
    with pytest.raises(TypeError):
        vattn.merge_states(o.long(), lse, o.long(), lse)
