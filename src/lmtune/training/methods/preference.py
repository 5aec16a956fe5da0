"""What preference tuning methods share (DPO in dpo.py, ORPO in orpo.py, KTO in kto.py): LoRA on the base (or on an
earlier run's adapter), preference data, answer log-probabilities, the reference, the trainer and its log figures.
Each method module adds only its objective.

The reference is the model as training starts: with the adapter switched off (the base, no second copy in memory),
or, when `train.init_adapter` continues an earlier run's adapter (the usual path: SFT, then DPO), with that adapter as
loaded. Its log-probabilities are computed once before the first step, in the training precision, and kept in the
run folder, so a resumed run uses the same ones.

Why by hand and not TRL's DPOTrainer/KTOTrainer: lmtune's label contract puts the prompt ids exactly as chat and serve
build them (the model's chat template or lmtune's plain template, `PromptTemplate`), where TRL tokenizes prompt and
answers its own way; and the output head runs only at answer positions (`answer_logps`), where TRL computes the whole
[tokens, vocabulary] logits for prompt positions too. Chosen and rejected answers share one forward pass
(concatenated batch, `data.preferences.PreferenceCollator`), as TRL does.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ... import processes
from ...data.preferences import PreferenceCollator, load_preferences, tokenize_preferences
from ...data.split import split_train_val
from ...data.template import PromptTemplate
from ...data.tokenize import IGNORE_INDEX
from ...errors import LmtuneError
from ..attention import attention_for_batch
from ..compiled import eager
from ..loss import causal_lm_of, supports_answer_only
from .base import PreparedData, TrainingMethod
from .lora import load_lora_model, lora_manifest, save_adapter

REFERENCE_FILE = "reference_logps.json"


def answer_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the log-probabilities of each row's trained tokens, their count): the head runs at those positions only."""
    targets = labels[:, 1:]
    trained = targets != IGNORE_INDEX
    causal_lm = causal_lm_of(model)
    if supports_answer_only(causal_lm) and not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        backbone = getattr(causal_lm, causal_lm.base_model_prefix)
        with attention_for_batch(causal_lm, input_ids):
            hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        head = causal_lm.get_output_embeddings()
        logits = F.linear(hidden[:, :-1][trained], head.weight, head.bias)
    else:  # logits transformed after the head (soft-capping), or a distributed wrapper that must see its forward
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1][trained]
    token_logps = torch.log_softmax(logits.float(), dim=-1).gather(1, targets[trained][:, None]).squeeze(1)
    rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(trained)[trained]
    sums = torch.zeros(labels.shape[0], dtype=torch.float32, device=labels.device).index_add(0, rows, token_logps)
    return sums, trained.sum(1)


# ---------------------------------------------------------------- the method


class PreferenceMethod(TrainingMethod):
    """DPO, ORPO or KTO (`name`) on a LoRA adapter."""

    def __init__(self, config):
        super().__init__(config)
        self.settings = config.preference
        self.precision = None

    paired = True  # rows of (prompt, chosen, rejected); False: (prompt, completion, label)

    @property
    def uses_reference(self) -> bool:
        return True

    def prepare_data(self, tokenizer, log: Callable[[str], None] = print) -> PreparedData:
        d = self.config.data
        template = PromptTemplate.for_tokenizer(tokenizer, d.template, d.system_prompt)
        examples, report = load_preferences(d.paths, d.max_samples, d.csv_delimiter)
        if any(e.paired != self.paired for e in examples):
            wanted = "prompt, chosen and rejected" if self.paired else "prompt, completion and label"
            other = "kto" if self.paired else "dpo or orpo"
            raise LmtuneError(f"{examples[0].where}: train.method {self.name} learns from rows with {wanted}; this file "
                              f"has the other kind (use train.method {other})")
        examples, val_examples = split_train_val(examples, d.val_size, d.seed)
        if d.eval_paths:
            val_examples += load_preferences(d.eval_paths, 0, d.csv_delimiter)[0]
        samples, token_report = tokenize_preferences(examples, tokenizer, template, d.max_length)
        val_samples = tokenize_preferences(val_examples, tokenizer, template, d.max_length)[0] if val_examples else []
        if self.paired:
            what = f"{len(samples)} pairs (prompt, chosen, rejected)"
        else:
            good = sum(s["label"] for s in samples)
            what = f"{len(samples)} answers ({good} good, {len(samples) - good} bad)"
            if not good or good == len(samples):
                raise LmtuneError(f"{', '.join(report.files)}: KTO needs answers marked good and answers marked bad; "
                                  f"all {len(samples)} are {'good' if good else 'bad'}")
        log(f"data: {report.rows_read} rows from {len(report.files)} file(s): {what}; {token_report.tokens} tokens "
            f"({token_report.trained_tokens} trained)")
        if token_report.truncated:
            log(f"data: {token_report.truncated} answers cut at data.max_length={d.max_length} (they lose their EOS)")
        if token_report.dropped_long_prompt:
            log(f"data: dropped {token_report.dropped_long_prompt} rows whose prompt alone exceeds data.max_length")
        if val_examples:
            log(f"validation: {len(val_samples)} rows")
        return PreparedData(template, samples, report, token_report, val_samples, 0, val_examples)

    def preflight(self, prepared: PreparedData, tokenizer, log: Callable[[str], None] = print) -> None:
        from ...data.collate import render_example

        shown = prepared.samples[0]
        log("pre-flight: one tokenized row (what the loss sees)")
        log(render_example(shown, tokenizer))
        if "rejected_input_ids" in shown:
            log("  rejected answer:")
            log(render_example({"input_ids": shown["rejected_input_ids"], "prompt_length": shown["prompt_length"],
                                "truncated": shown["rejected_truncated"]}, tokenizer))
        collate = self.collator(tokenizer)
        size = self.config.train.batch_size
        for start in range(0, len(prepared.samples), size):
            collate(prepared.samples[start : start + size])
        log(f"pre-flight: label contract holds on all {math.ceil(len(prepared.samples) / size)} batches")

    def load_model(self, source, precision, log):
        self.precision = precision
        return load_lora_model(self.config, source, precision, log)

    def compile_blocker(self) -> str | None:
        # Compiled decoder layers measured 1.53x the eager DPO step on SmolLM2 (bench/dpo_speed.py --compare
        # compile), as for supervised LoRA: the same rule decides (DoRA is never compiled).
        return "DoRA" if self.config.lora.use_dora else None

    def collator(self, tokenizer):
        return PreferenceCollator(tokenizer)

    def loss(self, model, batch):
        """One micro-batch's loss outside the trainer (the dry run's timing, before any reference exists): a
        reference of zeros costs what the real one costs, nothing."""
        rows = batch["input_ids"].shape[0]
        zeros = {"reference_logp": torch.zeros(rows), "reference_kl_logp": torch.zeros(batch["preference_label"].shape[0])
                 if "preference_label" in batch else None}
        filled = {k: v for k, v in zeros.items() if v is not None and k not in batch}
        return self.loss_and_metrics(model, {**batch, **filled})[0]

    def loss_and_metrics(self, model, batch) -> tuple[torch.Tensor, dict[str, float]]:
        logps, lengths = answer_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        reference = batch.get("reference_logp")
        if self.uses_reference and reference is None:
            raise LmtuneError("the batch has no reference log-probabilities (computed before training starts)")
        reference = reference.to(logps.device) if reference is not None else None
        return self.objective(logps, lengths.clamp(min=1).float(), reference, batch)

    def objective(self, logps, lengths, reference, batch) -> tuple[torch.Tensor, dict[str, float]]:
        """(loss, figures to log) from the batch's answer log-probability sums and token counts (chosen rows first,
        then rejected, for pairs) and the reference's log-probabilities of the same answers (None: no reference)."""
        raise NotImplementedError

    def trainer_class(self):
        return make_preference_trainer_class(self)

    def before_training(self, model, tokenizer, prepared: PreparedData, out: Path) -> None:
        """The reference log-probabilities of every training and validation answer, from the run folder when a
        resumed run finds them there, else computed now (every process computes; the first one keeps them)."""
        if not self.uses_reference:
            return
        path = out / REFERENCE_FILE
        datasets = {"train": prepared.samples, "validation": prepared.val_samples}
        if path.is_file():
            kept = json.loads(path.read_text(encoding="utf-8"))
        else:
            kept = {name: reference_logps(model, samples, self.collator(tokenizer), self.config.train.batch_size,
                                          self.precision, adapter_off=not self.config.train.init_adapter)
                    for name, samples in datasets.items()}
            if processes.is_main_process():
                path.write_text(json.dumps(kept), encoding="utf-8")
        for name, samples in datasets.items():
            if len(kept[name]) != len(samples):
                raise LmtuneError(f"{path}: holds reference log-probabilities of {len(kept[name])} {name} rows, the "
                                  f"data has {len(samples)}; the data changed since the run started, start it over")
            for sample, values in zip(samples, kept[name]):
                sample.update(values)

    def save(self, model, tokenizer, prepared, out: Path, state_dict: dict | None = None) -> None:
        save_adapter(self.config, model, out, state_dict)
        tokenizer.save_pretrained(out)
        prepared.template.save(out)
        (out / REFERENCE_FILE).unlink(missing_ok=True)  # a training aid, not part of the adapter

    def settings_manifest(self) -> dict:
        return {"beta": self.settings.beta}

    def manifest(self) -> dict:
        settings = self.settings_manifest()
        reference = ("none" if not self.uses_reference else
                     f"adapter {self.config.train.init_adapter}" if self.config.train.init_adapter else "base (adapter off)")
        return {"method": self.name, **settings, "reference": reference, **lora_manifest(self.config),
                "init_adapter": self.config.train.init_adapter or None}


@torch.no_grad()
def reference_logps(model, samples: list[dict], collate, batch_size: int, precision, adapter_off: bool) -> list[dict]:
    """Per sample, the reference's log-probability sums: {"reference_logp": the chosen (or only) answer's,
    "reference_rejected_logp": a pair's rejected answer's, "reference_kl_logp": KTO's mismatched answer's}."""
    from contextlib import nullcontext

    was_training = model.training
    model.eval()
    device, dtype = precision.device, precision.compute_dtype
    values: list[list[float]] = []
    off = model.disable_adapter() if adapter_off and hasattr(model, "disable_adapter") else nullcontext()
    with off, eager(), torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32):
        for start in range(0, len(samples), batch_size):
            part = samples[start : start + batch_size]
            batch = {k: v.to(device) for k, v in collate(part).items() if torch.is_tensor(v)}
            logps = answer_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])[0].tolist()
            kl = (answer_logps(model, batch["kl_input_ids"], batch["kl_attention_mask"], batch["kl_labels"])[0].tolist()
                  if "kl_input_ids" in batch else None)
            n = len(part)
            for i in range(n):
                row = {"reference_logp": logps[i]}
                if len(logps) > n:
                    row["reference_rejected_logp"] = logps[n + i]
                if kl is not None:
                    row["reference_kl_logp"] = kl[i]
                values.append(row)
    model.train(was_training)
    return values


def make_preference_trainer_class(method: PreferenceMethod):
    """A Trainer whose loss is the method's, logging its reward figures beside the loss (`rewards/accuracy`, ...)."""
    from transformers import Trainer

    class PreferenceTrainer(Trainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._figures = {"train": defaultdict(list), "eval": defaultdict(list)}

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            # answer_logps calls the backbone directly; accelerate's mixed precision wraps model.forward only.
            with self.accelerator.autocast():
                loss, figures = method.loss_and_metrics(model, inputs)
            for name, value in figures.items():
                self._figures["train" if model.training else "eval"][name].append(value)
            self.loss_is_scaled_for_ga = False  # a mean over the micro-batch's rows: the Trainer divides by accumulation
            return (loss, {}) if return_outputs else loss

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            inputs = self._prepare_inputs(inputs)
            with torch.no_grad(), eager():
                loss = self.compute_loss(model, inputs)
            return loss.detach(), None, None

        def log(self, logs: dict, start_time: float | None = None) -> None:
            mode = "eval" if "eval_loss" in logs else "train"
            prefix = "eval_" if mode == "eval" else ""
            for name, values in self._figures[mode].items():
                finite = [v for v in values if not math.isnan(v)]
                if finite:
                    logs[prefix + name] = round(sum(finite) / len(finite), 4)
            self._figures[mode].clear()
            super().log(logs, start_time)

    return PreferenceTrainer


def pair_figures(chosen, rejected, chosen_reward, rejected_reward) -> dict[str, float]:
    """What the log shows for a batch of pairs: the share whose chosen answer earns the higher reward, the rewards,
    their margin, and the answers' log-probabilities."""
    return {"rewards/chosen": float(chosen_reward.mean()), "rewards/rejected": float(rejected_reward.mean()),
            "rewards/accuracy": float((chosen_reward > rejected_reward).float().mean()),
            "rewards/margin": float((chosen_reward - rejected_reward).mean()),
            "logps/chosen": float(chosen.detach().mean()), "logps/rejected": float(rejected.detach().mean())}
