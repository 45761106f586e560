#!/usr/bin/env bash
# The README's main command: set up (venv, data) then `sepp demo` (CPU-sized SePP experiment, <= 10 min).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export SEPP_DATA=${SEPP_DATA:-$PWD/data}
exec .venv/bin/sepp demo "$@"
