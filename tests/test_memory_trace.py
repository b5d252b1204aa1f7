"""The memory-efficiency benchmark runs (quick) and meets its expectation (bench/memory_trace.py check():
token_major wastes < 1 page per live request, used/mapped >= 0.95 at a mean length >= 1K)."""

import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


def test_memory_trace_quick(tmp_path):
    sys.path.insert(0, BENCH)
    try:
        import memory_trace
    finally:
        sys.path.remove(BENCH)
    rc = memory_trace.main(["--quick", "--out-dir", str(tmp_path), "--no-plot"])
    text = (tmp_path / "memory_trace.md").read_text()
    assert "| token_major |" in text and "| layer_major |" in text and "paged16" in text
    assert rc == 0, text


def test_trace_file_is_realistic():
    sys.path.insert(0, BENCH)
    try:
        import memory_trace
    finally:
        sys.path.remove(BENCH)
    trace = memory_trace.load_trace(os.path.join(BENCH, "traces", "mixed_500.csv"))
    assert len(trace) >= 300
    mean = sum(r.prompt + r.output for r in trace) / len(trace)
    assert mean >= 1000
    assert all(r.prompt > 0 and r.output > 0 for r in trace)
    assert [r.arrival for r in trace] == sorted(r.arrival for r in trace)


@pytest.mark.parametrize("seed", [0, 1])
def test_poisson_trace_seeded(seed):
    sys.path.insert(0, BENCH)
    try:
        import memory_trace
    finally:
        sys.path.remove(BENCH)
    a, b = memory_trace.poisson_trace(50, seed), memory_trace.poisson_trace(50, seed)
    assert a == b
    assert sum(r.prompt + r.output for r in a) / 50 >= 700
