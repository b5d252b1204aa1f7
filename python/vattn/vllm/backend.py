"""The vattn attention backend for vLLM 0.32 (vllm/v1/attention/backend.py's contract).

The KV cache is vLLM's: one int8 allocation that vLLM views per layer as [num_blocks, kv_heads,
block_size, 2 * head_size] ([B, H, N, C], strides from the resolved layout: LBHNC or LBNHC),
addressed through the block table. vattn reads C as (K | V) of one token and one head, so each
layer's K and V are strided views [num_blocks, block_size, kv_heads, head_size] with the last
dimension contiguous, the paged KV view vattn's ops take directly (block_table=...): nothing is
copied or gathered.

Per step the builder splits the batch, which vLLM reorders so that rows with one new token come
first (reorder_batch_threshold = 1): those rows run vattn.decode_attention (split-KV decode), the
rest (prompts, chunks of a chunked prefill, prefix-cache hits: rows whose cache already holds a
prefix) vattn.prefill_attention (causal, each row's queries at the end of its kv length).
do_kv_cache_update writes the step's K / V at vLLM's slot_mapping with vattn.append_kv_raw.

Quantized KV (vLLM's per-token-head kv_cache_dtype values, each one of vattn's formats, quantized
by vattn's append and dequantized inside vattn's attention kernels): "int8_per_token_head" = vattn
"int8" (symmetric, one fp32 scale per (token, kv_head): amax / 127), "fp8_per_token_head" = vattn
"fp8_e4m3" (one fp32 scale per (token, kv_head): amax / 448), "int4_per_token_head" = vattn "int4"
(two codes per byte, fp32 scale and zero per (token, kv_head); no Hadamard rotation, so its numbers
differ from vLLM's own int4_per_token_head). customize_spec sizes vLLM's page for vattn's packing of
one (token, kv_head) cell: [K data | V data | K scale words | V scale words], padded to 16 bytes so
every cell starts 16-byte aligned for the CUDA kernels' vector loads.

Supported: decoder self-attention, q / KV dtypes float16 / bfloat16 / float32 (KV in the model's
dtype: kv_cache_dtype "auto" or the same dtype spelled out, or one of the quantized values above),
any head size vattn's kernels take on
the device, block sizes that are multiples of 16, sliding window, logit soft-cap, chunked prefill,
prefix caching, preemption (recompute), tensor parallelism (each rank sees its own heads), KV
sharing across layers. Rejected when vLLM constructs the layer (ValueError): ALiBi, attention
sinks, encoder / encoder-only / cross attention, MLA, per-tensor fp8 ("fp8", "fp8_e4m3",
"fp8_e5m2": scales from the checkpoint, which vattn's formats do not use) and the other quantized
kv_cache_dtype values, a KV dtype other than the model's, fused output quantization.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

import vattn
from vattn import _support, formats
from vllm.config import VllmConfig, get_current_vllm_config_or_none
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionImpl,
    AttentionLayer,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.kv_cache_interface import AttentionSpec, KVCacheLayout, get_kv_quant_mode

logger = logging.getLogger("vllm.vattn")  # under "vllm" so that vLLM's log handler prints it

_KV_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
# vLLM's per-token-head kv_cache_dtype values and the vattn format that stores each (K and V alike).
QUANTIZED_KV_DTYPES = {"int8_per_token_head": "int8", "fp8_per_token_head": "fp8_e4m3", "int4_per_token_head": "int4"}
_PER_TENSOR_FP8 = ("fp8", "fp8_e4m3", "fp8_e5m2")


@dataclass(frozen=True)
class Packing:
    """vattn's packing of one (token, kv_head) cell of vLLM's page for a quantized kv_cache_dtype:
    K data at byte 0, V data at k_bytes, then the K and V fp32 scale words, the cell padded to 16
    bytes (content_bytes, vLLM's state_content_bytes)."""

    k_format: formats.KVFormat
    v_format: formats.KVFormat
    k_bytes: int
    v_bytes: int
    k_scale_offset: int
    v_scale_offset: int
    content_bytes: int


def packing(kv_cache_dtype: str, head_size: int, head_size_v: Optional[int] = None) -> Optional[Packing]:
    """The cell packing of a quantized kv_cache_dtype (None for a float KV cache)."""
    name = QUANTIZED_KV_DTYPES.get(kv_cache_dtype)
    if name is None:
        return None
    fmt = formats.get(name)
    hv = head_size if head_size_v is None else head_size_v
    kb, vb = fmt.data_bytes(head_size), fmt.data_bytes(hv)
    ks = kb + vb
    vs = ks + 4 * fmt.scale_words
    end = vs + 4 * fmt.scale_words
    return Packing(fmt, fmt, kb, vb, ks, vs, (end + 15) // 16 * 16)


def _kv_cache_dtype_of(mode) -> Optional[str]:
    """The kv_cache_dtype string of a per-token-head KVQuantMode."""
    for name in QUANTIZED_KV_DTYPES:
        if get_kv_quant_mode(name) == mode:
            return name
    return None


_HEAD_SIZES = (32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256)
_BLOCK_MULTIPLE = 16
_announced = False  # the start-up line, once per process


def _device_type() -> str:
    try:
        from vllm.platforms import current_platform

        return "cuda" if current_platform.is_cuda_alike() else "cpu"
    except Exception:  # pragma: no cover - platform detection failing is vLLM's problem
        return "cpu"


class VattnAttentionBackend(AttentionBackend):
    """vattn's kernels over vLLM's paged KV cache."""

    forward_includes_kv_cache_update: bool = False  # vLLM calls do_kv_cache_update first
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto", "float16", "bfloat16", *QUANTIZED_KV_DTYPES]

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        """A quantized kv_cache_dtype's page holds vattn's packed cells (see Packing)."""
        name = _kv_cache_dtype_of(spec.kv_quant_mode)
        if name is None or spec.state_content_bytes is not None:
            return spec
        pk = packing(name, spec.head_size, spec.head_size_v)
        return dataclasses.replace(spec, state_content_bytes=pk.content_bytes)

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"  # an AttentionBackendEnum member (the layer looks its name up there)

    @staticmethod
    def get_impl_cls() -> type["VattnAttentionImpl"]:
        return VattnAttentionImpl

    @staticmethod
    def get_builder_cls() -> type["VattnMetadataBuilder"]:
        return VattnMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list:
        return [MultipleOf(_BLOCK_MULTIPLE)]

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        dev = _device_type()
        return [h for h in _HEAD_SIZES if all(_support.supported(op, dev, torch.float16, h) for op in _OPS)]

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        # Any layout whose content dim is innermost works (the views are strided); LBHNC keeps a
        # head's tokens of one block together, the better order for a kernel that walks one head.
        return (KVCacheLayout.LBHNC, KVCacheLayout.LBNHC)

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return True

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER


_OPS = ("append_kv", "decode", "prefill")


@dataclass
class VattnMetadata:
    """One step's attention metadata (shared by the layers of a KV cache group).

    Rows [0, num_decodes) have one query each (tokens [0, num_decodes)); rows [num_decodes,
    num_reqs) are prefill rows, their tokens [num_decodes, num_actual_tokens)."""

    num_actual_tokens: int
    num_reqs: int
    num_decodes: int
    max_query_len: int
    max_seq_len: int
    seq_lens: torch.Tensor  # int32 [num_reqs]: kv length of each row, this step's tokens included
    block_table: torch.Tensor  # int32 [num_reqs, max blocks]
    slot_mapping: torch.Tensor
    # the decode part
    decode_seq_lens: Optional[torch.Tensor]
    decode_block_table: Optional[torch.Tensor]
    # the prefill part (queries renumbered from 0)
    prefill_cu_seqlens_q: Optional[torch.Tensor]
    prefill_seq_lens: Optional[torch.Tensor]
    prefill_block_table: Optional[torch.Tensor]
    prefill_max_query_len: int = 0
    prefill_end: int = 0  # one past the last query token of the prefill part


class VattnMetadataBuilder(AttentionMetadataBuilder[VattnMetadata]):
    def __init__(self, kv_cache_spec: AttentionSpec, layer_names: list[str], vllm_config: VllmConfig, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        # Rows with <= 1 new token first: those are the decode part.
        self._init_reorder_batch_threshold(1, supports_spec_as_decode=False)
        self.block_size = kv_cache_spec.block_size
        _announce(kv_cache_spec, vllm_config, device)

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> VattnMetadata:
        m = common_attn_metadata
        if isinstance(m.causal, torch.Tensor) or not m.causal:
            raise ValueError("vattn's vLLM backend runs causal decoder attention only")
        num_reqs = m.num_reqs
        qsl = m.query_start_loc_cpu[: num_reqs + 1]
        query_lens = (qsl[1:] - qsl[:-1]).tolist()
        num_decodes = 0
        while num_decodes < num_reqs and query_lens[num_decodes] == 1:
            num_decodes += 1
        seq_lens = _i32(m.seq_lens[:num_reqs])
        block_table = _i32(m.block_table_tensor[:num_reqs])
        md = VattnMetadata(
            num_actual_tokens=m.num_actual_tokens,
            num_reqs=num_reqs,
            num_decodes=num_decodes,
            max_query_len=m.max_query_len,
            max_seq_len=m.max_seq_len,
            seq_lens=seq_lens,
            block_table=block_table,
            slot_mapping=m.slot_mapping,
            decode_seq_lens=seq_lens[:num_decodes] if num_decodes else None,
            decode_block_table=block_table[:num_decodes] if num_decodes else None,
            prefill_cu_seqlens_q=None,
            prefill_seq_lens=None,
            prefill_block_table=None,
        )
        if num_decodes < num_reqs:
            qsl_dev = _i32(m.query_start_loc[num_decodes : num_reqs + 1])
            md.prefill_cu_seqlens_q = (qsl_dev - qsl_dev[:1]).contiguous()
            md.prefill_seq_lens = seq_lens[num_decodes:]
            md.prefill_block_table = block_table[num_decodes:]
            md.prefill_max_query_len = max(query_lens[num_decodes:])
            md.prefill_end = int(qsl[num_reqs])
        return md


def _i32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.int32 else t.to(torch.int32)


def _announce(kv_cache_spec: AttentionSpec, vllm_config: VllmConfig, device) -> None:
    """The one start-up line of this process."""
    global _announced
    if _announced:
        return
    _announced = True
    from vattn import vllm as plugin

    slot = "in vLLM's CPU_ATTN slot (VATTN_VLLM_CPU=1)" if plugin.took_cpu_slot else "as CUSTOM"
    layout = getattr(vllm_config.cache_config, "kv_cache_layout", None) or "unresolved"
    cache_dtype = getattr(vllm_config.cache_config, "cache_dtype", "auto")
    kv = str(kv_cache_spec.dtype).replace("torch.", "")
    if cache_dtype in QUANTIZED_KV_DTYPES:
        kv = f"{cache_dtype} as vattn {QUANTIZED_KV_DTYPES[cache_dtype]}"
    kernels = "CUDA" if torch.device(device).type == "cuda" else "CPU"
    logger.info(
        "vattn attention backend: paged (vattn %s %s kernels on vLLM's block tables, %s; block_size %d, "
        "KV layout %s, KV dtype %s)",
        vattn.__version__,
        kernels,
        slot,
        kv_cache_spec.block_size,
        layout,
        kv,
    )


class VattnAttentionImpl(AttentionImpl[VattnMetadata]):
    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: Optional[int] = None,
        alibi_slopes: Optional[list] = None,
        sliding_window: Optional[int] = None,
        kv_cache_dtype: str = "auto",
        logits_soft_cap: Optional[float] = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: Optional[str] = None,
        sinks: Optional[torch.Tensor] = None,
        **extra,
    ) -> None:
        def reject(what: str) -> None:
            raise ValueError(f"vattn's vLLM attention backend does not support {what}")

        if extra:
            mla_keys = {"q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "kv_b_proj"}
            if mla_keys & set(extra):
                reject("MLA (multi-head latent attention)")
            reject(f"the layer options {sorted(extra)}")
        if alibi_slopes is not None:
            reject("ALiBi (alibi_slopes)")
        if sinks is not None:
            reject("attention sinks")
        if attn_type != AttentionType.DECODER:
            reject(f"attention type {attn_type!r} (decoder self-attention only; no encoder / cross attention)")
        if kv_cache_dtype in _PER_TENSOR_FP8:
            reject(
                f"kv_cache_dtype {kv_cache_dtype!r} (per-tensor fp8 scales); use 'fp8_per_token_head' "
                "(vattn's fp8_e4m3, scales computed per token and kv head)"
            )
        if kv_cache_dtype not in VattnAttentionBackend.supported_kv_cache_dtypes:
            reject(
                f"kv_cache_dtype {kv_cache_dtype!r} (supported: "
                f"{VattnAttentionBackend.supported_kv_cache_dtypes}: the model's dtype, or one of vattn's "
                "quantized formats)"
            )
        config = get_current_vllm_config_or_none()
        model_dtype = config.model_config.dtype if config is not None and config.model_config is not None else None
        if kv_cache_dtype in _KV_DTYPES and model_dtype is not None and _KV_DTYPES[kv_cache_dtype] != model_dtype:
            reject(f"kv_cache_dtype {kv_cache_dtype!r} with a {model_dtype} model (the KV dtype must be the model's)")
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads % num_kv_heads:
            reject(f"{num_heads} query heads over {num_kv_heads} kv heads")
        dev = _device_type()
        for op in _OPS:
            if not _support.supported(op, dev, model_dtype or torch.float16, head_size):
                reject(f"head_size {head_size} with dtype {model_dtype} on {dev} ({op})")
        if sliding_window is not None and sliding_window <= 0:
            reject(f"sliding_window {sliding_window}")

        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads
        self.kv_cache_dtype = kv_cache_dtype
        try:  # a head size the format cannot pack (int4: odd) raises here
            self.packing = packing(kv_cache_dtype, head_size)
        except ValueError as e:
            reject(f"kv_cache_dtype {kv_cache_dtype!r} with head_size {head_size} ({e})")
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        self.attn_type = attn_type
        # vLLM's sliding_window W: a query attends to its own token and the W - 1 before it
        # (FlashAttention's window (W - 1, 0)); vattn's window_left counts the keys left of the query.
        self.sliding_window = sliding_window
        self.window_left = -1 if sliding_window is None else int(sliding_window) - 1
        self.softcap = float(logits_soft_cap) if logits_soft_cap else 0.0
        self._cache = None  # (vLLM's kv_cache tensor, (K view, V view, slot block table))
        self._zeros: Optional[torch.Tensor] = None

    @staticmethod
    def split_kv_cache(kv_cache: torch.Tensor, head_size: int, pk: Optional[Packing] = None):
        """vLLM's per-layer [num_blocks, kv_heads, block_size, C] view as vattn's paged views
        (no copy): K and V [num_blocks, block_size, kv_heads, head_size] (C = 2 * head_size) and no
        scales; for a quantized kv_cache_dtype (C = pk.content_bytes) K and V data in their vattn
        storage dtype and the fp32 scales [num_blocks, block_size, kv_heads, scale words]."""
        width = 2 * head_size if pk is None else pk.content_bytes
        if kv_cache.dim() != 4 or kv_cache.shape[-1] != width or (pk is not None and kv_cache.element_size() != 1):
            raise ValueError(
                f"expected vLLM's KV cache view [num_blocks, kv_heads, block_size, {width}]"
                f"{' of 1-byte elements' if pk is not None else ''}, got shape {list(kv_cache.shape)} "
                f"dtype {kv_cache.dtype}"
            )
        if pk is None:
            kv = kv_cache.transpose(1, 2)
            return kv[..., :head_size], kv[..., head_size:], None, None
        kv = kv_cache.view(torch.uint8).transpose(1, 2)
        k = kv[..., : pk.k_bytes].view(pk.k_format.storage_dtype)
        v = kv[..., pk.k_bytes : pk.k_bytes + pk.v_bytes].view(pk.v_format.storage_dtype)
        ks = kv[..., pk.k_scale_offset : pk.k_scale_offset + 4 * pk.k_format.scale_words].view(torch.float32)
        vs = kv[..., pk.v_scale_offset : pk.v_scale_offset + 4 * pk.v_format.scale_words].view(torch.float32)
        return k, v, ks, vs

    def _views(self, kv_cache: torch.Tensor):
        """split_kv_cache, kept for the layer's cache tensor (vLLM hands the same one every step),
        with the [1, num_blocks] arange block table that makes a flat slot id a position."""
        c = self._cache
        if c is not None and c[0] is kv_cache:
            return c[1]
        k_cache, v_cache, k_scale, v_scale = self.split_kv_cache(kv_cache, self.head_size, self.packing)
        table = torch.arange(k_cache.shape[0], dtype=torch.int32, device=kv_cache.device)[None, :]
        self._cache = (kv_cache, (k_cache, v_cache, k_scale, v_scale, table))
        return self._cache[1]

    def _zero_rows(self, n: int, device) -> torch.Tensor:
        z = self._zeros
        if z is None or z.shape[0] < n or z.device != device:
            z = self._zeros = torch.zeros(max(n, 256), dtype=torch.int32, device=device)
        return z[:n]

    def do_kv_cache_update(
        self,
        layer: torch.nn.Module,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        if kv_cache.numel() == 0 or slot_mapping is None or slot_mapping.numel() == 0:
            return
        k_cache, v_cache, k_scale, v_scale, table = self._views(kv_cache)
        n = slot_mapping.shape[0]
        key, value, slots = key[:n], value[:n], slot_mapping
        if int(slots.min()) < 0:  # padding tokens (slot -1) are not written
            keep = slots >= 0
            key, value, slots = key[keep], value[keep], slots[keep]
            if slots.numel() == 0:
                return
        rows = self._zero_rows(slots.shape[0], slots.device)
        vattn.append_kv_raw(
            k_cache, v_cache, key, value, rows, slots, k_scale=k_scale, v_scale=v_scale, block_table=table
        )

    def forward(
        self,
        layer: AttentionLayer,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: Optional[VattnMetadata],
        output: torch.Tensor,
        output_scale: Optional[torch.Tensor] = None,
        output_block_scale: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("vattn's vLLM backend does not fuse output quantization")
        if attn_metadata is None:  # profiling / warm-up run
            return output
        md = attn_metadata
        k_cache, v_cache, k_scale, v_scale, _ = self._views(kv_cache)
        nd = md.num_decodes
        common = dict(
            scale=self.scale, window_left=self.window_left, softcap=self.softcap, k_scale=k_scale, v_scale=v_scale
        )
        if nd:
            out = vattn.decode_attention(
                query[:nd],
                k_cache,
                v_cache,
                md.decode_seq_lens,
                block_table=md.decode_block_table,
                max_seqlen_k=md.max_seq_len,
                **common,
            )
            output[:nd].copy_(out)
        if nd < md.num_reqs:
            end = md.prefill_end
            out = vattn.prefill_attention(
                query[nd:end],
                k_cache,
                v_cache,
                md.prefill_cu_seqlens_q,
                md.prefill_seq_lens,
                block_table=md.prefill_block_table,
                max_seqlen_q=md.prefill_max_query_len,
                max_seqlen_k=md.max_seq_len,
                **common,
            )
            output[nd:end].copy_(out)
        return output
