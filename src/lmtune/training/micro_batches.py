"""Merged micro-batches: on a CPU, the micro-batches of one optimizer step run as fewer, larger ones.

train.batch_size x train.grad_accum samples make one optimizer step, and a supervised method's loss is normalised by
the trained tokens of the whole step (training/loss.py), so how the step is cut into micro-batches changes neither
its loss nor its gradients beyond rounding: it is a choice of speed and memory. On a CPU the matrix products of a
micro-batch of 2 or 4 short samples are too small to run near the CPU's peak, whatever the model's hidden size: a
bf16 matmul of 288 rows runs about a tenth slower than one of 576 at hidden sizes 2,048 to 4,096 too. Merged into
micro-batches of up to 8 samples and 2,048 token positions, the same steps of the SmolLM2, Qwen2.5-0.5B,
BLOOM-560m and Llama-3.2-1B shapes ran 1.07 to 1.7x faster, and larger ones gained nothing more
(`bench/train_shapes.py`'s `unmerged` row; docs/performance.md, "Merged micro-batches").

A merged micro-batch is k of the configured ones, k dividing train.grad_accum, so every optimizer step trains the
same samples; the merge never turns gradient checkpointing on (it stops at the largest k that keeps the activations
within the same estimate). One process only: under torchrun each process's share of a step stays as configured.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

AUTO_SAMPLES = 8  # the most samples an automatic merge puts in one micro-batch
AUTO_TOKENS = 2048  # ... and the most token positions (samples x padded width)
TYPICAL_WIDTH_QUANTILE = 0.9  # a micro-batch of length-grouped samples is about as wide as its longest


@dataclass(frozen=True)
class Split:
    batch_size: int  # samples per micro-batch
    grad_accum: int  # micro-batches per optimizer step
    merged: int  # configured micro-batches in each of these (1 = as configured)


def typical_width(lengths: list[int], width_multiple: int) -> int:
    """The padded width of a typical micro-batch: a high quantile of the sample lengths, rounded up as the collator
    rounds widths."""
    ordered = sorted(lengths)
    width = ordered[min(len(ordered) - 1, int(TYPICAL_WIDTH_QUANTILE * len(ordered)))]
    multiple = max(1, width_multiple)
    return -(-width // multiple) * multiple


def merged_split(batch_size: int, grad_accum: int, lengths: list[int], width_multiple: int, limit: int,
                 needs_checkpointing: Callable[[int], bool] = lambda rows: False) -> Split:
    """The largest merge of `grad_accum` micro-batches of `batch_size` samples that stays within `limit` samples per
    micro-batch (0 = AUTO_SAMPLES and AUTO_TOKENS positions) and does not need gradient checkpointing where the
    configured split does not."""
    samples_cap = limit or AUTO_SAMPLES
    tokens_cap = AUTO_TOKENS if limit == 0 else float("inf")
    width = typical_width(lengths, width_multiple) if lengths else 1
    checkpointed_already = needs_checkpointing(batch_size)
    best = 1
    for k in range(2, grad_accum + 1):
        rows = batch_size * k
        if grad_accum % k or rows > samples_cap or rows * width > tokens_cap:
            continue
        if not checkpointed_already and needs_checkpointing(rows):
            break
        best = k
    return Split(batch_size * best, grad_accum // best, best)


def describe(split: Split, configured_batch: int, configured_accum: int) -> str:
    return (f"micro-batches: {split.grad_accum} of {split.batch_size} samples per optimizer step, merged from "
            f"{configured_accum} of {configured_batch} (train.cpu_micro_batch: larger matrix products run faster "
            f"on a CPU; the same samples, loss and gradients per step)")
