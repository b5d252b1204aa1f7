"""int4_ch: int4 keys per (kv head, channel) over groups of G = head_dim / 2 tokens (KIVI), on CPU.
append_kv and compact_kv store exactly reference.py's bytes (codes and the scale words of whole
groups); decode / prefill / sparse attention and block_minmax over an int4_ch-K / int4-V cache
match the reference over the reference-dequantized cache; a KVCache with kv_format="int4" (keys
int4_ch) end to end; bad inputs raise."""

from __future__ import annotations

import random

import pytest
import torch

import vattn
from vattn import formats, reference
from helpers import Case, assert_attention_close, assert_same_kv_bytes, case_queries_and_kwargs, case_rows, randn

KF, VF = formats.get("int4_ch"), formats.get("int4")
LAYOUTS = ("plain", "record", "head_major")


def _side(rows, seq, heads, dim, fmt, layout):
    """Data [rows, seq, heads, dim / 2] uint8 and scales [rows, seq, heads, words] of one side over
    garbage storage: 0xff codes and NaN words everywhere nothing was written."""
    elems = dim // 2
    if layout == "plain":
        return (
            torch.full((rows, seq, heads, elems), 0xFF, dtype=torch.uint8),
            torch.full((rows, seq, heads, fmt.scale_words), float("nan")),
        )
    if layout == "head_major":
        data = torch.full((rows, heads, seq, elems), 0xFF, dtype=torch.uint8)
        scales = torch.full((rows, heads, seq, fmt.scale_words), float("nan"))
        return data.transpose(1, 2), scales.transpose(1, 2)
    # "record": token records [heads x data | heads x words], padded to 16 bytes, two sides apart.
    rec = fmt.record_bytes(heads, dim)
    raw = torch.full((rows * seq * rec // 4,), float("nan")).view(torch.uint8)
    data = raw.as_strided((rows, seq, heads, elems), (seq * rec, rec, elems, 1))
    soff = fmt.scale_offset(heads, dim)
    scales = raw.view(torch.float32).as_strided(
        (rows, seq, heads, fmt.scale_words), (seq * rec // 4, rec // 4, fmt.scale_words, 1), soff // 4
    )
    return data, scales


def _caches(rows, seq, heads, dim, layout):
    kc, ks = _side(rows, seq, heads, dim, KF, layout)
    vc, vs = _side(rows, seq, heads, dim, VF, layout)
    return kc, vc, ks, vs


def _clone(caches):
    """Independent copies with the same strides (the whole storage is copied)."""
    out = []
    for t in caches:
        base = t.as_strided((t.untyped_storage().nbytes() // t.element_size(),), (1,), 0).clone()
        out.append(base.as_strided(t.shape, t.stride(), t.storage_offset()))
    return out


def _append_both(caches, ref, k, v, row_ids, pos, head_positions=None):
    kc, vc, ks, vs = caches
    vattn.append_kv_raw(kc, vc, k, v, row_ids, pos, k_scale=ks, v_scale=vs, head_positions=head_positions)
    rk, rv, rks, rvs = ref
    reference.append_kv(
        rk,
        rv,
        k,
        v,
        torch.as_tensor(row_ids),
        torch.as_tensor(pos),
        k_scale=rks,
        v_scale=rvs,
        k_format="int4_ch",
        v_format="int4",
        head_positions=None if head_positions is None else torch.as_tensor(head_positions),
    )


# ----------------------------------------------------------------------------- append: bytes bit for bit


@pytest.mark.parametrize("dim", [16, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_append_steps_bit_identical(dim, dtype, layout):
    """Ragged prefill steps (partial groups, rows with no token), decode steps that fill a group
    token by token, and chunks crossing group boundaries, on several rows: the cache bytes equal
    reference.append_kv's after every step."""
    g = dim // 2
    rows, heads = 4, 3
    seq = 6 * g
    gen = torch.Generator().manual_seed(dim)
    caches = _caches(rows, seq, heads, dim, layout)
    ref = _clone(caches)
    lens = [0] * rows
    steps = [
        {0: g + 3, 1: 1, 3: 2 * g},  # prefill: partial group, a single token, whole groups
        {0: 1, 1: 1, 2: 1, 3: 1},  # decode
        {0: 1, 1: g - 2, 2: 3},  # a chunk filling row 1's group exactly (1 + 1 + g - 2 = g)
        {0: g + 5, 3: 1},  # crossing group boundaries
    ] + [{r: 1 for r in range(rows)} for _ in range(g + 1)]  # decode steps filling whole groups
    for i, step in enumerate(steps):
        row_ids, pos = [], []
        for r, n in step.items():
            row_ids += [r] * n
            pos += list(range(lens[r], lens[r] + n))
            lens[r] += n
        k = randn((len(row_ids), heads, dim), gen, dtype) * (1 + 4 * torch.rand(1, 1, dim, generator=gen)).to(dtype)
        v = randn((len(row_ids), heads, dim), gen, dtype)
        _append_both(caches, ref, k, v, torch.tensor(row_ids, dtype=torch.int32), torch.tensor(pos, dtype=torch.int32))
        assert_same_kv_bytes(caches, ref, f"step {i}")
    kd = reference.dequantize(caches[0][0, : lens[0]], caches[2][0], "int4_ch", dim)
    assert torch.isfinite(kd).all()


def test_append_token_order_and_large_parallel():
    """A prefill large enough for the parallel path, with the tokens of the call shuffled (a
    group's tokens are consecutive positions in any order of the call)."""
    dim, heads, rows = 64, 2, 3
    g = dim // 2
    seq = 40 * g
    gen = torch.Generator().manual_seed(5)
    caches = _caches(rows, seq, heads, dim, "plain")
    ref = _clone(caches)
    lens = [700, 33, 1000]
    row_ids = [r for r, n in enumerate(lens) for _ in range(n)]
    pos = [t for n in lens for t in range(n)]
    perm = list(range(len(pos)))
    random.Random(0).shuffle(perm)
    row_ids, pos = [row_ids[i] for i in perm], [pos[i] for i in perm]
    k = randn((len(pos), heads, dim), gen, torch.bfloat16)
    v = randn((len(pos), heads, dim), gen, torch.bfloat16)
    _append_both(caches, ref, k, v, torch.tensor(row_ids, dtype=torch.int32), torch.tensor(pos, dtype=torch.int32))
    assert_same_kv_bytes(caches, ref, "shuffled prefill")


def test_append_head_positions_bit_identical():
    """Per-head positions (compacted slots: heads of a row at different lengths)."""
    dim, heads, rows = 32, 3, 2
    g = dim // 2
    seq = 4 * g
    gen = torch.Generator().manual_seed(9)
    caches = _caches(rows, seq, heads, dim, "record")
    ref = _clone(caches)
    head_lens = [[5, g, 2 * g - 1], [0, 3, g + 1]]
    # First fill each (row, head) up to its length with per-head positions, then two decode steps.
    n = max(max(h) for h in head_lens)
    for t in range(n):
        row_ids, hp = [], []
        for r in range(rows):
            if any(t < x for x in head_lens[r]):
                row_ids.append(r)
                hp.append([min(t, x - 1) if x else 0 for x in head_lens[r]])
        # heads already full re-write their last token (the same position twice would be a
        # duplicate within a call only if listed twice: one token per row per call here)
        k = randn((len(row_ids), heads, dim), gen)
        v = randn((len(row_ids), heads, dim), gen)
        _append_both(
            caches,
            ref,
            k,
            v,
            torch.tensor(row_ids, dtype=torch.int32),
            torch.zeros(len(row_ids), dtype=torch.int32),
            torch.tensor(hp, dtype=torch.int32),
        )
        assert_same_kv_bytes(caches, ref, f"fill {t}")
    for step in range(2):
        hp = [[x + step for x in head_lens[r]] for r in range(rows)]
        k = randn((rows, heads, dim), gen)
        v = randn((rows, heads, dim), gen)
        _append_both(
            caches,
            ref,
            k,
            v,
            torch.arange(rows, dtype=torch.int32),
            torch.zeros(rows, dtype=torch.int32),
            torch.tensor(hp, dtype=torch.int32),
        )
        assert_same_kv_bytes(caches, ref, f"decode {step}")


def test_append_edge_values_bit_identical():
    """NaN / inf / subnormal / constant channels inside a group: the reference's bytes, no NaN stored."""
    dim, heads = 16, 1
    g = dim // 2
    caches = _caches(1, 2 * g, heads, dim, "plain")
    ref = _clone(caches)
    gen = torch.Generator().manual_seed(2)
    x = randn((2 * g, heads, dim), gen)
    x[1, 0, 0], x[2, 0, 1], x[3, 0, 2] = float("nan"), float("inf"), float("-inf")
    x[:, 0, 3] = 0.75  # constant channel
    x[:, 0, 4] = 1.0e-40  # subnormal channel
    x[4, 0, 5] = 3.0e4  # outlier
    for a, b in ((0, 3), (3, 4), (4, 2 * g)):
        _append_both(
            caches,
            ref,
            x[a:b],
            x[a:b],
            torch.zeros(b - a, dtype=torch.int32),
            torch.arange(a, b, dtype=torch.int32),
        )
        assert_same_kv_bytes(caches, ref, f"tokens {a}..{b}")
    assert torch.isfinite(caches[2]).all()


def test_append_rejects_bad_calls_and_changes_nothing():
    dim, heads = 16, 2
    g = dim // 2
    caches = _caches(2, 2 * g, heads, dim, "plain")
    kc, vc, ks, vs = caches
    k = torch.randn(3, heads, dim)
    before = _clone(caches)
    # Non-consecutive positions within one group.
    with pytest.raises(ValueError, match="consecutive"):
        vattn.append_kv_raw(kc, vc, k, k, [0, 0, 0], [0, 1, 3], k_scale=ks, v_scale=vs)
    # The same position twice.
    with pytest.raises(ValueError, match="consecutive"):
        vattn.append_kv_raw(kc, vc, k, k, [0, 0, 1], [2, 2, 0], k_scale=ks, v_scale=vs)
    # Out of range (checked before anything is written).
    with pytest.raises(ValueError):
        vattn.append_kv_raw(kc, vc, k, k, [0, 0, 0], [0, 1, 2 * g], k_scale=ks, v_scale=vs)
    assert_same_kv_bytes(caches, before, "after failed calls")
    # A seq that is not a multiple of the group.
    kc2 = torch.zeros(1, g + 1, heads, dim // 2, dtype=torch.uint8)
    ks2 = torch.zeros(1, g + 1, heads, 4)
    vc2 = torch.zeros(1, g + 1, heads, dim // 2, dtype=torch.uint8)
    vs2 = torch.zeros(1, g + 1, heads, 2)
    with pytest.raises(ValueError, match="multiple"):
        vattn.append_kv_raw(kc2, vc2, k[:1], k[:1], [0], [0], k_scale=ks2, v_scale=vs2)


# ----------------------------------------------------------------------------- attention over int4_ch keys


def _build(case: Case, dtype, layout, seed):
    """(q, caches, (kd, vd) reference-dequantized fp32, kw): int4_ch K / int4 V filled through the
    reference's group encoder; codes past each length stay 0xff (finite garbage values), the words
    of groups past the last stay NaN."""
    gen, rows, row_ids, cap = case_rows(case, seed)
    heads, dim = case.hkv, case.dim
    g = dim // 2
    seq = -(-cap // g) * g
    kc, vc, ks, vs = _caches(rows, seq, heads, dim, layout)
    lens = case.head_lens if case.head_lens is not None else case.lens
    for b, row in enumerate(row_ids):
        per_head = lens[b] if isinstance(lens[b], (list, tuple)) else [lens[b]] * heads
        for h, n in enumerate(per_head):
            if not n:
                continue
            x = randn((n, dim), gen).to(dtype).float() * (1 + 3 * torch.rand(dim, generator=gen))
            for lo in range(0, n, g):
                packed, words = reference.quantize_int4_ch_group(x[lo : lo + g])
                kc[row, lo : lo + packed.shape[0], h] = packed
                ks[row, lo : lo + g, h] = words
            codes, sc = reference.quantize(randn((n, dim), gen).to(dtype).float(), "int4")
            vc[row, :n, h] = codes
            vs[row, :n, h] = sc
    kd = reference.dequantize(kc, ks, "int4_ch", dim)
    vd = reference.dequantize(vc, vs, "int4", dim)
    q, kw = case_queries_and_kwargs(case, row_ids, gen, dtype, "cpu")
    return q, (kc, vc, ks, vs), (kd, vd), kw


def _run(q, caches, kw):
    kc, vc, ks, vs = caches
    kw = dict(kw)
    if "cu_seqlens_q" not in kw:
        return vattn.decode_attention(q, kc, vc, kw.pop("seqlens_k"), return_lse=True, k_scale=ks, v_scale=vs, **kw)
    return vattn.prefill_attention(
        q, kc, vc, kw.pop("cu_seqlens_q"), kw.pop("seqlens_k"), return_lse=True, k_scale=ks, v_scale=vs, **kw
    )


ATTN_CASES = [
    Case(lens=[1, 31, 32, 33, 200], hkv=2, group=3, dim=64),
    Case(lens=[700, 5], hkv=1, group=4, dim=128, window_left=100),
    Case(lens=[64, 129], hkv=2, group=1, dim=64, softcap=30.0),
    Case(lens=[300, 17, 90], hkv=2, group=2, dim=32, head_lens=[[300, 7], [0, 17], [45, 90]]),
    Case(lens=[1500], hkv=1, group=8, dim=64, scale=0.3),
    Case(lens=[77, 20], hkv=2, group=3, dim=16, window_left=9, softcap=5.0),
    # fp32 (idx 6), softmax scale 1: large logits, where an uncentred fold of the group scales into
    # q lost 5.8x torch's own fp32 error to cancellation (row_reader.h int4_ch_qk)
    Case(lens=[63, 130, 96], hkv=1, group=2, dim=96, scale=1.0),
]


@pytest.mark.parametrize("idx", range(len(ATTN_CASES)))
@pytest.mark.parametrize("prefill", [False, True], ids=["decode", "prefill"])
def test_attention_over_int4_ch_keys(idx, prefill):
    case = ATTN_CASES[idx]
    case = Case(**{**case.__dict__})
    if prefill:
        case.q_lens = [min(n, [n, 1, 40, 3][i % 4]) for i, n in enumerate(case.lens)]
    dtype = [torch.float32, torch.float16, torch.bfloat16][idx % 3]
    layout = LAYOUTS[idx % len(LAYOUTS)]
    q, caches, (kd, vd), kw = _build(case, dtype, layout, seed=idx)
    out, lse = _run(q, caches, kw)
    assert out.dtype == dtype and out.shape == q.shape
    assert_attention_close(out, lse, q, kd, vd, kw, f"int4_ch-{case.describe()}-{layout}")


def test_row_readers_exact_generic_and_avx2():
    """Both converters of the CPU row reader (portable and AVX2, forced with VATTN_CPU_GENERIC in a
    subprocess) give exactly the reference's dequantized keys: block_minmax with blocks of one
    token reads them through the reader, min = max = the value."""
    import os
    import subprocess
    import sys

    code = (
        "import torch, vattn\n"
        "from vattn import reference\n"
        "g = torch.Generator().manual_seed(0)\n"
        "for dim in (16, 64, 128, 6):\n"
        "    seq = 4 * (dim // 2)\n"
        "    kc = torch.randint(0, 256, (2, seq, 2, dim // 2), dtype=torch.uint8, generator=g)\n"
        "    ks = torch.randn(2, seq, 2, 4, generator=g) * 3\n"
        "    meta = torch.zeros(2, seq, 2, 2, dim)\n"
        "    n = seq - 3\n"
        "    vattn.block_minmax(kc, meta, [0, 1], [n, n], block=1, k_scale=ks)\n"
        "    want = reference.dequantize(kc[:, :n], ks, 'int4_ch', dim)\n"
        "    for side in (0, 1):\n"
        "        got = meta[:, :n, :, side]\n"
        "        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), dim\n"
        "print('ok')\n"
    )
    for generic in ("", "1"):
        env = dict(os.environ)
        env.pop("VATTN_CPU_GENERIC", None)
        if generic:
            env["VATTN_CPU_GENERIC"] = "1"
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_attention_scores_over_int4_ch_keys():
    """Decode scores (H2O) and prefill observation scores read the same keys as the attention."""
    case = Case(lens=[90, 40], hkv=2, group=3, dim=32, q_lens=[10, 40])
    q, (kc, vc, ks, vs), (kd, vd), kw = _build(case, torch.float32, "plain", seed=3)
    rows, seq = kc.shape[0], kc.shape[1]
    for decode in (True, False):
        sc = torch.zeros(rows, 2, seq)
        want = torch.zeros(rows, 2, seq)
        kw2 = dict(kw)
        if decode:
            kw2.pop("cu_seqlens_q")
            qq = q[[9, 49]]
            vattn.decode_attention(qq, kc, vc, kw2.pop("seqlens_k"), k_scale=ks, v_scale=vs, scores=sc, **kw2)
            vattn.decode_attention(qq, kd, vd, kw["seqlens_k"], row_ids=kw["row_ids"], scores=want)
        else:
            cu, lens = kw2.pop("cu_seqlens_q"), kw2.pop("seqlens_k")
            vattn.prefill_attention(q, kc, vc, cu, lens, k_scale=ks, v_scale=vs, scores=sc, score_last_queries=4, **kw2)
            vattn.prefill_attention(q, kd, vd, cu, lens, row_ids=kw["row_ids"], scores=want, score_last_queries=4)
        torch.testing.assert_close(sc, want, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- compaction


@pytest.mark.parametrize("dim", [16, 64])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_compact_bit_identical(dim, layout):
    """compact_kv re-encodes the kept keys in the groups of their new positions: exactly
    reference.compact_kv(k_format="int4_ch"); V words and scores move as usual."""
    g = dim // 2
    rows, heads = 4, 2
    seq = 8 * g
    gen = torch.Generator().manual_seed(dim)
    rng = random.Random(dim)
    caches = _caches(rows, seq, heads, dim, layout)
    ref = _clone(caches)
    lens = [5 * g + 3, 7, 2 * g, 8 * g]
    row_ids = [r for r, n in enumerate(lens) for _ in range(n)]
    pos = [t for n in lens for t in range(n)]
    k = randn((len(pos), heads, dim), gen) * (1 + 3 * torch.rand(1, 1, dim, generator=gen))
    v = randn((len(pos), heads, dim), gen)
    _append_both(caches, ref, k, v, torch.tensor(row_ids, dtype=torch.int32), torch.tensor(pos, dtype=torch.int32))
    sel = [3, 0, 1, 2]  # row 0 is left alone
    max_keep = max(lens)
    keep = torch.zeros(len(sel), heads, max_keep, dtype=torch.int32)
    keep_lens = torch.zeros(len(sel), heads, dtype=torch.int32)
    for i, r in enumerate(sel):
        for h in range(heads):
            n = rng.choice([0, 1, g, lens[r], rng.randint(1, lens[r])]) if (i, h) != (0, 0) else lens[r]
            idx = sorted(rng.sample(range(lens[r]), n))
            keep[i, h, :n] = torch.tensor(idx, dtype=torch.int32)
            keep_lens[i, h] = n
    scores = torch.randn(rows, heads, seq, generator=gen)
    ref_scores = scores.clone()
    kc, vc, ks, vs = caches
    vattn.compact_kv(
        kc, vc, torch.tensor(sel, dtype=torch.int32), keep, keep_lens, k_scale=ks, v_scale=vs, scores=scores
    )
    rk, rv, rks, rvs = ref
    reference.compact_kv(
        rk, rv, torch.tensor(sel), keep, keep_lens, k_scale=rks, v_scale=rvs, scores=ref_scores, k_format="int4_ch"
    )
    assert_same_kv_bytes(caches, ref, "compact")
    assert torch.equal(scores, ref_scores)


def test_compact_rejects_seq_not_a_multiple():
    dim, heads = 16, 1
    kc = torch.zeros(1, 9, heads, dim // 2, dtype=torch.uint8)
    ks = torch.zeros(1, 9, heads, 4)
    vc = torch.zeros(1, 9, heads, dim // 2, dtype=torch.uint8)
    vs = torch.zeros(1, 9, heads, 2)
    with pytest.raises(ValueError, match="multiple"):
        vattn.compact_kv(kc, vc, [0], torch.zeros(1, 1, 1, dtype=torch.int32), torch.ones(1, 1, dtype=torch.int32),
                         k_scale=ks, v_scale=vs)  # fmt: skip


# ----------------------------------------------------------------------------- Quest


def test_block_minmax_and_sparse_decode():
    from vattn.quest_ops import block_minmax, sparse_decode_attention

    dim, heads, group, block = 32, 2, 3, 16
    case = Case(lens=[100, 17, 50], hkv=heads, group=group, dim=dim, head_lens=[[100, 60], [17, 1], [33, 50]])
    q, (kc, vc, ks, vs), (kd, vd), kw = _build(case, torch.float32, "record", seed=4)
    rows, seq = kc.shape[0], kc.shape[1]
    nb = -(-seq // block)
    row_ids = kw["row_ids"]
    meta = torch.full((rows, nb, heads, 2, dim), 7.0)
    want = meta.clone()
    first = torch.tensor([0, 0, 1], dtype=torch.int32)
    hl = kw["head_seqlens_k"]
    block_minmax(kc, meta, row_ids, kw["seqlens_k"], first, head_lengths=hl, block=block, k_scale=ks)
    reference.block_minmax(kc, want, row_ids, kw["seqlens_k"], first, block, k_scale=ks, k_format="int4_ch",
                           head_lengths=hl)  # fmt: skip
    assert torch.equal(meta, want)
    # Sparse decode over some blocks vs the same over the dequantized cache.
    sel = torch.zeros(3, heads, nb, dtype=torch.int32)
    cnt = torch.zeros(3, heads, dtype=torch.int32)
    for b in range(3):
        for h in range(heads):
            nbh = -(-int(hl[b, h]) // block)
            ids = [i for i in range(nbh) if i % 2 == 0 or i == nbh - 1]
            sel[b, h, : len(ids)] = torch.tensor(ids, dtype=torch.int32)
            cnt[b, h] = len(ids)
    out = sparse_decode_attention(q, kc, vc, row_ids, kw["seqlens_k"], sel, cnt, block=block, head_lengths=hl,
                                  k_scale=ks, v_scale=vs)  # fmt: skip
    ref = sparse_decode_attention(q, kd, vd, row_ids, kw["seqlens_k"], sel, cnt, block=block, head_lengths=hl)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- KVCache end to end


@pytest.mark.parametrize("layout", ["token_major", "layer_major"])
def test_kvcache_int4_is_int4_ch_keys(layout):
    """KVCache(kv_format="int4") stores K as int4_ch and V per token: several steps (ragged prefill,
    decode, a chunk) give the reference's bytes, attention equals the reference over the
    dequantized cache, and kv(dequantize=True) the reference's values."""
    heads, dim, hq = 2, 64, 6
    g = dim // 2
    c = vattn.KVCache(num_layers=2, num_kv_heads=heads, head_dim=dim, max_batch=3, max_seq_len=250,
                      dtype=torch.bfloat16, kv_format="int4", layout=layout, device="cpu", page_bytes=16 << 10)  # fmt: skip
    assert c.k_format.name == "int4_ch" and c.v_format.name == "int4"
    assert c.max_seq_len % g == 0
    a, b = c.alloc(), c.alloc()
    gen = torch.Generator().manual_seed(0)
    hist = {a: ([], []), b: ([], [])}
    for new in ([37, 5], [1, 1], [1, 30], [g, 1]):
        st = c.begin_step([a, b], new)
        k = randn((sum(new), heads, dim), gen, torch.bfloat16)
        v = randn((sum(new), heads, dim), gen, torch.bfloat16)
        q = randn((sum(new), hq, dim), gen, torch.bfloat16)
        vattn.append_kv(c, 1, st, k, v)
        out = vattn.attention(q, c, 1, st)
        hist[a][0].append(k[: new[0]])
        hist[a][1].append(v[: new[0]])
        hist[b][0].append(k[new[0] :])
        hist[b][1].append(v[new[0] :])
        kc, vc = c.kv(1)
        ks, vs = c.kv_scales(1)
        kd = reference.dequantize(kc, ks, "int4_ch", dim)  # fp32: the values the kernels read
        vd = reference.dequantize(vc, vs, "int4", dim)
        kw = dict(seqlens_k=st.seqlens, row_ids=st.slot_ids)
        if not st.is_decode:
            kw["cu_seqlens_q"] = st.cu_seqlens_q
        assert_attention_close(out, None, q, kd, vd, kw, f"kvcache step {new}")
        c.end_step(st)
    kc, _ = c.kv(1)
    ks, _ = c.kv_scales(1)
    kd, _ = c.kv(1, dequantize=True)
    for s in (a, b):
        allk = torch.cat(hist[s][0])
        n = allk.shape[0]
        # The reference's bytes for the same sequence of appends, into a fresh row.
        rk = torch.zeros(1, c.max_seq_len, heads, dim // 2, dtype=torch.uint8)
        rks = torch.zeros(1, c.max_seq_len, heads, 4)
        rv, rvs = torch.zeros_like(rk), torch.zeros(1, c.max_seq_len, heads, 2)
        t = 0
        for chunk, vchunk in zip(*hist[s]):
            m = chunk.shape[0]
            if m:
                reference.append_kv(rk, rv, chunk, vchunk, torch.zeros(m, dtype=torch.long), torch.arange(t, t + m),
                                    rks, rvs, "int4_ch", "int4")  # fmt: skip
            t += m
        ng = -(-n // g) * g
        assert torch.equal(kc[s, :n].view(torch.uint8), rk[0, :n])
        assert torch.equal(ks[s, :ng].contiguous().view(torch.int32), rks[0, :ng].view(torch.int32))
        want = reference.dequantize(rk[0, :n], rks[0], "int4_ch", dim, torch.bfloat16)
        assert torch.equal(kd[s, :n], want)


def test_kvcache_int4_tok_is_per_token_keys():
    c = vattn.KVCache(1, 1, 64, 1, 40, dtype=torch.float32, kv_format="int4_tok", device="cpu")
    assert c.k_format.name == "int4" and c.v_format.name == "int4"


def test_slots_map_whole_groups_of_int4_ch_keys():
    # The parameters of a partial group live in the scale words of all its tokens, so a slot maps its
    # last group completely: after 1 token (and after shrinking to G + 1) the mapped pages hold the
    # whole group, with pages smaller than a group.
    cache = vattn.KVCache(
        num_layers=2, num_kv_heads=2, head_dim=64, max_batch=2, max_seq_len=100, dtype=torch.float32,
        kv_format="int4", device="cpu", page_bytes=4096,
    )  # fmt: skip
    g = 32
    assert cache.max_seq_len == 128  # rounded up to whole groups
    per_page = cache.page_bytes // cache.token_bytes
    assert per_page < g
    s = cache.alloc()
    st = cache.begin_step([s], [1])
    vattn.append_kv(cache, 0, st, torch.randn(1, 2, 64), torch.randn(1, 2, 64))
    vattn.append_kv(cache, 1, st, torch.randn(1, 2, 64), torch.randn(1, 2, 64))
    cache.end_step(st)
    assert cache.stats()["pages_mapped"] == -(-g * cache.token_bytes // cache.page_bytes)
    st = cache.begin_step([s], [g + 4])
    for layer in range(2):
        vattn.append_kv(cache, layer, st, torch.randn(g + 4, 2, 64), torch.randn(g + 4, 2, 64))
    cache.end_step(st)
    cache.shrink(s, g + 1)
    assert cache.length(s) == g + 1
    assert cache.stats()["pages_mapped"] == -(-2 * g * cache.token_bytes // cache.page_bytes)


def _one_token_on_small_pages():
    """(cache, slot, tokens mapped) of an int4 cache with 4 KiB pages whose one slot holds 1 token:
    its first group is mapped whole, with a few tokens of slack past it."""
    cache = vattn.KVCache(
        num_layers=2, num_kv_heads=2, head_dim=64, max_batch=1, max_seq_len=128, dtype=torch.float32,
        kv_format="int4", device="cpu", page_bytes=4096,
    )  # fmt: skip
    s = cache.alloc()
    st = cache.begin_step([s], [1])
    for layer in range(2):
        vattn.append_kv(cache, layer, st, torch.randn(1, 2, 64), torch.randn(1, 2, 64))
    cache.end_step(st)
    return cache, s, cache.stats()["mapped_bytes"] // cache.token_bytes


def test_raw_append_whose_group_reaches_unmapped_memory_is_refused():
    # A raw append at a mapped position re-encodes its whole group, whose parameter words reach the
    # group's last token: when that token is not mapped, the guard refuses (no fault, no change).
    cache, s, mapped_tokens = _one_token_on_small_pages()
    assert 32 < mapped_tokens < 63  # slack past the first group, but not the second group's end
    k, v = cache.kv(0)
    ks, vs = cache.kv_scales(0)
    before = [t.clone() for t in (k[s, :64], ks[s, :mapped_tokens])]
    one = torch.tensor([s], dtype=torch.int32)
    with pytest.raises(ValueError, match="unmapped"):
        vattn.append_kv_raw(
            k, v, torch.randn(1, 2, 64), torch.randn(1, 2, 64), one, torch.tensor([33], dtype=torch.int32),
            k_scale=ks, v_scale=vs,
        )  # fmt: skip
    assert torch.equal(k[s, :mapped_tokens], before[0][:mapped_tokens])
    assert torch.equal(ks[s, :mapped_tokens], before[1])


def test_raw_compaction_whose_group_reaches_unmapped_memory_is_refused():
    # compact_kv re-encodes kept int4_ch keys into groups whose parameter words reach each group's
    # last token: keeping 34 tokens writes words up to token 63, unmapped here, so it is refused.
    cache, s, mapped_tokens = _one_token_on_small_pages()
    assert 34 <= mapped_tokens < 63
    k, v = cache.kv(0)
    ks, vs = cache.kv_scales(0)
    keep = torch.arange(34, dtype=torch.int32).expand(1, 2, 34).contiguous()
    lens = torch.full((1, 2), 34, dtype=torch.int32)
    before = k[s, :mapped_tokens].clone()
    with pytest.raises(ValueError, match="unmapped"):
        vattn.compact_kv(k, v, torch.tensor([s], dtype=torch.int32), keep, lens, k_scale=ks, v_scale=vs)
    assert torch.equal(k[s, :mapped_tokens], before)
