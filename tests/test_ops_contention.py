"""CPU ops on a machine where another process holds a core (cpu_util.h: a call whose teammate lost
its core sends the calls of the next window to the calling thread alone, then tries the team again).
The work items and their order do not depend on who runs them, so every call must return exactly
what the first one did, through team and solo calls and the switches between them, and that must
match reference.py. A spinning process pinned to the last CPU makes the switches happen; the test
asserts results, never times."""

import os
import subprocess
import sys
import time

import pytest
import torch

from helpers import Case, assert_attention_close, build, run_attention

pytestmark = pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to contend for"
)

# (lens, q_lens or None for decode): short rows on few items, many rows, one row split by keys,
# and a chunked prefill on a prefix.
CASES = [
    ([512], None),
    ([2048, 40, 700], None),
    ([64] * 24, None),
    ([6000], None),
    ([900, 300], [128, 300]),
]


@pytest.fixture
def spinner():
    cpu = sorted(os.sched_getaffinity(0))[-1]
    code = f"import os\nos.sched_setaffinity(0, {{{cpu}}})\nwhile True:\n    pass\n"
    proc = subprocess.Popen([sys.executable, "-c", code])
    time.sleep(0.2)
    yield
    proc.kill()
    proc.wait()


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_results_do_not_depend_on_contention(spinner, two_threads):
    built = []
    for i, (lens, q_lens) in enumerate(CASES):
        case = Case(lens=lens, hkv=4, group=2, dim=64, q_lens=q_lens)
        q, kc, vc, kw = build(case, torch.float32, "plain", "cpu", seed=i)
        out, lse = run_attention(q, kc, vc, kw)
        assert_attention_close(out, lse, q, kc, vc, kw, case.describe())
        built.append((case, q, kc, vc, kw, out, lse))
    calls = 0
    until = time.perf_counter() + 1.5
    while time.perf_counter() < until or calls < 50:
        for case, q, kc, vc, kw, out0, lse0 in built:
            out, lse = run_attention(q, kc, vc, kw)
            assert torch.equal(out, out0) and torch.equal(lse, lse0), f"{case.describe()} call {calls}"
            calls += 1
