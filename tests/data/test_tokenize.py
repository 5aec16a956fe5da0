"""Tokenizing with the label contract: prompt masked, answer and EOS trained, truncation."""

from __future__ import annotations

from lmtune.data.readers import Example
from lmtune.data.template import PromptTemplate
from lmtune.data.tokenize import IGNORE_INDEX, tokenize_example, tokenize_examples


def _sample(tokenizer, question="Học máy là gì?", answer="Học máy giúp máy tính học từ dữ liệu.", max_length=512):
    template = PromptTemplate.for_tokenizer(tokenizer, "plain")
    return template, tokenize_example(Example(question, answer), tokenizer, template, max_length)


def test_labels_are_masked_exactly_on_the_prompt(bloom_tokenizer):
    template, s = _sample(bloom_tokenizer)
    prompt = template.prompt_ids(bloom_tokenizer, "Học máy là gì?")
    answer = bloom_tokenizer(" Học máy giúp máy tính học từ dữ liệu.", add_special_tokens=False)["input_ids"]
    assert s["input_ids"] == prompt + answer + [bloom_tokenizer.eos_token_id]
    assert s["labels"] == [IGNORE_INDEX] * len(prompt) + answer + [bloom_tokenizer.eos_token_id]
    assert s["prompt_length"] == len(prompt)


def test_truncation_cuts_the_answer_not_the_prompt(bloom_tokenizer):
    template, full = _sample(bloom_tokenizer)
    p = full["prompt_length"]
    _, cut = _sample(bloom_tokenizer, max_length=p + 3)
    assert cut["input_ids"] == full["input_ids"][: p + 3] and cut["truncated"]
    assert cut["labels"][:p] == [IGNORE_INDEX] * p


def test_prompt_longer_than_max_length_is_dropped_not_cut(bloom_tokenizer):
    template = PromptTemplate.for_tokenizer(bloom_tokenizer, "plain")
    examples = [Example("rất dài " * 100, "ngắn"), Example("Q?", "A.")]
    samples, report = tokenize_examples(examples, bloom_tokenizer, template, max_length=32)
    assert report.dropped_long_prompt == 1 and len(samples) == 1
