#!/usr/bin/env bash
# Download, on a machine with the package index, exactly the wheels the bare GPU image lacks for the
# device kit (cp312, manylinux x86-64), into two git-ignored folders that each fit one transfer to the
# GPU machine (64 MiB with the working tree):
#   .whl/a: tilelang                                   (about 48 MiB)
#   .whl/b: apache-tvm-ffi, torch-c-dlpack-ext, z3-solver (about 32 MiB)
# The image has torch, triton, pytest, hypothesis, numpy, matplotlib and tilelang's other requirements.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
fetch() {
  local dir=$1; shift
  rm -rf "$dir"; mkdir -p "$dir"
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$dir" "$@"
}
fetch .whl/a tilelang==0.1.15
fetch .whl/b apache-tvm-ffi==0.1.12 torch-c-dlpack-ext==0.1.5 z3-solver==4.15.4.0
for dir in .whl/a .whl/b; do
  size=$(du -sm "$dir" | cut -f1)
  echo "$dir: $(ls "$dir" | tr '\n' ' ')(${size} MiB)"
  [ "$size" -lt 60 ] || { echo "$dir is over 60 MiB: it will not fit one transfer" >&2; exit 1; }
done
