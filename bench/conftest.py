"""pytest wiring of the microbenchmarks (pytest-benchmark).

    pytest bench/ --benchmark-only       times the benchmarks (pytest-benchmark groups: one per shape,
                                         vattn next to its anchors)
    pytest bench/ --benchmark-disable    runs each benchmark once as a correctness check (CI)

Each benchmark asserts that vattn matches its anchor within tolerance. GPU benchmarks carry the
`gpu` marker: they skip without a CUDA device and a CUDA build, and fail instead with
VATTN_REQUIRE_GPU=1 (the root conftest.py).
"""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

try:
    import pytest_benchmark  # noqa: F401

    HAVE_PYTEST_BENCHMARK = True
except ImportError:
    HAVE_PYTEST_BENCHMARK = False


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
