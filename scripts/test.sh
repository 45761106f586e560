#!/usr/bin/env bash
# The README's test command: set up (venv, data) then run the whole suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export SEPP_DATA=${SEPP_DATA:-$PWD/data}
exec .venv/bin/python -m pytest "$@"
