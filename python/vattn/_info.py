"""Build and device information (`vattn.info()`, `vattn info`)."""

from __future__ import annotations

from typing import Any

from . import _C


def info() -> dict[str, Any]:
    """How the native module was built and which devices it sees."""
    out: dict[str, Any] = {
        "version": _C.__version__,
        "built_with_cuda": bool(_C.built_with_cuda),
        "cuda_architectures": list(_C.cuda_architectures),
        "cuda_runtime_version": int(_C.cuda_runtime_version),
        "cuda_devices": list(_C.cuda_devices()) if _C.built_with_cuda else [],
    }
    try:
        import torch

        out["torch"] = torch.__version__
        out["torch_cuda_available"] = bool(torch.cuda.is_available())
    except ImportError:  # torch is needed for the ops, not for the build information
        out["torch"] = None
    # Page granularity per backend: the host backend maps OS pages of a memfd; the CUDA backend
    # the driver's VMM allocation granularity (None without a usable device).
    out["page_granularity"] = {
        "host": int(_C.host_page_bytes()),
        "cuda": [_C.page_granularity(d["index"]) for d in out["cuda_devices"]],
    }
    return out
