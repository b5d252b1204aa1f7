"""Property tests (hypothesis) of the CPU ops against reference.py: random valid configurations of
decode_attention / prefill_attention (batch rows, GQA groups, head dims, dtypes, lengths 0..300
with a cached prefix under the new queries, permuted / partial / repeated row ids, per-head
lengths, scale, window, soft-cap, LSE, float and quantized caches, score buffers, length hints,
strided q and caches, 1-2 threads) and append_kv_raw (float and quantized caches, per-head
positions, special values), checked against the float64 reference with FlashAttention's tolerance
rule (tests/helpers.py, tests/test_ops_scores.py); and random invalid calls, which must raise
ValueError / TypeError / RuntimeError and leave caches and scores as they were.

VATTN_FUZZ_EXAMPLES=N runs N examples per property (bug hunting); the default keeps the file short.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("hypothesis")  # in the [test] extra; a bare GPU machine may lack it
from hypothesis import HealthCheck, Phase, given, note, settings, strategies as st  # noqa: E402
from hypothesis.errors import InvalidArgument  # noqa: E402

import vattn  # noqa: E402
from vattn import _support, formats, reference  # noqa: E402
from helpers import (  # noqa: E402
    LAYOUTS,
    assert_attention_close,
    assert_same_kv_bytes,
    cache_views,
    fill_cache,
    randn,
)
from test_ops_scores import check_scores  # noqa: E402

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DIMS = (64, 128, 80, 96, 256)
QFORMATS = ("fp8_e4m3", "int8", "int4")
ERRORS = (ValueError, TypeError, RuntimeError)
_N = int(os.environ.get("VATTN_FUZZ_EXAMPLES", "0") or 0)
_TOKEN_ORDER = "VATTN_CPU_TOKEN_ORDER_MIN_BYTES"


def _settings(default: int):
    # Default runs are derandomized (the same examples every run); VATTN_FUZZ_EXAMPLES runs are random.
    return settings(
        max_examples=_N or default,
        deadline=None,
        database=None,
        derandomize=not _N,
        phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


LEN = st.one_of(
    st.sampled_from([0, 1, 2, 7, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257, 299, 300]),
    st.integers(0, 300),
)
NEW_Q = st.one_of(st.sampled_from([0, 1, 2, 5, 6, 7, 15, 16, 17, 63, 64, 65, 70]), st.integers(0, 70))


def _index_form(t: list, form: str):
    """An index argument as the wrappers accept it: an int32 / int64 tensor or a list."""
    if form == "list":
        return list(t)
    return torch.tensor(t, dtype=torch.int32 if form == "int32" else torch.int64)


def _qside(rows, seq, heads, dim, fmt: formats.KVFormat, layout):
    """Codes and scale words of one quantized side over garbage: 0xff codes (fp8 NaN, int8 -1, int4
    15) and NaN words everywhere nothing is written, so reading past a length gives NaN."""
    elems = fmt.storage_elems(dim)
    nan = float("nan")
    if layout == "head_major":
        data = torch.full((rows, heads, seq, elems), 0xFF, dtype=torch.uint8).view(fmt.storage_dtype)
        scales = torch.full((rows, heads, seq, fmt.scale_words), nan)
        return data.transpose(1, 2), scales.transpose(1, 2)
    data = torch.full((rows, seq, heads, elems), 0xFF, dtype=torch.uint8).view(fmt.storage_dtype)
    return data, torch.full((rows, seq, heads, fmt.scale_words), nan)


def _fill_quantized(cache, scales, fmt: str, need, gen, dtype):
    """Random values in tokens [0, need[row][h]) of every (row, kv head), quantized as reference.py
    defines (int4_ch over groups of head_dim / 2 tokens); everything else stays garbage."""
    rows, seq, heads = cache.shape[:3]
    dim = cache.shape[-1] * formats.get(fmt).elems_per_storage
    if not seq:
        return
    x = randn((rows, seq, heads, dim), gen).to(dtype).float()
    if fmt == "int4_ch":
        g = reference.int4_ch_group(dim)
        for row, per_head in need.items():
            for h, n in enumerate(per_head):
                for lo in range(0, n, g):
                    packed, words = reference.quantize_int4_ch_group(x[row, lo : min(lo + g, n), h])
                    cache[row, lo : lo + packed.shape[0], h] = packed
                    scales[row, lo : lo + g, h] = words
        return
    codes, sc = reference.quantize(x, fmt)  # one call for the whole cache, then the tokens in use
    mask = torch.zeros(rows, seq, heads, dtype=torch.bool)
    for row, per_head in need.items():
        for h, n in enumerate(per_head):
            mask[row, :n, h] = True
    cache[mask] = codes[mask]
    scales[mask] = sc[mask]


# ----------------------------------------------------------------------------- valid attention problems


@st.composite
def attention_problems(draw, prefill: bool):
    batch = draw(st.integers(1, 4))
    group = draw(st.sampled_from([1, 2, 3, 4, 8]))
    hkv = draw(st.sampled_from([1, 2, 3, 4] if group <= 4 else [1, 2]))
    dim = draw(st.sampled_from(DIMS + (64, 128)))  # the common ones twice as often
    dtype = draw(st.sampled_from(DTYPES))
    kv = draw(st.sampled_from(["plain", "plain", "quant"]))
    kf = vf = None
    if kv == "quant":
        kf = draw(st.sampled_from(QFORMATS + ("int4_ch",)))
        vf = draw(st.sampled_from(QFORMATS))
    if prefill:
        q_lens, lens = [], []
        for _ in range(batch):
            n = draw(NEW_Q)
            prefix = min(draw(LEN), 300 - n)
            length = prefix + n
            if draw(st.integers(0, 9)) == 0 and length > 0:  # more queries than keys: early ones see nothing
                length = draw(st.integers(0, length - 1))
            q_lens.append(n)
            lens.append(length)
    else:
        q_lens = None
        lens = [draw(LEN) for _ in range(batch)]
    if draw(st.integers(0, 7)) == 0:
        # Now and then one long row (past the 300 of the rest): decode splits rows of more than 512
        # visible keys over several work items (attention_cpu.cpp decode_impl), prefill walks a long
        # cached prefix under its chunk.
        b = draw(st.integers(0, batch - 1))
        top = 1100 if prefill else 2100  # (prefill: 70 queries on it keep the reference slower)
        long_len = draw(st.one_of(st.sampled_from([513, 1024, 1025, 1099, 2049][: 4 if prefill else 5]),
                                  st.integers(301, top)))  # fmt: skip
        lens[b] = max(lens[b], long_len)
    head_lens = None
    if draw(st.integers(0, 3)) == 0:
        head_lens = [
            [min(draw(st.one_of(st.sampled_from([0, 1, length]), st.integers(0, 300))), length) for _ in range(hkv)]
            for length in lens
        ]
    score_mode = draw(st.sampled_from([None, None, "add", "replace"]))
    extra_rows = draw(st.integers(0, 3))
    rows = batch + extra_rows
    if score_mode is None and draw(st.integers(0, 5)) == 0:
        row_ids = [draw(st.integers(0, rows - 1)) for _ in range(batch)]  # repeats are fine without scores
    else:
        row_ids = draw(st.permutations(list(range(rows))))[:batch]
    return dict(
        prefill=prefill,
        batch=batch,
        group=group,
        hkv=hkv,
        dim=dim,
        dtype=dtype,
        kf=kf,
        vf=vf,
        lens=lens,
        q_lens=q_lens,
        head_lens=head_lens,
        rows=rows,
        row_ids=row_ids,
        pass_row_ids=draw(st.booleans()) or row_ids != list(range(batch)) or score_mode is not None,
        index_form=draw(st.sampled_from(["int32", "int64", "list"])),
        slack=draw(st.sampled_from([0, 0, 1, 5, 9])),
        layout=draw(st.sampled_from(LAYOUTS if kv == "plain" else ("plain", "head_major"))),
        strided_q=draw(st.booleans()),
        q_mul=draw(st.sampled_from([1.0, 1.0, 3.0])),
        scale=draw(st.one_of(st.none(), st.none(), st.sampled_from([0.05, 0.3, 1.0, 0.0, -0.25]))),
        window_left=draw(st.one_of(st.just(-1), st.integers(0, 100), st.sampled_from([0, 1, 63, 64, 100, -5]))),
        softcap=draw(st.sampled_from([0.0, 0.0, 30.0, 5.0])),
        return_lse=draw(st.booleans()),
        score_mode=score_mode,
        score_last_queries=draw(st.one_of(st.none(), st.integers(-2, 80))),
        score_extra=(draw(st.integers(0, 2)), draw(st.integers(0, 5))),
        max_k=draw(st.sampled_from(["none", "exact", "low", "high"])),
        max_k_frac=draw(st.floats(0, 1)),
        max_q=draw(st.sampled_from(["none", "exact", "high"])),
        threads=draw(st.sampled_from([1, 2])),
        # The fp32 decode's token-order walks past a byte gate (attention_cpu.cpp; 0: wherever they
        # apply, the variable is read per call), or never (-1), or the default gate (None).
        token_order=draw(st.sampled_from([None, None, "0", "-1"])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _per_head(c):
    """L(b, h) of every batch row and kv head."""
    if c["head_lens"] is not None:
        return [list(h) for h in c["head_lens"]]
    return [[n] * c["hkv"] for n in c["lens"]]


def _build(c):
    """(q for the op, q values, op caches (kc, vc, ks, vs), float caches for the reference, op kwargs,
    reference kwargs)."""
    gen = torch.Generator().manual_seed(c["seed"])
    hkv, dim, dtype = c["hkv"], c["dim"], c["dtype"]
    lengths = _per_head(c)
    need = {}
    for b, row in enumerate(c["row_ids"]):
        prev = need.get(row, [0] * hkv)
        need[row] = [max(a, n) for a, n in zip(prev, lengths[b])]
    seq = max([max(x) for x in need.values()] + c["lens"]) + c["slack"]  # seqlens_k too must fit
    if c["kf"] == "int4_ch":
        g = dim // 2
        seq = -(-seq // g) * g
    if c["kf"] is None:
        kc, vc = cache_views(c["rows"], seq, hkv, dim, dtype, c["layout"])
        rows = list(need)
        fill_cache(kc, vc, rows, [need[r] for r in rows], gen)
        ks = vs = None
        kd, vd = kc, vc
    else:
        kfmt, vfmt = formats.get(c["kf"]), formats.get(c["vf"])
        kc, ks = _qside(c["rows"], seq, hkv, dim, kfmt, c["layout"])
        vc, vs = _qside(c["rows"], seq, hkv, dim, vfmt, c["layout"])
        _fill_quantized(kc, ks, c["kf"], need, gen, dtype)
        _fill_quantized(vc, vs, c["vf"], need, gen, dtype)
        kd = reference.dequantize(kc, ks, c["kf"], dim)
        vd = reference.dequantize(vc, vs, c["vf"], dim)
    hq = hkv * c["group"]
    total_q = c["batch"] if not c["prefill"] else sum(c["q_lens"])
    q = (randn((total_q, hq, dim), gen) * c["q_mul"]).to(dtype)
    q_op = q
    if c["strided_q"]:
        fused = torch.full((total_q, hq + 3, dim), float("nan"), dtype=dtype)
        fused[:, 2 : 2 + hq] = q
        q_op = fused[:, 2 : 2 + hq]
    form = c["index_form"]
    kw = dict(scale=c["scale"], window_left=c["window_left"], softcap=c["softcap"])
    ref_kw = dict(kw)
    ref_kw["seqlens_k"] = torch.tensor(c["lens"], dtype=torch.int32)
    ref_kw["row_ids"] = torch.tensor(c["row_ids"], dtype=torch.int32)
    kw["seqlens_k"] = _index_form(c["lens"], form)
    if c["pass_row_ids"]:
        kw["row_ids"] = _index_form(c["row_ids"], form)
    if c["head_lens"] is not None:
        ref_kw["head_seqlens_k"] = torch.tensor(c["head_lens"], dtype=torch.int32)
        kw["head_seqlens_k"] = ref_kw["head_seqlens_k"] if form != "int64" else ref_kw["head_seqlens_k"].long()
    if c["prefill"]:
        cu = [0]
        for n in c["q_lens"]:
            cu.append(cu[-1] + n)
        ref_kw["cu_seqlens_q"] = torch.tensor(cu, dtype=torch.int32)
        kw["cu_seqlens_q"] = _index_form(cu, form)
    longest_k = max(max(x) for x in lengths)
    if c["max_k"] == "exact":
        kw["max_seqlen_k"] = longest_k
    elif c["max_k"] == "low":  # a hint below a real length only steers how decode splits rows
        kw["max_seqlen_k"] = int(c["max_k_frac"] * longest_k)
    elif c["max_k"] == "high":
        kw["max_seqlen_k"] = longest_k + 1 + int(c["max_k_frac"] * 500)
    if c["prefill"] and c["max_q"] != "none":
        kw["max_seqlen_q"] = max(c["q_lens"]) + (0 if c["max_q"] == "exact" else 1 + int(c["max_k_frac"] * 50))
    return q_op, q, (kc, vc, ks, vs), (kd, vd), kw, ref_kw


def _initial_scores(c, seq):
    """A score buffer with random values (the "add" baseline) and some NaN with distinct payloads, so
    "untouched" is checked bit for bit (as tests/test_ops_scores.py builds it), maybe larger than
    the cache."""
    gen = torch.Generator().manual_seed(c["seed"] + 1)
    er, ec = c["score_extra"]
    sc = torch.randn(c["rows"] + er, c["hkv"], seq + ec, generator=gen)
    bits = sc.view(torch.int32)
    nan_mask = torch.rand(sc.shape, generator=gen) < 0.2
    bits[nan_mask] = 0x7FC00000 | (torch.arange(int(nan_mask.sum())) & 0xFFFF).to(torch.int32)
    return sc


def _describe(c) -> str:
    kind = "prefill" if c["prefill"] else "decode"
    fmt = "plain" if c["kf"] is None else f"{c['kf']}/{c['vf']}"
    return (
        f"{kind} b{c['batch']} h{c['hkv']}x{c['group']} d{c['dim']} {str(c['dtype'])[6:]} {fmt} {c['layout']} "
        f"L{c['lens']} n{c['q_lens']} hl{c['head_lens']} rows{c['row_ids']}/{c['rows']} w{c['window_left']} "
        f"c{c['softcap']} s{c['scale']} t{c['threads']} to{c.get('token_order')} scores={c['score_mode']}:{c['score_last_queries']} seed{c['seed']}"
    )


def _sees_no_key(c) -> torch.Tensor:
    """[total_q, q_heads] bool: the queries that see no key."""
    n_q = c["q_lens"] if c["prefill"] else [1] * c["batch"]
    group = c["group"]
    rows = []
    for b, lengths in enumerate(_per_head(c)):
        for i in range(n_q[b]):
            rows.append([length == 0 or length - n_q[b] + i < 0 for length in lengths for _ in range(group)])
    return torch.tensor(rows, dtype=torch.bool).reshape(-1, c["hkv"] * group)


def _note(text: str) -> None:
    try:
        note(text)
    except InvalidArgument:  # outside a hypothesis test (the cases below)
        pass


def _check_problem(c):
    # The references run on one torch thread (a 2-thread team on a busy small machine can wait long
    # at its barriers); the op runs on c["threads"].
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _check_problem_1(c)
    finally:
        torch.set_num_threads(before)


def _check_problem_1(c):
    _note(_describe(c))
    q_op, q, (kc, vc, ks, vs), (kd, vd), kw, ref_kw = _build(c)
    inputs = [t for t in (q_op, kc, vc, ks, vs) if t is not None]
    snap = [t.clone() for t in inputs]
    scores = init = None
    if c["score_mode"] is not None:
        init = _initial_scores(c, kc.shape[1])
        scores = init.clone()
        kw.update(scores=scores, score_mode=c["score_mode"], score_last_queries=c["score_last_queries"])
    torch.set_num_threads(c["threads"])
    env_before = os.environ.get(_TOKEN_ORDER)
    if c.get("token_order") is not None:
        os.environ[_TOKEN_ORDER] = c["token_order"]
    try:
        if c["prefill"]:
            res = vattn.prefill_attention(
                q_op, kc, vc, kw.pop("cu_seqlens_q"), kw.pop("seqlens_k"), return_lse=c["return_lse"],
                k_scale=ks, v_scale=vs, **kw,
            )  # fmt: skip
        else:
            res = vattn.decode_attention(
                q_op, kc, vc, kw.pop("seqlens_k"), return_lse=c["return_lse"], k_scale=ks, v_scale=vs, **kw
            )
    finally:
        torch.set_num_threads(1)
        if env_before is None:
            os.environ.pop(_TOKEN_ORDER, None)
        else:
            os.environ[_TOKEN_ORDER] = env_before
    out, lse = res if c["return_lse"] else (res, None)
    what = _describe(c)
    assert isinstance(out, torch.Tensor) and out.shape == q.shape and out.dtype == q.dtype, what
    if lse is not None:
        assert lse.shape == q.shape[:2] and lse.dtype == torch.float32, what
    for t0, t1 in zip(snap, inputs):
        assert _bits_equal(t0, t1), f"{what}: attention changed q or a cache"
    assert_attention_close(out, lse, q, kd, vd, ref_kw, what)
    # A query that sees no key outputs exactly zeros (and lse -inf), with or without the LSE asked
    # for. Query i of a row's n sits at position p = L - n + i and sees the keys max(0, p - window)..p
    # below L: none exactly when L == 0 or p < 0 (the docstring's rule, derived here, not taken
    # from the reference).
    empty = _sees_no_key(c)
    assert (out[empty] == 0).all(), f"{what}: a query that sees no key must output zeros"
    if lse is not None:
        assert torch.equal(torch.isneginf(lse), empty), f"{what}: lse must be -inf exactly where no key is seen"
    if scores is not None:
        check_scores(scores, init, q, kd, vd, ref_kw, c["score_mode"], c["score_last_queries"], _per_head(c), what)


@_settings(200)
@given(attention_problems(prefill=False))
def test_decode_matches_reference(c):
    _check_problem(c)


@_settings(200)
@given(attention_problems(prefill=True))
def test_prefill_matches_reference(c):
    _check_problem(c)


@_settings(20)
@given(
    dim=st.sampled_from([1, 2, 3, 7, 8, 16, 33, 40, 72, 100, 160, 192, 320, 512, 1000]),
    prefill=st.booleans(),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31 - 1),
)
def test_any_head_dim_runs_or_raises(dim, prefill, dtype, seed):
    """Head dims beyond the usual ones: what the support table (vattn/_support.py) says the CPU runs
    matches the reference; anything else raises a clear error (never a crash)."""
    c = dict(
        prefill=prefill, batch=2, group=2, hkv=2, dim=dim, dtype=dtype, kf=None, vf=None, lens=[70, 5],
        q_lens=[40, 5] if prefill else None, head_lens=None, rows=3, row_ids=[2, 0], pass_row_ids=True,
        index_form="int32", slack=3, layout="token_major", strided_q=False, q_mul=1.0, scale=None,
        window_left=-1, softcap=0.0, return_lse=True, score_mode=None, score_last_queries=None,
        score_extra=(0, 0), max_k="none", max_k_frac=0.0, max_q="none", threads=2, seed=seed,
    )  # fmt: skip
    if _support.supported("prefill" if prefill else "decode", "cpu", dtype, dim):
        _check_problem(c)
    else:
        with pytest.raises((ValueError, RuntimeError)):
            _check_problem(c)


# ----------------------------------------------------------------------------- append_kv_raw

SPECIALS = [float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 1e-40, -3e-39, 6e4, -1e30, 1e-20]


@st.composite
def append_problems(draw):
    rows = draw(st.integers(1, 5))
    seq = draw(st.sampled_from([1, 2, 17, 40, 64]))
    heads = draw(st.integers(1, 4))
    dim = draw(st.sampled_from(DIMS + (8, 40)))
    dtype = draw(st.sampled_from(DTYPES))
    quant = draw(st.booleans())
    kf = vf = None
    if quant:
        kf, vf = draw(st.sampled_from(QFORMATS)), draw(st.sampled_from(QFORMATS))
    n = draw(st.integers(0, min(40, rows * seq)))
    return dict(
        rows=rows,
        seq=seq,
        heads=heads,
        dim=dim,
        dtype=dtype,
        kf=kf,
        vf=vf,
        n=n,
        head_positions=draw(st.booleans()),
        specials=draw(st.booleans()),
        layout=draw(st.sampled_from(LAYOUTS if not quant else ("plain", "head_major"))),
        index_form=draw(st.sampled_from(["int32", "int64", "list"])),
        strided_k=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    view = {4: torch.int32, 2: torch.int16, 1: torch.uint8}[a.element_size()]
    return torch.equal(a.contiguous().view(view), b.contiguous().view(view))


@_settings(100)
@given(append_problems())
def test_append_matches_reference(c):
    """append_kv_raw writes exactly reference.append_kv's bytes (values, or codes and scale words of
    quantized formats, special values included) and nothing else."""
    _note(str(c))
    gen = torch.Generator().manual_seed(c["seed"])
    rows, seq, heads, dim, dtype, n = c["rows"], c["seq"], c["heads"], c["dim"], c["dtype"], c["n"]
    if c["kf"] is None:
        kc, vc = cache_views(rows, seq, heads, dim, dtype, c["layout"])
        ks = vs = None
    else:
        kc, ks = _qside(rows, seq, heads, dim, formats.get(c["kf"]), c["layout"])
        vc, vs = _qside(rows, seq, heads, dim, formats.get(c["vf"]), c["layout"])
    ref = [None if t is None else t.clone() for t in (kc, vc, ks, vs)]
    flat = torch.randperm(rows * seq, generator=gen)[:n]  # distinct (row, position) pairs, scrambled
    row_ids, positions = (flat // seq).to(torch.int32), (flat % seq).to(torch.int32)
    head_pos = None
    if c["head_positions"]:
        # Per kv head, the tokens of a row go to distinct positions of that row.
        head_pos = torch.empty(n, heads, dtype=torch.int32)
        for h in range(heads):
            for r in row_ids.unique().tolist():
                idx = (row_ids == r).nonzero().flatten()
                head_pos[idx, h] = torch.randperm(seq, generator=gen)[: idx.numel()].to(torch.int32)
    k = randn((n, heads, dim), gen) * 2
    v = randn((n, heads, dim), gen)
    if c["specials"] and n:
        for x in (k, v):
            m = torch.rand(x.shape, generator=gen) < 0.05
            pick = torch.randint(len(SPECIALS), (int(m.sum()),), generator=gen)
            x[m] = torch.tensor(SPECIALS)[pick]
    k, v = k.to(dtype), v.to(dtype)
    k_op, v_op = k, v
    if c["strided_k"]:
        fused = torch.full((n, 3, heads, dim), float("nan"), dtype=dtype)
        fused[:, 0], fused[:, 2] = k, v
        k_op, v_op = fused[:, 0], fused[:, 2]
    form = c["index_form"]
    vattn.append_kv_raw(
        kc, vc, k_op, v_op, _index_form(row_ids.tolist(), form), _index_form(positions.tolist(), form),
        k_scale=ks, v_scale=vs, head_positions=None if head_pos is None else head_pos.long() if form == "int64" else head_pos,
    )  # fmt: skip
    rk, rv, rks, rvs = ref
    reference.append_kv(rk, rv, k, v, row_ids, positions, rks, rvs, c["kf"], c["vf"], head_positions=head_pos)
    if c["kf"] is None:
        assert _bits_equal(kc, rk), "k_cache differs from reference.append_kv"
        assert _bits_equal(vc, rv), "v_cache differs from reference.append_kv"
    else:
        assert_same_kv_bytes((kc, vc, ks, vs), (rk, rv, rks, rvs), f"{c['kf']}/{c['vf']}")


# ----------------------------------------------------------------------------- invalid inputs

ATTN_MUTATIONS = [
    "q_heads_not_multiple",
    "q_float64",
    "q_dtype_vs_cache",
    "q_dim",
    "q_2d",
    "seqlens_float",
    "seqlens_short",
    "seqlens_over_cache",
    "seqlens_negative",
    "row_id_over",
    "row_id_negative",
    "row_ids_float",
    "head_lens_over",
    "head_lens_negative",
    "head_lens_shape",
    "cu_decreasing",
    "cu_total",
    "cu_first",
    "cu_len",
    "softcap_negative",
    "softcap_nan",
    "scale_nan",
    "scale_inf",
    "max_q_low",
    "max_k_negative",
    "scores_float64",
    "scores_few_rows",
    "scores_heads",
    "scores_short",
    "scores_mode",
    "scores_last_float",
    "scores_dup_rows",
    "cache_shapes_differ",
    "cache_dtypes_differ",
    "cache_3d",
    "cache_dim0",
    "k_scale_missing",
    "scale_dtype",
    "scale_shape",
    "plain_with_quant",
]


@st.composite
def invalid_attention(draw):
    prefill = draw(st.booleans())
    quant = draw(st.integers(0, 3)) == 0
    batch = draw(st.integers(1, 3))
    hkv = draw(st.sampled_from([1, 2]))
    group = draw(st.sampled_from([1, 2, 4]))
    mutation = draw(st.sampled_from(ATTN_MUTATIONS))
    return dict(
        prefill=prefill,
        quant=quant,
        batch=batch,
        hkv=hkv,
        group=group,
        dim=draw(st.sampled_from([16, 64])),
        dtype=draw(st.sampled_from(DTYPES)),
        lens=[draw(st.integers(1, 40)) for _ in range(batch)],
        mutation=mutation,
        amount=draw(st.integers(1, 2**31 - 100)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@_settings(150)
@given(invalid_attention())
def test_invalid_attention_raises(c):
    """One thing wrong with an otherwise valid call: a ValueError / TypeError / RuntimeError, and the
    caches and the score buffer are left as they were."""
    _note(str(c))
    gen = torch.Generator().manual_seed(c["seed"])
    batch, hkv, dim, dtype, lens = c["batch"], c["hkv"], c["dim"], c["dtype"], c["lens"]
    hq = hkv * c["group"]
    rows, seq = batch + 1, max(lens) + 2
    row_ids = torch.randperm(rows, generator=gen)[:batch].to(torch.int32)
    if c["quant"]:
        kc, ks = _qside(rows, seq, hkv, dim, formats.get("int8"), "plain")
        vc, vs = _qside(rows, seq, hkv, dim, formats.get("int4"), "plain")
        need = {r: [seq] * hkv for r in range(rows)}
        _fill_quantized(kc, ks, "int8", need, gen, dtype)
        _fill_quantized(vc, vs, "int4", need, gen, dtype)
    else:
        kc, vc = randn((rows, seq, hkv, dim), gen, dtype), randn((rows, seq, hkv, dim), gen, dtype)
        ks = vs = None
    q_lens = [min(n, 3) for n in lens] if c["prefill"] else [1] * batch
    cu = torch.tensor([0] + [sum(q_lens[: i + 1]) for i in range(batch)], dtype=torch.int32)
    q = randn((sum(q_lens), hq, dim), gen, dtype)
    scores = torch.zeros(rows, hkv, seq)
    args = dict(
        q=q, k_cache=kc, v_cache=vc, cu_seqlens_q=cu, seqlens_k=torch.tensor(lens, dtype=torch.int32),
        row_ids=row_ids, head_seqlens_k=None, k_scale=ks, v_scale=vs, scores=None, score_mode="add",
    )  # fmt: skip

    def call(a):
        a = dict(a)
        q_, kc_, vc_, cu_, sl_ = (a.pop(x) for x in ("q", "k_cache", "v_cache", "cu_seqlens_q", "seqlens_k"))
        if c["prefill"]:
            return vattn.prefill_attention(q_, kc_, vc_, cu_, sl_, **a)
        return vattn.decode_attention(q_, kc_, vc_, sl_, **a)

    call(args)  # the unmutated call is valid
    m, amt = c["mutation"], c["amount"]
    a = dict(args)
    if m.startswith("cu_") and not c["prefill"]:
        m = "seqlens_over_cache"
    if m == "max_q_low" and (not c["prefill"] or max(q_lens) == 0):
        m = "max_k_negative"
    if m in ("q_dtype_vs_cache",) and c["quant"]:
        m = "q_float64"  # a quantized cache reads any float q dtype
    if m in ("k_scale_missing", "scale_dtype", "scale_shape") and not c["quant"]:
        m = "plain_with_quant"
    if m == "plain_with_quant" and c["quant"]:
        m = "k_scale_missing"
    if m == "scores_dup_rows" and batch < 2:
        m = "scores_mode"
    scores_given = m.startswith("scores_")
    if scores_given:
        a["scores"] = scores
    if m == "q_heads_not_multiple":
        # hq + 1 is no multiple of 2+ kv heads; every count is a multiple of 1: zero q heads then
        a["q"] = randn((q.shape[0], hq + 1 if hkv > 1 else 0, dim), gen, dtype)
    elif m == "q_float64":
        a["q"] = q.double()
    elif m == "q_dtype_vs_cache":
        a["q"] = q.to([d for d in DTYPES if d != dtype][amt % 2])
    elif m == "q_dim":
        a["q"] = randn((q.shape[0], hq, dim + 1 + amt % 5), gen, dtype)
    elif m == "q_2d":
        a["q"] = q.reshape(q.shape[0], -1)
    elif m == "seqlens_float":
        a["seqlens_k"] = a["seqlens_k"].float()
    elif m == "seqlens_short":
        a["seqlens_k"] = a["seqlens_k"][:-1]
    elif m == "seqlens_over_cache":
        sl = a["seqlens_k"].clone()
        sl[amt % batch] = seq + 1 + amt % 1000
        a["seqlens_k"] = sl
    elif m == "seqlens_negative":
        sl = a["seqlens_k"].clone()
        sl[amt % batch] = -(1 + amt % 1000)
        a["seqlens_k"] = sl
    elif m == "row_id_over":
        r = row_ids.clone()
        r[amt % batch] = rows + amt % 1000
        a["row_ids"] = r
    elif m == "row_id_negative":
        r = row_ids.clone()
        r[amt % batch] = -(1 + amt % 1000)
        a["row_ids"] = r
    elif m == "row_ids_float":
        a["row_ids"] = row_ids.float()
    elif m == "head_lens_over":
        hl = torch.tensor([[n] * hkv for n in lens], dtype=torch.int32)
        hl[amt % batch, amt % hkv] = seq + 1 + amt % 100
        a["head_seqlens_k"] = hl
    elif m == "head_lens_negative":
        hl = torch.tensor([[n] * hkv for n in lens], dtype=torch.int32)
        hl[amt % batch, amt % hkv] = -1
        a["head_seqlens_k"] = hl
    elif m == "head_lens_shape":
        a["head_seqlens_k"] = torch.ones(batch, hkv + 1, dtype=torch.int32)
    elif m == "cu_decreasing":
        if batch >= 2 and cu[1] > 0:
            bad = cu.clone()
            bad[1] = cu[2] + 1  # then cu[2] < cu[1]
        else:
            bad = cu.clone()
            bad[-1] = cu[-1] + 1
        a["cu_seqlens_q"] = bad
    elif m == "cu_total":
        bad = cu.clone()
        bad[-1] = cu[-1] + 1 + amt % 3
        a["cu_seqlens_q"] = bad
    elif m == "cu_first":
        bad = cu.clone()
        bad[0] = 1 + amt % 2
        a["cu_seqlens_q"] = bad
    elif m == "cu_len":
        a["cu_seqlens_q"] = cu[:-1]
    elif m == "softcap_negative":
        a["softcap"] = -0.5
    elif m == "softcap_nan":
        a["softcap"] = float("nan")
    elif m == "scale_nan":
        a["scale"] = float("nan")
    elif m == "scale_inf":
        a["scale"] = float("inf")
    elif m == "max_q_low":
        a["max_seqlen_q"] = max(q_lens) - 1
    elif m == "max_k_negative":
        a["max_seqlen_k"] = -1 - amt % 5
    elif m == "scores_float64":
        a["scores"] = scores.double()
    elif m == "scores_few_rows":
        a["scores"] = scores[:-1]
    elif m == "scores_heads":
        a["scores"] = torch.zeros(rows, hkv + 1, seq)
    elif m == "scores_short":
        a["scores"] = scores[:, :, :-1]
    elif m == "scores_mode":
        a["score_mode"] = "sum"
    elif m == "scores_last_float":
        a["score_last_queries"] = 1.5
    elif m == "scores_dup_rows":
        r = row_ids.clone()
        r[1] = r[0]
        a["row_ids"] = r
    elif m == "cache_shapes_differ":
        a["v_cache"] = vc[:, :-1]
        if vs is not None:
            a["v_scale"] = vs[:, :-1]
    elif m == "cache_dtypes_differ":
        a["v_cache"] = vc.to([d for d in DTYPES if d != dtype][amt % 2])
    elif m == "cache_3d":
        a["k_cache"], a["v_cache"] = kc[0], vc[0]
        if ks is not None:
            a["k_scale"], a["v_scale"] = ks[0], vs[0]
    elif m == "cache_dim0":
        a["k_cache"], a["v_cache"] = kc[..., :0], vc[..., :0]
        a["q"] = q[..., :0]
        a["k_scale"] = a["v_scale"] = None
    elif m == "k_scale_missing":
        a["k_scale"] = None
    elif m == "scale_dtype":
        a["k_scale"] = ks.half()
    elif m == "scale_shape":
        a["v_scale"] = vs[..., :1]  # int4 needs 2 words
    elif m == "plain_with_quant":
        codes, sc = reference.quantize(vc.float(), "int8")
        a["v_cache"], a["v_scale"] = codes, sc
    else:
        raise AssertionError(m)
    snap = [t.clone() for t in (kc, vc, scores) + tuple(x for x in (ks, vs) if x is not None)]
    with pytest.raises(ERRORS):
        call(a)
    after = (kc, vc, scores) + tuple(x for x in (ks, vs) if x is not None)
    for t0, t1 in zip(snap, after):
        assert _bits_equal(t0, t1), f"{m}: a rejected call changed a cache or the scores"


APPEND_MUTATIONS = [
    "row_over",
    "row_negative",
    "pos_over",
    "pos_negative",
    "head_pos_over",
    "head_pos_negative",
    "head_pos_shape",
    "k_dtype",
    "k_float64",
    "k_heads",
    "k_dim",
    "kv_shapes_differ",
    "kv_dtypes_differ",
    "row_ids_len",
    "positions_float",
    "cache_dtypes_differ",
    "scale_missing",
]


@_settings(80)
@given(
    mutation=st.sampled_from(APPEND_MUTATIONS),
    quant=st.booleans(),
    n=st.integers(1, 8),
    dtype=st.sampled_from(DTYPES),
    amount=st.integers(1, 2**31 - 100),
    seed=st.integers(0, 2**31 - 1),
)
def test_invalid_append_raises(mutation, quant, n, dtype, amount, seed):
    """A bad append raises a clear error and writes nothing."""
    gen = torch.Generator().manual_seed(seed)
    rows, seq, heads, dim = 3, 8, 2, 16
    if quant:
        kc, ks = _qside(rows, seq, heads, dim, formats.get("fp8_e4m3"), "plain")
        vc, vs = _qside(rows, seq, heads, dim, formats.get("int4"), "plain")
    else:
        kc, vc = cache_views(rows, seq, heads, dim, dtype, "plain")
        ks = vs = None
    flat = torch.randperm(rows * seq, generator=gen)[:n]
    row_ids, positions = (flat // seq).to(torch.int32), (flat % seq).to(torch.int32)
    k, v = randn((n, heads, dim), gen, dtype), randn((n, heads, dim), gen, dtype)
    a = dict(k_cache=kc, v_cache=vc, k=k, v=v, row_ids=row_ids, positions=positions, k_scale=ks, v_scale=vs)
    i = amount % n
    m = mutation
    if m == "cache_dtypes_differ" and quant:
        m = "scale_missing"
    if m == "scale_missing" and not quant:
        m = "cache_dtypes_differ"
    if m in ("k_dtype", "kv_dtypes_differ") and quant:
        m = "k_float64"
    if m == "row_over":
        r = row_ids.clone()
        r[i] = rows + amount % 1000
        a["row_ids"] = r
    elif m == "row_negative":
        r = row_ids.clone()
        r[i] = -1 - amount % 1000
        a["row_ids"] = r
    elif m == "pos_over":
        p = positions.clone()
        p[i] = seq + amount % 1000
        a["positions"] = p
    elif m == "pos_negative":
        p = positions.clone()
        p[i] = -1 - amount % 1000
        a["positions"] = p
    elif m in ("head_pos_over", "head_pos_negative"):
        hp = positions[:, None].expand(n, heads).clone()
        hp[i, amount % heads] = seq + amount % 100 if m == "head_pos_over" else -1
        a["head_positions"] = hp
    elif m == "head_pos_shape":
        a["head_positions"] = positions[:, None].expand(n, heads + 1).contiguous()
    elif m == "k_dtype":
        other = [d for d in DTYPES if d != dtype][amount % 2]
        a["k"], a["v"] = k.to(other), v.to(other)
    elif m == "k_float64":
        a["k"], a["v"] = k.double(), v.double()
    elif m == "k_heads":
        a["k"], a["v"] = k[:, :1], v[:, :1]
    elif m == "k_dim":
        a["k"] = randn((n, heads, dim + 2), gen, dtype)
        a["v"] = randn((n, heads, dim + 2), gen, dtype)
    elif m == "kv_shapes_differ":
        a["v"] = torch.cat([v, v[:1]])
    elif m == "kv_dtypes_differ":
        a["v"] = v.to([d for d in DTYPES if d != dtype][amount % 2])
    elif m == "row_ids_len":
        a["row_ids"] = torch.cat([row_ids, row_ids[:1]])
    elif m == "positions_float":
        a["positions"] = positions.float()
    elif m == "cache_dtypes_differ":
        a["v_cache"] = vc.to([d for d in DTYPES if d != dtype][amount % 2])
    elif m == "scale_missing":
        a["v_scale"] = None
    else:
        raise AssertionError(m)
    snap = [t.clone() for t in (kc, vc) + tuple(x for x in (ks, vs) if x is not None)]
    with pytest.raises(ERRORS):
        vattn.append_kv_raw(
            a.pop("k_cache"), a.pop("v_cache"), a.pop("k"), a.pop("v"), a.pop("row_ids"), a.pop("positions"), **a
        )
    for t0, t1 in zip(snap, (kc, vc) + tuple(x for x in (ks, vs) if x is not None)):
        assert _bits_equal(t0, t1), f"{m}: a rejected append wrote into the cache"


# ----------------------------------------------------------------------------- cases the fuzzing found
# Valid configurations the properties above drew that the CPU ops got wrong (kept as plain tests so
# they run every time, whatever hypothesis draws).

_BASE = dict(
    prefill=True, batch=1, group=1, hkv=1, dim=64, dtype=torch.float32, kf=None, vf=None, lens=[0], q_lens=[0],
    head_lens=None, rows=1, row_ids=[0], pass_row_ids=True, index_form="int32", slack=0, layout="plain",
    strided_q=False, q_mul=1.0, scale=None, window_left=-1, softcap=0.0, return_lse=True, score_mode=None,
    score_last_queries=None, score_extra=(0, 0), max_k="none", max_k_frac=0.0, max_q="none", threads=1, seed=0,
)  # fmt: skip
FOUND = {
    # A cache of no positions ([rows, 0, heads, dim], every row empty) with a score buffer
    # [rows, heads, 0]: the reference touches nothing; the ops refused it ("scores is null").
    "decode-scores-no-positions": dict(prefill=False, q_lens=None, score_mode="add"),
    "decode-replace-no-positions": dict(
        prefill=False, q_lens=None, batch=2, rows=2, lens=[0, 0], row_ids=[1, 0], score_mode="replace"
    ),
    "prefill-scores-no-positions": dict(batch=2, rows=2, lens=[0, 0], q_lens=[0, 1], row_ids=[0, 1], score_mode="add"),
    "prefill-replace-no-queries-no-positions": dict(score_mode="replace"),
    # int4_ch keys, float32 q, scale 1.0: prefill error up to 3.0e-05 where the rule allows 2.7e-05
    # (the same keys as a plain fp32 cache stay well within it). Seeds that showed it.
    "int4_ch-prefill-fp32-scale1": dict(
        dim=96, kf="int4_ch", vf="fp8_e4m3", lens=[63], q_lens=[63], scale=1.0, seeds=(2, 13, 18, 24)
    ),
}


def test_fp32_prefill_error_with_logits_far_past_the_default_scale():
    """A known limit, measured (README "Known limits"): plain fp32 prefill at head_dim 256 with
    softmax scale 1.0 (16x the default 1/sqrt(256)), GQA 8, errs up to 4.8x torch's own fp32 error,
    past the 2x rule the other cases meet (decode over the same data: within it). The fuzz found it;
    this keeps it from growing: at most 6x torch's error + 1e-5, and within the 2x rule at the
    default scale."""
    from vattn import reference

    for seed in (5, 9, 12, 25):
        for scale, factor in ((1.0, 6.0), (None, 2.0)):
            g = torch.Generator().manual_seed(seed)
            k, v = torch.randn(1, 40, 1, 256, generator=g), torch.randn(1, 40, 1, 256, generator=g)
            q = torch.randn(40, 8, 256, generator=g)
            lens, cu = torch.tensor([40], dtype=torch.int32), torch.tensor([0, 40], dtype=torch.int32)
            ref, _ = reference.attention(q, k, v, lens, cu, scale=scale)
            low, _ = reference.attention(q, k, v, lens, cu, scale=scale, compute_dtype=torch.float32)
            out = vattn.prefill_attention(q, k, v, cu, lens, scale=scale)
            err = (out.double() - ref).abs().max().item()
            base = (low.double() - ref).abs().max().item()
            assert err <= factor * base + 1e-5, f"seed {seed} scale {scale}: error {err:.3g} vs torch {base:.3g}"


@pytest.mark.parametrize("name", list(FOUND))
def test_found_case(name):
    case = dict(_BASE, **FOUND[name])
    for seed in case.pop("seeds", (case["seed"],)):
        _check_problem(dict(case, seed=seed))
