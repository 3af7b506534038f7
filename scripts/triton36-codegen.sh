#!/usr/bin/env bash
# Compile every Triton kernel for sm_90a, sm_100a, gfx942 and gfx950 with triton 3.6, the version of the
# GPU image (the CI pins 3.9): the kernels must build on both. triton 3.6 and numpy < 2.4 (3.6 breaks on
# numpy 2.4) are installed once into their own folder (about 10 s, 600 MB; never into the project's
# environment) and put first on PYTHONPATH for the run; torch and the package come from the active one.
# A few minutes on 2 cores. Usage: scripts/triton36-codegen.sh   (TRITON36_DIR overrides the folder)
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python}
dir=${TRITON36_DIR:-$HOME/.cache/dsv4k/triton36}
if [ ! -f "$dir/triton/__init__.py" ]; then
  "$py" -m pip install -q --target "$dir" "triton==3.6.0" "numpy<2.4"
fi
cache=$(mktemp -d)
trap 'rm -rf "$cache"' EXIT
env -u TRITON_INTERPRET PYTHONPATH="$dir${PYTHONPATH:+:$PYTHONPATH}" TRITON_CACHE_DIR="$cache" \
  "$py" scripts/triton36_codegen.py
