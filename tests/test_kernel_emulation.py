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
