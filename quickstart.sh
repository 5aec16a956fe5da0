#!/usr/bin/env bash
# The main job: set up, then fine-tune SmolLM2-135M-Instruct (offline) on the bundled Vietnamese
# data, merge, and print base vs tuned answers with scores. Extra arguments go to `lmtune quickstart`,
# e.g. ./quickstart.sh --model bigscience/bloom-560m
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
exec .venv/bin/lmtune quickstart --config configs/quickstart.yaml "$@"
