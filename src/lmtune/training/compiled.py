"""Regional compilation: torch.compile of each decoder layer while training on a CPU.

In eager mode a LoRA step on the small models people fine-tune on a CPU spends about half its time outside the
matmuls: in a profile of a SmolLM2-135M step, dtype casts took 17%, element-wise multiplies 12% and additions 7%
(RMSNorm in fp32, rotary embeddings, SiLU gating, the LoRA branch of every linear layer), each a separate pass over
memory on two cores. Inductor fuses them into a few C++ loops around the matmuls: an eager SmolLM2 step took 1.66x
the compiled one's time (`bench/train_shapes.py --skip-trl --shapes smollm2`, its lmtune-eager row).

Compiled per layer ("regional compilation"): every decoder layer runs the same code, so one graph (with dynamic
sequence length and batch size) serves all of them, and compiling takes about a minute the first time instead of
one graph per layer. Inductor's compiled code is cached on disk (TORCHINDUCTOR_CACHE_DIR, by default under
~/.cache/lmtune), so a later run with the same model shape starts in seconds.

"auto" compiles only where it pays and is safe to: a CPU, one process, LoRA without DoRA or quantization, no
gradient checkpointing, a Llama-family model (RMSNorm: where the gain was measured), a C++ compiler on the machine
(Inductor generates C++), and a run long enough that the minute of compiling is won back (`COMPILE_WORTH_FLOPS`).
If compiling fails anyway, Dynamo falls back to eager for that layer (suppress_errors), so "auto" never stops a run
that eager mode could do; `true` lets the error through.
Validation and generation run eager: compiling their no-grad graphs would cost another minute for a small share
of the run's time.

Why by hand: transformers' Trainer can only compile the whole model (`torch_compile`), which recompiles for every
new sequence length and wraps the model so that adapters are saved under other names.
"""

from __future__ import annotations

import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

# Training FLOPs (forward + input gradients: 4 per frozen weight per token) above which "auto" compiles. Counted so,
# an eager SmolLM2 LoRA run did about 130 GFLOP/s on a 2-core CPU, so this is about 2.5 minutes of eager training,
# which the 1.5x-1.8x gain shortens by about the 50-70 s a first (uncached) compile of a small model's layer takes;
# with the compiled kernels cached from an earlier run, compiling takes about 10 s.
COMPILE_WORTH_FLOPS = 20e12


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


def decoder_layers(causal_lm) -> torch.nn.ModuleList | None:
    """The model's stack of decoder layers: the ModuleList of num_hidden_layers modules of one class."""
    config = getattr(causal_lm, "config", None)
    count = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
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


def decide(setting, *, device: str, processes: int, method: str, use_dora: bool, quantized: bool,
           checkpointing: bool, causal_lm, tokens: float) -> tuple[bool, str]:
    """(compile?, why) for train.compile = setting ("auto", True or False)."""
    if setting is False:
        return False, "off (train.compile false)"
    if setting is True:
        return True, "on (train.compile true)"
    if device != "cpu":
        return False, f"off: auto compiles on a CPU only (this run is on {device}; set train.compile true to try)"
    reasons = [
        (processes > 1, "several processes"),
        (method != "lora", "full fine-tuning"),
        (use_dora, "DoRA"),
        (quantized, "a quantized base"),
        (checkpointing, "gradient checkpointing"),
        (decoder_layers(causal_lm) is None, "no decoder layer stack found in the model"),
        # The gain is fused element-wise work: fp32 RMSNorm, rotary embeddings, gated MLPs (the Llama family:
        # Llama, Qwen, Mistral, Gemma, Phi-3, SmolLM). BLOOM's layers (LayerNorm, one fused GeLU) measured no gain
        # (bench/train_shapes.py's lmtune-eager row), so they do not pay for the compile.
        (not hasattr(getattr(causal_lm, "config", None), "rms_norm_eps"),
         f"{getattr(getattr(causal_lm, 'config', None), 'model_type', 'this')} layers (no measured gain)"),
    ]
    for applies, reason in reasons:
        if applies:
            return False, f"off: auto does not compile with {reason}"
    if cpp_compiler() is None:
        return False, ("off: no C++ compiler found (g++, clang++ or $CXX), which torch.compile needs on a CPU; "
                       "installing one makes long CPU runs about 1.5x faster")
    flops = training_flops(causal_lm, tokens)
    if flops < COMPILE_WORTH_FLOPS:
        return False, "off: the run is too short to repay compiling"
    return True, "on: the decoder layers are compiled (about a minute the first time, cached after)"


@contextmanager
def compiled_layers(causal_lm, enabled: bool, strict: bool = False):
    """Inside: every decoder layer runs through torch.compile (dynamic shapes). After: the plain modules again, so
    that generation and saving see the model as it was. `strict`: a failing compile raises instead of running eager."""
    layers = decoder_layers(causal_lm) if enabled else None
    if layers is None:
        yield
        return
    import torch._dynamo

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(inductor_cache_dir())
    suppress = torch._dynamo.config.suppress_errors
    torch._dynamo.config.suppress_errors = not strict
    for layer in layers:
        layer.compile(dynamic=True)
    try:
        yield
    finally:
        for layer in layers:
            layer._compiled_call_impl = None
        torch._dynamo.config.suppress_errors = suppress


@contextmanager
def eager():
    """Run without the compiled layers (validation, generation): their no-grad graphs are not worth compiling."""
    with torch.compiler.set_stance("force_eager"):
        yield
