"""Batches: right padding per batch, masked by position, and check_batch catching every violation."""

from __future__ import annotations

import pytest
import torch
from conftest import QA

from lmtune.data.collate import Collator, check_batch
from lmtune.data.readers import Example
from lmtune.data.template import PromptTemplate
from lmtune.data.tokenize import IGNORE_INDEX, tokenize_example
from lmtune.errors import LabelContractError


def _sample(tokenizer, question="Học máy là gì?", answer="Học máy giúp máy tính học từ dữ liệu.", max_length=512):
    template = PromptTemplate.for_tokenizer(tokenizer, "plain")
    return template, tokenize_example(Example(question, answer), tokenizer, template, max_length)


def test_collator_pads_right_per_batch_and_masks_padding(bloom_tokenizer):
    template = PromptTemplate.for_tokenizer(bloom_tokenizer, "plain")
    samples = [tokenize_example(Example(r["question"], r["answer"]), bloom_tokenizer, template, 512) for r in QA]
    batch = Collator(bloom_tokenizer)(samples)
    lengths = [len(s["input_ids"]) for s in samples]
    assert batch["input_ids"].shape == (len(QA), max(lengths))  # dynamic, never a fixed 512
    for row, n in enumerate(lengths):
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (max(lengths) - n)
        assert batch["labels"][row, n:].eq(IGNORE_INDEX).all()
        assert batch["input_ids"][row, n:].eq(bloom_tokenizer.pad_token_id).all()
        assert batch["labels"][row, n - 1] == bloom_tokenizer.eos_token_id


@pytest.mark.parametrize(
    "break_it,reason",
    [
        (lambda b: b["labels"].__setitem__((0, 0), 5), "a prompt token is a training target"),
        (lambda b: b["labels"].__setitem__((1, -1), 7), "a padding position is a training target"),
        (lambda b: (b["labels"].__setitem__((0, -1), 5), b["input_ids"].__setitem__((0, -1), 5)), "does not end with EOS"),
        (lambda b: b["attention_mask"].__setitem__((0, 0), 0), "padding is not only on the right"),
    ],
    ids=["prompt-target", "padding-target", "no-eos", "left-padding"],
)
def test_check_batch_catches_each_violation(bloom_tokenizer, break_it, reason):
    template = PromptTemplate.for_tokenizer(bloom_tokenizer, "plain")
    long, short = Example("Câu hỏi dài hơn một chút là gì vậy?", "Trả lời dài hơn."), Example("Q?", "A.")
    samples = [tokenize_example(e, bloom_tokenizer, template, 512) for e in (long, short)]
    batch = Collator(bloom_tokenizer, check=False)(samples)
    check_batch(batch, [s["prompt_length"] for s in samples], [False, False], bloom_tokenizer.eos_token_id)
    break_it(batch)
    with pytest.raises(LabelContractError, match=reason):
        check_batch(batch, [s["prompt_length"] for s in samples], [False, False], bloom_tokenizer.eos_token_id)


def test_check_batch_rejects_fixed_width_padding(bloom_tokenizer):
    template, s = _sample(bloom_tokenizer)
    batch = Collator(bloom_tokenizer, check=False)([s])
    padded = {k: torch.nn.functional.pad(v, (0, 10), value=IGNORE_INDEX if k == "labels" else 0) for k, v in batch.items()}
    with pytest.raises(LabelContractError, match="not dynamic"):
        check_batch(padded, [s["prompt_length"]], [False], bloom_tokenizer.eos_token_id)


@pytest.mark.parametrize("multiple", [1, 8, 32])
def test_collator_rounds_the_width_up_to_a_multiple_and_masks_the_extra_padding(bloom_tokenizer, multiple):
    template = PromptTemplate.for_tokenizer(bloom_tokenizer, "plain")
    samples = [tokenize_example(Example(r["question"], r["answer"]), bloom_tokenizer, template, 512) for r in QA]
    lengths = [len(s["input_ids"]) for s in samples]
    batch = Collator(bloom_tokenizer, width_multiple=multiple)(samples)  # checked, with the multiple
    width = batch["input_ids"].shape[1]
    assert width % multiple == 0 and max(lengths) <= width < max(lengths) + multiple
    for row, n in enumerate(lengths):
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
        assert batch["labels"][row, n:].eq(IGNORE_INDEX).all()
    unrounded = Collator(bloom_tokenizer)(samples)
    assert torch.equal(batch["labels"][:, :max(lengths)], unrounded["labels"])  # the same targets, only more padding


def test_check_batch_rejects_a_width_past_the_multiple(bloom_tokenizer):
    template, s = _sample(bloom_tokenizer)
    batch = Collator(bloom_tokenizer, check=False, width_multiple=8)([s])
    check_batch(batch, [s["prompt_length"]], [False], bloom_tokenizer.eos_token_id, width_multiple=8)
    padded = {k: torch.nn.functional.pad(v, (0, 8), value=IGNORE_INDEX if k == "labels" else 0) for k, v in batch.items()}
    with pytest.raises(LabelContractError, match="rounded up to a multiple of 8"):
        check_batch(padded, [s["prompt_length"]], [False], bloom_tokenizer.eos_token_id, width_multiple=8)
