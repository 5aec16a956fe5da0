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


# Packed rows (data/packing.py): attention computed per sample inside the row.
#
# transformers reads a packed row (position ids restarting at 0, no attention mask) into a block-diagonal mask over
# the whole row and attends over all of it: for a row of 1,024 tokens holding 15 samples of about 70 tokens that is
# 1,024² scores where the samples need 15 x 70², and it made packed SmolLM2 steps slower than padded micro-batches.
# Attending per sample is the field's padding-free attention (flash-attention's varlen kernel, which has no CPU
# build); here it is a loop of causal sdpa calls over each sample's slice of the row, registered with transformers'
# attention interface. `bench/smollm2_step.py --compare packing` measures the packed step against padded batches.
PACKED_ATTENTION = "lmtune_packed_rows"


def _segments(positions: torch.Tensor) -> list[tuple[int, int]]:
    """[(start, end)] of the samples of one packed row: a sample starts where its position is 0."""
    starts = (positions == 0).nonzero().flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0, *starts]
    return list(zip(starts, [*starts[1:], positions.shape[0]]))


@torch.compiler.disable  # sample boundaries change every batch: a graph break, not a recompile per batch
def packed_rows_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    positions = kwargs.pop("position_ids", None)
    window = kwargs.pop("sliding_window", None) or None
    if positions is None:  # not a packed row (nothing marks its samples): the row is one sample
        positions = torch.arange(query.shape[2]).expand(query.shape[0], -1)
    rows = []
    for r in range(query.shape[0]):
        pieces = []
        for start, end in _segments(positions[r]):
            q, k, v = (t[r : r + 1, :, start:end] for t in (query, key, value))
            n = end - start
            mask = None
            if window is not None and n > window:  # a sliding-window layer sees only the last `window` tokens
                i = torch.arange(n, device=query.device)
                mask = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < window)
            out, _ = sdpa_attention_forward(module, q, k, v, mask, dropout=dropout, scaling=scaling,
                                            is_causal=mask is None, **kwargs)
            pieces.append(out)
        rows.append(torch.cat(pieces, dim=1))
    return torch.cat(rows, dim=0), None


def _no_mask(*args, **kwargs):
    return None  # these attention functions build what they need from the position ids or their layout


_registered: set[str] = set()


@contextmanager
def custom_attention(causal_lm, name: str, function):
    """Run the block with `function`, registered as `name` with transformers' attention interface (and a mask function
    that builds no mask: `function` builds its own); the model's own choice is restored after."""
    if name not in _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        AttentionInterface.register(name, function)
        AttentionMaskInterface.register(name, _no_mask)
        _registered.add(name)
    before = causal_lm.config._attn_implementation
    causal_lm.set_attn_implementation(name)
    try:
        yield
    finally:
        causal_lm.set_attn_implementation(before)


def reads_packed_rows(causal_lm) -> bool:
    config = getattr(causal_lm, "config", None)
    return (getattr(config, "_attn_implementation", None) in ("sdpa", "eager")
            and type(causal_lm)._can_set_attn_implementation() and not _checkpointing(causal_lm))


@contextmanager
def attention_for_packed_rows(causal_lm):
    """Run the block with per-sample attention (packed_rows_attention); the model's own choice is restored after."""
    if not reads_packed_rows(causal_lm):
        yield
        return
    with custom_attention(causal_lm, PACKED_ATTENTION, packed_rows_attention):
        yield
