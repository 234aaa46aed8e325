#!/usr/bin/env bash
# Download, on a machine with PyPI access, the wheels that bench/gpu_check.sh needs on the GPU
# machine but that its image lacks (it has no network): open_clip_torch and its small
# pure-Python needs, tabulate, and pytorch-ood (tests/test_pytorch_ood.py). The GPU image runs CPython 3.12 on x86-64, so the wheels are
# fetched for that interpreter, whatever runs this script. The folder is git-ignored; pass it to
# the GPU machine along with the checkout (gpu_check.sh installs from it when present).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.gpu_wheels}
PYVER=${GPU_PYTHON_VERSION:-3.12}
mkdir -p "$DEST"
python -m pip download --quiet --dest "$DEST" --no-deps --only-binary=:all: \
    --python-version "$PYVER" --implementation cp --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    open_clip_torch==3.3.0 ftfy wcwidth regex tabulate pytorch-ood==0.4.0
ls -1 "$DEST"
