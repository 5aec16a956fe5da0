#!/usr/bin/env bash
# Set up, then run the whole test suite (unit tests on tiny models + integration test on SmolLM2).
# Extra arguments go to pytest, e.g. ./run-tests.sh -m "not slow"
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh --with-llama-cpp  # llama.cpp too: the GGUF export tests load their files into it
exec .venv/bin/python -m pytest "$@"
