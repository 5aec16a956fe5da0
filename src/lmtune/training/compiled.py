"""Regional compilation: torch.compile of each decoder layer while training on a CPU.

In eager mode a LoRA step on the small models people fine-tune on a CPU spends much of its time outside the matmuls,
in dtype casts and element-wise work (RMSNorm in fp32, rotary embeddings, SiLU gating, the LoRA branch of every
linear layer), each a separate pass over memory. Inductor fuses them into a few C++ loops around the matmuls
(`python bench/train_shapes.py --skip-trl --shapes smollm2` compares the compiled and eager steps).

Compiled per layer ("regional compilation", PyTorch's recipe for models of repeated blocks): every decoder layer
runs the same code, so one graph (with dynamic sequence length and batch size) serves all of them, and compiling
takes about a minute the first time instead of one graph per layer. Whether a run compiles, where Inductor caches
its kernels and what a failing compile does are decided with inference's in `lmtune/compiling.py`.
Validation and generation run eager (`eager`): compiling their no-grad graphs would cost another compile for a small
share of the run's time.

Why by hand: transformers' Trainer can only compile the whole model (`torch_compile`), which recompiles for every
new sequence length and wraps the model so that adapters are saved under other names. Here each layer's `forward`
is replaced on the instance for the run and restored after, so parameter names, saving and hooks stay untouched.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from .. import compiling
from ..compiling import decide_training as decide  # noqa: F401  train.compile's decision (lmtune/compiling.py)


_active = False


def active() -> bool:
    """Whether the training step runs compiled (inside `compiled_layers`): the loss then compiles its head's
    element-wise work too (training/loss.py)."""
    return _active


@contextmanager
def compiled_layers(causal_lm, enabled: bool, strict: bool = False):
    """Inside: every decoder layer runs through torch.compile (dynamic shapes). After: the plain modules again, so
    that generation and saving see the model as it was. `strict`: a failing compile raises instead of running eager."""
    global _active
    layers = compiling.decoder_layers(causal_lm) if enabled else None
    if layers is None:
        yield
        return
    compiling.use_inductor_cache()
    with compiling.errors(strict):
        # The instance attribute shadows the class's forward (nn.Module.__call__ calls self.forward); deleting it
        # brings the class's back. Every layer compiles the same code, so Dynamo reuses one graph for all of them.
        for layer in layers:
            layer.forward = torch.compile(layer.forward, dynamic=True)
        _active = True
        try:
            yield
        finally:
            _active = False
            for layer in layers:
                del layer.forward


@contextmanager
def eager():
    """Run without the compiled layers (validation, generation): their no-grad graphs are not worth compiling."""
    with torch.compiler.set_stance("force_eager"):
        yield
