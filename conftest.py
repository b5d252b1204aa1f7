"""Shared by tests/ and bench/: the `gpu` marker (modules with gpu items run first on a GPU machine).

A gpu-marked test skips without a CUDA device and a CUDA build of vattn; with VATTN_REQUIRE_GPU=1
it fails instead, so a GPU machine cannot pass the suite by skipping.
"""

import os

import pytest

REQUIRE_GPU = os.environ.get("VATTN_REQUIRE_GPU", "0") not in ("", "0")
_cuda = None


def cuda_available() -> bool:
    global _cuda
    if _cuda is None:
        try:
            import torch
            import vattn

            _cuda = bool(torch.cuda.is_available() and vattn._C.built_with_cuda)
        except Exception:
            _cuda = False
    return _cuda


def pytest_collection_modifyitems(config, items):
    if cuda_available() or REQUIRE_GPU:
        # On a GPU machine the modules holding gpu items run first (each kept whole and in order, so
        # module fixtures are set up once), so a time-boxed run (bench/gpu_check.sh) spends its budget
        # on what only that machine can check.
        with_gpu = {getattr(getattr(item, "module", None), "__name__", "") for item in items if "gpu" in item.keywords}
        items.sort(key=lambda item: getattr(getattr(item, "module", None), "__name__", "") not in with_gpu)
        return  # with VATTN_REQUIRE_GPU=1 the gpu items fail in pytest_runtest_setup instead
    skip = pytest.mark.skip(reason="needs a CUDA device and a CUDA build of vattn")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_runtest_setup(item):
    # Raised here, not through a fixture added at collection: such a fixture would never run.
    if REQUIRE_GPU and "gpu" in item.keywords and not cuda_available():
        pytest.fail("VATTN_REQUIRE_GPU=1 but no CUDA device / CUDA build of vattn is available", pytrace=False)
