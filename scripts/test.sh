#!/usr/bin/env bash
# The README's test command: set up (venv, data) then run the whole suite on CPU, in SEPP_TEST_WORKERS pytest
# processes (default 2, one per core of the CI machine; each uses one torch thread, tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export SEPP_DATA=${SEPP_DATA:-$PWD/data}
exec .venv/bin/python -m pytest -n "${SEPP_TEST_WORKERS:-2}" --dist loadgroup "$@"
