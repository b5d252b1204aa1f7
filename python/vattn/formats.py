"""The registry of KV storage formats: the one place that says what a format is.

A KV storage format is how one (token, kv_head) vector of K or V is stored in the cache: the
element type of the data, how many head_dim elements one stored element holds, and the fp32 scale
words kept beside it. The query / output dtype is a separate thing: a cache may store bfloat16
today and int4 tomorrow while q and out stay bfloat16.

The codes are shared with cuda/include/vattn/kv_format.h (KvFormatCode) and never renumbered; the
plain codes equal the dtype codes, so kv_format="auto" (store the q dtype) is the same number.
Everything else derives from this table: the dtype codes of the ops (_dtypes.py), the byte
geometry of a cache (bytes per token, given to the memory manager), CuPy's dtype strings and the
support table of the ops (_support.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Union

import torch

__all__ = [
    "KVFormat",
    "FORMATS",
    "PLAIN",
    "QUANTIZED_BY_STORAGE",
    "get",
    "plain_for",
    "resolve",
    "of_tensor",
    "token_bytes",
]


@dataclass(frozen=True)
class KVFormat:
    name: str  # registry key, the spelling users pass as kv_format
    code: int  # KvFormatCode (kv_format.h)
    storage_dtype: torch.dtype  # element type of the data tensor (the cache's K / V views)
    elems_per_storage: int  # head_dim elements in one stored element (2 for packed int4)
    bits: int  # bits of data per head_dim element
    scale_words: int  # fp32 words stored per (token, kv_head) beside the data
    scale_layout: str  # "none", or what the scale words are (granularity of the scales)
    cupy_typestr: str  # __cuda_array_interface__ type string of the data

    @property
    def quantized(self) -> bool:
        return self.scale_words > 0

    def storage_elems(self, head_dim: int) -> int:
        """Stored elements of one (token, kv_head) vector (the data views' last dimension)."""
        if head_dim % self.elems_per_storage:
            raise ValueError(f"kv_format {self.name!r} needs head_dim a multiple of {self.elems_per_storage}")
        return head_dim // self.elems_per_storage

    def data_bytes(self, head_dim: int) -> int:
        return self.storage_elems(head_dim) * _itemsize(self.storage_dtype)

    def scale_bytes(self) -> int:
        return 4 * self.scale_words

    def vector_bytes(self, head_dim: int) -> int:
        """Bytes of one (token, kv_head) vector: data and scales."""
        return self.data_bytes(head_dim) + self.scale_bytes()

    # A record is one token's K (or V) of one layer, all kv heads: the heads' data one after the
    # other, then (quantized formats) their scale words, padded to 16 bytes so every record, and
    # with it every head's data, stays 16-byte aligned for the kernels' vector loads. A plain
    # record is exactly the data (no padding), as a [heads, head_dim] tensor of its dtype.
    def record_bytes(self, num_kv_heads: int, head_dim: int) -> int:
        raw = num_kv_heads * self.vector_bytes(head_dim)
        return raw if not self.quantized else (raw + 15) // 16 * 16

    def scale_offset(self, num_kv_heads: int, head_dim: int) -> int:
        """Byte offset of the scale words inside a record."""
        return num_kv_heads * self.data_bytes(head_dim)

    def bits_per_element(self, head_dim: int) -> float:
        """Effective bits per head_dim element, scales included."""
        return 8.0 * self.vector_bytes(head_dim) / head_dim


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


_TABLE = (
    KVFormat("float32", 0, torch.float32, 1, 32, 0, "none", "<f4"),
    KVFormat("float16", 1, torch.float16, 1, 16, 0, "none", "<f2"),
    # CuPy has no bfloat16: its views expose the bit patterns as uint16.
    KVFormat("bfloat16", 2, torch.bfloat16, 1, 16, 0, "none", "<u2"),
    # Quantized on append, dequantized inside the attention kernels (definitions: reference.py).
    KVFormat("fp8_e4m3", 3, torch.float8_e4m3fn, 1, 8, 1, "one fp32 scale per (token, kv_head): amax / 448", "|u1"),
    KVFormat("int8", 4, torch.int8, 1, 8, 1, "one fp32 scale per (token, kv_head): amax / 127 (symmetric)", "|i1"),
    KVFormat(
        "int4",
        5,
        torch.uint8,
        2,
        4,
        2,
        "two codes per byte; fp32 (scale, zero) per (token, kv_head): (max - min) / 15, min",
        "|u1",
    ),
    # Keys per channel (KIVI): what a KVCache stores for K when kv_format says "int4" (values stay
    # per token). Its 4 words per token hold the parameters of the token's group (reference.py).
    KVFormat(
        "int4_ch",
        6,
        torch.uint8,
        2,
        4,
        4,
        "two codes per byte; fp32 (scale, zero) per (kv_head, channel) over groups of head_dim / 2 tokens",
        "|u1",
    ),
)

FORMATS: Dict[str, KVFormat] = {f.name: f for f in _TABLE}
BY_CODE: Dict[int, KVFormat] = {f.code: f for f in _TABLE}
# The plain (unquantized) format of each q / out dtype.
PLAIN: Dict[torch.dtype, KVFormat] = {f.storage_dtype: f for f in _TABLE if not f.quantized}
# The quantized format a user's cache tensor of this dtype (with a scale tensor) holds: uint8 is int4
# with 2 scale words per (token, head), int4_ch with 4 (by_storage picks by the scale tensor).
QUANTIZED_BY_STORAGE: Dict[torch.dtype, KVFormat] = {
    f.storage_dtype: f for f in _TABLE if f.quantized and f.name != "int4_ch"
}


def by_storage(dtype: torch.dtype, scale_words: Optional[int] = None) -> Optional[KVFormat]:
    """The quantized format of a cache tensor of `dtype` whose scale tensor has `scale_words` words."""
    if dtype == torch.uint8 and scale_words == FORMATS["int4_ch"].scale_words:
        return FORMATS["int4_ch"]
    return QUANTIZED_BY_STORAGE.get(dtype)


def group_tokens(fmt: KVFormat, head_dim: int) -> int:
    """Tokens per parameter group of a grouped format (int4_ch: head_dim / 2), 1 for the others."""
    return head_dim // 2 if fmt.name == "int4_ch" else 1


FormatSpec = Union[str, Tuple[str, str]]


def get(name: str) -> KVFormat:
    if name == "int4_tok":  # the spelling of per-token int4 keys in a kv_format (see resolve)
        name = "int4"
    try:
        return FORMATS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown kv_format {name!r}; expected 'auto' or one of {sorted(FORMATS)}") from None


def plain_for(dtype: torch.dtype) -> KVFormat:
    """The unquantized storage format of a q / out dtype (what kv_format="auto" stores)."""
    try:
        return PLAIN[dtype]
    except KeyError:
        raise TypeError(f"vattn: unsupported dtype {dtype}; expected one of {[str(d) for d in PLAIN]}") from None


def _one(name, dtype: torch.dtype) -> KVFormat:
    if name == "auto":
        return plain_for(dtype)
    if not isinstance(name, str):
        raise TypeError(f"kv_format must be a str or a (k, v) pair of str, got {type(name).__name__}")
    fmt = get(name)
    if not fmt.quantized and fmt.storage_dtype != dtype:
        raise ValueError(
            f"kv_format {name!r} stores {fmt.storage_dtype} but the cache dtype is {dtype}; "
            "use 'auto' to store the cache dtype"
        )
    return fmt


def resolve(kv_format: FormatSpec, dtype: torch.dtype) -> Tuple[KVFormat, KVFormat]:
    """(K format, V format) of a KVCache's kv_format argument: "auto", a name, or a (k, v) pair.
    int4 keys are stored per channel (int4_ch, KIVI: the outlier channels of keys are what int4
    per token loses, bench/RESULTS.md); "int4_tok" asks for int4 keys per token; values are always
    per token."""
    if isinstance(kv_format, (tuple, list)):
        if len(kv_format) != 2:
            raise ValueError(f"a kv_format pair must be (k_format, v_format), got {kv_format!r}")
        k, v = kv_format
    else:
        k = v = kv_format
    if v == "int4_ch":
        raise ValueError("int4_ch groups keys per channel; values are stored per token (use 'int4')")
    k = "int4_ch" if k == "int4" else "int4" if k == "int4_tok" else k
    v = "int4" if v == "int4_tok" else v
    kf, vf = _one(k, dtype), _one(v, dtype)
    if kf.quantized != vf.quantized:
        # The kernels take K and V both plain or both with scales (their views and loaders pair up).
        raise ValueError(f"kv_format {kv_format!r} pairs a plain side with a quantized one; quantize both or neither")
    return kf, vf


def of_tensor(t: torch.Tensor) -> Optional[KVFormat]:
    """The plain format a cache tensor's dtype stores, or None when no plain format has it."""
    return PLAIN.get(t.dtype)


def token_bytes(
    num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, kv_format: FormatSpec = "auto"
) -> int:
    """Bytes one stored token takes in a KVCache over all layers, K and V, scales included (what the
    memory manager is given, and what KVCache.token_bytes reports)."""
    k, v = resolve(kv_format, dtype)
    return num_layers * (k.record_bytes(num_kv_heads, head_dim) + v.record_bytes(num_kv_heads, head_dim))
