"""Int8 matmuls for the frozen base weights of a LoRA run on a CPU that computes in fp32.

On a CPU without native bf16 (AVX2 laptops, AVX-512 ones without AVX-512 BF16) lmtune trains in fp32, and most of a
LoRA step is the frozen base weights' two matmuls per linear layer: the forward `x @ W^T` and the input gradient
`dy @ W`. Both can run on the CPU's int8 dot-product instructions (VNNI), which do about four times the fp32
multiply-adds per cycle (`python bench/train_shapes.py --shapes smollm2 --skip-trl` times the `int8-lever` row).

The scheme is SwitchBack's (Wortsman et al. 2023, "Stable and low-precision training for large-scale vision-language
models"; bitsandbytes' `SwitchBackLinear`): the activations and the incoming gradient are quantized per row (one
scale per token), the weight per output channel for the forward and per input channel for the input gradient, and
the int32 products are scaled back to fp32. SwitchBack keeps the weight-gradient matmul in 16 bits; a frozen base
weight has no weight gradient, so both of its matmuls run in int8. LoRA's own matrices, attention, norms and the
output head stay in fp32, and the adapter is trained, saved and merged in fp32 as always: only the frozen weights'
products are approximate (about 1% relative error per product against about 0.3% for bf16's), which moves SmolLM2's
loss by about 2% before training (docs/performance.md, "Int8 matmuls").

Why by hand: torch has the int8 kernel (`torch._int_mm`, oneDNN's VNNI GEMM) but no trainable layer around it on a
CPU; bitsandbytes' int8 layers need a CUDA GPU. Each adapted layer's frozen `base_layer` gets an instance `forward`
for the run and its own forward back after, as training/compiled.py does for the decoder layers, so parameter names,
saving and merging never see the int8 copies.
"""

from __future__ import annotations

from contextlib import contextmanager
from types import MethodType

import torch

from ..errors import LmtuneError

# The int8 copies live on the base layer as buffers (not saved with the model: persistent=False), so the compiled
# decoder layers read them as the layer's own tensors and one graph serves every layer.
_BUFFERS = ("int8_weight", "int8_weight_scale", "int8_weight_t", "int8_weight_t_scale")


def cpu_has_vnni() -> bool:
    """AVX-512 VNNI (as torch detects it; Intel since Cascade Lake and Ice Lake, AMD since Zen 4): int8 dot products
    at about four times the fp32 rate. Without it the int8 GEMM is built from wider multiplies, not measured here."""
    try:
        return bool(torch.cpu._is_vnni_supported())
    except AttributeError:
        return False


def decide(setting, *, device: str, compute_dtype: torch.dtype, method_blocker: str | None, quantized: bool,
           vnni: bool, compiled: bool, processes: int = 1) -> tuple[bool, str]:
    """(multiply the frozen base weights in int8?, why) for train.int8_matmuls = setting ("auto", True or False).
    Raises LmtuneError where true is asked for and cannot run."""
    if setting is False:
        return False, "off (train.int8_matmuls false)"
    blockers = [
        (device != "cpu", f"a CPU (this run is on {device})"),
        (compute_dtype != torch.float32, f"a run that computes in fp32 (this one computes in "
                                         f"{str(compute_dtype).removeprefix('torch.')}, faster than int8 here)"),
        (method_blocker is not None, f"supervised LoRA (not {method_blocker})"),
        (quantized, "a full-precision base (not model.quantization)"),
        # Not measured with DDP or FSDP (whose sharded weights would each need their own int8 copy).
        (processes > 1, f"one process (this run has {processes})"),
    ]
    for applies, need in blockers:
        if applies:
            if setting is True:
                raise LmtuneError(f"train.int8_matmuls true needs {need}; remove it or set it to auto")
            return False, f"off: int8 matmuls are for {need}"
    if setting == "auto" and not vnni:
        return False, "off: this CPU has no int8 dot-product instructions (VNNI)"
    # Eagerly, quantizing and scaling back are passes of their own and ate most of the gain (0.96x to 1.48x per
    # layer); compiled, Inductor fuses them into the loops around the matmuls (2.2x to 2.5x per layer).
    if setting == "auto" and not compiled:
        return False, "off: auto multiplies in int8 only in compiled decoder layers (this run is not compiled)"
    return True, ("on: the frozen base weights multiply in int8 (per-row scales); LoRA, attention and the head in "
                  "fp32")


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: (int8 values, fp32 scale per row) with x ~ values * scale."""
    scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / 127.0
    return torch.round(x / scale).clamp(-127, 127).to(torch.int8), scale


class _FrozenInt8Linear(torch.autograd.Function):
    """y = x @ W^T with x quantized per row and W per output channel; dx = dy @ W with dy per row and W per input
    channel. No gradient for W (frozen)."""

    @staticmethod
    def forward(ctx, x, weight_q, weight_scale, weight_t_q, weight_t_scale):
        rows = x.reshape(-1, x.shape[-1])
        x_q, x_scale = quantize_rows(rows)
        y = torch._int_mm(x_q, weight_q.t()).to(torch.float32) * x_scale * weight_scale
        ctx.save_for_backward(weight_t_q, weight_t_scale)
        ctx.in_features = x.shape[-1]
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        weight_t_q, weight_t_scale = ctx.saved_tensors
        rows = grad.reshape(-1, grad.shape[-1])
        g_q, g_scale = quantize_rows(rows)
        dx = torch._int_mm(g_q, weight_t_q.t()).to(torch.float32) * g_scale * weight_t_scale
        return dx.reshape(*grad.shape[:-1], ctx.in_features), None, None, None, None


def _int8_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    y = _FrozenInt8Linear.apply(x, self.int8_weight, self.int8_weight_scale, self.int8_weight_t,
                                self.int8_weight_t_scale)
    return y if self.bias is None else y + self.bias


def frozen_linears(model) -> list[torch.nn.Linear]:
    """The fp32 frozen base layers of the model's LoRA layers (peft's `base_layer`)."""
    from peft.tuners.lora import LoraLayer

    found = []
    for module in model.modules():
        base = getattr(module, "base_layer", None)
        if (isinstance(module, LoraLayer) and type(base) is torch.nn.Linear and not base.weight.requires_grad
                and base.weight.dtype == torch.float32):
            found.append(base)
    return found


def _attach(layer: torch.nn.Linear) -> None:
    w = layer.weight.detach()
    weight_q, weight_scale = quantize_rows(w)  # per output channel, for the forward
    weight_t_q, weight_t_scale = quantize_rows(w.t())  # per input channel, for the input gradient
    for name, value in zip(_BUFFERS, (weight_q, weight_scale.reshape(1, -1), weight_t_q.contiguous(),
                                      weight_t_scale.reshape(1, -1))):
        layer.register_buffer(name, value, persistent=False)
    layer.forward = MethodType(_int8_forward, layer)


def _detach(layer: torch.nn.Linear) -> None:
    del layer.forward
    for name in _BUFFERS:
        delattr(layer, name)


@contextmanager
def int8_matmuls(model, enabled: bool):
    """Inside: the frozen base layers of the LoRA layers multiply in int8. After: their own fp32 forward again."""
    layers = frozen_linears(model) if enabled else []
    for layer in layers:
        _attach(layer)
    try:
        yield len(layers)
    finally:
        for layer in layers:
            _detach(layer)
