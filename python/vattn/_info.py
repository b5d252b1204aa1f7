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
        "cpu_simd": str(_C.cpu_simd()),  # which copy of the CPU attention loops runs
    }
    # The CUDA runtime is linked statically, so the driver must support its version: with an older
    # driver every CUDA call fails. Say which driver this machine has and what is needed.
    if _C.built_with_cuda:
        drv = dict(_C.cuda_driver_status())
        out["cuda_driver_version"] = int(drv["driver_version"])  # cudaDriverGetVersion, 0: no driver
        out["cuda_driver_required"] = int(drv["required_driver_version"])
        out["cuda_driver_ok"] = bool(drv["ok"])
        if not drv["ok"]:
            out["cuda_driver_problem"] = str(drv["message"])
    else:
        out["cuda_driver_version"] = None
        out["cuda_driver_required"] = None
        out["cuda_driver_ok"] = None
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
