#!/usr/bin/env bash
# Fill wheels/ with what the GPU machine's python lacks (webdataset, braceexpand, omegaconf, and the
# antlr4-python3-runtime of omegaconf 2.3), at the versions installed here; benchmarks/gpu_check.sh installs them from there
# with `pip install --no-index --no-deps --target` (that machine reaches no registry).
#
#   bash scripts/gpu_wheels.sh [DIR]          # default DIR: wheels/ (gitignored)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
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
ls "$DIR"
