"""GPU-less checks of the CUDA kernels' logic: numpy ports of the split-KV decode kernel and the
tensor-core prefill kernel (index math, cp.async stages, fragments, masks) against float64.
They do not replace the gpu tests; they catch a broken tile or split plan on any machine. Likewise
the CPU's AVX-512 copies (decode's token pieces, prefill's GEMM tiles), compiled against SIMDe's
portable AVX-512 where the CPU has none (on a CPU with AVX-512 the attention tests run them)."""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOOLS = ROOT / "tools"


@pytest.mark.parametrize("script", ["emulate_decode_split.py", "emulate_prefill_fa2.py"])
def test_kernel_emulation(script):
    r = subprocess.run([sys.executable, str(TOOLS / script)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "ALL OK" in r.stdout


def test_avx512_copies_under_simde(tmp_path):
    # tools/emulate_avx512.cpp against float64: 3000 random token-piece walks (head dims 16-256, 4-16
    # rows a head, 1-5 heads with their own key ranges, padded head and token strides) and 1500
    # prefill GEMM calls (1-40 rows, 1-150 keys, head dims 1-256 with masked last vectors), built
    # with AddressSanitizer so a read or write outside the exactly sized buffers fails too.
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if cxx is None:
        pytest.skip("no C++ compiler")
    exe = tmp_path / "emulate_avx512"
    cmd = [cxx, "-std=c++17", "-O1", "-Wno-psabi", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"]
    cmd += [f"-I{ROOT / 'cuda' / 'cpu'}", str(TOOLS / "emulate_avx512.cpp"), "-o", str(exe)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if r.returncode != 0 and "simde/x86/avx512.h" in r.stderr:
        pytest.skip("SIMDe headers not installed (Debian / Ubuntu: libsimde-dev; .ci/run installs them)")
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ALL OK" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]


def test_emulation_constants_come_from_the_headers():
    # The emulations take their tile constants from the CUDA sources (tools/emulate_headers.py),
    # so they cannot drift; this checks every constant is still found, and that they run every
    # head dim the split kernel is instantiated for.
    sys.path.insert(0, str(TOOLS))
    import emulate_decode_split
    import emulate_headers

    dec = emulate_headers.decode_split()
    fa2 = emulate_headers.prefill_fa2()
    assert all(isinstance(v, int) and v > 0 for v in dec.values()), dec
    assert fa2["threads"] == 32 * fa2["warps"] and fa2["configs"], fa2
    tiles = emulate_headers.template_instances("cuda/include/vattn/cuda/decode_args.cuh", "DecodeSplitConfigFor")
    head_dims = sorted({t[0] for t in tiles})
    assert head_dims == sorted({c["HD"] for c in emulate_decode_split.CASES}), head_dims


def _decode_split():
    sys.path.insert(0, str(TOOLS))
    import emulate_decode_split

    return emulate_decode_split


def test_decode_split_plan_checks():
    # choose_splits (decode.cu) as ported: bounds, whole / half-full waves, coverage of every row
    # exactly once, and its candidate search against the exhaustive rule, for one row of 32K keys
    # with 8 kv heads on 1 / 78 / 108 / 132 SMs at occupancies 1..8 and a random sweep of grids.
    problems = _decode_split().check_plans(verbose=False)
    assert not problems, "\n".join(problems[:20])


@pytest.mark.parametrize("sms", [1, 78, 108, 132])
@pytest.mark.parametrize("occ", range(1, 9))
def test_decode_split_long_row_fills_every_sm(sms, occ):
    # Single-row long-context decode (Llama-3-8B shape: 32 q / 8 kv heads, head_dim 128, 32K
    # keys): every SM gets work, and a whole wave of CTAs (occupancy x SMs) unless the length
    # bound (kMinSplitKeys per split) or kDecodeMaxSplits stops the splits first.
    e = _decode_split()
    n = 32768
    gb, chunks, splits, chunk = e.make_plan(1, 32, 8, 128, n, n, -1, sms, occ)
    tile = e.cfg(128)["TILE"]
    top = e.real_splits(n, max(1, min(e.cdiv(n, max(e.MIN_SPLIT_KEYS, tile)), e.MAX_SPLITS)), tile)
    ctas = 8 * chunks * splits
    assert ctas >= sms
    assert ctas >= sms * occ or splits == top
    assert splits <= min(e.MAX_SPLITS, e.cdiv(n, e.MIN_SPLIT_KEYS)) and chunk % tile == 0
    assert e.cdiv(n, chunk) == splits


@pytest.mark.parametrize("script", ["emulate_decode_split.py", "emulate_prefill_fa2.py"])
@pytest.mark.parametrize("mistake", ["offset", "block", "rowterm", "stride", "noclamp"])
def test_paged_emulation_catches_broken_addresses(script, mistake):
    # The paged cases must fail when the emulated kernels' paged address math is broken on purpose
    # (tools/emulate_paging.py VATTN_EMU_BREAK: wrong in-block offset, wrong block, a row term in a
    # paged head base, one block stride for every side, no clamp of bad block ids), so a passing
    # run means the cases really exercise every part of the rule.
    env = dict(os.environ, VATTN_EMU_BREAK=mistake)
    r = subprocess.run(
        [sys.executable, str(TOOLS / script), "--paged"], capture_output=True, text=True, timeout=300, env=env
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "ALL OK" not in r.stdout and ": FAIL" in r.stdout, r.stdout[-2000:]
