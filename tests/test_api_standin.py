"""vattn.append_kv / vattn.attention on a minimal stand-in for KVCache and Step (the call contract only)."""

import types

import pytest
import torch

import vattn
from vattn import reference
from helpers import cache_views, device_impls, randn


class FakeCache:
    """What api.py relies on: kv(layer), num_layers, num_kv_heads, head_dim, dtype, device."""

    def __init__(self, layers, heads, dim, rows, seq, dtype, device):
        self.num_layers, self.num_kv_heads, self.head_dim, self.dtype = layers, heads, dim, dtype
        self.device = torch.device(device)
        self._views = [
            cache_views(rows, seq, heads, dim, dtype, "token_major", device, layers=layers, layer=i)
            for i in range(layers)
        ]

    def kv(self, layer):
        return self._views[layer]


def make_step(slots, start, new, device):
    cu = [0]
    for n in new:
        cu.append(cu[-1] + n)
    token_slots = [s for s, n in zip(slots, new) for _ in range(n)]
    positions = [a + i for a, n in zip(start, new) for i in range(n)]
    t = lambda x: torch.tensor(x, dtype=torch.int32, device=device)  # noqa: E731
    return types.SimpleNamespace(
        slots=slots,
        new_tokens=new,
        start=start,
        slot_ids=t(slots),
        seqlens=t([a + n for a, n in zip(start, new)]),
        cu_seqlens_q=t(cu),
        token_slots=t(token_slots),
        positions=t(positions),
        max_seqlen_q=max(new),
        max_seqlen_k=max(a + n for a, n in zip(start, new)),
        total_new=sum(new),
        is_decode=all(n == 1 for n in new),
    )


@pytest.mark.parametrize("device,impl", device_impls())
def test_prefill_then_decode_on_standin(device, impl):
    dtype = torch.float16
    cache = FakeCache(layers=2, heads=2, dim=64, rows=4, seq=64, dtype=dtype, device=device)
    gen = torch.Generator().manual_seed(0)
    slots, lengths = [3, 1], [0, 0]
    with vattn.ops.attention_impl(impl):
        for new in ([5, 17], [1, 1], [1, 1], [3, 1]):
            step = make_step(slots, lengths, new, device)
            for layer in range(cache.num_layers):
                k = randn((step.total_new, 2, 64), gen, dtype).to(device)
                v = randn((step.total_new, 2, 64), gen, dtype).to(device)
                q = randn((step.total_new, 8, 64), gen, dtype).to(device)
                vattn.append_kv(cache, layer, step, k, v)
                out, lse = vattn.attention(q, cache, layer, step, return_lse=True)
                kc, vc = cache.kv(layer)
                ref, _ = reference.attention(
                    q.cpu(),
                    kc.cpu(),
                    vc.cpu(),
                    step.seqlens.cpu(),
                    cu_seqlens_q=step.cu_seqlens_q.cpu(),
                    row_ids=step.slot_ids.cpu(),
                )
                torch.testing.assert_close(out.cpu().double(), ref, atol=2e-3, rtol=2e-3)
                assert lse.shape == (step.total_new, 8)
            lengths = [a + n for a, n in zip(lengths, new)]


def test_api_validation():
    cache = FakeCache(layers=2, heads=2, dim=64, rows=4, seq=16, dtype=torch.float32, device="cpu")
    step = make_step([0], [0], [3], "cpu")
    k = torch.randn(3, 2, 64)
    with pytest.raises(ValueError, match="layer"):
        vattn.append_kv(cache, 2, step, k, k)
    with pytest.raises(TypeError, match="layer"):
        vattn.append_kv(cache, 1.0, step, k, k)
    with pytest.raises(TypeError, match="dtype"):
        vattn.append_kv(cache, 0, step, k.half(), k.half())
    with pytest.raises(ValueError, match="shape"):
        vattn.append_kv(cache, 0, step, k[:2], k[:2])
    with pytest.raises(ValueError, match="shape"):
        vattn.attention(torch.randn(3, 4, 32), cache, 0, step)
    with pytest.raises(ValueError, match="multiple"):
        vattn.attention(torch.randn(3, 3, 64), cache, 0, step)
