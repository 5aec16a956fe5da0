"""KTO (`train.method: kto`; Ethayarajh et al. 2024): learn from single answers marked good or bad (rows of prompt,
completion, label), no pairs needed. A good answer's log-ratio to the reference is pushed above a reference point,
a bad one's below it, each through a sigmoid with weight `preference.desirable_weight` / `undesirable_weight`.

The reference point estimates KL(policy || reference) as KTO's authors and TRL do: from answers paired with another
row's prompt, computed without gradient, averaged over the micro-batch and clamped at 0. Here each row's mismatched
answer is fixed when the data is prepared (the next row's answer after the row's own prompt), so its reference
log-probability is computed once before training with the others and a resumed run sees the same ones.
"""

from __future__ import annotations

import torch

from ...data.tokenize import IGNORE_INDEX
from .preference import PreferenceMethod, answer_logps


def kto_loss(logps, ref_logps, desirable: torch.Tensor, kl: torch.Tensor, beta: float, desirable_weight: float,
             undesirable_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-answer loss, reward) for answers' log-probability sums, given the reference point `kl`."""
    log_ratio = logps - ref_logps
    loss = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (log_ratio - kl))),
                       undesirable_weight * (1 - torch.sigmoid(beta * (kl - log_ratio))))
    return loss, beta * log_ratio.detach()


def add_mismatched_answers(samples: list[dict], max_length: int) -> None:
    """Give each sample `kl_input_ids`/`kl_labels`: its own prompt followed by the next sample's answer."""
    for index, sample in enumerate(samples):
        other = samples[(index + 1) % len(samples)]
        prompt = sample["input_ids"][: sample["prompt_length"]]
        answer = other["input_ids"][other["prompt_length"]:][: max(1, max_length - len(prompt))]
        sample.update(kl_input_ids=prompt + answer, kl_labels=[IGNORE_INDEX] * len(prompt) + answer,
                      kl_prompt_length=len(prompt))


class KahnemanTverskyOptimization(PreferenceMethod):
    name = "kto"
    paired = False

    def prepare_data(self, tokenizer, log=print):
        prepared = super().prepare_data(tokenizer, log)
        for samples in (prepared.samples, prepared.val_samples):
            if samples:
                add_mismatched_answers(samples, self.config.data.max_length)
        return prepared

    def loss_and_metrics(self, model, batch):
        with torch.no_grad():
            mismatched = answer_logps(model, batch["kl_input_ids"], batch["kl_attention_mask"], batch["kl_labels"])[0]
        kl = (mismatched - batch["reference_kl_logp"].to(mismatched.device)).mean().clamp(min=0)
        return super().loss_and_metrics(model, {**batch, "kl": kl})

    def objective(self, logps, lengths, reference, batch):
        s = self.settings
        good = batch["preference_label"].to(logps.device)
        loss, rewards = kto_loss(logps, reference, good, batch["kl"], s.beta, s.desirable_weight, s.undesirable_weight)
        figures = {"rewards/desirable": _mean(rewards[good]), "rewards/undesirable": _mean(rewards[~good]),
                   "kl": float(batch["kl"])}
        return loss.mean(), figures

    def settings_manifest(self) -> dict:
        s = self.settings
        return {"beta": s.beta, "desirable_weight": s.desirable_weight, "undesirable_weight": s.undesirable_weight}


def _mean(values: torch.Tensor) -> float:
    return float(values.mean()) if values.numel() else float("nan")
