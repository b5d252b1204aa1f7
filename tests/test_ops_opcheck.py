"""torch.library.opcheck for every vattn op (schema, fake tensors, AOT dispatch), cpu and cuda."""

import pytest
import torch

import vattn  # noqa: F401
from helpers import Case, build, cache_views, device_impls


@pytest.mark.parametrize("device,impl", device_impls())
def test_opcheck_attention(device, impl):
    case = Case(lens=[3, 70, 17], hkv=2, group=3, dim=64, q_lens=[3, 5, 1])
    q, kc, vc, kw = build(case, torch.float16, "token_major", device, seed=1)
    # NaN filler makes the "same output twice" comparisons of opcheck meaningless: zero it here.
    kc.nan_to_num_(0.0)
    vc.nan_to_num_(0.0)
    with vattn.ops.attention_impl(impl):
        qd = q[:3]
        torch.library.opcheck(
            torch.ops.vattn.decode_attention.default,
            (qd, kc, vc, kw["seqlens_k"], kw["row_ids"], None, None, -1, 0.0, 128),
        )
        torch.library.opcheck(
            torch.ops.vattn.decode_attention.default, (qd, kc, vc, kw["seqlens_k"]), dict(window_left=5, softcap=10.0)
        )
        torch.library.opcheck(
            torch.ops.vattn.prefill_attention.default, (q, kc, vc, kw["cu_seqlens_q"], kw["seqlens_k"], kw["row_ids"])
        )


@pytest.mark.parametrize("device,impl", device_impls())
def test_opcheck_append_and_merge(device, impl):
    kc, vc = cache_views(3, 8, 2, 64, torch.float16, "layer_major", device)
    kc.zero_()
    vc.zero_()
    k = torch.randn(4, 2, 64, dtype=torch.float16, device=device)
    rows = torch.tensor([2, 0, 1, 2], dtype=torch.int32, device=device)
    pos = torch.tensor([0, 3, 7, 5], dtype=torch.int32, device=device)
    torch.library.opcheck(torch.ops.vattn.append_kv.default, (kc, vc, k, k * 2, rows, pos))
    o = torch.randn(5, 3, 64, dtype=torch.float16, device=device)
    lse = torch.randn(5, 3, device=device)
    torch.library.opcheck(torch.ops.vattn.merge_states.default, (o, lse, o * 0.5, lse + 1))
