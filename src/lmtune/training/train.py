"""train(config): one training run around the transformers Trainer, whatever the method.

Setup (tokenizer, the method's data and pre-flight check) -> the method's model -> Trainer with the method's loss ->
the method saves what it trained, with everything needed to reproduce and reuse it, atomically. What differs between
methods (LoRA, full fine-tuning, preference tuning) lives in `training.methods`; this module owns what they share:
the run folder and its lock, graceful stop, resume, checkpoints, the batch plan, compiling, the log, plot and manifest.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from .. import families, processes
from ..config import Config
from ..cpu_memory import trim_heap_callback, trim_heap_every
from ..data.template import PromptTemplate
from ..errors import LmtuneError, TrainingInterrupted
from ..model import adapter_saving, choose_precision, configure_cpu_threads, describe, load_tokenizer, resolve_source
from ..outputs import (
    CONFIG_FILE,
    LOG_FILE,
    MANIFEST_FILE,
    PLOT_FILE,
    command_line,
    disk_full_error,
    file_sha256,
    library_versions,
    now_iso,
    write_json,
)
from ..safeload import check_model_weights
from . import compiled, distributed, micro_batches
from .checkpoints import (
    CHECKPOINTS_DIR,
    RUN_CONFIG_FILE,
    GracefulStop,
    RunFolder,
    checkpoint_callback,
    open_run_folder,
    resume_command,
)
from .loss import causal_lm_of, supports_answer_only
from .methods import PreparedData, TrainingMethod, method_for
from .plot import plot_loss
from .int8_matmuls import cpu_has_vnni, int8_matmuls
from .int8_matmuls import decide as int8_decide
from .quantization import check_quantization


@dataclass
class TrainResult:
    output_dir: str
    steps: int = 0
    final_loss: float = float("nan")
    log: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    dry_run_estimate: dict | None = None
    model: object = field(default=None, repr=False)  # the trained PeftModel, for use right away
    # What the end-of-run validation report needs (evaluation.evaluate.validation_report): the trained model is
    # asked exactly as inference would ask it. Empty on ranks other than 0 and when there is no validation data.
    tokenizer: object = field(default=None, repr=False)
    template: PromptTemplate | None = None
    val_examples: list = field(default_factory=list, repr=False)
    device: str = "cpu"
    compute_dtype: torch.dtype = torch.float32
    sharded_engine: str | None = None  # FSDP / ZeRO-3: no process holds the whole model, so no generation report


class _LossLog:
    """Collects the Trainer's log entries and appends them to train_log.jsonl as they come."""

    def __init__(self, path: Path, resume_step: int | None = None, write: bool = True):
        self.path = path
        self.write = write  # every process sees the same (already averaged) entries; one writes them
        self.entries: list[dict] = []
        if write and resume_step is not None and path.is_file():  # keep what was logged up to the checkpoint, drop the rest
            lines = path.read_text(encoding="utf-8").splitlines()
            self.entries = [e for e in map(json.loads, filter(None, lines)) if e.get("step", 0) <= resume_step]
            path.write_text("".join(json.dumps(e) + "\n" for e in self.entries), encoding="utf-8")

    def make_callback(self):
        from transformers import TrainerCallback

        outer = self

        class Callback(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and ("loss" in logs or "eval_loss" in logs):
                    entry = {"step": state.global_step, "epoch": round(state.epoch or 0, 4), **logs, "time": now_iso()}
                    outer.entries.append(entry)
                    if not outer.write:
                        return
                    with open(outer.path, "a", encoding="utf-8") as f:
                        f.write(json.dumps(entry) + "\n")

        return Callback()


def build_trainer(config: Config, model, tokenizer, samples: list[dict], precision, scratch: Path, callbacks=(),
                  val_samples: list[dict] | None = None, verbose: bool = False, method: TrainingMethod | None = None,
                  per_device: int | None = None):
    """The Trainer lmtune trains with: the method's loss and batches (for supervised methods the answer-only loss and
    dynamic padding with the label-contract check), and with validation samples: periodic validation loss, best
    weights kept, optional early stopping."""
    from transformers import EarlyStoppingCallback

    method = method or method_for(config)

    per_device = per_device or config.train.batch_size  # rows per micro-batch: 1 packed row, or batch_size samples
    use_checkpointing = decide_checkpointing(config, model, samples, precision, per_device)
    if use_checkpointing:
        # LoRA freezes the embeddings, so checkpointed blocks would get inputs that need no grad and skip backward.
        model.enable_input_require_grads()
    callbacks = list(callbacks)
    if val_samples and config.train.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=config.train.early_stopping_patience))
    if config.train.report_to == "tensorboard" and processes.is_main_process():
        callbacks.append(_tensorboard_callback(scratch / TENSORBOARD_DIR))
    Trainer = method.trainer_class()
    trainer = Trainer(
        model=model,
        args=_training_arguments(config, precision, scratch, use_checkpointing, len(samples), bool(val_samples), per_device),
        train_dataset=samples,
        eval_dataset=val_samples or None,
        data_collator=method.collator(tokenizer),
        callbacks=callbacks,
    )
    # The Trainer's console (a raw dictionary per step, a bar per evaluation) gives way to one bar with the figures.
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from .console import ConsoleProgress, ReclaimCpuThreads

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if processes.is_main_process():
        trainer.add_callback(ConsoleProgress(verbose))
    if precision.device == "cpu":  # cores shared with another lmtune process come back when it ends
        trainer.add_callback(ReclaimCpuThreads(show=processes.is_main_process()))
        every = trim_heap_every()
        if every:  # freed activation memory goes back to the system (cpu_memory.py)
            trainer.add_callback(trim_heap_callback(every))
    return trainer


TENSORBOARD_DIR = "tensorboard"
# Trainer integrations (train.report_to) -> the package each needs
REPORT_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio",
                   "comet_ml": "comet_ml", "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab",
                   "neptune": "neptune"}


def check_report_to(report_to: str) -> None:
    """Before anything is loaded: the logging integration asked for must be installed (it is an optional extra)."""
    import importlib.util

    package = REPORT_PACKAGES.get(report_to)
    if package and importlib.util.find_spec(package) is None:
        extra = " (or pip install 'lmtune[tensorboard]')" if report_to == "tensorboard" else ""
        raise LmtuneError(f"train.report_to is {report_to!r} but the '{package}' package is not installed: "
                          f"pip install {package}{extra}, or set train.report_to none")


def _tensorboard_callback(folder: Path):
    """The Trainer's TensorBoard logger, writing to `folder` inside the run (renamed with it into the output folder)."""
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    return TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(folder)))


def per_device_rows(config: Config, prepared: PreparedData) -> int:
    """Rows of one micro-batch: one packed row (about train.batch_size samples long, data/packing.py), or
    train.batch_size samples."""
    return 1 if prepared.packing else config.train.batch_size


def total_steps(config: Config, n_samples: int, processes: int = 1, per_device: int | None = None) -> int:
    """Optimizer steps of the run. Each of `processes` gets every processes-th micro-batch (as the Trainer shards them)."""
    t = config.train
    micro_batches = math.ceil(math.ceil(n_samples / (per_device or t.batch_size)) / processes)
    return t.max_steps if t.max_steps > 0 else math.ceil(math.ceil(micro_batches / t.grad_accum) * t.epochs)


def decide_checkpointing(config: Config, model, samples: list[dict], precision, per_device: int | None = None) -> bool:
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
    layers = families.layer_count(c) or 1
    longest = max(len(s["input_ids"]) for s in samples)
    b = per_device or config.train.batch_size
    per_layer = longest * b * hidden * (34 + 5 * heads * longest / max(hidden, 1))
    need = per_layer * layers * (1 if precision.compute_dtype != torch.float32 else 2)
    return need > 0.5 * free_memory_bytes(precision.device)


def run_disk_bytes(model, keep_checkpoints: int, output_kind: str) -> tuple[int, str]:
    """(bytes, what they are) the run writes at most: the saved weights, and the checkpoints kept at once (each the
    trained weights with AdamW's two moments; one more than kept exists while the newest is written)."""
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    saved = sum(p.numel() * p.element_size() for p in model.parameters()) if output_kind == "model" else trainable
    checkpoint = saved + 2 * sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    kept = keep_checkpoints + 1
    return saved + kept * checkpoint, f"the {output_kind} {_size(saved)} and up to {kept} checkpoints of {_size(checkpoint)}"


def _size(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def free_disk_bytes(path: Path) -> int:
    while not path.exists():  # the run folder may not exist yet: the disk it will be on
        path = path.parent
    return shutil.disk_usage(path).free


def check_disk_space(folder: Path, model, keep_checkpoints: int, output_kind: str) -> None:
    """Refuse before the first step a run whose outputs cannot fit, rather than train to the end and fail at saving."""
    needed, what = run_disk_bytes(model, keep_checkpoints, output_kind)
    free = free_disk_bytes(Path(folder))
    if needed > free:
        raise LmtuneError(f"not enough free disk space for this run: it writes up to {_size(needed)} ({what}) and "
                          f"{Path(folder).parent} has {_size(free)} free; free some space, choose another --output-dir, "
                          f"or keep fewer checkpoints (train.keep_checkpoints {keep_checkpoints})")


def free_memory_bytes(device: str) -> float:
    if device == "cuda":
        return float(torch.cuda.mem_get_info()[0])
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return float(info["MemAvailable"].strip().split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return float("inf")  # unknown (macOS, Windows): do not slow training down on a guess


def _training_arguments(config: Config, precision, scratch: Path, use_checkpointing: bool, n_samples: int, validate: bool,
                        per_device: int):
    from transformers import TrainingArguments

    t = config.train
    every = t.eval_steps or max(1, total_steps(config, n_samples, processes.world_size(), per_device) // 10)
    evaluation = dict(
        eval_strategy="steps", eval_steps=every, save_strategy="steps", save_steps=every,
        load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=False,
        per_device_eval_batch_size=t.batch_size,
    ) if validate else dict(save_strategy="no")
    return TrainingArguments(
        **evaluation,
        output_dir=str((scratch / CHECKPOINTS_DIR).resolve()),  # the trainer state records paths inside it
        save_total_limit=None,  # checkpoints.prune_checkpoints keeps train.keep_checkpoints complete ones
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate,
        warmup_steps=t.warmup_steps,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        lr_scheduler_type=t.lr_scheduler,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps,
        # TensorBoard gets its own callback (build_trainer) so that it writes inside the run folder.
        report_to=[t.report_to] if t.report_to not in ("none", "tensorboard") else [],
        neftune_noise_alpha=t.neftune_noise_alpha or None,
        bf16=precision.bf16,
        fp16=precision.fp16,
        use_cpu=precision.device == "cpu",
        seed=t.seed,
        data_seed=t.seed,
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        remove_unused_columns=False,
        # On resume, early stopping's patience counter and a pending stop come back with the checkpoint.
        restore_callback_states_from_checkpoint=True,
        activation_checkpointing=use_checkpointing,
        dataloader_num_workers=0,
        disable_tqdm=True,  # training.console shows the progress
        include_num_input_tokens_seen="non_padding",  # for the tokens/s it shows
        # DDP: every LoRA weight takes part in every forward pass, so skip the search for unused ones
        # (an extra walk of the autograd graph per step).
        ddp_find_unused_parameters=False,
    )


# The validation report after the run (evaluation.validation_report) asks at most this many questions, in batches of
# at least this size; kept equal to evaluation's constants (a test checks), which training cannot import.
REPORT_QUESTIONS, REPORT_MIN_BATCH = 200, 8


def _estimate_run_time(method: TrainingMethod, model, prepared: PreparedData, tokenizer, config: Config, precision,
                       steps: int) -> dict:
    """What the run will cost, from real passes on this machine: forward + backward timed on several micro-batches
    spread over the length range (after an untimed warm-up, which pays one-time costs), scaled to the run's steps;
    with validation data, the periodic validation loss and the end-of-run validation report (greedy answers: a
    prefill and decoding steps timed on a batch of validation prompts)."""
    collate = method.collator(tokenizer)
    t = config.train
    device, dtype = precision.device, precision.compute_dtype
    autocast = lambda: torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32)  # noqa: E731
    model.to(device)

    def to_device(batch):
        return {k: v.to(device) for k, v in batch.items()}

    def timed(fn) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    def forward_backward(batch) -> None:
        with autocast():
            loss = method.loss(model, batch)
        loss.backward()

    # group_by_length makes the run's micro-batches runs of similar lengths: time some across the whole range.
    by_length = sorted(prepared.train_rows, key=lambda s: len(s["input_ids"]))
    per_device = per_device_rows(config, prepared)
    last = max(0, len(by_length) - per_device)
    starts = sorted({round(q * last) for q in (0.1, 0.35, 0.65, 0.9)})
    batches = [to_device(collate(by_length[i : i + per_device])) for i in starts]
    model.train()
    forward_backward(batches[len(batches) // 2])  # warm-up
    per_micro = statistics.mean(timed(lambda b=b: forward_backward(b)) for b in batches)
    model.zero_grad(set_to_none=True)
    micro_batches = math.ceil(len(prepared.train_rows) / per_device)
    per_step = per_micro * t.grad_accum
    estimate = {
        "seconds_per_micro_batch": per_micro,
        "micro_batches_timed": len(batches),
        "seconds_per_optimizer_step": per_step,
        "optimizer_steps_per_epoch": math.ceil(micro_batches / t.grad_accum),
        "seconds_per_epoch": per_micro * micro_batches,
        "seconds_training": per_step * steps,
        "validation_evaluations": 0,
        "seconds_validation_loss": 0.0,
        "validation_report_questions": 0,
        "seconds_validation_report": 0.0,
    }
    if prepared.val_samples:
        model.eval()
        with torch.no_grad(), compiled.eager():  # validation runs eager in the run too (training/compiled.py)
            val = sorted(prepared.val_samples, key=lambda s: len(s["input_ids"]))
            val_batch = to_device(collate(val[len(val) // 2 : len(val) // 2 + t.batch_size] or val[: t.batch_size]))
            with autocast():
                per_val_batch = timed(lambda: method.loss(model, val_batch))
            every = t.eval_steps or max(1, steps // 10)
            evaluations = steps // every
            val_batches = math.ceil(len(val) / t.batch_size)
            # The report also computes the answer loss once: one more pass over the validation samples.
            estimate["validation_evaluations"] = evaluations
            estimate["seconds_validation_loss"] = (evaluations + 1) * val_batches * per_val_batch
            questions = min(REPORT_QUESTIONS, len(prepared.val_examples))
            size = max(t.batch_size, REPORT_MIN_BATCH)
            prefill, per_token = _time_decoding(model, val[:size], tokenizer, device, autocast)
            estimate["validation_report_questions"] = questions
            # At most: an answer that ends with EOS earlier costs less.
            estimate["seconds_validation_report"] = (math.ceil(questions / size)
                                                     * (prefill + config.generate.max_new_tokens * per_token))
        model.train()
    estimate["seconds_total"] = (estimate["seconds_training"] + estimate["seconds_validation_loss"]
                                 + estimate["seconds_validation_report"])
    return estimate


def _time_decoding(model, samples: list[dict], tokenizer, device: str, autocast, steps: int = 4) -> tuple[float, float]:
    """(seconds of the prefill, seconds per new token) for a batch of these samples' prompts, decoded greedily by the
    loop every answer goes through (lmtune.decoding)."""
    from ..decoding import decode, greedy

    prompts = [[i for i, label in zip(s["input_ids"], s["labels"]) if label == -100] or s["input_ids"][:1] for s in samples]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    times = [time.perf_counter()]

    def observe(tokens: list[int]) -> list[bool]:  # told each token once the prefill, then each step, has run
        times.append(time.perf_counter())
        return [False] * len(tokens)

    with autocast():
        decode(model, prompts, pad, steps + 1, greedy, observe, device)
    return times[1] - times[0], (times[-1] - times[1]) / steps


def duration(seconds: float) -> str:
    """'42 s', '3 min 05 s', '1 h 20 min'."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def _describe_estimate(e: dict, prepared: PreparedData, steps: int, config: Config) -> str:
    t = config.train
    lines = [f"dry run: {len(prepared.samples)} samples, {prepared.token_report.tokens} tokens, {steps} optimizer steps",
             f"  training: about {e['seconds_per_optimizer_step']:.2f} s per step (forward + backward timed on "
             f"{e['micro_batches_timed']} micro-batches of {t.batch_size}, x{t.grad_accum} per step), "
             f"{duration(e['seconds_per_epoch'])} per epoch, {duration(e['seconds_training'])} for the run"]
    if prepared.val_samples:
        lines.append(f"  validation loss: {e['validation_evaluations']} evaluations of {len(prepared.val_samples)} samples "
                     f"and one for the report, about {duration(e['seconds_validation_loss'])}")
        lines.append(f"  validation report: greedy answers to {e['validation_report_questions']} questions, up to "
                     f"{config.generate.max_new_tokens} new tokens each, at most {duration(e['seconds_validation_report'])}")
    lines.append(f"  whole run: about {duration(e['seconds_total'])} (this machine, now; another process computing "
                 f"beside it slows it down)")
    return "\n".join(lines)


def train(config: Config, dry_run: bool = False, log: Callable[[str], None] = print, verbose: bool = False) -> TrainResult:
    """Fine-tune `config.model` on `config.data` with `config.train.method`; write what it trained (an adapter, or a
    whole model) to `config.train.output_dir`.

    `verbose`: every log entry (loss, learning rate, gradient norm, ...) on screen too; it is always in train_log.jsonl."""
    main = processes.is_main_process()  # under torchrun / accelerate launch only rank 0 prints and writes
    if not main:
        log = processes.quiet
        processes.silence_library_output()
    plan = distributed.batch_plan(config.train.batch_size, config.train.grad_accum, config.train.global_batch_size,
                                  processes.world_size())
    config = replace(config, train=replace(config.train, grad_accum=plan.grad_accum))
    t = config.train
    method = method_for(config)
    started, start_clock = now_iso(), time.perf_counter()
    check_quantization(config.model)  # before anything is loaded or written: QLoRA needs a CUDA GPU and bitsandbytes
    check_report_to(t.report_to)
    method.check()
    # Fail before minutes of loading, not after: the output must be free, a --resume must find its checkpoint.
    # Every process checks (and finds the same checkpoint); only rank 0 creates, renames or removes the run folder.
    run = None if dry_run else open_run_folder(t.output_dir, t.overwrite_output_dir, t.resume, log,
                                               replace(config, train=replace(t, resume=False)))
    # Until the run starts, an error (bad data, a missing model) must not leave the run folder locked for the rest
    # of a long-lived process (a notebook); once started, the run's own error handling releases it.
    try:
        random.seed(t.seed)
        torch.manual_seed(t.seed)

        source = resolve_source(config.model.name_or_path)
        if not source.gguf_file:  # refuse pickle-only weights before the data work (a GGUF file is not a pickle)
            check_model_weights(source.path, config.model.allow_pickle)
        tokenizer = load_tokenizer(source, config.model.trust_remote_code)
        prepared = method.prepare_data(tokenizer, log)
        method.preflight(prepared, tokenizer, log)

        precision = choose_precision(config.model.device, config.model.dtype)
        threads = f", {configure_cpu_threads(log)} threads" if precision.device == "cpu" else ""
        log(f"model: {describe(source)} on {precision.device}{threads}, compute dtype {str(precision.compute_dtype).removeprefix('torch.')}")
        model = method.load_model(source, precision, log)
        method.arrange(prepared, causal_lm_of(model), precision, log)
        config = _merge_micro_batches(config, method, model, prepared, precision, plan.processes, log)

        steps = total_steps(config, len(prepared.train_rows), plan.processes, per_device_rows(config, prepared))
        if not dry_run and main:
            check_disk_space(run.partial, model, t.keep_checkpoints, method.output_kind)
        use_compile = _decide_compile(config, method, model, prepared, precision, steps, plan.processes, log)
        use_int8 = _decide_int8(config, method, precision, use_compile, plan.processes, log)

        if dry_run:
            with compiled.compiled_layers(causal_lm_of(model), use_compile, strict=t.compile is True), \
                    int8_matmuls(model, use_int8):
                estimate = _estimate_run_time(method, model, prepared, tokenizer, config, precision, steps)
            log(_describe_estimate(estimate, prepared, steps, config))
            return TrainResult(output_dir="", steps=steps, dry_run_estimate={**estimate, "samples": len(prepared.samples),
                                                                              "tokens": prepared.token_report.tokens, "optimizer_steps": steps})

    except BaseException:
        if run is not None:
            run.release()
        raise
    # The run folder keeps the config as written (t: before any merge of micro-batches, which a resume redoes).
    requested = replace(config, train=replace(t, resume=False))
    if main:
        run.start(requested, log)
    try:
        with adapter_saving():
            result = _train_in(run, config, method, model, tokenizer, prepared, precision, steps, started, start_clock,
                               log, verbose, use_compile, requested, use_int8)
    except BaseException as error:
        lost = distributed.lost_peer(error)  # another machine or process of the run went away
        if not main:
            if lost:
                raise LmtuneError(f"training stopped: {lost}. Rank 0 says which checkpoint is kept and how to resume "
                                  f"(the same command with --resume, on every machine)") from error
            raise
        kept = run.discard_unless_resumable(error)
        if lost:
            raise LmtuneError(_interrupted_message(run, lost, steps)) from error
        if kept and isinstance(error, KeyboardInterrupt):  # a second Ctrl-C: stopped at once, no new checkpoint
            raise TrainingInterrupted(_interrupted_message(run, "stopped at once", steps)) from None
        full = disk_full_error(error, run.final)
        if full and kept:
            raise type(full)(f"{full}. The run's checkpoints are kept in {run.partial}: after freeing space, "
                             f"continue with --resume") from error
        raise full or error
    if main:
        run.finish()
    log(f"saved {'adapter' if method.output_kind == 'adapter' else 'model'} to {t.output_dir} (final loss {result.final_loss:.4f}, {result.seconds:.0f} s)")
    return result


def _merge_micro_batches(config: Config, method: TrainingMethod, model, prepared: PreparedData, precision,
                         n_processes: int, log) -> Config:
    """On a CPU with one process, the config with the micro-batches of each optimizer step merged into larger ones
    (training/micro_batches.py), said in one line; else the config as it is."""
    t = config.train
    if (precision.device != "cpu" or n_processes != 1 or not method.merges_micro_batches or prepared.packing
            or t.grad_accum == 1 or not supports_answer_only(causal_lm_of(model))):
        return config
    rows = prepared.train_rows
    split = micro_batches.merged_split(
        t.batch_size, t.grad_accum, [len(s["input_ids"]) for s in rows], getattr(method, "width_multiple", 1),
        t.cpu_micro_batch, lambda per_device: decide_checkpointing(config, model, rows, precision, per_device))
    if split.merged == 1:
        return config
    log(micro_batches.describe(split, t.batch_size, t.grad_accum))
    return replace(config, train=replace(t, batch_size=split.batch_size, grad_accum=split.grad_accum))


def _decide_compile(config: Config, method: TrainingMethod, model, prepared: PreparedData, precision, steps: int,
                    n_processes: int, log) -> bool:
    """Whether the decoder layers are compiled for this run (training/compiled.py), said in one line."""
    t = config.train
    rows = prepared.train_rows
    mean_length = sum(len(s["input_ids"]) for s in rows) / max(1, len(rows))
    per_device = per_device_rows(config, prepared)
    tokens = mean_length * per_device * t.grad_accum * n_processes * steps
    checkpointing = decide_checkpointing(config, model, rows, precision, per_device)
    use, why = compiled.decide(t.compile, device=precision.device, processes=n_processes,
                               method_blocker=method.compile_blocker(), quantized=config.model.quantization != "none",
                               checkpointing=checkpointing, causal_lm=causal_lm_of(model), tokens=tokens)
    if use or t.compile is not False:
        log(f"compile: {why}")
    return use


def _decide_int8(config: Config, method: TrainingMethod, precision, use_compile: bool, processes: int,
                 log) -> bool:
    """Whether the frozen base weights multiply in int8 for this run (training/int8_matmuls.py), said in one line."""
    setting = config.train.int8_matmuls
    use, why = int8_decide(setting, device=precision.device, compute_dtype=precision.compute_dtype,
                           method_blocker=method.int8_blocker(), quantized=config.model.quantization != "none",
                           vnni=cpu_has_vnni(), compiled=use_compile, processes=processes)
    if use:  # said only when on: where auto leaves it off, the run computes as it always did
        log(f"int8 matmuls: {why}")
    return use


def _train_in(run: RunFolder, config: Config, method: TrainingMethod, model, tokenizer, prepared: PreparedData, precision,
              steps: int, started: str, start_clock: float, log, verbose: bool = False,
              use_compile: bool = False, requested: Config | None = None, use_int8: bool = False) -> TrainResult:
    """Train, writing everything into the run folder; raises TrainingInterrupted after a graceful stop."""
    t = config.train
    out = run.partial
    resume_step = run.resume_step
    main = processes.is_main_process()
    loss_log = _LossLog(out / LOG_FILE, resume_step, write=main)
    method.before_training(model, tokenizer, prepared, out)
    with GracefulStop(log) as stop:
        callbacks = [loss_log.make_callback(), checkpoint_callback(stop, out, t.checkpoint_minutes, t.keep_checkpoints)]
        trainer = build_trainer(config, model, tokenizer, prepared.train_rows, precision, out, callbacks, prepared.val_samples,
                                verbose, method, per_device_rows(config, prepared))
        if run.resume_from:
            log(f"resume: continuing from {run.resume_from} (step {resume_step} of {steps})")
        plan = distributed.batch_plan(per_device_rows(config, prepared), t.grad_accum, 0, processes.world_size())
        engine = distributed.engine(trainer)
        what = plan.describe(f"packed rows of {prepared.packing['length']} tokens" if prepared.packing else "samples")
        log(f"training: {steps} optimizer steps of {what}" + (f" with {engine}" if engine else ""))
        # Errors propagate: an untrained adapter is never saved (the tutorial's defect 9).
        with compiled.compiled_layers(causal_lm_of(model), use_compile, strict=t.compile is True), \
                int8_matmuls(model, use_int8):
            trainer.train(resume_from_checkpoint=str(run.resume_from) if run.resume_from else None)
        # Every process may still be reading the best checkpoint back; rank 0 deletes checkpoints only after this.
        trainer.accelerator.wait_for_everyone()
    if stop.requested and trainer.state.global_step < steps:
        raise TrainingInterrupted(_interrupted_message(run, f"{stop.signal_name} received", steps))

    losses = [e["loss"] for e in loss_log.entries if "loss" in e]
    final_loss = losses[-1] if losses else float("nan")
    if processes.is_main_process() and not math.isfinite(final_loss):
        raise LmtuneError(f"training diverged (loss {final_loss}); lower train.learning_rate (now {t.learning_rate})")

    state_dict = distributed.gathered_state_dict(trainer)  # FSDP / DeepSpeed: every process joins the gather
    if not main:  # the others have trained; rank 0 writes the one copy of every output
        return TrainResult(t.output_dir, trainer.state.global_step, final_loss, loss_log.entries, 0.0, model=model)
    method.save(model, tokenizer, prepared, out, state_dict)
    (requested or replace(config, train=replace(t, resume=False))).save_yaml(out / CONFIG_FILE)
    evals = [e for e in loss_log.entries if "eval_loss" in e]
    plot_loss([e["step"] for e in loss_log.entries if "loss" in e], losses, out / PLOT_FILE,
              title=f"{Path(config.model.name_or_path).name}, {len(prepared.samples)} samples: training loss",
              val_steps=[e["step"] for e in evals], val_losses=[e["eval_loss"] for e in evals])
    seconds = time.perf_counter() - start_clock
    manifest = _manifest(config, method, prepared, precision, started, seconds, final_loss, trainer.state.global_step,
                         use_int8)
    if run.resume_from:
        manifest["resumed_from_step"] = resume_step
    if evals:
        best = min(evals, key=lambda e: e["eval_loss"])
        manifest["validation"] = {"samples": len(prepared.val_samples), "leaked_questions": prepared.leaked_val_questions,
                                  "best_eval_loss": best["eval_loss"], "best_step": best["step"],
                                  "stopped_early": trainer.state.global_step < steps}
        log(f"validation: best loss {best['eval_loss']:.4f} at step {best['step']}; that adapter is the one saved")
    write_json(out / MANIFEST_FILE, manifest)
    return TrainResult(t.output_dir, trainer.state.global_step, final_loss, loss_log.entries, seconds, model=model,
                       tokenizer=tokenizer, template=prepared.template, val_examples=prepared.val_examples if evals else [],
                       device=precision.device, compute_dtype=precision.compute_dtype,
                       sharded_engine=distributed.sharded_engine(trainer))


def _interrupted_message(run: RunFolder, why: str, steps: int) -> str:
    newest = run.newest_checkpoint()
    if newest is None:
        return f"training interrupted ({why}) before its first checkpoint; nothing to resume, run the command again"
    return (f"training interrupted ({why}); checkpoint of step {newest.name.removeprefix('checkpoint-')} of {steps} "
            f"saved in {newest}\nresume with:\n  {resume_command(run.partial / RUN_CONFIG_FILE)}")


def _manifest(config: Config, method: TrainingMethod, prepared: PreparedData, precision, started: str, seconds: float,
              final_loss: float, steps: int, int8_matmuls: bool = False) -> dict:
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
            "packing": prepared.packing,
        },
        "template": prepared.template.kind,
        "method": method.manifest(),
        "device": precision.device,
        "compute_dtype": str(precision.compute_dtype).removeprefix("torch."),
        "int8_matmuls": int8_matmuls,  # the frozen base weights multiplied in int8 (training/int8_matmuls.py)
        "seed": config.train.seed,
        "optimizer_steps": steps,
        "final_loss": final_loss,
        "started": started,
        "finished": now_iso(),
        "seconds": round(seconds, 1),
        "versions": library_versions(),
    }
