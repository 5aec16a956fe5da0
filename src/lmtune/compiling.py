"""Where compiling pays, for training and inference alike, and how every compile is run.

lmtune compiles two things on a CPU, both with Inductor:

* while training, each decoder layer (regional compilation, `training/compiled.py`): Inductor fuses the
  element-wise work around the matmuls (RMSNorm in fp32, rotary embeddings, SiLU gating, the LoRA branch of every
  linear layer) into a few C++ loops;
* while answering one question at a time (`chat`, `serve`), the one-token decode step (`decoding.CompiledDecoder`).

Both need a C++ compiler, keep their kernels in one disk cache (`inductor_cache_dir`), and fail the same way: a
setting of `true` lets a failing compile raise, "auto" falls back to eager for what did not compile, so "auto"
never stops what eager mode could do (`errors`). "auto" compiles only where the compile is repaid: the decisions
below say why not, in one line, where it does not.
"""

from __future__ import annotations

import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

from . import families

# Training FLOPs (forward + input gradients: 4 per frozen weight per token) above which "auto" compiles. Counted so,
# an eager SmolLM2 LoRA run did about 130 GFLOP/s on a 2-core CPU, so this is about 2.5 minutes of eager training,
# which the 1.5x-1.8x gain shortens by about the 50-70 s a first (uncached) compile of a small model's layer takes
# (`python bench/train_shapes.py --skip-trl --shapes smollm2`, the lmtune and lmtune-eager rows).
COMPILE_WORTH_FLOPS = 20e12
# Weights (bytes) from which "auto" compiles the decode step: SmolLM2-135M in bf16 is 270 MB (where the step
# measured its gain: `python bench/generate_speed.py --quick`), test models are a few MB.
COMPILE_WORTH_BYTES = 200e6


def inductor_cache_dir() -> Path:
    """Where Inductor keeps compiled kernels: the user's TORCHINDUCTOR_CACHE_DIR, else ~/.cache/lmtune/torchinductor
    (Inductor's own default is under /tmp, which a reboot empties)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    # Importing transformers already writes Inductor's default into the environment: that one is not a choice.
    if chosen and os.path.abspath(chosen) != os.path.abspath(default_cache_dir()):
        return Path(chosen)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "lmtune" / "torchinductor"


def use_inductor_cache() -> None:
    """Point Inductor at `inductor_cache_dir()`; called before anything is compiled, so a later run with the same
    model shape finds its kernels (a compile of about a minute becomes seconds)."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(inductor_cache_dir())


@contextmanager
def errors(strict: bool):
    """Inside: a compile that fails raises (`strict`, a setting of true), or the code it was compiling runs eager
    (Dynamo's suppress_errors: "auto" never fails where eager mode would not)."""
    import torch._dynamo

    with torch._dynamo.config.patch(suppress_errors=not strict):
        yield


def cpp_compiler() -> str | None:
    """The C++ compiler Inductor would call, if there is one on this machine."""
    if sys.platform == "win32":
        candidates = [os.environ.get("CXX") or "cl"]
    else:
        candidates = [os.environ.get("CXX")] if os.environ.get("CXX") else ["g++", "clang++", "c++"]
    for name in candidates:
        found = shutil.which(name)
        if found:
            return found
    return None


def _no_compiler(gain: str) -> str:
    return ("off: no C++ compiler found (g++, clang++ or $CXX), which torch.compile needs on a CPU; "
            f"installing one {gain}")


def _pays_for_family(model) -> bool:
    """Whether compiling this model's family measured a gain (its entry in `lmtune.families`)."""
    config = getattr(model, "config", None)
    return families.facts(config).compile_pays(config)


def _family(model, unknown: str = "this model") -> str:
    return getattr(getattr(model, "config", None), "model_type", unknown)


def decoder_layers(causal_lm) -> torch.nn.ModuleList | None:
    """The model's stack of decoder layers: the ModuleList of num_hidden_layers modules of one class."""
    count = families.layer_count(getattr(causal_lm, "config", None))
    for module in causal_lm.modules():
        if (isinstance(module, torch.nn.ModuleList) and len(module) == count and count
                and len({type(layer) for layer in module}) == 1):
            return module
    return None


def training_flops(causal_lm, tokens: float) -> float:
    """Forward and input-gradient matmul FLOPs of `tokens` through the frozen decoder layers (4 per weight)."""
    layers = decoder_layers(causal_lm)
    if layers is None:
        return 0.0
    weights = sum(p.numel() for p in layers.parameters() if p.dim() == 2)
    return 4.0 * weights * tokens


def weight_bytes(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:  # a tied embedding is the output head too: counted once
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def decide_training(setting, *, device: str, processes: int, method_blocker: str | None, quantized: bool,
                    checkpointing: bool, causal_lm, tokens: float) -> tuple[bool, str]:
    """(compile the decoder layers?, why) for train.compile = setting ("auto", True or False)."""
    if setting is False:
        return False, "off (train.compile false)"
    if setting is True:
        return True, "on (train.compile true)"
    if device != "cpu":
        return False, f"off: auto compiles on a CPU only (this run is on {device}; set train.compile true to try)"
    reasons = [
        (processes > 1, "several processes"),
        # The training method's own reason (training.methods: full fine-tuning, DoRA, ...).
        (method_blocker is not None, method_blocker),
        (quantized, "a quantized base"),
        (checkpointing, "gradient checkpointing"),
        (decoder_layers(causal_lm) is None, "no decoder layer stack found in the model"),
        (not _pays_for_family(causal_lm),
         f"{_family(causal_lm, 'this')} layers (no measured gain)"),
    ]
    for applies, reason in reasons:
        if applies:
            return False, f"off: auto does not compile with {reason}"
    if cpp_compiler() is None:
        return False, _no_compiler("makes long CPU runs about 1.5x faster")
    if training_flops(causal_lm, tokens) < COMPILE_WORTH_FLOPS:
        return False, "off: the run is too short to repay compiling"
    return True, "on: the decoder layers are compiled (about a minute the first time, cached after)"


def decide_decoding(setting, model, device: str, compute_dtype: torch.dtype, one_answer: bool) -> tuple[bool, str]:
    """(compile the one-token decode step?, why) for generate.compile = setting ("auto", True or False)."""
    if setting is False:
        return False, "off (generate.compile false)"
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    # Forced or not, these cannot work: the step runs on its weights without autocast, through a StaticCache.
    if device != "cpu":
        return False, f"off: the compiled decode step is for a CPU (this model is on {device})"
    # bf16 on a CPU with native bf16, fp32 on one without (AVX2 only), as load_for_inference picks them: the step
    # computes in its weights' dtype, so the weights must be in the compute dtype and one of those two. "In", not
    # "only": peft keeps an adapter's LoRA weights in fp32 on a bf16 base (autocast_adapter_dtype), and that compiles.
    if compute_dtype not in (torch.bfloat16, torch.float32) or compute_dtype not in dtypes:
        return False, "off: the compiled decode step needs bf16 or fp32 weights (--dtype auto, bfloat16 or float32)"
    if not getattr(model, "_can_compile_fullgraph", True):  # a peft model answers for its base model
        return False, f"off: transformers cannot compile {_family(model)} in one graph"
    if cpp_compiler() is None:
        return False, _no_compiler("makes single answers about 1.8x faster")
    if setting is True:
        return True, "on (generate.compile true)"
    if not _pays_for_family(model):
        return False, f"off: auto does not compile {_family(model)} (no measured gain)"
    if one_answer:
        return False, "off: one answer does not repay compiling (chat and serve compile; generate.compile true forces it)"
    if weight_bytes(model) < COMPILE_WORTH_BYTES:
        return False, "off: the model is small enough that its tokens are fast without compiling"
    return True, "on: one-token decode step compiled for single answers (about a minute the first time, cached after)"
