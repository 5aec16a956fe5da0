"""Tokenize examples into samples with answer-only labels.

The label contract every training batch obeys (checked by `check_batch` on every batch):
  * prompt and answer are tokenized separately and their ids concatenated, so the token
    boundary before the answer is exactly what inference sees (same `PromptTemplate`);
  * the answer ends with EOS and EOS is a target;
  * labels are -100 on the prompt and on padding; padding is on the right, per batch;
  * padding is masked by position (attention mask), never by token id, so a tokenizer whose
    pad id equals its EOS id still learns to stop.

"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import DataError
from .readers import Example
from .template import PromptTemplate

IGNORE_INDEX = -100


@dataclass
class TokenizeReport:
    samples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0  # answer cut at max_length (its EOS is lost)
    dropped_long_prompt: int = 0  # prompt alone leaves no room for an answer


def tokenize_example(example: Example, tokenizer, template: PromptTemplate, max_length: int) -> dict[str, Any] | None:
    """Return {'input_ids', 'labels', 'prompt_length', 'truncated'}; None if the prompt leaves no room."""
    prompt = template.prompt_ids(tokenizer, example.question, example.context)
    answer = template.answer_ids(tokenizer, example.answer)
    if len(prompt) >= max_length - 1:
        return None
    truncated = len(prompt) + len(answer) > max_length
    answer = answer[: max_length - len(prompt)]
    return {
        "input_ids": prompt + answer,
        "labels": [IGNORE_INDEX] * len(prompt) + answer,
        "prompt_length": len(prompt),
        "truncated": truncated,
    }


def tokenize_examples(examples: list[Example], tokenizer, template: PromptTemplate, max_length: int) -> tuple[list[dict], TokenizeReport]:
    report = TokenizeReport()
    samples = []
    for example in examples:
        sample = tokenize_example(example, tokenizer, template, max_length)
        if sample is None:
            report.dropped_long_prompt += 1
            continue
        report.truncated += sample["truncated"]
        report.tokens += len(sample["input_ids"])
        report.trained_tokens += len(sample["input_ids"]) - sample["prompt_length"]
        samples.append(sample)
    report.samples = len(samples)
    if not samples:
        raise DataError(
            f"every sample's prompt is longer than data.max_length={max_length} tokens; nothing would be trained. "
            "Raise data.max_length"
        )
    return samples, report
