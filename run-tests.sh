#!/usr/bin/env bash
# Set up, then run the whole test suite (unit tests on tiny models + integration test on SmolLM2).
# Extra arguments go to pytest, e.g. ./run-tests.sh -m "not slow"
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
