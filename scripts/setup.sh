#!/usr/bin/env bash
# Set up this checkout on a fresh machine: the Fashion-MNIST files (Debian package, when run as root)
# and a virtual environment in .venv with mae, its dependencies and the test tools. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

FMNIST=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
if [ ! -f "$FMNIST" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null; }
  else
    echo "note: Fashion-MNIST is not installed; run 'sudo apt-get install dataset-fashion-mnist'" \
         "or point data.fmnist_dir at a folder of its idx files" >&2
  fi
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q -e ".[dev]" 2>&1 | grep -vE "^(WARNING: Location|  Location)" || true
.venv/bin/python -c "import mae, torch, timm, webdataset, accelerate" \
  || { echo "setup failed: mae's dependencies do not import" >&2; exit 1; }
