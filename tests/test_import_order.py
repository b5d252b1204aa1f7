"""`import vattn` before `import torch` must not load a second OpenMP runtime (issue 12): torch's
bundled libgomp is the only one in the process, whatever the import order."""

import os
import subprocess
import sys

import pytest


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads /proc/self/maps (Linux)")
def test_one_openmp_runtime_whatever_the_import_order():
    code = (
        "import re, vattn, torch\n"
        "maps = open('/proc/self/maps').read()\n"
        "libs = sorted(set(re.findall(r'/\\S*(?:libgomp|libiomp|libomp)\\S*', maps)))\n"
        "print('\\n'.join(libs))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    libs = [line for line in out.stdout.splitlines() if line.strip()]
    assert len(libs) <= 1, f"more than one OpenMP runtime loaded: {libs}"
