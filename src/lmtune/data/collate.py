"""Batches that keep the label contract (see `tokenize`): right padding per batch, masked by position;
`check_batch` proves it on every batch, `render_example` shows one sample's trained span."""

from __future__ import annotations

import torch

from ..errors import LabelContractError
from .tokenize import IGNORE_INDEX


class Collator:
    """Right-pad each batch to its own longest sample, rounded up to a multiple of `width_multiple`, and check the
    label contract.

    Padding positions get the pad id as filler input (or EOS when the tokenizer has no pad),
    attention 0 and label -100: masking is by position, so the filler id never matters.
    """

    def __init__(self, tokenizer, check: bool = True, width_multiple: int = 1):
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.check = check
        self.width_multiple = max(1, width_multiple)

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(s["input_ids"]) for s in samples)
        width = -(-longest // self.width_multiple) * self.width_multiple
        input_ids = torch.full((len(samples), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((len(samples), width), dtype=torch.long)
        for row, s in enumerate(samples):
            n = len(s["input_ids"])
            input_ids[row, :n] = torch.tensor(s["input_ids"])
            labels[row, :n] = torch.tensor(s["labels"])
            attention[row, :n] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
        if self.check:
            check_batch(batch, [s["prompt_length"] for s in samples], [s["truncated"] for s in samples], self.eos_id,
                        [s.get("spans") for s in samples], self.width_multiple)
        return batch


def check_batch(batch: dict[str, torch.Tensor], prompt_lengths: list[int], truncated: list[bool], eos_id: int,
                spans: list[list[tuple[int, int]] | None] | None = None, width_multiple: int = 1) -> None:
    """Raise LabelContractError if the batch breaks the contract in `tokenize`'s docstring.

    `spans`: per row, the trained (start, end) ranges of a conversation; None for a pair, whose one span runs
    from its prompt length to its end. `width_multiple`: the batch is as wide as its longest sample rounded up to
    a multiple of it."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    if ids.shape != labels.shape or ids.shape != mask.shape:
        raise LabelContractError(f"input_ids {tuple(ids.shape)}, attention_mask {tuple(mask.shape)} and labels {tuple(labels.shape)} differ in shape")
    for row in range(ids.shape[0]):
        length = int(mask[row].sum())
        if not bool(mask[row, :length].all()):
            raise LabelContractError(f"row {row}: padding is not only on the right")
        row_spans = (spans[row] if spans and spans[row] else None) or [(prompt_lengths[row], length)]
        p = row_spans[0][0]
        if bool((labels[row, :p] != IGNORE_INDEX).any()):
            raise LabelContractError(f"row {row}: a prompt token is a training target")
        if bool((labels[row, length:] != IGNORE_INDEX).any()):
            raise LabelContractError(f"row {row}: a padding position is a training target")
        trained = torch.zeros(ids.shape[1], dtype=torch.bool)
        for number, (start, end) in enumerate(row_spans):
            answer = labels[row, start:end]
            if answer.numel() == 0 or bool((answer == IGNORE_INDEX).any()):
                raise LabelContractError(f"row {row}: the answer span is empty or partly ignored")
            if not torch.equal(answer, ids[row, start:end]):
                raise LabelContractError(f"row {row}: labels of the answer differ from its input ids")
            last = number == len(row_spans) - 1
            if not (truncated[row] and last) and int(answer[-1]) != eos_id:
                raise LabelContractError(f"row {row}: the answer does not end with EOS (id {eos_id}) as a target")
            trained[start:end] = True
        if bool((labels[row, :length][~trained[:length]] != IGNORE_INDEX).any()):
            raise LabelContractError(f"row {row}: a user, system or template token is a training target")
    longest = int(mask.sum(1).max())
    if ids.shape[1] != -(-longest // width_multiple) * width_multiple:
        raise LabelContractError(f"batch is {ids.shape[1]} wide for a longest sample of {longest} (padding is not "
                                 f"dynamic: the longest sample rounded up to a multiple of {width_multiple})")


def render_example(sample: dict, tokenizer) -> str:
    """Show one sample with its trained spans marked, for the pre-flight check."""
    ids = sample["input_ids"]
    spans = sample.get("spans") or [(sample["prompt_length"], len(ids))]
    trained = sum(end - start for start, end in spans)
    eos_note = "ends with EOS" if not sample["truncated"] else "TRUNCATED at max_length, no EOS"
    turns = f" in {len(spans)} assistant turns" if len(spans) > 1 else ""
    lines = [f"{len(ids)} tokens: {len(ids) - trained} ignored (label -100), {trained} trained{turns} ({eos_note})"]
    edges = sorted({0, len(ids), *(x for span in spans for x in span)})
    for start, end in zip(edges, edges[1:]):
        mark = "trained" if any(s <= start and end <= e for s, e in spans) else "ignored"
        lines += [f"  {mark} | {line}" for line in tokenizer.decode(ids[start:end], skip_special_tokens=False).split("\n")]
    return "\n".join(lines)
