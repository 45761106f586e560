#!/usr/bin/env bash
# Compatibility check against the GPU machine's versions: torch 2.11 / torchvision 0.26, tests run on the CPU.
# Creates .venv-compat (gitignored) once, installs sepp with its test extras there, and runs the test suite on
# the CPU. Exits non-zero when the install or any test fails. Not part of every CI run (.ci/run).
#   bash scripts/compat.sh                 # the whole suite
#   bash scripts/compat.sh tests/test_optim.py -k lars    # arguments go to pytest
# Env: PYTHON (interpreter for the venv, default python3), COMPAT_INDEX (torch wheel index, default pip's
# configured index: its torch 2.11.0 wheel runs on the CPU too; COMPAT_INDEX=https://download.pytorch.org/whl/cpu
# takes the smaller CPU-only wheels where that index is reachable), SEPP_DATA (CIFAR-10, default ./data).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv-compat
TORCH=2.11.0
VISION=0.26.0
INDEX=${COMPAT_INDEX:-pypi}
start=$(date +%s)
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
if ! "$VENV/bin/python" - <<PYEOF 2>/dev/null
import torch, torchvision, sepp, pytest, hypothesis, omegaconf
assert torch.__version__.split("+")[0] == "$TORCH", torch.__version__
assert torchvision.__version__.split("+")[0] == "$VISION", torchvision.__version__
PYEOF
then
  "$VENV/bin/pip" install -q --upgrade pip >/dev/null 2>&1 || true
  if [ "$INDEX" = pypi ]; then
    "$VENV/bin/pip" install -q "torch==$TORCH" "torchvision==$VISION"
  else
    "$VENV/bin/pip" install -q "torch==$TORCH" "torchvision==$VISION" --index-url "$INDEX"
  fi
  # sepp and its test extras; the pins above stay (pip keeps an installed torch that satisfies torch>=2.4)
  "$VENV/bin/pip" install -q -e ".[dev]"
fi
"$VENV/bin/python" -c "import torch, torchvision; print(f'compat venv: torch {torch.__version__}, torchvision {torchvision.__version__}')"
export SEPP_DATA=${SEPP_DATA:-$PWD/data}
status=0
"$VENV/bin/python" -m pytest -q -p no:cacheprovider "${@:-tests}" || status=$?
echo "compat.sh: pytest exit status $status after $(( $(date +%s) - start )) s (torch $TORCH / torchvision $VISION, CPU)"
exit $status
