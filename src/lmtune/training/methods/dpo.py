"""DPO (`train.method: dpo`; Rafailov et al. 2023): raise the log-probability of the chosen answer against the
rejected one, relative to the reference (the model as training starts).

`preference.loss_type`: "sigmoid", the paper's loss (default); "ipo", IPO's squared loss on length-normalised
log-probabilities (Azar et al. 2023), as TRL computes it; "simpo", SimPO's length-normalised margin with a target
`simpo_gamma` and no reference at all (Meng et al. 2024). `label_smoothing` > 0: conservative DPO (a share of pairs
assumed mislabelled).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .preference import PreferenceMethod, pair_figures


def dpo_loss(chosen, rejected, ref_chosen, ref_rejected, chosen_len, rejected_len, beta: float, loss_type: str,
             label_smoothing: float = 0.0, simpo_gamma: float = 0.5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair loss, chosen reward, rejected reward) from per-answer log-probability sums."""
    if loss_type == "simpo":
        chosen_reward, rejected_reward = beta * chosen / chosen_len, beta * rejected / rejected_len
        logits = chosen_reward - rejected_reward - simpo_gamma
        loss = -F.logsigmoid(logits) * (1 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing
        return loss, chosen_reward.detach(), rejected_reward.detach()
    if loss_type == "ipo":
        chosen_ratio = (chosen - ref_chosen) / chosen_len
        rejected_ratio = (rejected - ref_rejected) / rejected_len
        loss = (chosen_ratio - rejected_ratio - 1 / (2 * beta)) ** 2
    else:
        chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
        logits = beta * (chosen_ratio - rejected_ratio)
        loss = -F.logsigmoid(logits) * (1 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing
    return loss, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


class DirectPreferenceOptimization(PreferenceMethod):
    name = "dpo"

    @property
    def uses_reference(self) -> bool:
        return self.settings.loss_type != "simpo"

    def objective(self, logps, lengths, reference, batch):
        s = self.settings
        n = logps.shape[0] // 2
        ref = reference if reference is not None else torch.zeros_like(logps)
        losses, chosen_reward, rejected_reward = dpo_loss(logps[:n], logps[n:], ref[:n], ref[n:], lengths[:n],
                                                          lengths[n:], s.beta, s.loss_type, s.label_smoothing,
                                                          s.simpo_gamma)
        return losses.mean(), pair_figures(logps[:n], logps[n:], chosen_reward, rejected_reward)

    def settings_manifest(self) -> dict:
        s = self.settings
        settings = {"beta": s.beta, "loss_type": s.loss_type, "label_smoothing": s.label_smoothing}
        return {**settings, "simpo_gamma": s.simpo_gamma} if s.loss_type == "simpo" else settings
