#!/usr/bin/env bash
# Create .venv with sepp and its test dependencies, and prepare the CIFAR-10 copy under data/ (SEPP_DATA).
# Idempotent: a second call only checks. Used by the README's two commands and by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# (pytest < 9 as pyproject.toml pins it: under pytest 9 xdist's --dist loadgroup does not group)
if ! .venv/bin/python -c "import sepp, torch, torchvision, pytest, xdist, hypothesis, faiss, omegaconf, sklearn
assert int(pytest.__version__.split('.')[0]) < 9" 2>/dev/null; then
  .venv/bin/pip install -q --upgrade pip >/dev/null 2>&1 || true
  # torch/torchvision pinned to the builds this machine serves; the package itself accepts torch>=2.4
  .venv/bin/pip install -q "torch==2.14.1" "torchvision==0.29.1" 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/pip install -q -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -c "import sepp, torch, torchvision, pytest, xdist, hypothesis, faiss, omegaconf, sklearn"
fi
DATA=${SEPP_DATA:-data}
if [ ! -f "$DATA/cifar-10-batches-py/data_batch_1" ]; then
  SHARED=${SEPP_SHARED:-../shared/data}
  if [ -f "$SHARED/prepare_cifar10.py" ]; then
    echo "preparing CIFAR-10 from $SHARED into $DATA"
    .venv/bin/python "$SHARED/prepare_cifar10.py" "$DATA"
  else
    echo "note: no CIFAR-10 under $DATA and no $SHARED/prepare_cifar10.py; set SEPP_DATA to a folder holding cifar-10-batches-py (or use data.download=true)" >&2
  fi
fi
