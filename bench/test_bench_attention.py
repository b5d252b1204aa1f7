"""pytest-benchmark versions of the decode and prefill microbenchmarks of bench/run.py.

One pytest-benchmark group per shape holds vattn and its anchors. Every test, benchmarked or
not (--benchmark-disable), checks vattn against the anchor on the same data. CPU shapes are
small so the disabled run stays fast in CI; bench/run.py holds the full shape list.
"""

import re

import pytest
import torch

import bench_utils as bu

F32, BF16 = torch.float32, torch.bfloat16

DECODE = {
    "cpu": [
        bu.DecodeCase("llama3-8b", 1, 2048, F32),
        bu.DecodeCase("llama3-8b", 3, 700, F32, ragged=True),
        bu.DecodeCase("smollm2", 4, 515, F32),
        bu.DecodeCase("llama3-8b", 2, 512, BF16),
    ],
    "cuda": [
        bu.DecodeCase("llama3-8b", 1, 32768, BF16),
        bu.DecodeCase("llama3-8b", 16, 8192, BF16),
        bu.DecodeCase("llama3-8b", 32, 8192, BF16, ragged=True),
        bu.DecodeCase("smollm2", 64, 4096, BF16),
    ],
}
PREFILL = {
    "cpu": [
        bu.PrefillCase("llama3-8b", [128], [0], F32),
        bu.PrefillCase("llama3-8b", [64], [300], F32),
        bu.PrefillCase("smollm2", [33, 70, 5], [0, 100, 17], F32),
    ],
    "cuda": [
        bu.PrefillCase("llama3-8b", [4096], [0], BF16),
        bu.PrefillCase("llama3-8b", [2048], [6144], BF16),
        bu.PrefillCase("llama3-8b", [1000, 3000, 370, 2500], [0, 1024, 4000, 0], BF16),
        bu.PrefillCase("smollm2", [2048] * 4, [0] * 4, BF16),
    ],
}


def _params(table):
    out = []
    for dev, cases in table.items():
        marks = [pytest.mark.gpu] if dev == "cuda" else []
        for c in cases:
            out.append(
                pytest.param(dev, c, marks=marks, id=f"{dev}-" + re.sub(r"[^A-Za-z0-9.]+", "_", c.name).strip("_"))
            )
    return out


def _pick(anchors, who):
    """The anchor named like `who` ("sdpa" matches sdpa, sdpa+mask, sdpa-flash, sdpa-loop ...)."""
    for a in anchors:
        if isinstance(a, bu.Anchor) and a.name.startswith(who):
            return a
    reasons = [a for a in anchors if isinstance(a, str)]
    return "; ".join(reasons) or f"no {who} anchor for this case"


def _skip_flex(bench, device, who):
    if who != "flex":
        return
    if device == "cpu":
        pytest.skip("FlexAttention is a GPU anchor here")
    if getattr(bench.benchmark, "disabled", False):
        pytest.skip("FlexAttention compiles per shape (slow for a correctness run); bench/run.py checks it")


def _run(bench, device, who, vfn, anchors, group):
    bench.benchmark.group = group
    vout = vfn()
    if who == "vattn":
        result = bench(vfn, device)
        ref_anchor = next((a for a in anchors if isinstance(a, bu.Anchor)), None)
        assert ref_anchor is not None, f"no anchor ran: {anchors}"
        ref = ref_anchor.to_vattn(ref_anchor.fn())
        out = result
    else:
        a = _pick(anchors, who)
        if isinstance(a, str):
            if device == "cpu":
                pytest.fail(f"CPU anchor {who} unavailable: {a}")
            pytest.skip(f"anchor {who} unavailable here: {a}")
        ref = a.to_vattn(bench(a.fn, device))
        out = vout
    assert torch.isfinite(out.float()).all()
    err = bu.max_abs_err(out, ref)
    assert err <= bu.tolerance(out.dtype), f"vattn vs anchor max abs error {err:.3g} > {bu.tolerance(out.dtype):.3g}"


@pytest.mark.parametrize("who", ["vattn", "sdpa", "flex"])
@pytest.mark.parametrize("device,case", _params(DECODE))
def test_bench_decode(bench, device, case, who):
    import vattn

    _skip_flex(bench, device, who)
    if who == "sdpa" and device == "cuda" and case.ragged:
        pytest.skip("SDPA flash takes uniform lengths only; the ragged anchor is FlexAttention")
    data = bu.make_decode(case, device)
    maxlen = max(data.lens)

    def vfn():
        return vattn.decode_attention(data.q, data.k_cache, data.v_cache, data.seqlens, max_seqlen_k=maxlen)

    anchors = bu.decode_anchors(data, device, with_flex=(who == "flex"))
    _run(bench, device, who, vfn, anchors, f"decode {device} {case.name}")


@pytest.mark.parametrize("who", ["vattn", "sdpa", "flex"])
@pytest.mark.parametrize("device,case", _params(PREFILL))
def test_bench_prefill(bench, device, case, who):
    import vattn

    _skip_flex(bench, device, who)
    if who == "sdpa" and device == "cuda" and not case.uniform:
        pytest.skip("SDPA takes uniform lengths only; the ragged anchor is FlexAttention")
    if who == "flex" and case.uniform and case.prefixes[0] == 0:
        pytest.skip("plain causal prefill is anchored by SDPA flash")
    data = bu.make_prefill(case, device)

    def vfn():
        return vattn.prefill_attention(
            data.q,
            data.k_cache,
            data.v_cache,
            data.cu_seqlens_q,
            data.seqlens_k,
            max_seqlen_q=max(case.qlens),
            max_seqlen_k=max(case.klens),
        )

    anchors = bu.prefill_anchors(data, device, with_flex=(who == "flex"))
    _run(bench, device, who, vfn, anchors, f"prefill {device} {case.name}")
