"""Packed, padding-free training rows: samples laid end to end in rows of one fixed length.

A right-padded batch is as wide as its longest sample, so every micro-batch has its own shape. On a CPU that costs
three ways: the padding is computed like any token, compiled layers see a new shape per batch, and the allocator
keeps blocks of every size it was ever asked for (resident memory creeps up over a long run). Packing lays the
samples of the run end to end in rows of one length (best-fit decreasing, as TRL's `bfd` packing does), so every
micro-batch is [rows, length].

Each sample in a row attends only to itself: its position ids restart at 0, and with no 2-D attention mask
transformers builds a block-diagonal causal mask from where the position ids restart (its packed-sequence masks,
masking_utils.find_packed_sequence_indices). Positions restart, so rotary embeddings see exactly the positions of the
unpacked sample. The labels are the samples' own (`tokenize`'s contract, checked per packed sample by
`check_pack`), except that each sample's first label is ignored: unpacked, the shift of next-token prediction
never trains it; packed, it would be predicted from the end of the previous sample. So the loss of a packed row is
the loss of its samples (`tests/training/test_packing.py` checks it against the unpacked batches).

Why by hand: transformers and TRL pack inside TRL's SFTTrainer only, which lmtune does not use (its loss, batches
and sampler are lmtune's own), and datasets has no packing of its own.
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass

import torch

from ..errors import LabelContractError
from .tokenize import IGNORE_INDEX

# The lengths a packed row may have. One is chosen per run (`pack_length`), so the whole run trains on one shape.
PACK_LENGTHS = (256, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192)
# The batch key holding each packed row's token count (padding excluded), for the tokens/s on the console; the
# trainer removes it before the model sees the batch.
PACKED_TOKENS = "packed_tokens"


@dataclass(frozen=True)
class PackReport:
    samples: int
    rows: int
    length: int
    tokens: int

    @property
    def efficiency(self) -> float:
        """Share of the rows' positions that hold a token of a sample (the rest is padding)."""
        return self.tokens / max(1, self.rows * self.length)

    def describe(self) -> str:
        return (f"packing: {self.samples} samples into {self.rows} row{'s' * (self.rows != 1)} of {self.length} tokens "
                f"({self.efficiency:.1%} of positions are tokens, {1 - self.efficiency:.1%} padding)")


def pack_length(lengths: list[int], batch_size: int, requested: int = 0) -> int:
    """The row length of a run: `requested` when set, else about as many tokens as `batch_size` samples hold (so an
    optimizer step trains about as many tokens as unpacked and the learning rate keeps its meaning), rounded up to
    one of PACK_LENGTHS; never shorter than the longest sample."""
    longest = max(lengths)
    if requested:
        if requested < longest:
            raise ValueError(f"data.pack_length {requested} is shorter than the longest sample ({longest} tokens); "
                             f"use at least {longest} or 0 (chosen from the data)")
        return requested
    target = max(longest, round(batch_size * sum(lengths) / len(lengths)))
    return next((n for n in PACK_LENGTHS if n >= target), target)


def pack(samples: list[dict], length: int, seed: int = 0) -> tuple[list[dict], PackReport]:
    """Samples -> rows of at most `length` tokens, best-fit decreasing: longest sample first, each into the row whose
    free space it fills best. Ties are broken by a seeded shuffle, so rows mix samples from across the data."""
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    order.sort(key=lambda i: -len(samples[i]["input_ids"]))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free space, row number), sorted: the best fit is the first that fits
    for i in order:
        n = len(samples[i]["input_ids"])
        if n > length:
            raise ValueError(f"a sample of {n} tokens does not fit a packed row of {length}")
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            space, row = free.pop(at)
        else:
            space, row = length, len(rows)
            rows.append([])
        rows[row].append(i)
        if space - n:
            bisect.insort(free, (space - n, row))
    packed = [_row([samples[i] for i in members]) for members in rows]
    tokens = sum(len(s["input_ids"]) for s in samples)
    return packed, PackReport(len(samples), len(packed), length, tokens)


def _row(members: list[dict]) -> dict:
    ids, labels, positions, segments = [], [], [], []
    for s in members:
        start = len(ids)
        ids += s["input_ids"]
        labels += [IGNORE_INDEX] + list(s["labels"][1:])
        positions += range(len(s["input_ids"]))
        spans = s.get("spans") or [(s["prompt_length"], len(s["input_ids"]))]
        segments.append({"start": start, "length": len(s["input_ids"]), "spans": [tuple(x) for x in spans],
                         "truncated": s["truncated"]})
    return {"input_ids": ids, "labels": labels, "position_ids": positions, "segments": segments}


class PackedCollator:
    """Packed rows -> a batch of [rows, length]: input ids, labels and position ids, and no attention mask (its
    absence is what makes transformers read the position ids as sample boundaries). The padding at a row's end is a
    segment of its own (positions from 0, labels ignored), so it attends only to itself."""

    def __init__(self, tokenizer, length: int, check: bool = True):
        from .collate import Collator

        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.length = length
        self.check = check
        self.unpacked = Collator(tokenizer, check)  # validation samples are not packed: their losses are per sample

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        if rows and "segments" not in rows[0]:
            return self.unpacked(rows)
        input_ids = torch.full((len(rows), self.length), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), self.length), IGNORE_INDEX, dtype=torch.long)
        positions = torch.zeros((len(rows), self.length), dtype=torch.long)
        for r, row in enumerate(rows):
            n = len(row["input_ids"])
            if n > self.length:
                raise LabelContractError(f"packed row {r} holds {n} tokens, more than its length {self.length}")
            input_ids[r, :n] = torch.tensor(row["input_ids"])
            labels[r, :n] = torch.tensor(row["labels"])
            positions[r, :n] = torch.tensor(row["position_ids"])
            positions[r, n:] = torch.arange(self.length - n)
        batch = {"input_ids": input_ids, "labels": labels, "position_ids": positions}
        if self.check:
            for r, row in enumerate(rows):
                check_pack(batch, r, row["segments"], self.eos_id)
        batch[PACKED_TOKENS] = torch.tensor([len(row["input_ids"]) for row in rows])
        return batch


def check_pack(batch: dict[str, torch.Tensor], r: int, segments: list[dict], eos_id: int) -> None:
    """Raise LabelContractError unless row `r` keeps `tokenize`'s label contract for every sample packed in it, each
    sample's positions restart at 0, and nothing outside the samples' answers is trained."""
    ids, labels, positions = batch["input_ids"][r], batch["labels"][r], batch["position_ids"][r]
    trained = torch.zeros(ids.shape[0], dtype=torch.bool)
    for k, seg in enumerate(segments):
        start, n = seg["start"], seg["length"]
        where = f"packed row {r}, sample {k}"
        if not torch.equal(positions[start : start + n], torch.arange(n)):
            raise LabelContractError(f"{where}: position ids do not run 0..{n - 1}")
        if int(labels[start]) != IGNORE_INDEX:
            raise LabelContractError(f"{where}: its first token is a training target (it would be predicted from "
                                     "the previous sample)")
        for number, (s, e) in enumerate(seg["spans"]):
            answer = labels[start + s : start + e]
            if answer.numel() == 0 or bool((answer == IGNORE_INDEX).any()):
                raise LabelContractError(f"{where}: the answer span is empty or partly ignored")
            if not torch.equal(answer, ids[start + s : start + e]):
                raise LabelContractError(f"{where}: labels of the answer differ from its input ids")
            last = number == len(seg["spans"]) - 1
            if not (seg["truncated"] and last) and int(answer[-1]) != eos_id:
                raise LabelContractError(f"{where}: the answer does not end with EOS (id {eos_id}) as a target")
            trained[start + s : start + e] = True
    if bool((labels[~trained] != IGNORE_INDEX).any()):
        raise LabelContractError(f"packed row {r}: a prompt, template or padding token is a training target")
    end = segments[-1]["start"] + segments[-1]["length"] if segments else 0
    if end < ids.shape[0] and positions[end] != 0:
        raise LabelContractError(f"packed row {r}: its padding continues the last sample's positions")
