#!/usr/bin/env bash
# Lower the portable Triton mHC kernels with triton-ascend, as far as it goes without CANN
# (backends/ascend/TRITON.md has the table and what it means).
#
#   scripts/triton-ascend-lower.sh setup        create (or reuse) the triton-ascend virtual environment
#   scripts/triton-ascend-lower.sh [ARGS...]    setup, then scripts/triton_ascend_lower.py ARGS, e.g.
#                                               --update-doc, --json FILE, --dump DIR, --op mhc_pre
#
# triton-ascend replaces the `triton` package, so it gets a virtual environment of its own, never the
# project's: $DSV4K_TRITON_ASCEND_VENV, default ~/.cache/dsv4k/triton-ascend-venv. It holds the CPU build
# of the torch that requirements-cpu.txt pins (override: DSV4K_TORCH_SPEC), triton-ascend 3.2.0, pybind11
# and numpy: about 1.2 GB, 50 s from a local torch wheel. The project is imported from this checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${DSV4K_TRITON_ASCEND_VENV:-$HOME/.cache/dsv4k/triton-ascend-venv}
triton_ascend=3.2.0
torch_pin=$(sed -n 's/^torch==\([^ ;#]*\).*/\1/p' requirements-cpu.txt)
torch_spec=${DSV4K_TORCH_SPEC:-torch==${torch_pin}+cpu}

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

ready() {
  [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "
import importlib.metadata as m, sys
sys.exit(m.version('triton-ascend') != '$triton_ascend')" 2>/dev/null
}

setup() {
  if ready; then
    return 0
  fi
  start=$(date +%s)
  echo "triton-ascend-lower: building $venv ($torch_spec, triton-ascend==$triton_ascend)" >&2
  python3 -m venv "$venv"
  # torch first and in the same command: nothing may pull another torch build
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "$torch_spec" \
    "triton-ascend==$triton_ascend" pybind11 numpy
  echo "triton-ascend-lower: built in $(( $(date +%s) - start )) s, $(du -sh "$venv" | cut -f1)" >&2
}

case "${1:-}" in
  -h|--help) usage; exit 0 ;;
  setup) setup; exit 0 ;;
esac
setup
# The interpreter would turn every @triton.jit into an interpreted function: never inherit it.
exec env -u TRITON_INTERPRET "$venv/bin/python" scripts/triton_ascend_lower.py "$@"
