"""pytest wiring of the microbenchmarks (pytest-benchmark).

    pytest bench/ --benchmark-only       times the benchmarks (pytest-benchmark groups: one per shape,
                                         vattn next to its anchors)
    pytest bench/ --benchmark-disable    runs each benchmark once as a correctness check (CI)

Each benchmark asserts that vattn matches its anchor within tolerance. GPU benchmarks carry the
`gpu` marker: they skip without a CUDA device and a CUDA build, and fail instead with
VATTN_REQUIRE_GPU=1 (same rule as tests/conftest.py, repeated here so `pytest bench/` alone
behaves the same).
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

REQUIRE_GPU = os.environ.get("VATTN_REQUIRE_GPU", "0") not in ("", "0")

try:
    import pytest_benchmark  # noqa: F401
    HAVE_PYTEST_BENCHMARK = True
except ImportError:
    HAVE_PYTEST_BENCHMARK = False


def _cuda_available() -> bool:
    try:
        import vattn
        return torch.cuda.is_available() and bool(vattn._C.built_with_cuda)
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if _cuda_available() or REQUIRE_GPU:
        return  # with VATTN_REQUIRE_GPU=1 the gpu items fail in pytest_runtest_setup instead
    here = os.path.dirname(os.path.abspath(__file__))
    for item in items:
        if "gpu" in item.keywords and str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device and a CUDA build of vattn"))


def pytest_runtest_setup(item):
    # A fixture added by a marker after collection never runs (fixture closures are fixed at
    # collection), so the VATTN_REQUIRE_GPU failure is raised here, before the test body.
    if REQUIRE_GPU and "gpu" in item.keywords and not _cuda_available():
        pytest.fail("VATTN_REQUIRE_GPU=1 but no CUDA device / CUDA build of vattn is available", pytrace=False)


@pytest.fixture
def _require_gpu():
    # Kept for tests/conftest.py, whose hook may mark bench items with usefixtures("_require_gpu").
    pytest.fail("VATTN_REQUIRE_GPU=1 but no CUDA device / CUDA build of vattn is available")


if not HAVE_PYTEST_BENCHMARK:
    # Without the plugin the benchmarks still run once as correctness checks.
    class _Once:
        disabled = True
        group = None
        extra_info: dict = {}

        def __call__(self, fn, *args, **kwargs):
            return fn(*args, **kwargs)

        def pedantic(self, fn, args=(), kwargs=None, **_):
            return fn(*args, **(kwargs or {}))

    @pytest.fixture
    def benchmark():
        return _Once()


@pytest.fixture
def bench(benchmark):
    """benchmark(fn) that also works on CUDA: synchronizes after each call so pytest-benchmark's
    wall clock measures the kernels, with warm-up rounds. Returns fn's result."""
    def run(fn, device: str):
        if device == "cuda":
            def synced():
                r = fn()
                torch.cuda.synchronize()
                return r
            return benchmark.pedantic(synced, rounds=30, warmup_rounds=3, iterations=1)
        return benchmark.pedantic(fn, rounds=10, warmup_rounds=1, iterations=1)
    run.benchmark = benchmark
    return run
