"""vattn: a KV-cache in contiguous virtual memory, mapped on demand, and attention / KV kernels
that work on it directly.

    cache = vattn.KVCache(num_layers=..., num_kv_heads=..., head_dim=..., max_batch=..., max_seq_len=...)
    step = cache.begin_step(slots=[slot], new_tokens=[n])
    vattn.append_kv(cache, layer, step, k, v)
    out = vattn.attention(q, cache, layer, step)
    cache.end_step(step)
"""

import os as _os

# Development hook (tools/dev_build.sh): look for the native module in a separate build folder.
if _os.environ.get("VATTN_DEV_NATIVE"):
    __path__.insert(0, _os.environ["VATTN_DEV_NATIVE"])

# torch first: its bundled OpenMP runtime must be the one loaded, so that `import vattn` before
# `import torch` does not make torch (and vattn) run on the system's libgomp instead (issue 12).
import torch as _torch  # noqa: E402,F401

from . import _C  # noqa: E402
from ._info import info

__version__ = _C.__version__

from . import ops  # noqa: E402,F401  registers torch.ops.vattn.*
from .ops import append_kv_raw, decode_attention, prefill_attention, merge_states  # noqa: E402
from .sparse_ops import compact_kv  # noqa: E402  registers torch.ops.vattn.compact_kv
from .quest_ops import block_minmax, quest_select, sparse_decode_attention  # noqa: E402  Quest ops
from .cache import KVCache, Step  # noqa: E402
from ._C import OutOfMemoryError  # noqa: E402  (a MemoryError)
from .api import append_kv, attention, dequantize_kv  # noqa: E402
from . import policies  # noqa: E402,F401  eviction policies (vattn.policies.SnapKV, ...)

__all__ = [
    "KVCache",
    "Step",
    "OutOfMemoryError",
    "append_kv",
    "attention",
    "dequantize_kv",
    "info",
    "append_kv_raw",
    "decode_attention",
    "prefill_attention",
    "merge_states",
    "compact_kv",
    "block_minmax",
    "quest_select",
    "sparse_decode_attention",
    "policies",
]
