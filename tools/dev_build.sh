#!/usr/bin/env bash
# Fast development build without pip: configures and builds vattn._C into its own folder so
# several builds (CPU-only, CUDA) can live side by side. Prints the line to source.
#   tools/dev_build.sh NAME [extra cmake args...]      e.g. tools/dev_build.sh cpu -DVATTN_CUDA=OFF
#   eval "$(tools/dev_build.sh cpu -DVATTN_CUDA=OFF)" && pytest tests
set -euo pipefail
name=${1:?usage: tools/dev_build.sh NAME [cmake args]}; shift
root=$(cd "$(dirname "$0")/.." && pwd)
bdir=/tmp/vattn-dev-$name
pybind_dir=$(python -c 'import pybind11; print(pybind11.get_cmake_dir())')
cmake -S "$root" -B "$bdir" -G Ninja -DCMAKE_BUILD_TYPE=Release -Dpybind11_DIR="$pybind_dir" \
  -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$bdir/native" "$@" >&2
cmake --build "$bdir" -j "${VATTN_BUILD_JOBS:-2}" >&2
echo "export PYTHONPATH=$root/python VATTN_DEV_NATIVE=$bdir/native"
