"""ORPO (`train.method: orpo`; Hong et al. 2024): no reference model and no SFT stage before it. The loss is the
chosen answers' token NLL (the SFT loss) minus `preference.beta` x log sigmoid of the log odds ratio between the
chosen and the rejected answer, odds taken on the mean token probability, as TRL's ORPO computes them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .preference import PreferenceMethod, pair_figures


def orpo_loss(chosen, rejected, chosen_len, rejected_len, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, chosen reward, rejected reward) from per-answer log-probability sums and token counts."""
    chosen_avg, rejected_avg = chosen / chosen_len, rejected / rejected_len

    def log_odds(avg):  # log(p / (1 - p)); p kept below 1 so that a memorised answer stays finite
        return avg - torch.log1p(-torch.exp(avg).clamp(max=1 - 1e-6))

    ratio = F.logsigmoid(log_odds(chosen_avg) - log_odds(rejected_avg))
    nll = -chosen.sum() / chosen_len.sum()
    return nll - beta * ratio.mean(), beta * chosen_avg.detach(), beta * rejected_avg.detach()


class OddsRatioPreferenceOptimization(PreferenceMethod):
    name = "orpo"

    @property
    def uses_reference(self) -> bool:
        return False

    def objective(self, logps, lengths, reference, batch):
        n = logps.shape[0] // 2
        loss, chosen_reward, rejected_reward = orpo_loss(logps[:n], logps[n:], lengths[:n], lengths[n:],
                                                         self.settings.beta)
        return loss, pair_figures(logps[:n], logps[n:], chosen_reward, rejected_reward)
