"""GPU-less checks of the CUDA kernels' logic: numpy ports of the split-KV decode kernel and the
tensor-core prefill kernel (index math, cp.async stages, fragments, masks) against float64.
They do not replace the gpu tests; they catch a broken tile or split plan on any machine."""

import pathlib
import subprocess
import sys

import pytest

TOOLS = pathlib.Path(__file__).resolve().parents[1] / "tools"


@pytest.mark.parametrize("script", ["emulate_decode_split.py", "emulate_prefill_fa2.py"])
def test_kernel_emulation(script):
    r = subprocess.run([sys.executable, str(TOOLS / script)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "ALL OK" in r.stdout


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
