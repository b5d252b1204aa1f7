"""What each op runs on each device: q / out dtypes, head dims, KV storage formats.

The table comes from the native module (cuda/include/vattn/support.h, which the CUDA launchers
check against too), so the argument checks here, the test helpers' skips and the docs read the one
source. `supported(...)` answers, `check_supported(...)` raises the error a user sees.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from . import _C, formats
from ._dtypes import CODE_TO_TORCH

__all__ = ["OPS", "Support", "table", "supported", "check_supported", "check_cache_supported"]

OPS = ("append_kv", "decode", "prefill", "merge_states")


@dataclass(frozen=True)
class Support:
    dtypes: Tuple[torch.dtype, ...]
    kv_formats: Tuple[str, ...]
    head_dim_multiple: int
    max_head_dim: int  # 0: no limit

    def head_dim_ok(self, head_dim: int) -> bool:
        return (
            head_dim > 0
            and head_dim % self.head_dim_multiple == 0
            and (self.max_head_dim == 0 or head_dim <= self.max_head_dim)
        )

    def head_dim_rule(self) -> str:
        if self.max_head_dim == 0 and self.head_dim_multiple == 1:
            return "any head_dim"
        return f"head_dim a multiple of {self.head_dim_multiple} up to {self.max_head_dim}"


def _load() -> Dict[str, Dict[str, Support]]:
    out = {}
    for device, per_op in _C.support_table().items():
        out[device] = {
            op: Support(
                tuple(CODE_TO_TORCH[c] for c in e["dtypes"]),
                tuple(formats.BY_CODE[c].name for c in e["kv_formats"] if c in formats.BY_CODE),
                int(e["head_dim_multiple"]),
                int(e["max_head_dim"]),
            )
            for op, e in per_op.items()
        }
    return out


_TABLE = _load()
_OK = set()  # argument combinations check_supported has accepted


def table() -> Dict[str, Dict[str, Support]]:
    """{device type: {op: Support}} for "cpu" and "cuda"."""
    return _TABLE


def supported(op: str, device_type: str, dtype: torch.dtype, head_dim: int, kv_format: Optional[str] = None) -> bool:
    e = _TABLE[device_type][op]
    return dtype in e.dtypes and e.head_dim_ok(head_dim) and (kv_format is None or kv_format in e.kv_formats)


_OP_NAMES = {
    "append_kv": "append_kv",
    "decode": "decode_attention",
    "prefill": "prefill_attention",
    "merge_states": "merge_states",
}


def check_supported(
    op: str, device_type: str, dtype: torch.dtype, head_dim: int, kv_formats: Tuple[str, ...] = ()
) -> None:
    """Raises TypeError (dtype) or ValueError (head_dim, format) for what the device does not run."""
    # Symbolic sizes (torch.compile, fake tensors) are not hashable: check those without the memo.
    key = (op, device_type, dtype, head_dim, kv_formats) if type(head_dim) is int else None
    if key is not None and key in _OK:
        return  # the hot path (once per call of every op): one set lookup
    e = _TABLE[device_type][op]
    if dtype in e.dtypes and e.head_dim_ok(head_dim) and all(n in e.kv_formats for n in kv_formats):
        if key is not None:
            _OK.add(key)
        return
    where = f"{device_type.upper() if device_type == 'cuda' else 'CPU'} {_OP_NAMES[op]}"
    if dtype not in e.dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in e.dtypes)
        raise TypeError(f"{where} supports {names}; got {dtype}")
    if not e.head_dim_ok(head_dim):
        raise ValueError(f"{where} needs {e.head_dim_rule()}, got {head_dim}")
    for name in kv_formats:
        if name not in e.kv_formats:
            raise ValueError(f"{where} does not read the KV format {name!r} (supported: {list(e.kv_formats)})")


def check_cache_supported(
    device_type: str, dtype: torch.dtype, k_format: "formats.KVFormat", v_format: "formats.KVFormat", head_dim: int
) -> None:
    """A KVCache needs at least append_kv and decode on its device."""
    for op in ("append_kv", "decode"):
        e = _TABLE[device_type][op]
        if dtype not in e.dtypes:
            raise TypeError(f"dtype {dtype} is not supported on {device_type}; use one of {list(e.dtypes)}")
        for f in (k_format, v_format):
            if f.name not in e.kv_formats:
                raise ValueError(
                    f"kv_format {f.name!r} is not supported on {device_type} (supported: {list(e.kv_formats)})"
                )
