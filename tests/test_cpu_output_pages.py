"""A large CPU attention output is advised onto transparent huge pages before the op first writes
it (cpu_util.h advise_huge_pages): in 4 KiB pages every first write is a page fault. The test checks
that the output's memory carries the advice (VmFlags "hg" in /proc/self/smaps; deterministic, unlike
whether the kernel finds free huge pages at that moment), that the call took few page faults where
it could get them, and the output against reference.py."""

import resource

import pytest
import torch

import vattn
from vattn import reference

_THP = "/sys/kernel/mm/transparent_hugepage/enabled"


def _thp_mode():
    try:
        with open(_THP) as f:
            text = f.read()
    except OSError:
        return None
    return text[text.index("[") + 1 : text.index("]")] if "[" in text else None


def _smaps_entry(addr):
    """The /proc/self/smaps lines of the mapping holding addr."""
    try:
        with open("/proc/self/smaps") as f:
            lines = f.read().splitlines()
    except OSError:
        pytest.skip("no /proc/self/smaps")
    entry, found = [], False
    for line in lines:
        head = line.split()[0] if line else ""
        if "-" in head and ":" not in head:  # a mapping's first line: start-end perms ...
            if found:
                break
            lo, hi = (int(x, 16) for x in head.split("-"))
            found = lo <= addr < hi
            entry = []
        if found:
            entry.append(line)
    return entry


def _vm_flags(addr):
    for line in _smaps_entry(addr):
        if line.startswith("VmFlags:"):
            return line.split()[1:]
    pytest.skip("no VmFlags in /proc/self/smaps")


def _anon_huge_bytes(addr):
    for line in _smaps_entry(addr):
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1]) * 1024
    return 0


@pytest.mark.skipif(_thp_mode() not in ("madvise", "always"), reason="needs transparent huge pages (madvise/always)")
def test_large_prefill_output_takes_few_page_faults():
    torch.manual_seed(0)
    rows, per_row, hq, hkv, dim = 512, 16, 8, 2, 128  # 8192 queries x 8 heads x 128 fp32 = 32 MiB
    total = rows * per_row
    q = torch.randn(total, hq, dim)
    k = torch.randn(rows, per_row, hkv, dim)
    v = torch.randn(rows, per_row, hkv, dim)
    cu = torch.arange(0, total + 1, per_row, dtype=torch.int32)
    lens = torch.full((rows,), per_row, dtype=torch.int32)
    vattn.prefill_attention(q, k, v, cu, lens)  # warm: scratch, thread team
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    out = vattn.prefill_attention(q, k, v, cu, lens)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    middle = out.data_ptr() + out.numel() * out.element_size() // 2
    assert "hg" in _vm_flags(middle), "the output's memory was not advised onto huge pages"
    # In 4 KiB pages the output alone is 8192 faults; in 2 MiB pages 16, plus the unaligned ends
    # (at most 2 x 511) and the op's own small allocations. Only where huge pages were to be had.
    if _anon_huge_bytes(middle) > 0:
        assert faults < 4096, f"{faults} minor page faults for a 32 MiB output"
    one = torch.tensor([0, per_row], dtype=torch.int32)
    for r in (0, rows - 1):  # the first and the last row: both ends of the advised range
        rq = q[r * per_row : (r + 1) * per_row]
        want = reference.attention(rq, k[r : r + 1], v[r : r + 1], lens[:1], one)[0]
        torch.testing.assert_close(out[r * per_row : (r + 1) * per_row], want.to(out.dtype), rtol=1e-5, atol=1e-5)
