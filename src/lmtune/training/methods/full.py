"""Full fine-tuning (`train.method: full`): every weight trained, saved as a whole model folder (no merge needed).

Weights stay in fp32 (AdamW's small updates are lost in bf16 weights); bf16 is used only inside autocast. It needs
about four times the model's size in memory (weights, gradients, AdamW's two moments): for small models.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ...model import load_model, save_generation_config
from .supervised import SupervisedMethod


class FullFineTuning(SupervisedMethod):
    name = "full"
    output_kind = "model"

    def load_model(self, source, precision, log):
        m = self.config.model
        model = load_model(source, m.trust_remote_code, dtype=torch.float32, allow_pickle=m.allow_pickle)
        total = sum(p.numel() for p in model.parameters())
        log(f"full fine-tuning: all {total:,} parameters trained; saved as a whole model (no merge needed)")
        return model

    def compile_blocker(self) -> str | None:
        # Compiling pays through fused element-wise work around frozen matmuls; with every weight trained the
        # optimizer and weight gradients dominate and the compile was not measured to pay.
        return "full fine-tuning"

    def save(self, model, tokenizer, prepared, out: Path, state_dict: dict | None = None) -> None:
        model.save_pretrained(out, **({"state_dict": state_dict} if state_dict is not None else {}))
        save_generation_config(model, tokenizer, out)
        self.save_common(tokenizer, prepared, out)

    def manifest(self) -> dict:
        return {"method": "full", "neftune_noise_alpha": self.config.train.neftune_noise_alpha}
