"""Shared test setup: the `gpu` marker and NaN-filled caches."""
import os

import pytest
import torch


def cuda_available() -> bool:
    try:
        import vattn

        return torch.cuda.is_available() and vattn._C.built_with_cuda
    except Exception:
        return False


REQUIRE_GPU = os.environ.get("VATTN_REQUIRE_GPU", "0") not in ("", "0")


def pytest_collection_modifyitems(config, items):
    if cuda_available():
        return
    for item in items:
        if "gpu" in item.keywords:
            if REQUIRE_GPU:
                item.add_marker(pytest.mark.usefixtures("_require_gpu"))
            else:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA device and a CUDA build of vattn"))


@pytest.fixture
def _require_gpu():
    pytest.fail("VATTN_REQUIRE_GPU=1 but no CUDA device / CUDA build of vattn is available")


def devices():
    """Devices every op test runs on: cpu always, cuda (marked gpu) too."""
    return ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
