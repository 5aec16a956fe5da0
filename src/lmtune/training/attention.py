"""Which attention kernel a training micro-batch runs on a CPU.

transformers picks torch's scaled_dot_product_attention ("sdpa"), which on a CPU takes its flash kernel. For the
short sequences and small heads of the models people fine-tune, that kernel's backward is slow: in a profile of
a SmolLM2-135M LoRA step (9 heads of 64, about 200 tokens, micro-batches of 4) the flash forward and backward
took about a fifth of the step. transformers' eager attention (two matmuls around an fp32 softmax) computes the
same function, and on those batches the whole step ran about 1.3x faster (`bench/smollm2_step.py --compare attention`
measures the two in one run).

Eager attention keeps the [batch, heads, length, length] scores for the backward pass, which flash does not, so it
is used only while those scores stay small; longer batches keep sdpa. The gradient-checkpointing memory estimate
(train.decide_checkpointing) already counts those scores. With checkpointing on, the recomputation in the
backward pass must see the same kernel as the forward pass, so nothing is switched then.

Why by hand: transformers chooses one implementation per model at load time; the better one depends on each
micro-batch's shape, which only the training loop knows.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

# The largest [batch, heads, length, length] fp32 score tensor, per layer, for which eager attention is used
# (64 MB: micro-batches of 4 x 9 heads up to about 680 tokens; 0 turns the switch off).
EAGER_SCORES_BYTES = 64 << 20


def prefers_eager(causal_lm, input_ids: torch.Tensor) -> bool:
    config = getattr(causal_lm, "config", None)
    if (
        EAGER_SCORES_BYTES <= 0
        or not torch.is_grad_enabled()
        or input_ids.device.type != "cpu"
        or getattr(config, "_attn_implementation", None) != "sdpa"
        or _checkpointing(causal_lm)
        # Models whose attention does not go through transformers' attention interface cannot switch.
        or not type(causal_lm)._can_set_attn_implementation()
    ):
        return False
    heads = getattr(config, "num_attention_heads", None)
    if not isinstance(heads, int):
        return False
    batch, length = input_ids.shape
    return batch * heads * length * length * 4 <= EAGER_SCORES_BYTES


def _checkpointing(causal_lm) -> bool:
    # transformers 5 renamed is_gradient_checkpointing (now deprecated, with a warning) to is_activation_checkpointing.
    name = "is_activation_checkpointing" if hasattr(type(causal_lm), "is_activation_checkpointing") else "is_gradient_checkpointing"
    return bool(getattr(causal_lm, name, False))


@contextmanager
def attention_for_batch(causal_lm, input_ids: torch.Tensor):
    """Run the block with eager attention when `prefers_eager` says so; the model's own choice is restored after."""
    if not prefers_eager(causal_lm, input_ids):
        yield
        return
    causal_lm.set_attn_implementation("eager")
    try:
        yield
    finally:
        causal_lm.set_attn_implementation("sdpa")
