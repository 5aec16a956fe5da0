"""Preference tuning on LoRA: DPO (`train.method: dpo`), ORPO (`orpo`) and KTO (`kto`).

DPO (Rafailov et al. 2023) raises the log-probability of the chosen answer against the rejected one, relative to a
reference model; `preference.loss_type` picks the sigmoid loss of the paper (default), IPO's squared loss on
length-normalised log-probabilities (Azar et al. 2023), or SimPO's length-normalised margin without a reference
(Meng et al. 2024). ORPO (Hong et al. 2024) needs no reference: the SFT loss on the chosen answer plus
`beta` x an odds-ratio term, from the base model in one stage. KTO (Ethayarajh et al. 2024) learns from answers
marked good or bad one by one.

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
from .lora import keep_initial_adapter, load_lora_model, lora_manifest, save_adapter

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


# ---------------------------------------------------------------- the losses


def dpo_loss(chosen, rejected, ref_chosen, ref_rejected, chosen_len, rejected_len, beta: float, loss_type: str,
             label_smoothing: float = 0.0, simpo_gamma: float = 0.5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair loss, chosen reward, rejected reward) from per-answer log-probability sums."""
    if loss_type == "simpo":
        chosen_reward, rejected_reward = beta * chosen / chosen_len, beta * rejected / rejected_len
        logits = chosen_reward - rejected_reward - simpo_gamma
        loss = -F.logsigmoid(logits) * (1 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing
        return loss, chosen_reward.detach(), rejected_reward.detach()
    if loss_type == "ipo":  # on length-normalised log-probabilities, as TRL computes IPO
        chosen_ratio = (chosen - ref_chosen) / chosen_len
        rejected_ratio = (rejected - ref_rejected) / rejected_len
        loss = (chosen_ratio - rejected_ratio - 1 / (2 * beta)) ** 2
    else:
        chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
        logits = beta * (chosen_ratio - rejected_ratio)
        loss = -F.logsigmoid(logits) * (1 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing
    return loss, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def orpo_loss(chosen, rejected, chosen_len, rejected_len, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, chosen reward, rejected reward): the chosen answers' mean token NLL - beta x log sigmoid(log odds ratio)."""
    chosen_avg, rejected_avg = chosen / chosen_len, rejected / rejected_len
    # log(p / (1 - p)) with p the mean token probability; clamped below 1 so that a memorised answer stays finite
    def log_odds(avg):
        return avg - torch.log1p(-torch.exp(avg).clamp(max=1 - 1e-6))

    ratio = F.logsigmoid(log_odds(chosen_avg) - log_odds(rejected_avg))
    nll = -chosen.sum() / chosen_len.sum()
    return nll - beta * ratio.mean(), beta * chosen_avg.detach(), beta * rejected_avg.detach()


def kto_loss(logps, ref_logps, desirable: torch.Tensor, beta: float, desirable_weight: float,
             undesirable_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-answer loss, reward). The reference point is the batch's mean log-ratio (clamped at 0, no gradient): an
    estimate of KL(policy || reference) from the batch's own answers, where TRL's KTOTrainer spends one more forward
    pass on answers paired with other prompts."""
    log_ratio = logps - ref_logps
    kl = log_ratio.detach().mean().clamp(min=0)
    loss = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (log_ratio - kl))),
                       undesirable_weight * (1 - torch.sigmoid(beta * (kl - log_ratio))))
    return loss, beta * log_ratio.detach()


# ---------------------------------------------------------------- the method


class PreferenceMethod(TrainingMethod):
    """DPO, ORPO or KTO (`name`) on a LoRA adapter."""

    def __init__(self, config):
        super().__init__(config)
        self.settings = config.preference
        self.precision = None

    @property
    def uses_reference(self) -> bool:
        return self.name == "kto" or (self.name == "dpo" and self.settings.loss_type != "simpo")

    @property
    def paired(self) -> bool:
        return self.name != "kto"

    def check(self) -> None:
        if self.config.model.quantization != "none":  # the reference pass and LoRA on a k-bit base: not tested here
            raise LmtuneError(f"train.method {self.name} runs on a full-precision base; set model.quantization none")

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
        return PreparedData(template, samples, report, token_report, val_samples, 0, [])

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
        return "preference tuning (not measured)"

    def collator(self, tokenizer):
        return PreferenceCollator(tokenizer)

    def loss(self, model, batch):
        return self.loss_and_metrics(model, batch)[0]

    def loss_and_metrics(self, model, batch) -> tuple[torch.Tensor, dict[str, float]]:
        s = self.settings
        logps, lengths = answer_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        lengths = lengths.clamp(min=1).float()
        reference = batch.get("reference_logp")
        if self.uses_reference and reference is None:
            raise LmtuneError("the batch has no reference log-probabilities (computed before training starts)")
        if not self.paired:
            loss, rewards = kto_loss(logps, reference.to(logps.device), batch["preference_label"].to(logps.device),
                                     s.beta, s.desirable_weight, s.undesirable_weight)
            good = batch["preference_label"].to(logps.device)
            metrics = {"rewards/desirable": _mean(rewards[good]), "rewards/undesirable": _mean(rewards[~good])}
            return loss.mean(), metrics
        n = logps.shape[0] // 2
        chosen, rejected, chosen_len, rejected_len = logps[:n], logps[n:], lengths[:n], lengths[n:]
        if self.name == "orpo":
            loss, chosen_reward, rejected_reward = orpo_loss(chosen, rejected, chosen_len, rejected_len, s.beta)
        else:
            ref = reference.to(logps.device) if reference is not None else torch.zeros_like(logps)
            losses, chosen_reward, rejected_reward = dpo_loss(chosen, rejected, ref[:n], ref[n:], chosen_len,
                                                              rejected_len, s.beta, s.loss_type, s.label_smoothing,
                                                              s.simpo_gamma)
            loss = losses.mean()
        metrics = {"rewards/chosen": float(chosen_reward.mean()), "rewards/rejected": float(rejected_reward.mean()),
                   "rewards/accuracy": float((chosen_reward > rejected_reward).float().mean()),
                   "rewards/margin": float((chosen_reward - rejected_reward).mean()),
                   "logps/chosen": float(chosen.detach().mean()), "logps/rejected": float(rejected.detach().mean())}
        return loss, metrics

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
                sample["reference_logp"] = values[0]
                if len(values) > 1:
                    sample["reference_rejected_logp"] = values[1]

    def save(self, model, tokenizer, prepared, out: Path, state_dict: dict | None = None) -> None:
        save_adapter(self.config, model, out, state_dict)
        tokenizer.save_pretrained(out)
        prepared.template.save(out)
        (out / REFERENCE_FILE).unlink(missing_ok=True)  # a training aid, not part of the adapter

    def manifest(self) -> dict:
        s = self.settings
        settings = {"beta": s.beta}
        if self.name == "dpo":
            settings.update(loss_type=s.loss_type, label_smoothing=s.label_smoothing)
            if s.loss_type == "simpo":
                settings["simpo_gamma"] = s.simpo_gamma
        if self.name == "kto":
            settings.update(desirable_weight=s.desirable_weight, undesirable_weight=s.undesirable_weight)
        reference = ("none" if not self.uses_reference else
                     f"adapter {self.config.train.init_adapter}" if self.config.train.init_adapter else "base (adapter off)")
        return {"method": self.name, **settings, "reference": reference, **lora_manifest(self.config),
                "init_adapter": self.config.train.init_adapter or None}


def _mean(values: torch.Tensor) -> float:
    return float(values.mean()) if values.numel() else float("nan")


@torch.no_grad()
def reference_logps(model, samples: list[dict], collate, batch_size: int, precision, adapter_off: bool) -> list[list[float]]:
    """Per sample: [chosen (or only) answer's log-probability sum] + [rejected's] for a pair."""
    from contextlib import nullcontext

    was_training = model.training
    model.eval()
    device, dtype = precision.device, precision.compute_dtype
    values: list[list[float]] = []
    off = model.disable_adapter() if adapter_off and hasattr(model, "disable_adapter") else nullcontext()
    with off, eager(), torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32):
        for start in range(0, len(samples), batch_size):
            part = samples[start : start + batch_size]
            batch = {k: v.to(device) for k, v in collate(part).items() if k in ("input_ids", "attention_mask", "labels")}
            logps = answer_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])[0].tolist()
            n = len(part)
            values += [[logps[i], logps[n + i]] if len(logps) > n else [logps[i]] for i in range(n)]
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


class DirectPreferenceOptimization(PreferenceMethod):
    name = "dpo"


class OddsRatioPreferenceOptimization(PreferenceMethod):
    name = "orpo"


class KahnemanTverskyOptimization(PreferenceMethod):
    name = "kto"
