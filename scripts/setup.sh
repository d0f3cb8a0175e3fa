#!/usr/bin/env bash
# Set up this checkout on a fresh machine: the Fashion-MNIST files (Debian package, when run as root), a
# virtual environment in .venv with mae, its dependencies and the test tools, and Accelerate's default
# config when there is none. Idempotent. One line per step; pip's full output goes to .venv/pip-install.log
# and is shown when the install fails.
set -euo pipefail
cd "$(dirname "$0")/.."

FMNIST_DIR=/usr/share/datasets/fashion-mnist
if [ -f "$FMNIST_DIR/train-images-idx3-ubyte.gz" ]; then
  echo "Fashion-MNIST: $FMNIST_DIR"
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null; }
  echo "Fashion-MNIST: installed the Debian package dataset-fashion-mnist ($FMNIST_DIR)"
else
  echo "note: Fashion-MNIST is not installed; run 'sudo apt-get install dataset-fashion-mnist'" \
       "or point data.fmnist_dir at a folder of its idx files" >&2
fi

created=""
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  created=" (created)"
fi
log=.venv/pip-install.log
.venv/bin/python -m pip install --upgrade pip >"$log" 2>&1 || true  # an offline mirror may not have a newer pip
if ! .venv/bin/python -m pip install -e ".[dev]" >>"$log" 2>&1; then
  tail -n 25 "$log" >&2
  echo "setup failed: pip install -e '.[dev]' (full log: $log)" >&2
  exit 1
fi
.venv/bin/python -c "
import accelerate, mae, timm, torch, webdataset
print(f'.venv$created: mae {mae.__version__} with torch {torch.__version__}, timm {timm.__version__},'
      f' accelerate {accelerate.__version__} (pip log: $log)')
" || { echo "setup failed: mae's dependencies do not import" >&2; exit 1; }
.venv/bin/python scripts/accelerate_config.py
