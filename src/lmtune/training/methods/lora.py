"""LoRA fine-tuning (the default, `train.method: lora`): a frozen base and a small adapter, saved on its own.

The lora section's variants apply here only: rsLoRA, DoRA, PiSSA/OLoRA initialisation (the saved adapter converted
back to a plain LoRA on the original base, so that it merges onto the base people have), modules_to_save, LoRA+,
and a 4-/8-bit quantized base (QLoRA, CUDA only).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ... import processes
from ...model import (
    MUTATING_INITS,
    add_lora,
    apply_adapter,
    frozen_weights_dtype,
    load_model,
    save_converted_adapter,
    save_initial_adapter,
)
from ..quantization import load_quantized_model
from .supervised import SupervisedMethod

# Kept from the first start of a run with a base-mutating init, so that a resumed run converts against it.
INITIAL_ADAPTER_DIR = "initial_adapter"


def load_lora_model(config, source, precision, log):
    """The frozen base (quantized for QLoRA) with a fresh adapter of the lora section's settings."""
    m = config.model
    if m.quantization != "none":
        log(f"model: loading the base {m.quantization} quantized (bitsandbytes) for QLoRA")
        model = load_quantized_model(source, m.quantization, precision.compute_dtype, m.trust_remote_code, m.allow_pickle)
    else:
        model = load_model(source, m.trust_remote_code, dtype=frozen_weights_dtype(precision), allow_pickle=m.allow_pickle)
    l = config.lora
    if config.train.init_adapter:
        model = apply_adapter(model, config.train.init_adapter, m.name_or_path, trainable=True)
        trainable, total = model.get_nb_trainable_parameters()
        log(f"LoRA: continuing the adapter {config.train.init_adapter}: {trainable:,} trainable of {total:,} parameters")
        return model
    model = add_lora(model, l.r, l.alpha, l.dropout, l.bias, l.target_modules, use_rslora=l.use_rslora,
                     use_dora=l.use_dora, init=l.init, modules_to_save=l.modules_to_save)
    trainable, total = model.get_nb_trainable_parameters()
    log(f"LoRA: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)" + variants(config))
    if precision.device == "cpu" and l.dropout > 0:
        log(f"LoRA: lora.dropout {l.dropout:g} draws a random mask over every adapted layer's input at every step, "
            "which on a CPU takes a large share of the step (docs/performance.md, \"LoRA dropout\"); 0 trains faster")
    return model


def variants(config) -> str:
    """The LoRA variants and training options switched on, for the log: '' when none."""
    l, t = config.lora, config.train
    on = [name for name, flag in [("rsLoRA", l.use_rslora), ("DoRA", l.use_dora), (f"init {l.init}", l.init != "default"),
                                  (f"modules_to_save {l.modules_to_save}", bool(l.modules_to_save)),
                                  (f"LoRA+ ratio {t.loraplus_lr_ratio:g}", t.loraplus_lr_ratio > 0),
                                  (f"NEFTune alpha {t.neftune_noise_alpha:g}", t.neftune_noise_alpha > 0)] if flag]
    return f"; {', '.join(on)}" if on else ""


def save_adapter(config, model, out: Path, state_dict: dict | None = None) -> None:
    """adapter_model.safetensors + adapter_config.json; `state_dict`: the gathered weights when they were sharded."""
    initial = out / INITIAL_ADAPTER_DIR
    if initial.is_dir():
        save_converted_adapter(model, out, initial, state_dict)
        shutil.rmtree(initial)
    else:
        model.save_pretrained(out, **({"state_dict": state_dict} if state_dict is not None else {}))


def keep_initial_adapter(config, model, out: Path) -> None:
    if not processes.is_main_process():
        return
    if config.lora.init in MUTATING_INITS and not (out / INITIAL_ADAPTER_DIR).is_dir():
        save_initial_adapter(model, out / INITIAL_ADAPTER_DIR)


def lora_manifest(config) -> dict:
    l, t = config.lora, config.train
    return {"use_rslora": l.use_rslora, "use_dora": l.use_dora, "init": l.init,
            "converted_to_lora_on_original_base": l.init in MUTATING_INITS, "modules_to_save": l.modules_to_save,
            "loraplus_lr_ratio": t.loraplus_lr_ratio}


class LoraFineTuning(SupervisedMethod):
    name = "lora"

    def load_model(self, source, precision, log):
        return load_lora_model(self.config, source, precision, log)

    def compile_blocker(self) -> str | None:
        return "DoRA" if self.config.lora.use_dora else None

    def int8_blocker(self) -> str | None:
        # DoRA's layers multiply by the base weight themselves (to normalise it), not through the base layer.
        return "DoRA" if self.config.lora.use_dora else None

    def before_training(self, model, tokenizer, prepared, out: Path) -> None:
        keep_initial_adapter(self.config, model, out)

    def save(self, model, tokenizer, prepared, out: Path, state_dict: dict | None = None) -> None:
        save_adapter(self.config, model, out, state_dict)
        self.save_common(tokenizer, prepared, out)

    def manifest(self) -> dict:
        return {"method": "lora", **lora_manifest(self.config), "neftune_noise_alpha": self.config.train.neftune_noise_alpha}
