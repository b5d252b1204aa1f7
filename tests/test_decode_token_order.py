"""CPU decode's token-order walks (attention_cpu.cpp: fp32 caches whose row is one [tokens, heads,
dim] block, several kv heads) against reference.py. Calls reading >= 24 MiB of K and V stream: token
order for GQA groups <= 3, the same in pieces of 8 tokens for groups of 4+ at head dims that are a
multiple of 16 (AVX2; the AVX-512 copy's pieces are 4), the head walk in prefetched pieces for the others. Smaller calls take the
pieces for groups of 4+ at those head dims (their AVX-512 copy where the CPU has AVX-512), else the plain
head-at-a-time walk. Covered: head dims with and without a partial last vector, rows shorter and
longer than a key block, a split long row, per-head lengths with NaN past each head's length,
windows, soft-cap, decode scores, group 1's token pairs, and the portable copy.
VATTN_CPU_TOKEN_ORDER_MIN_BYTES=0 takes the streaming walks on these small problems (-1: never, so
the in-cache walks run), so the same data runs through both."""

import os
import subprocess
import sys

import pytest
import torch

import vattn
from vattn import reference
from helpers import LAYOUTS, Case, assert_attention_close, build

# Odd lengths so token pairs (group 1) end on a single token; 64 / 65 straddle a key block; 1500 on
# one row makes decode split it into key ranges.
LENS = [[1], [2, 63, 64, 65], [129, 7, 300], [1500], [33, 1, 2, 200, 91]]


@pytest.fixture(autouse=True)
def token_order_everywhere(monkeypatch):
    monkeypatch.setenv("VATTN_CPU_TOKEN_ORDER_MIN_BYTES", "0")


def _decode(q, kc, vc, kw, **extra):
    kw = {k: v for k, v in kw.items() if k != "cu_seqlens_q"}
    return vattn.decode_attention(q, kc, vc, kw.pop("seqlens_k"), return_lse=True, **kw, **extra)


@pytest.mark.parametrize("group", [1, 2, 3, 4, 5, 7, 8, 16])
@pytest.mark.parametrize("dim", [8, 36, 64, 80, 128])
@pytest.mark.parametrize("hkv", [2, 3, 9])
def test_token_order_matches_reference(group, dim, hkv):
    for i, lens in enumerate(LENS):
        case = Case(lens=lens, hkv=hkv, group=group, dim=dim)
        if i == 2:
            case.window_left = 100
        if i == 4:
            case.softcap = 5.0
        layout = LAYOUTS[(i + group + dim) % len(LAYOUTS)]
        q, kc, vc, kw = build(case, torch.float32, layout, "cpu", seed=100 * group + dim + i)
        out, lse = _decode(q, kc, vc, kw)
        assert_attention_close(out, lse, q, kc, vc, kw, f"{case.describe()}-{layout}")


@pytest.mark.parametrize("group", [4, 5, 7, 8, 16])
@pytest.mark.parametrize("dim", [48, 64, 80, 128])
@pytest.mark.parametrize("layout", ["plain", "layer_major"])
def test_in_cache_walk_matches_reference(group, dim, layout, monkeypatch):
    """Below the streaming gate (knob -1): the token pieces (groups 4+, head dims a multiple of 16,
    rows stored as one block; their AVX-512 copy on a CPU with AVX-512F), the head walk elsewhere. Per-head
    lengths with NaN past each head's length in one case, a window and soft-cap in others."""
    monkeypatch.setenv("VATTN_CPU_TOKEN_ORDER_MIN_BYTES", "-1")
    for i, lens in enumerate(LENS):
        case = Case(lens=lens, hkv=3, group=group, dim=dim)
        if i == 2:
            case.head_lens = [[n, max(n - 5, 0), 1] for n in lens]
        if i == 3:
            case.window_left = 700
        if i == 4:
            case.softcap = 5.0
        q, kc, vc, kw = build(case, torch.float32, layout, "cpu", seed=31 * group + dim + i)
        out, lse = _decode(q, kc, vc, kw)
        assert_attention_close(out, lse, q, kc, vc, kw, f"{case.describe()}-{layout}")


@pytest.mark.parametrize("group", [1, 2, 3, 4, 6, 8])
@pytest.mark.parametrize("layout", ["plain", "layer_major", "token_major"])
def test_token_order_agrees_with_the_head_walk(group, layout, monkeypatch):
    """The same problems through the streaming walk and the plain one (plain and layer_major rows
    stream: token order for groups <= 3, token pieces for groups 4+ at head dims 64 / 128, prefetched
    head pieces at 36; token_major never does):
    the same output up to float rounding."""
    for i, lens in enumerate(LENS):
        case = Case(lens=lens, hkv=3, group=group, dim=[36, 64, 128][i % 3])
        case.head_lens = [[n, max(n - 5, 0), 1] for n in lens] if i == 2 else None
        q, kc, vc, kw = build(case, torch.float32, layout, "cpu", seed=i)
        outs = []
        for knob in ("0", "-1"):
            monkeypatch.setenv("VATTN_CPU_TOKEN_ORDER_MIN_BYTES", knob)
            outs.append(_decode(q, kc, vc, kw))
        assert torch.allclose(outs[0][0], outs[1][0], atol=2e-6, rtol=1e-5), case.describe()
        assert torch.allclose(outs[0][1], outs[1][1], atol=2e-6, rtol=1e-6), case.describe()


def test_default_gate_takes_the_walk_on_a_large_call(monkeypatch):
    """Without the knob, a call reading 24 MiB of K and V (one 16K-token row, SmolLM2 heads) takes the
    token order (the gate's own path) and matches the reference."""
    monkeypatch.delenv("VATTN_CPU_TOKEN_ORDER_MIN_BYTES")
    case = Case(lens=[16384], hkv=3, group=3, dim=64, extra_rows=0)
    q, kc, vc, kw = build(case, torch.float32, "plain", "cpu", seed=5)
    out, lse = _decode(q, kc, vc, kw)
    assert_attention_close(out, lse, q, kc, vc, kw, case.describe())


@pytest.mark.parametrize("group", [1, 2, 3, 4, 6, 8])
@pytest.mark.parametrize("dim", [64, 96, 128])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_per_head_lengths_read_nothing_past_a_head(group, dim, layout):
    """Heads of a row end at different tokens (one at 0, others inside and across key blocks); the
    cache is NaN past each head's own length, so any read past it would show in the output. Groups 2
    and 3 at head dims 64 / 128 take the multi-head tiles (4 / 2 heads of a token in one reduction),
    which fall back to one head at a time where a head of the chunk has ended; groups 4+ take token
    pieces, which go token by token for a head whose range ends inside a piece."""
    case = Case(lens=[130, 70, 1200], hkv=4, group=group, dim=dim)
    case.head_lens = [[0, 65, 130, 1], [64, 3, 70, 69], [1200, 2, 513, 640]]
    q, kc, vc, kw = build(case, torch.float32, layout, "cpu", seed=7 + group)
    out, lse = _decode(q, kc, vc, kw)
    assert_attention_close(out, lse, q, kc, vc, kw, f"{case.describe()}-{layout}")
    # A head that sees no key outputs zeros with LSE -inf (batch row 0, kv head 0).
    assert (out[0, :group] == 0).all() and torch.isinf(lse[0, :group]).all()


@pytest.mark.parametrize("mode", ["add", "replace"])
@pytest.mark.parametrize("group", [1, 3])
def test_decode_scores_over_token_order(mode, group):
    case = Case(lens=[90, 257, 1], hkv=3, group=group, dim=40)
    q, kc, vc, kw = build(case, torch.float32, "token_major", "cpu", seed=11)
    rows, seq = kc.shape[0], kc.shape[1]
    got = torch.rand(rows, 3, seq, generator=torch.Generator().manual_seed(1))
    want = got.clone()
    _decode(q, kc, vc, kw, scores=got, score_mode=mode)
    ref_kw = {k: v for k, v in kw.items() if k != "cu_seqlens_q"}
    reference.attention(q, kc, vc, ref_kw.pop("seqlens_k"), **ref_kw, scores=want, score_mode=mode)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("switch", ["VATTN_CPU_GENERIC", "VATTN_CPU_NO_AVX512"])
def test_other_copies_match_reference(switch):
    """The same walks in the portable copy (VATTN_CPU_GENERIC), forced in a subprocess, and with
    AVX-512 switched off (VATTN_CPU_NO_AVX512: the in-cache walk of groups 4+ is the AVX2 pieces then),
    each streaming (knob 0) and in cache (knob -1). Groups 2-3 at head dims 64 / 128 with heads that
    end inside a multi-head chunk."""
    tests = os.path.dirname(os.path.abspath(__file__))
    code = (
        f"import sys; sys.path.insert(0, {tests!r})\n"
        "import os, torch, vattn\n"
        "from helpers import Case, assert_attention_close, build\n"
        "for knob, group, dim, lens, layout in (\n"
        "        (k, *c) for k in ('0', '-1') for c in (\n"
        "            (1, 36, [5, 130], 'plain'), (3, 64, [1500, 3], 'token_major'), (4, 128, [65, 64], 'head_major'),\n"
        "            (2, 64, [300, 77], 'plain'), (3, 128, [129, 64], 'layer_major'), (2, 128, [70, 1], 'layer_major'),\n"
        "            (4, 64, [130, 67], 'plain'), (8, 128, [9, 700], 'layer_major'))):\n"
        "    os.environ['VATTN_CPU_TOKEN_ORDER_MIN_BYTES'] = knob\n"
        "    hkv = 2 if group in (1, 4) else 5\n"
        "    heads = [[lens[0], 1] + [lens[0] - 3] * (hkv - 2), [0, lens[1]] + [lens[1]] * (hkv - 2)]\n"
        "    case = Case(lens=lens, hkv=hkv, group=group, dim=dim, head_lens=heads)\n"
        "    q, kc, vc, kw = build(case, torch.float32, layout, 'cpu', seed=group)\n"
        "    kw = {k: v for k, v in kw.items() if k != 'cu_seqlens_q'}\n"
        "    out, lse = vattn.decode_attention(q, kc, vc, kw.pop('seqlens_k'), return_lse=True, **kw)\n"
        "    kw['seqlens_k'] = torch.tensor(lens, dtype=torch.int32)\n"
        "    assert_attention_close(out, lse, q, kc, vc, kw, case.describe())\n"
        "print('ok')\n"
    )
    env = dict(os.environ, VATTN_CPU_TOKEN_ORDER_MIN_BYTES="0", **{switch: "1"})
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
