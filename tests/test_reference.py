"""reference.py against independent formulations (torch SDPA, explicit softmax), so the tests of the
kernels rest on a definition that is itself checked."""

import math

import torch
import torch.nn.functional as F

from vattn import reference


def _plain_cache(rows, seq, heads, dim, seed):
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(rows, seq, heads, dim, generator=gen, dtype=torch.float64)
    v = torch.randn(rows, seq, heads, dim, generator=gen, dtype=torch.float64)
    return k, v


def test_full_prefill_is_causal_sdpa_with_gqa():
    for seed in range(3):
        rows, L, hkv, group, dim = 2, 37, 2, 3, 16
        k, v = _plain_cache(rows, L, hkv, dim, seed)
        q = torch.randn(rows * L, hkv * group, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        cu = torch.tensor([0, L, 2 * L], dtype=torch.int32)
        out, lse = reference.attention(q, k, v, torch.tensor([L, L]), cu_seqlens_q=cu)
        for b in range(rows):
            qb = q[b * L : (b + 1) * L].transpose(0, 1)  # [hq, L, d]
            kb = k[b].transpose(0, 1).repeat_interleave(group, dim=0)  # [hq, L, d]
            vb = v[b].transpose(0, 1).repeat_interleave(group, dim=0)
            want = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True).transpose(0, 1)
            torch.testing.assert_close(out[b * L : (b + 1) * L], want)
            logits = (qb @ kb.transpose(1, 2)) / math.sqrt(dim)
            logits = logits.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
            torch.testing.assert_close(
                lse[b * L : (b + 1) * L].double(), torch.logsumexp(logits, -1).T.contiguous(), atol=1e-5, rtol=1e-5
            )


def test_decode_window_softcap_rows_and_empty():
    k, v = _plain_cache(3, 20, 1, 8, seed=4)
    k[:, 12:] = float("nan")  # beyond every length: must never be read
    v[:, 12:] = float("nan")
    q = torch.randn(2, 2, 8, dtype=torch.float64)
    lens = torch.tensor([12, 5])
    rows = torch.tensor([2, 0])
    out, lse = reference.attention(q, k, v, lens, row_ids=rows, window_left=3, softcap=2.0, scale=0.7)
    for b in range(2):
        L, r = int(lens[b]), int(rows[b])
        keys = k[r, L - 4 : L, 0]  # positions L-1-3 .. L-1
        logits = 2.0 * torch.tanh((q[b] @ keys.T) * 0.7 / 2.0)
        torch.testing.assert_close(out[b], torch.softmax(logits, -1) @ v[r, L - 4 : L, 0])
        torch.testing.assert_close(lse[b].double(), torch.logsumexp(logits, -1), atol=1e-6, rtol=1e-6)
    # Per-head length 0: zero output, lse -inf.
    out, lse = reference.attention(q, k, v, lens, row_ids=rows, head_seqlens_k=torch.tensor([[0], [3]]))
    assert (out[0] == 0).all() and torch.isneginf(lse[0]).all()
    assert torch.isfinite(out[1]).all()


def test_chunk_positions_align_to_row_end():
    """A chunk of n queries over a row of length L sits at positions L-n..L-1 (cached prefix)."""
    k, v = _plain_cache(1, 50, 1, 8, seed=5)
    q = torch.randn(50, 1, 8, dtype=torch.float64)
    full, _ = reference.attention(q, k, v, torch.tensor([50]), cu_seqlens_q=torch.tensor([0, 50]))
    tail, _ = reference.attention(q[30:], k, v, torch.tensor([50]), cu_seqlens_q=torch.tensor([0, 20]))
    torch.testing.assert_close(tail, full[30:])


def test_merge_of_halves_is_whole():
    k, v = _plain_cache(1, 40, 2, 8, seed=6)
    q = torch.randn(1, 4, 8, dtype=torch.float64)
    whole, lse = reference.attention(q, k, v, torch.tensor([40]))
    a, lse_a = reference.attention(q, k[:, :15], v[:, :15], torch.tensor([15]))  # decode sees all 15
    b, lse_b = reference.attention(q, k[:, 15:], v[:, 15:], torch.tensor([25]))
    out, lse_m = reference.merge_states(a, lse_a, b, lse_b)
    torch.testing.assert_close(out, whole)
    torch.testing.assert_close(lse_m, lse)
    # An empty state is neutral, and two empty states give zeros / -inf.
    inf = torch.full_like(lse_a, float("-inf"))
    out, lse_m = reference.merge_states(torch.full_like(a, float("nan")), inf, b, lse_b)
    torch.testing.assert_close(out, b)
    out, lse_m = reference.merge_states(a, inf, b, inf)
    assert (out == 0).all() and torch.isneginf(lse_m).all()


def test_append_writes_rows_and_positions():
    kc = torch.zeros(3, 5, 2, 4)
    vc = torch.zeros(3, 5, 2, 4)
    k = torch.randn(2, 2, 4)
    reference.append_kv(kc, vc, k, -k, torch.tensor([2, 0]), torch.tensor([4, 1]))
    assert torch.equal(kc[2, 4], k[0]) and torch.equal(kc[0, 1], k[1]) and torch.equal(vc[0, 1], -k[1])
    assert kc.count_nonzero() == k.count_nonzero()


def test_format_registry_matches_native_traits():
    """python/vattn/formats.py and cuda/include/vattn/kv_format.h describe the same formats: codes,
    names, storage element sizes, elements per stored element, scale words."""
    from vattn import _C, formats

    native = {t["code"]: t for t in _C.kv_format_traits()}
    assert set(native) == set(formats.BY_CODE)
    for code, f in formats.BY_CODE.items():
        t = native[code]
        assert t["name"] == f.name
        assert t["storage_bytes"] == f.storage_dtype.itemsize
        assert t["elems_per_storage"] == f.elems_per_storage
        assert t["scale_words"] == f.scale_words
        assert t["quantized"] == f.quantized


def test_dequantize_int4_ch_of_no_tokens_is_empty():
    """A cache of no positions ([rows, 0, heads, dim / 2] codes) dequantizes to [rows, 0, heads, dim],
    as the per-token formats do (it was a reshape error)."""
    codes, words = torch.zeros(2, 0, 1, 32, dtype=torch.uint8), torch.zeros(2, 0, 1, 4)
    out = reference.dequantize(codes, words, "int4_ch", 64)
    assert out.shape == (2, 0, 1, 64)
    assert reference.dequantize_int4_ch(codes[0, :, 0], words[0, :, 0]).shape == (0, 64)
