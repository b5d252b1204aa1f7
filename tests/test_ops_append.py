"""append_kv against reference.append_kv: strided caches, slot order, dtype / index errors."""

import pytest
import torch

import vattn
from vattn import reference
from helpers import LAYOUTS, cache_views, device_impls, randn


def _inputs(n, rows, seq, heads, dim, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    k = randn((n, heads, dim), gen, dtype).to(device)
    v = randn((n, heads, dim), gen, dtype).to(device)
    # Distinct (row, position) pairs in a scrambled order.
    flat = torch.randperm(rows * seq, generator=gen)[:n]
    row_ids = (flat // seq).to(torch.int32).to(device)
    positions = (flat % seq).to(torch.int32).to(device)
    return k, v, row_ids, positions


@pytest.mark.parametrize("device,impl", device_impls())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dim", [64, 128, 40])
def test_append_matches_reference(device, impl, dtype, layout, dim):
    rows, seq, heads = 5, 37, 3
    for seed in (0, 1):
        kc, vc = cache_views(rows, seq, heads, dim, dtype, layout, device)
        rk, rv = kc.clone(), vc.clone()
        k, v, row_ids, positions = _inputs(50, rows, seq, heads, dim, dtype, device, seed)
        vattn.append_kv_raw(kc, vc, k, v, row_ids, positions)
        reference.append_kv(rk, rv, k, v, row_ids, positions)
        assert torch.equal(kc.isnan(), rk.isnan())
        assert torch.equal(kc.nan_to_num(), rk.nan_to_num())  # bit-exact copy
        assert torch.equal(vc.nan_to_num(), rv.nan_to_num())


@pytest.mark.parametrize("device,impl", device_impls())
def test_append_strided_inputs_and_int64(device, impl):
    """k, v as views of a fused projection; int64 and list indices are converted by the wrapper."""
    kc, vc = cache_views(4, 16, 2, 64, torch.float16, "token_major", device)
    fused = torch.randn(6, 3, 2, 64, dtype=torch.float16, device=device)
    k, v = fused[:, 1], fused[:, 2]
    rows = torch.tensor([3, 0, 2, 2, 1, 3], device=device)
    pos = [0, 5, 15, 1, 7, 9]
    vattn.append_kv_raw(kc, vc, k, v, rows, pos)
    for i in range(6):
        assert torch.equal(kc[rows[i], pos[i]], k[i])
        assert torch.equal(vc[rows[i], pos[i]], v[i])


def test_append_out_of_range_leaves_cache_unchanged():
    kc, vc = cache_views(3, 8, 2, 64, torch.float32, "plain", "cpu")
    kc.normal_()
    vc.normal_()
    before_k, before_v = kc.clone(), vc.clone()
    k = torch.randn(3, 2, 64)
    for rows, pos in (([0, 1, 3], [0, 1, 2]), ([0, 1, 2], [0, 8, 2]), ([0, -1, 2], [0, 1, 2]), ([0, 1, 2], [0, 1, -5])):
        with pytest.raises(ValueError, match="outside"):
            vattn.append_kv_raw(kc, vc, k, k, torch.tensor(rows), torch.tensor(pos))
        assert torch.equal(kc, before_k) and torch.equal(vc, before_v)


def test_append_rejects_bad_arguments():
    kc, vc = cache_views(3, 8, 2, 64, torch.float16, "plain", "cpu")
    k = torch.randn(2, 2, 64, dtype=torch.float16)
    idx = torch.tensor([0, 1])
    with pytest.raises(TypeError, match="dtype"):
        vattn.append_kv_raw(kc, vc, k.float(), k.float(), idx, idx)
    with pytest.raises(ValueError, match="shape"):
        vattn.append_kv_raw(kc, vc, k[:, :1], k[:, :1], idx, idx)
    with pytest.raises(ValueError, match="row_ids"):
        vattn.append_kv_raw(kc, vc, k, k, torch.tensor([0, 1, 2]), idx)
    with pytest.raises(TypeError, match="positions"):
        vattn.append_kv_raw(kc, vc, k, k, idx, idx.float())
    with pytest.raises(ValueError, match="last dimension contiguous"):
        vattn.append_kv_raw(kc.transpose(2, 3), vc.transpose(2, 3), k.transpose(1, 2), k.transpose(1, 2), idx, idx)
    with pytest.raises(ValueError, match="4-D"):
        vattn.append_kv_raw(kc[0], vc[0], k, k, idx, idx)
