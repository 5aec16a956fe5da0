#!/usr/bin/env bash
# GPU smoke test, a few minutes on a CUDA machine: LoRA, QLoRA (4-bit base) and, with 2+ GPUs, 2-process DDP,
# each for a few optimizer steps on the bundled Vietnamese data, through the real CLI. Prints each run's first and
# final loss and training tokens per second. It cannot run on CPU-only machines (QLoRA needs CUDA + bitsandbytes).
#
#   pip install -e ".[gpu]"                 # bitsandbytes, for the QLoRA run
#   bench/gpu_smoke.sh [MODEL] [STEPS]      # default HuggingFaceTB/SmolLM2-135M-Instruct (from the Hub), 30 steps
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi

MODEL="${1:-HuggingFaceTB/SmolLM2-135M-Instruct}"
STEPS="${2:-30}"
OUT="$(mktemp -d "${TMPDIR:-/tmp}/lmtune-gpu-smoke.XXXXXX")"
GPUS="$(python -c 'import torch; print(torch.cuda.device_count())')"
if [ "$GPUS" -lt 1 ]; then
  echo "error: torch sees no CUDA GPU; this script checks GPU training" >&2
  exit 1
fi
# Same global batch (16 samples per optimizer step) in every run, whatever the number of processes.
ARGS=(--model "$MODEL" --data data/vi_ai_qa.jsonl --max-steps "$STEPS" --batch-size 4 --global-batch-size 16
      --checkpoint-minutes 0 --learning-rate 2e-4)

run() {  # $1 = name of the run (and of its output folder), then the command
  local name="$1"; shift
  if ! "$@" --output-dir "$OUT/$name" > "$OUT/$name.log" 2>&1; then
    tail -n 30 "$OUT/$name.log" >&2
    echo "error: the $name run failed; its whole log is $OUT/$name.log" >&2
    exit 1
  fi
}

report() {  # $1 = name, $2 = adapter folder
  python - "$1" "$2" <<'PY'
import json, sys
from datetime import datetime
name, folder = sys.argv[1], sys.argv[2]
manifest = json.load(open(f"{folder}/lmtune_manifest.json"))
log = [json.loads(line) for line in open(f"{folder}/train_log.jsonl") if '"loss"' in line]
config = open(f"{folder}/lmtune_config.yaml").read()
tokens_per_sample = manifest["data"]["tokens"] / manifest["data"]["samples"]
first, last = log[0], log[-1]
at = lambda entry: datetime.strptime(entry["time"], "%Y-%m-%dT%H:%M:%S%z")
span = (at(last) - at(first)).total_seconds()
tokens = (last["step"] - first["step"]) * 16 * tokens_per_sample  # steps after the first x global batch x mean length
speed = f"{tokens / span:8.0f}" if span > 0 else "   (too fast to time at 1 s resolution)"
print(f"{name:12s} loss {first['loss']:.3f} -> {last['loss']:.3f}   tokens/s {speed}   whole run {manifest['seconds']:.0f} s")
PY
}

echo "GPUs: $GPUS; outputs in $OUT"
run lora lmtune train "${ARGS[@]}"
report "LoRA" "$OUT/lora"
run qlora lmtune train "${ARGS[@]}" --quantization 4bit
report "QLoRA 4-bit" "$OUT/qlora"
if [ "$GPUS" -ge 2 ]; then
  run ddp torchrun --nproc_per_node 2 --standalone -m lmtune train "${ARGS[@]}"
  report "DDP 2 GPUs" "$OUT/ddp"
else
  echo "DDP 2 GPUs   skipped: only one GPU"
fi
run qlora-merged lmtune merge --adapter "$OUT/qlora"
grep "full-precision base" "$OUT/qlora-merged.log"
echo "smoke test passed; logs in $OUT"
