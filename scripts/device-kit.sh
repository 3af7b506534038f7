#!/usr/bin/env bash
# The device kit on a bare GPU machine (no network): install what the image lacks, then run
# `dsv4k device-check`. Everything is installed under .tl/ (git-ignored), which stays on the machine
# between calls while it is warm. README.md, "Device kit", says how to call it.
#
#   scripts/device-kit.sh install DIR...      pip-install the wheels in each DIR into .tl/site
#   scripts/device-kit.sh run [ARGS...]       install this tree's dsv4-kernels into .tl/project, then
#                                             dsv4k device-check --out "$OUT" ARGS (e.g. --budget-s 450)
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
pip_offline=(-m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --disable-pip-version-check)
case "${1:-}" in
  install)
    shift
    [ $# -gt 0 ] || { echo "device-kit.sh install: name the wheel folders (e.g. .whl/a)" >&2; exit 2; }
    for dir in "$@"; do
      ls "$dir"/*.whl >/dev/null 2>&1 || { echo "device-kit.sh install: no wheels in $dir" >&2; exit 2; }
      "$py" "${pip_offline[@]}" --target .tl/site "$dir"/*.whl
      echo "installed $(ls "$dir"/*.whl | wc -l) wheel(s) from $dir into .tl/site"
    done
    ;;
  run)
    shift
    : "${OUT:?device-kit.sh run: set OUT to the results folder}"
    start=$(date +%s)
    rm -rf .tl/project
    "$py" "${pip_offline[@]}" --no-build-isolation --target .tl/project .
    rm -rf build ./*.egg-info src/*.egg-info
    export PYTHONPATH=".tl/project${PYTHONPATH:+:$PYTHONPATH}"
    [ -d .tl/site ] && export PYTHONPATH="$PYTHONPATH:.tl/site"
    export PYTHONUNBUFFERED=1 PATH="$PATH:/usr/local/cuda/bin"
    echo "device-kit.sh: installed dsv4-kernels in $(( $(date +%s) - start )) s; commit ${DSV4K_COMMIT:-unknown}"
    exec "$py" -m dsv4_kernels.cli device-check --out "$OUT" "$@"
    ;;
  *)
    echo "usage: scripts/device-kit.sh install DIR... | run [device-check args]" >&2
    exit 2
    ;;
esac
