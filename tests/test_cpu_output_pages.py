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


def _mapping_fields(addr):
    """The /proc/self/smaps fields ("VmFlags", "AnonHugePages", ...) of the mapping holding addr."""
    try:
        with open("/proc/self/smaps") as f:
            lines = f.read().splitlines()
    except OSError:
        pytest.skip("no /proc/self/smaps")
    fields, found = {}, False
    for line in lines:
        head = line.split()[0] if line else ""
        if "-" in head and ":" not in head:  # a mapping's first line: start-end perms ...
            if found:
                break
            lo, hi = (int(x, 16) for x in head.split("-"))
            found = lo <= addr < hi
        elif found and ":" in head:
            fields[head[:-1]] = line[len(head) :].split()
    if "VmFlags" not in fields:
        pytest.skip("no VmFlags in /proc/self/smaps")
    return fields


@pytest.mark.skipif(_thp_mode() not in ("madvise", "always"), reason="needs transparent huge pages (madvise/always)")
def test_large_prefill_output_is_advised_onto_huge_pages():
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
    fields = _mapping_fields(middle)
    assert "hg" in fields["VmFlags"], "the output's memory was not advised onto huge pages"
    # In 4 KiB pages the output alone is 8192 faults; in 2 MiB pages 16, plus the unaligned ends
    # (at most 2 x 511) and the op's own small allocations. Only where huge pages were to be had.
    if int(fields.get("AnonHugePages", ["0"])[0]) > 0:
        assert faults < 4096, f"{faults} minor page faults for a 32 MiB output"
    one = torch.tensor([0, per_row], dtype=torch.int32)
    for r in (0, rows - 1):  # the first and the last row: both ends of the advised range
        rq = q[r * per_row : (r + 1) * per_row]
        want = reference.attention(rq, k[r : r + 1], v[r : r + 1], lens[:1], one)[0]
        torch.testing.assert_close(out[r * per_row : (r + 1) * per_row], want.to(out.dtype), rtol=1e-5, atol=1e-5)
