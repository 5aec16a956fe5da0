"""train(config): LoRA fine-tuning around the transformers Trainer.

Setup (tokenizer, template, data, pre-flight check) -> model + LoRA -> Trainer -> save the
adapter with everything needed to reproduce and reuse it, atomically.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import data as data_mod
from .config import Config
from .data import Collator, PromptTemplate, load_examples, render_example, tokenize_examples
from .errors import LmtuneError
from .loss import answer_only_loss, causal_lm_of, make_trainer_class, supports_answer_only
from .model import add_lora, choose_precision, configure_cpu_threads, describe, frozen_weights_dtype, load_model, load_tokenizer, resolve_source
from .outputs import atomic_output, check_output_free, command_line, file_sha256, library_versions, now_iso, write_json
from .plot import plot_loss
from .split import leaked_questions, split_train_val

CONFIG_FILE = "lmtune_config.yaml"
MANIFEST_FILE = "lmtune_manifest.json"
LOG_FILE = "train_log.jsonl"
PLOT_FILE = "loss.png"


@dataclass
class PreparedData:
    template: PromptTemplate
    samples: list[dict]
    load_report: data_mod.LoadReport
    token_report: data_mod.TokenizeReport
    val_samples: list[dict] = field(default_factory=list)
    leaked_val_questions: int = 0
    val_examples: list = field(default_factory=list)


@dataclass
class TrainResult:
    output_dir: str
    steps: int = 0
    final_loss: float = float("nan")
    log: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    dry_run_estimate: dict | None = None
    model: object = field(default=None, repr=False)  # the trained PeftModel, for use right away


def prepare_data(config: Config, tokenizer, log: Callable[[str], None] = print) -> PreparedData:
    d = config.data
    template = PromptTemplate.for_tokenizer(tokenizer, d.template, d.system_prompt)
    examples, load_report = load_examples(d.paths, d.question_field, d.answer_field, d.context_field, d.max_samples)
    examples, val_examples = split_train_val(examples, d.val_size, d.seed)
    if d.eval_paths:
        val_examples += load_examples(d.eval_paths, d.question_field, d.answer_field, d.context_field)[0]
    samples, token_report = tokenize_examples(examples, tokenizer, template, d.max_length)
    val_samples = tokenize_examples(val_examples, tokenizer, template, d.max_length)[0] if val_examples else []
    leaked = leaked_questions(examples, val_examples)
    q, a, c = load_report.columns
    log(
        f"data: {load_report.rows_read} rows from {len(load_report.files)} file(s), columns question='{q}' answer='{a}'"
        f" context='{c}'; {len(samples)} samples, {token_report.tokens} tokens ({token_report.trained_tokens} trained)"
    )
    if load_report.skipped_empty:
        log(f"data: skipped {load_report.skipped_empty} rows with an empty question or answer")
    if token_report.truncated:
        log(f"data: {token_report.truncated} answers cut at data.max_length={d.max_length} (they lose their EOS)")
    if token_report.dropped_long_prompt:
        log(f"data: dropped {token_report.dropped_long_prompt} samples whose prompt alone exceeds data.max_length")
    if val_examples:
        log(f"validation: {len(val_samples)} samples; {leaked} of their questions also appear in training"
            + (" (they measure memorisation, not generalisation; run `lmtune data clean`)" if leaked else ""))
    return PreparedData(template, samples, load_report, token_report, val_samples, leaked, val_examples)


def preflight(prepared: PreparedData, tokenizer, batch_size: int, log: Callable[[str], None] = print) -> None:
    """Show one example with its trained span and check the label contract on every batch once."""
    log("pre-flight: one tokenized example (what the loss sees)")
    log(render_example(prepared.samples[0], tokenizer))
    collate = Collator(tokenizer)
    for start in range(0, len(prepared.samples), batch_size):
        collate(prepared.samples[start : start + batch_size])
    log(f"pre-flight: label contract holds on all {math.ceil(len(prepared.samples) / batch_size)} batches")


class _LossLog:
    """Collects the Trainer's log entries and appends them to train_log.jsonl as they come."""

    def __init__(self, path: Path):
        self.path = path
        self.entries: list[dict] = []

    def make_callback(self):
        from transformers import TrainerCallback

        outer = self

        class Callback(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and ("loss" in logs or "eval_loss" in logs):
                    entry = {"step": state.global_step, "epoch": round(state.epoch or 0, 4), **logs, "time": now_iso()}
                    outer.entries.append(entry)
                    with open(outer.path, "a", encoding="utf-8") as f:
                        f.write(json.dumps(entry) + "\n")

        return Callback()


def build_trainer(config: Config, model, tokenizer, samples: list[dict], precision, scratch: Path, callbacks=(),
                  val_samples: list[dict] | None = None):
    """The Trainer lmtune trains with: answer-only loss, dynamic padding with the label-contract check,
    and with validation samples: periodic validation loss, best adapter kept, optional early stopping."""
    from transformers import EarlyStoppingCallback

    use_checkpointing = decide_checkpointing(config, model, samples, precision)
    if use_checkpointing:
        # LoRA freezes the embeddings, so checkpointed blocks would get inputs that need no grad and skip backward.
        model.enable_input_require_grads()
    callbacks = list(callbacks)
    if val_samples and config.train.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=config.train.early_stopping_patience))
    Trainer = make_trainer_class()
    return Trainer(
        model=model,
        args=_training_arguments(config, precision, scratch, use_checkpointing, len(samples), bool(val_samples)),
        train_dataset=samples,
        eval_dataset=val_samples or None,
        data_collator=Collator(tokenizer),
        callbacks=callbacks,
    )


def total_steps(config: Config, n_samples: int) -> int:
    t = config.train
    micro_batches = math.ceil(n_samples / t.batch_size)
    return t.max_steps if t.max_steps > 0 else math.ceil(math.ceil(micro_batches / t.grad_accum) * t.epochs)


def decide_checkpointing(config: Config, model, samples: list[dict], precision) -> bool:
    """Gradient checkpointing costs about a third more compute; use it only when activations would not fit.

    Activation estimate per layer for a micro-batch of b sequences of s tokens (Korthikanti et al. 2022,
    16-bit): s*b*h*(34 + 5*a*s/h) bytes, doubled for fp32. Compared with half the free memory.
    """
    setting = config.train.gradient_checkpointing
    if setting != "auto":
        return bool(setting)
    c = model.config
    hidden = getattr(c, "hidden_size", None) or getattr(c, "n_embd", 0)
    heads = getattr(c, "num_attention_heads", None) or getattr(c, "n_head", 1)
    layers = getattr(c, "num_hidden_layers", None) or getattr(c, "n_layer", 1)
    longest = max(len(s["input_ids"]) for s in samples)
    b = config.train.batch_size
    per_layer = longest * b * hidden * (34 + 5 * heads * longest / max(hidden, 1))
    need = per_layer * layers * (1 if precision.compute_dtype != torch.float32 else 2)
    return need > 0.5 * free_memory_bytes(precision.device)


def free_memory_bytes(device: str) -> float:
    if device == "cuda":
        return float(torch.cuda.mem_get_info()[0])
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return float(info["MemAvailable"].strip().split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return float("inf")  # unknown (macOS, Windows): do not slow training down on a guess


def _training_arguments(config: Config, precision, scratch: Path, use_checkpointing: bool, n_samples: int, validate: bool):
    from transformers import TrainingArguments

    t = config.train
    every = t.eval_steps or max(1, total_steps(config, n_samples) // 10)
    evaluation = dict(
        eval_strategy="steps", eval_steps=every, save_strategy="steps", save_steps=every, save_total_limit=2,
        load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=False,
        per_device_eval_batch_size=t.batch_size,
    ) if validate else dict(save_strategy="no")
    return TrainingArguments(
        **evaluation,
        output_dir=str(scratch / "trainer"),
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate,
        warmup_steps=t.warmup_steps,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        lr_scheduler_type=t.lr_scheduler,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps,
        report_to=[],
        bf16=precision.bf16,
        fp16=precision.fp16,
        use_cpu=precision.device == "cpu",
        seed=t.seed,
        data_seed=t.seed,
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        remove_unused_columns=False,
        activation_checkpointing=use_checkpointing,
        dataloader_num_workers=0,
    )


def _estimate_step_time(model, prepared: PreparedData, tokenizer, config: Config, precision) -> dict:
    """Time real forward+backward passes on two typical micro-batches; extrapolate to an epoch."""
    collate = Collator(tokenizer)
    t = config.train
    by_length = sorted(prepared.samples, key=lambda s: len(s["input_ids"]))
    middle = len(by_length) // 2
    batch = collate(by_length[middle : middle + t.batch_size] or by_length[: t.batch_size])
    device = precision.device
    model.to(device)
    model.train()
    timings = []
    for _ in range(2):
        start = time.perf_counter()
        with torch.autocast(device_type=device, dtype=precision.compute_dtype, enabled=precision.compute_dtype != torch.float32):
            inputs = {k: v.to(device) for k, v in batch.items()}
            lm = causal_lm_of(model)
            loss = answer_only_loss(lm, **inputs) if supports_answer_only(lm) else model(**inputs).loss
        loss.backward()
        timings.append(time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
    micro_batches = math.ceil(len(prepared.samples) / t.batch_size)
    per_micro = timings[-1]
    return {
        "seconds_per_micro_batch": per_micro,
        "seconds_per_optimizer_step": per_micro * t.grad_accum,
        "optimizer_steps_per_epoch": math.ceil(micro_batches / t.grad_accum),
        "seconds_per_epoch": per_micro * micro_batches,
    }


def train(config: Config, dry_run: bool = False, log: Callable[[str], None] = print) -> TrainResult:
    """Fine-tune `config.model` with LoRA on `config.data`; write the adapter to `config.train.output_dir`."""
    t = config.train
    started, start_clock = now_iso(), time.perf_counter()
    if not dry_run:
        check_output_free(t.output_dir, t.overwrite_output_dir)  # fail before minutes of loading, not after
    random.seed(t.seed)
    torch.manual_seed(t.seed)

    source = resolve_source(config.model.name_or_path)
    tokenizer = load_tokenizer(source, config.model.trust_remote_code)
    prepared = prepare_data(config, tokenizer, log)
    preflight(prepared, tokenizer, t.batch_size, log)

    precision = choose_precision(config.model.device, config.model.dtype)
    threads = f", {configure_cpu_threads()} threads" if precision.device == "cpu" else ""
    log(f"model: {describe(source)} on {precision.device}{threads}, compute dtype {str(precision.compute_dtype).removeprefix('torch.')}")
    model = load_model(source, config.model.trust_remote_code, dtype=frozen_weights_dtype(precision))
    model = add_lora(model, config.lora.r, config.lora.alpha, config.lora.dropout, config.lora.bias, config.lora.target_modules)
    trainable, total = model.get_nb_trainable_parameters()
    log(f"LoRA: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)")

    steps = total_steps(config, len(prepared.samples))

    if dry_run:
        estimate = _estimate_step_time(model, prepared, tokenizer, config, precision)
        log(
            f"dry run: {len(prepared.samples)} samples, {prepared.token_report.tokens} tokens, {steps} optimizer steps;"
            f" about {estimate['seconds_per_optimizer_step']:.2f} s per step, {estimate['seconds_per_epoch']:.1f} s per epoch"
        )
        return TrainResult(output_dir="", steps=steps, dry_run_estimate={**estimate, "samples": len(prepared.samples),
                                                                          "tokens": prepared.token_report.tokens, "optimizer_steps": steps})

    with atomic_output(t.output_dir, t.overwrite_output_dir) as out:
        loss_log = _LossLog(out / LOG_FILE)
        trainer = build_trainer(config, model, tokenizer, prepared.samples, precision, out, [loss_log.make_callback()],
                                prepared.val_samples)
        log(f"training: {steps} optimizer steps of {t.batch_size * t.grad_accum} samples")
        trainer.train()  # errors propagate: an untrained adapter is never saved (the tutorial's defect 9)

        losses = [e["loss"] for e in loss_log.entries if "loss" in e]
        final_loss = losses[-1] if losses else float("nan")
        if not math.isfinite(final_loss):
            raise LmtuneError(f"training diverged (loss {final_loss}); lower train.learning_rate (now {t.learning_rate})")

        _save_adapter(model, tokenizer, prepared, config, out)
        evals = [e for e in loss_log.entries if "eval_loss" in e]
        plot_loss([e["step"] for e in loss_log.entries if "loss" in e], losses, out / PLOT_FILE,
                  title=f"{Path(config.model.name_or_path).name}, {len(prepared.samples)} samples: training loss",
                  val_steps=[e["step"] for e in evals], val_losses=[e["eval_loss"] for e in evals])
        shutil.rmtree(out / "trainer", ignore_errors=True)
        seconds = time.perf_counter() - start_clock
        manifest = _manifest(config, prepared, precision, started, seconds, final_loss, trainer.state.global_step)
        if evals:
            best = min(evals, key=lambda e: e["eval_loss"])
            manifest["validation"] = {"samples": len(prepared.val_samples), "leaked_questions": prepared.leaked_val_questions,
                                      "best_eval_loss": best["eval_loss"], "best_step": best["step"],
                                      "stopped_early": trainer.state.global_step < steps}
            log(f"validation: best loss {best['eval_loss']:.4f} at step {best['step']}; that adapter is the one saved")
            manifest["validation"]["report"] = _final_report(model, tokenizer, prepared, config, precision, out, log)
        write_json(out / MANIFEST_FILE, manifest)
    log(f"saved adapter to {t.output_dir} (final loss {final_loss:.4f}, {seconds:.0f} s)")
    return TrainResult(t.output_dir, trainer.state.global_step, final_loss, loss_log.entries, seconds, model=model)


FINAL_REPORT_QUESTIONS = 200  # generation is the slow part of evaluation; a sample this size is enough to compare runs


def _final_report(model, tokenizer, prepared: PreparedData, config: Config, precision, out: Path, log) -> dict:
    """Greedy generations on the validation questions, scored, written to <adapter>/eval/ (report.md, predictions.jsonl)."""
    from .evaluate import evaluate_model, format_table, write_report
    from .generate import LoadedModel

    examples = prepared.val_examples[:FINAL_REPORT_QUESTIONS]
    loaded = LoadedModel(model.eval(), tokenizer, prepared.template, precision.device, precision.compute_dtype)
    result = evaluate_model(loaded, examples, config.generate, "tuned", batch_size=max(config.train.batch_size, 8))
    (out / "eval").mkdir()
    figures = {"model": config.train.output_dir, "data": ["validation split"], "n": len(examples),
               "max_new_tokens": config.generate.max_new_tokens, "tuned": result.figures(), "base": None}
    write_report(out / "eval", examples, result, None, figures, out / PLOT_FILE)
    log(f"validation: {format_table(result, None, len(examples))}")
    return {"n": len(examples), **result.figures()}


def _save_adapter(model, tokenizer, prepared: PreparedData, config: Config, out: Path) -> None:
    model.save_pretrained(out)  # adapter_model.safetensors + adapter_config.json
    tokenizer.save_pretrained(out)
    prepared.template.save(out)
    config.save_yaml(out / CONFIG_FILE)


def _manifest(config: Config, prepared: PreparedData, precision, started: str, seconds: float, final_loss: float, steps: int) -> dict:
    files = [
        {"path": f, "sha256": file_sha256(f) if Path(f).is_file() else None}
        for f in prepared.load_report.files
    ]
    lengths = [len(s["input_ids"]) for s in prepared.samples]
    return {
        "base_model": config.model.name_or_path,
        "command": command_line(),
        "data": {
            "files": files,
            "rows_read": prepared.load_report.rows_read,
            "rows_skipped_empty": prepared.load_report.skipped_empty,
            "samples": len(prepared.samples),
            "tokens": prepared.token_report.tokens,
            "trained_tokens": prepared.token_report.trained_tokens,
            "truncated": prepared.token_report.truncated,
            "median_length": statistics.median(lengths),
        },
        "template": prepared.template.kind,
        "device": precision.device,
        "compute_dtype": str(precision.compute_dtype).removeprefix("torch."),
        "seed": config.train.seed,
        "optimizer_steps": steps,
        "final_loss": final_loss,
        "started": started,
        "finished": now_iso(),
        "seconds": round(seconds, 1),
        "versions": library_versions(),
    }
