"""vattn's vLLM backend (vattn.vllm) at the layer level, against vLLM's own CPU backend.

Runs in the vLLM venv (bench/vllm_env.sh); without vLLM every test here skips except the one that
checks `import vattn.vllm` needs no vLLM. Same inputs for both backends: each writes the same K / V
into its own real KV cache tensor ([num_blocks, kv_heads, block_size, 2 * head_size], vLLM's
per-layer view) through its do_kv_cache_update at the same slot mapping (a shuffled block table),
then runs forward over one mixed batch (decode rows, fresh prompts, rows with a cached prefix: a
chunk of a chunked prefill or a prefix-cache hit). Outputs are compared with each other and with a
float64 reference.
"""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = pytest.mark.vllm


def test_plugin_imports_without_vllm():
    import vattn.vllm as plugin

    assert plugin.BACKEND_PATH == "vattn.vllm.backend.VattnAttentionBackend"
    assert plugin.vllm_version_supported("0.32.0") and not plugin.vllm_version_supported("0.31.2")


@pytest.fixture(scope="module")
def vl():
    """(vllm modules namespace, a VllmConfig factory) or skip."""
    pytest.importorskip("vllm", reason="needs vLLM (bench/vllm_env.sh builds its venv)")
    import types

    from vllm.config import CacheConfig, ModelConfig, VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.attention import Attention
    from vllm.v1.attention.backend import AttentionType, CommonAttentionMetadata
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from vattn.vllm.backend import VattnAttentionBackend, VattnAttentionImpl

    return types.SimpleNamespace(
        CacheConfig=CacheConfig,
        ModelConfig=ModelConfig,
        VllmConfig=VllmConfig,
        set_current_vllm_config=set_current_vllm_config,
        Attention=Attention,
        AttentionType=AttentionType,
        CommonAttentionMetadata=CommonAttentionMetadata,
        CPUAttentionBackend=CPUAttentionBackend,
        AttentionBackendEnum=AttentionBackendEnum,
        FullAttentionSpec=FullAttentionSpec,
        VattnAttentionBackend=VattnAttentionBackend,
        VattnAttentionImpl=VattnAttentionImpl,
    )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import LlamaConfig

    d = tmp_path_factory.mktemp("cfg")
    LlamaConfig(
        vocab_size=256,
        hidden_size=384,
        intermediate_size=512,
        num_hidden_layers=1,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=2048,
    ).save_pretrained(d)
    return str(d)


def _config(vl, model_dir, dtype, block_size, kv_cache_dtype="auto"):
    mc = vl.ModelConfig(model=model_dir, dtype=dtype, max_model_len=2048, skip_tokenizer_init=True)
    cc = vl.CacheConfig(block_size=block_size, cache_dtype=kv_cache_dtype)
    return vl.VllmConfig(model_config=mc, cache_config=cc), cc


_counter = [0]


def _layer(vl, vc, cc, backend, hq, hk, d, window, cap):
    _counter[0] += 1
    name = f"t{_counter[0]}.attn"
    with vl.set_current_vllm_config(vc):
        layer = vl.Attention(
            hq,
            d,
            d**-0.5,
            hk,
            cache_config=cc,
            prefix=name,
            attn_backend=backend,
            per_layer_sliding_window=window,
            logits_soft_cap=cap,
        )
    return layer, name


def _reference(q, k_all, v_all, rows, hq, hk, d, window, cap):
    """float64 attention of each row's new queries over its whole (causal) history."""
    out, off, qo = [], 0, 0
    for ctx, n in rows:
        s = ctx + n
        k = k_all[off : off + s].double().repeat_interleave(hq // hk, 1)
        v = v_all[off : off + s].double().repeat_interleave(hq // hk, 1)
        logits = torch.einsum("qhd,khd->hqk", q[qo : qo + n].double(), k) * d**-0.5
        if cap:
            logits = cap * torch.tanh(logits / cap)
        pos = torch.arange(s - n, s)[:, None]
        j = torch.arange(s)[None, :]
        mask = j <= pos
        if window:
            mask &= j > pos - window  # vLLM's window W: the query and the W - 1 keys before it
        logits = logits.masked_fill(~mask, float("-inf"))
        out.append(torch.einsum("hqk,khd->qhd", logits.softmax(-1), v))
        off += s
        qo += n
    return torch.cat(out)


MIXED = ((100, 1), (37, 1), (1, 1), (0, 50), (64, 20), (130, 7), (0, 1))  # decodes first, as vLLM orders them


def _problem(vl, rows, block_size, dtype, hq, hk, d, g, pad=0):
    """One mixed step over a shuffled block table: every row's K / V (history, then this step's
    tokens: mask new), their slots, the step's queries (pad extra rows) and vLLM's metadata."""
    seq = [c + n for c, n in rows]
    per_row = max(math.ceil(s / block_size) for s in seq)
    num_blocks = len(rows) * per_row + 5
    table = torch.randperm(num_blocks, generator=g)[: len(rows) * per_row].view(len(rows), per_row).to(torch.int32)
    total = sum(seq)
    k_all = torch.randn(total, hk, d, generator=g).to(dtype)
    v_all = torch.randn(total, hk, d, generator=g).to(dtype)
    slots = torch.tensor(
        [int(table[r, p // block_size]) * block_size + p % block_size for r, s in enumerate(seq) for p in range(s)]
    )
    nq = sum(n for _, n in rows)
    new = torch.zeros(total, dtype=torch.bool)  # this step's tokens; the rest is each row's history
    for (c, n), o in zip(rows, _offsets(seq)):
        new[o + c : o + c + n] = True
    q = torch.randn(nq + pad, hq, d, generator=g).to(dtype)
    qsl = torch.tensor([0] + torch.cumsum(torch.tensor([n for _, n in rows]), 0).tolist(), dtype=torch.int32)
    common = vl.CommonAttentionMetadata(
        query_start_loc=qsl,
        query_start_loc_cpu=qsl,
        seq_lens=torch.tensor(seq, dtype=torch.int32),
        num_reqs=len(rows),
        num_actual_tokens=nq,
        max_query_len=max(n for _, n in rows),
        max_seq_len=max(seq),
        block_table_tensor=table,
        slot_mapping=slots[new],
    )
    return num_blocks, k_all, v_all, slots, new, nq, q, common


def _run_both(vl, model_dir, *, dtype, block_size, rows, window=None, cap=None, hnc_view=False, pad=0, seed=0):
    hq, hk, d = 6, 2, 64
    vc, cc = _config(vl, model_dir, dtype, block_size)
    g = torch.Generator().manual_seed(seed)
    num_blocks, k_all, v_all, slots, new, nq, q, common = _problem(vl, rows, block_size, dtype, hq, hk, d, g, pad)
    results = {}
    for name, backend in (("vattn", vl.VattnAttentionBackend), ("cpu", vl.CPUAttentionBackend)):
        layer, lname = _layer(vl, vc, cc, backend, hq, hk, d, window, cap)
        spec = vl.FullAttentionSpec(block_size=block_size, num_kv_heads=hk, head_size=d, dtype=dtype)
        if name == "vattn" and hnc_view:  # vLLM's LBNHC layout: the same logical view, tokens outside heads
            kv = torch.zeros(num_blocks, block_size, hk, 2 * d, dtype=dtype).transpose(1, 2)
        else:
            kv = torch.zeros(num_blocks, hk, block_size, 2 * d, dtype=dtype)
        with vl.set_current_vllm_config(vc):
            builder = backend.get_builder_cls()(spec, [lname], vc, torch.device("cpu"))
            md = builder.build(0, common)
            # the history (all rows' earlier tokens), then this step's tokens (with padding slots -1)
            layer.impl.do_kv_cache_update(layer, k_all[~new], v_all[~new], kv, slots[~new])
            k_new = torch.cat([k_all[new], torch.randn(pad, hk, d, generator=g).to(dtype)])
            v_new = torch.cat([v_all[new], torch.randn(pad, hk, d, generator=g).to(dtype)])
            step_slots = torch.cat([slots[new], torch.full((pad,), -1, dtype=slots.dtype)])
            layer.impl.do_kv_cache_update(layer, k_new, v_new, kv, step_slots)
            out = torch.full((nq + pad, hq, d), float("nan"), dtype=dtype)
            layer.impl.forward(layer, q, k_new, v_new, kv, md, out)
        assert torch.isnan(out[nq:]).all(), f"{name} wrote past num_actual_tokens"
        results[name] = out[:nq].float()
    ref = _reference(q[:nq], k_all, v_all, rows, hq, hk, d, window, cap).float()
    return results["vattn"], results["cpu"], ref


def _offsets(seq):
    out, o = [], 0
    for s in seq:
        out.append(o)
        o += s
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("block_size", [32, 128])
@pytest.mark.parametrize("window,cap", [(None, None), (40, None), (None, 30.0), (17, 20.0)])
def test_forward_matches_cpu_backend(vl, model_dir, dtype, block_size, window, cap):
    ours, theirs, ref = _run_both(vl, model_dir, dtype=dtype, block_size=block_size, rows=MIXED, window=window, cap=cap)
    assert torch.isfinite(ours).all()
    err_ours, err_theirs = (ours - ref).abs().max().item(), (theirs - ref).abs().max().item()
    eps = {torch.float32: 2e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    assert err_ours <= 2 * err_theirs + eps, (err_ours, err_theirs)
    torch.testing.assert_close(ours, theirs, atol=2 * eps, rtol=0)


def test_lbnhc_layout_and_padding(vl, model_dir):
    """The other layout vattn declares (a strided view of the same logical cache) and padded tokens
    (slot -1, rows past num_actual_tokens) that must be neither written nor computed."""
    ours, theirs, ref = _run_both(vl, model_dir, dtype=torch.float32, block_size=32, rows=MIXED, hnc_view=True, pad=3)
    torch.testing.assert_close(ours, ref, atol=2e-6, rtol=0)
    torch.testing.assert_close(ours, theirs, atol=4e-6, rtol=0)


def test_unordered_batch(vl, model_dir):
    """A batch vLLM did not reorder (a prompt before the decodes) still runs right (all as prefill)."""
    rows = ((0, 9), (50, 1), (20, 4), (33, 1))
    ours, theirs, ref = _run_both(vl, model_dir, dtype=torch.float32, block_size=32, rows=rows)
    torch.testing.assert_close(ours, ref, atol=2e-6, rtol=0)


def _cells(kv, pk, fmt_name, head_size):
    """Dequantized K and V of every (block, slot, head) cell of a packed cache [nb, hk, bs, C]."""
    from vattn import reference

    kv8 = kv.view(torch.uint8).transpose(1, 2)
    f = pk.k_format
    k = kv8[..., : pk.k_bytes].contiguous().view(f.storage_dtype)
    v = kv8[..., pk.k_bytes : pk.k_bytes + pk.v_bytes].contiguous().view(f.storage_dtype)
    w = 4 * f.scale_words
    ks = kv8[..., pk.k_scale_offset : pk.k_scale_offset + w].contiguous().view(torch.float32)
    vs = kv8[..., pk.v_scale_offset : pk.v_scale_offset + w].contiguous().view(torch.float32)
    return reference.dequantize(k, ks, fmt_name, head_size), reference.dequantize(v, vs, fmt_name, head_size)


@pytest.mark.parametrize("kv_cache_dtype", ["int8_per_token_head", "fp8_per_token_head", "int4_per_token_head"])
@pytest.mark.parametrize("dtype,block_size,hnc_view", [(torch.float32, 32, False), (torch.bfloat16, 16, True)], ids=str)
def test_quantized_kv_cache_dtype(vl, model_dir, kv_cache_dtype, dtype, block_size, hnc_view):
    """vLLM's per-token-head kv_cache_dtype values through vattn's formats: customize_spec sizes the
    page for vattn's packed cell, do_kv_cache_update quantizes into it (the cells hold the reference
    quantization of each token at its slot, nothing else is written), and forward equals attention
    over the dequantized cache (and stays near the float attention by the format's error)."""
    from vllm.utils.torch_utils import STR_DTYPE_TO_TORCH_DTYPE
    from vllm.v1.kv_cache_interface import get_kv_quant_mode

    from vattn import reference
    from vattn.vllm.backend import QUANTIZED_KV_DTYPES, packing

    fmt_name = QUANTIZED_KV_DTYPES[kv_cache_dtype]
    hq, hk, d = 6, 2, 64
    rows = MIXED
    vc, cc = _config(vl, model_dir, dtype, block_size, kv_cache_dtype)
    storage = STR_DTYPE_TO_TORCH_DTYPE[kv_cache_dtype]
    spec = vl.FullAttentionSpec(
        block_size=block_size,
        num_kv_heads=hk,
        head_size=d,
        dtype=storage,
        kv_quant_mode=get_kv_quant_mode(kv_cache_dtype),
    )
    spec = vl.VattnAttentionBackend.customize_spec(spec)
    pk = packing(kv_cache_dtype, d)
    assert spec.state_content_bytes == pk.content_bytes and pk.content_bytes % 16 == 0
    assert pk.content_bytes >= 2 * (pk.k_format.data_bytes(d) + 4 * pk.k_format.scale_words)
    assert spec.page_size_bytes == hk * block_size * pk.content_bytes

    g = torch.Generator().manual_seed(3)
    num_blocks, k_all, v_all, slots, new, nq, q, common = _problem(vl, rows, block_size, dtype, hq, hk, d, g)
    layer, lname = _layer(vl, vc, cc, vl.VattnAttentionBackend, hq, hk, d, None, None)
    shape = (num_blocks, hk, block_size, pk.content_bytes)
    if hnc_view:  # LBNHC: tokens outside heads
        kv = torch.zeros(num_blocks, block_size, hk, pk.content_bytes, dtype=storage).transpose(1, 2)
    else:
        kv = torch.zeros(shape, dtype=storage)
    with vl.set_current_vllm_config(vc):
        builder = vl.VattnAttentionBackend.get_builder_cls()(spec, [lname], vc, torch.device("cpu"))
        md = builder.build(0, common)
        layer.impl.do_kv_cache_update(layer, k_all[~new], v_all[~new], kv, slots[~new])
        layer.impl.do_kv_cache_update(layer, k_all[new], v_all[new], kv, slots[new])
        out = torch.full((nq, hq, d), float("nan"), dtype=dtype)
        layer.impl.forward(layer, q, k_all[new], v_all[new], kv, md, out)

    # The cells: each token's reference quantization at its slot; every other cell untouched (zero).
    written = torch.zeros(num_blocks * block_size, dtype=torch.bool)
    written[slots] = True
    flat = kv.transpose(1, 2).reshape(num_blocks * block_size, hk, pk.content_bytes)
    assert (flat[~written].view(torch.uint8) == 0).all()
    kd, vd = _cells(kv, pk, fmt_name, d)
    kd, vd = kd.reshape(-1, hk, d)[slots], vd.reshape(-1, hk, d)[slots]
    for got, x in ((kd, k_all), (vd, v_all)):
        codes, scales = reference.quantize(x.float(), fmt_name)
        want = reference.dequantize(codes, scales, fmt_name, d)
        step = scales[..., :1]  # one code step (fp8: the scale bounds the error of a rounding too)
        assert ((got - want).abs() <= step * 1.01 + 1e-6).all(), (got - want).abs().max()
    # forward = attention over the cache's own dequantized K / V, and near the float attention
    ours = out.float()
    assert torch.isfinite(ours).all()
    exact = _reference(q, kd, vd, rows, hq, hk, d, None, None).float()
    eps = {torch.float32: 1e-5, torch.bfloat16: 1.5e-2}[dtype]
    torch.testing.assert_close(ours, exact, atol=eps, rtol=0)
    floating = _reference(q, k_all, v_all, rows, hq, hk, d, None, None).float()
    bound = {"int8": 0.03, "fp8_e4m3": 0.12, "int4": 0.5}[fmt_name]
    assert (ours - floating).abs().max().item() < bound


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(alibi_slopes=[0.5] * 6), "ALiBi"),
        (dict(sinks=torch.zeros(6)), "sinks"),
        (dict(attn_type="encoder_only"), "attention type"),
        (dict(attn_type="encoder_decoder"), "attention type"),
        (dict(kv_cache_dtype="fp8"), "kv_cache_dtype 'fp8'"),
        (dict(kv_cache_dtype="fp8_e5m2"), "fp8_per_token_head"),
        (dict(kv_cache_dtype="turboquant_k8v4"), "kv_cache_dtype 'turboquant_k8v4'"),
        (dict(kv_cache_dtype="bfloat16"), "the model's"),
        (dict(kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128, qk_rope_head_dim=64, kv_b_proj=None), "MLA"),
        (dict(chunk_lookback=4), "layer options"),
    ],
)
def test_rejected_at_construction(vl, model_dir, kwargs, match):
    vc, _ = _config(vl, model_dir, torch.float16, 32)
    args = dict(num_heads=6, head_size=64, scale=0.125, num_kv_heads=2, alibi_slopes=None, sliding_window=None)
    args.update(kwargs)
    args.setdefault("kv_cache_dtype", "auto")
    with vl.set_current_vllm_config(vc), pytest.raises(ValueError, match=match):
        vl.VattnAttentionImpl(**args)


def test_backend_declarations(vl):
    b = vl.VattnAttentionBackend
    assert b.get_name() in vl.AttentionBackendEnum.__members__
    assert b.supports_attn_type(vl.AttentionType.DECODER) and not b.supports_attn_type(vl.AttentionType.ENCODER_ONLY)
    assert b.supports_sliding_window() and not b.supports_sink() and not b.is_mla()
    assert b.supports_block_size(16) and b.supports_block_size(128) and not b.supports_block_size(24)
    assert b.supports_head_size(64) and b.supports_head_size(128)
    assert not b.supports_kv_cache_dtype("fp8") and b.supports_kv_cache_dtype("auto")
    for name in ("int8_per_token_head", "fp8_per_token_head", "int4_per_token_head"):
        assert b.supports_kv_cache_dtype(name)
    assert b.forward_includes_kv_cache_update is False


@pytest.fixture
def clean_registry(vl, monkeypatch):
    import vattn.vllm as plugin

    monkeypatch.setattr(plugin, "took_cpu_slot", False)
    yield plugin
    for member in (vl.AttentionBackendEnum.CUSTOM, vl.AttentionBackendEnum.CPU_ATTN):
        member.clear_override()


def test_register_custom_only_by_default(vl, clean_registry, monkeypatch):
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.attention.selector import AttentionSelectorConfig

    monkeypatch.delenv("VATTN_VLLM_CPU", raising=False)
    clean_registry.register()
    assert vl.AttentionBackendEnum.CUSTOM.get_path() == clean_registry.BACKEND_PATH
    assert not vl.AttentionBackendEnum.CPU_ATTN.is_overridden()
    cfg = AttentionSelectorConfig(head_size=64, dtype=torch.float32, kv_cache_dtype="auto", block_size=None)
    # vLLM's CPU platform ignores the CUSTOM choice: without the flag it stays on its own backend
    path = CpuPlatform.get_attn_backend_cls(vl.AttentionBackendEnum.CUSTOM, cfg)
    assert path == "vllm.v1.attention.backends.cpu_attn.CPUAttentionBackend"
    assert not clean_registry.took_cpu_slot


def test_register_takes_cpu_slot_with_flag(vl, clean_registry, monkeypatch):
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.attention.selector import AttentionSelectorConfig

    monkeypatch.setenv("VATTN_VLLM_CPU", "1")
    clean_registry.register()
    clean_registry.register()  # vLLM may load plugins more than once
    cfg = AttentionSelectorConfig(head_size=64, dtype=torch.float32, kv_cache_dtype="auto", block_size=None)
    assert CpuPlatform.get_attn_backend_cls(None, cfg) == clean_registry.BACKEND_PATH
    assert clean_registry.took_cpu_slot


def test_register_rejects_bad_flag(vl, clean_registry, monkeypatch):
    monkeypatch.setenv("VATTN_VLLM_CPU", "yes")
    with pytest.raises(ValueError, match="VATTN_VLLM_CPU"):
        clean_registry.register()
