#!/usr/bin/env bash
# Fill wheels/ with what the GPU machine lacks, for benchmarks/gpu_check.sh (that machine reaches no registry):
#   wheels/*.whl             webdataset, braceexpand, omegaconf and omegaconf 2.3's antlr4-python3-runtime, at the
#                            versions installed here (pure Python; installed there with pip --no-index --target)
#   wheels/xformers/         the xformers wheel of pyproject's [xformers] extra (3 MB), for the check on the
#                            machine's own torch
#   wheels/fashion-mnist/    the Fashion-MNIST idx files, when this machine has them (30 MB; segment_demo's data)
#   wheels/xformers-pair/    only with --xformers-pair: the pinned pair itself (torch 2.10.0, torchvision 0.25.0,
#                            xformers 0.0.35 and their CUDA 12 libraries for Python 3.12: gigabytes), for the
#                            check in an environment of its own
#
#   bash scripts/gpu_wheels.sh [--xformers-pair] [DIR]     # default DIR: wheels/ (gitignored)
# The device tool carries at most 64 MiB: wheels/ without xformers-pair/ is about 35 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
PAIR=0
[ "${1:-}" = --xformers-pair ] && PAIR=1 && shift
DIR=${1:-wheels}
mkdir -p "$DIR"
pin() { "$PY" -c "import importlib.metadata as m, sys; print(f'{sys.argv[1]}=={m.version(sys.argv[1])}')" "$1"; }
# pure-Python wheels on PyPI
"$PY" -m pip download --quiet --no-deps --only-binary :all: -d "$DIR" \
    "$(pin webdataset)" "$(pin braceexpand)" "$(pin omegaconf)"
# omegaconf 2.3 needs antlr4-python3-runtime 4.9.3, published as a source archive only: build its wheel
# (omegaconf 2.4 needs it no longer)
if "$PY" -c "import importlib.metadata as m, sys; sys.exit(0 if any('antlr4' in r for r in m.requires('omegaconf') or []) else 1)"; then
    "$PY" -m pip wheel --quiet --no-deps -w "$DIR" "$(pin antlr4-python3-runtime)"
fi
# the [xformers] extra's pins, read from pyproject.toml (one place)
EXTRA=$("$PY" -c "
import re
print(' '.join(re.findall(r'\"([^\"]+)\"', re.search(r'^xformers = \[(.*)\]', open('pyproject.toml').read(), re.M)[1])))")
XFORMERS=$(tr ' ' '\n' <<< "$EXTRA" | grep '^xformers==')
# the GPU machine's python is 3.12 on x86-64 Linux
PLATFORM=(--only-binary :all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
    --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
    --platform manylinux2014_x86_64)
"$PY" -m pip download --quiet --no-deps "${PLATFORM[@]}" -d "$DIR/xformers" "$XFORMERS"
FMNIST=/usr/share/datasets/fashion-mnist
if [ -d "$FMNIST" ]; then
    mkdir -p "$DIR/fashion-mnist" && cp "$FMNIST"/*-ubyte.gz "$DIR/fashion-mnist/"
fi
if [ "$PAIR" = 1 ]; then
    # with their dependencies (the CUDA 12 libraries torch 2.10.0 loads): installed there into a folder of
    # their own that comes first on the path, so the machine's torch stays as it is
    # shellcheck disable=SC2086  # EXTRA is a list of requirements
    "$PY" -m pip download --quiet "${PLATFORM[@]}" -d "$DIR/xformers-pair" $EXTRA
fi
du -sh "$DIR"/*/ 2> /dev/null && du -sh "$DIR"
