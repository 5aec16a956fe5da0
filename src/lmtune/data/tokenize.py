"""Tokenize examples into samples with answer-only labels.

The label contract every training batch obeys (checked by `check_batch` on every batch):
  * prompt and answer are tokenized separately and their ids concatenated, so the token
    boundary before the answer is exactly what inference sees (same `PromptTemplate`);
  * the answer ends with EOS and EOS is a target;
  * labels are -100 on the prompt and on padding; padding is on the right, per batch;
  * padding is masked by position (attention mask), never by token id, so a tokenizer whose
    pad id equals its EOS id still learns to stop.

A conversation is the same contract turn by turn: every assistant answer (and its EOS) is a trained
span, everything else (system, user turns, the template around them) is -100, and the ids before each
answer are exactly `PromptTemplate.conversation_ids` of the history so far: what chat and serve send.
A sample records its trained spans; a question/answer sample has one, starting at its prompt length.
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
    conversations: int = 0  # samples built from multi-turn conversations
    turns_dropped: int = 0  # earlier turns left out so that a conversation fits max_length
    conversations_cut: int = 0  # conversations that lost earlier turns that way
    turn_by_turn: int = 0  # conversations the chat template re-tokenizes: one sample per answer instead
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


def _turns(messages: list[dict]) -> tuple[list[dict], list[tuple[dict, dict]]]:
    system = [messages[0]] if messages[0]["role"] == "system" else []
    rest = messages[len(system):]
    return system, [(rest[i], rest[i + 1]) for i in range(0, len(rest), 2)]


def _conversation_pieces(system: list[dict], turns: list[tuple[dict, dict]], tokenizer, template: PromptTemplate,
                         last_turn_only: bool) -> list[tuple[list[int], bool]] | None:
    """The conversation as (ids, trained) pieces, or None when the template renders an earlier answer with other ids
    than training would give it (then the history before an answer is not a prefix of the next prompt)."""
    ids: list[int] = []
    pieces: list[tuple[list[int], bool]] = []
    history = list(system)
    for number, (user, assistant) in enumerate(turns):
        history.append(user)
        prompt = template.conversation_ids(tokenizer, history)  # exactly what chat and serve build for this history
        if prompt[: len(ids)] != ids:
            return None
        answer = template.answer_ids(tokenizer, assistant["content"])
        pieces += [(prompt[len(ids):], False), (answer, not last_turn_only or number == len(turns) - 1)]
        ids = prompt + answer
        history.append(assistant)
    return pieces


def _sample_of(pieces: list[tuple[list[int], bool]], max_length: int, cut: bool = True) -> dict[str, Any] | None:
    """Concatenate pieces into a sample; with `cut`, the last answer is cut at max_length (None if it does not fit)."""
    input_ids: list[int] = []
    labels: list[int] = []
    spans: list[tuple[int, int]] = []
    truncated = False
    for index, (ids, trained) in enumerate(pieces):
        if len(input_ids) + len(ids) > max_length:
            if not cut or not trained or index != len(pieces) - 1 or len(input_ids) >= max_length - 1:
                return None
            ids, truncated = ids[: max_length - len(input_ids)], True
        if trained:
            spans.append((len(input_ids), len(input_ids) + len(ids)))
        labels += ids if trained else [IGNORE_INDEX] * len(ids)
        input_ids += ids
    return {"input_ids": input_ids, "labels": labels, "prompt_length": spans[0][0], "truncated": truncated,
            "spans": spans}


def tokenize_conversation(example: Example, tokenizer, template: PromptTemplate, max_length: int,
                          last_turn_only: bool = False, report: TokenizeReport | None = None) -> list[dict]:
    """Samples of one conversation (usually one; one per answer for templates that re-tokenize earlier turns).

    Longer than max_length: whole earlier turns are dropped until it fits (counted in `report`); if the last
    turn alone is still too long, its answer is cut like a single answer's, or the sample dropped."""
    report = report or TokenizeReport()
    system, turns = _turns(example.messages)
    pieces = _conversation_pieces(system, turns, tokenizer, template, last_turn_only)
    if pieces is None:  # train each answer after exactly the prompt chat builds, in a sample of its own
        report.turn_by_turn += 1
        chosen = turns[-1:] if last_turn_only else turns
        samples = []
        for end in range(len(turns) - len(chosen), len(turns)):
            history = system + [m for pair in turns[:end] for m in pair] + [turns[end][0]]
            single = _sample_of([(template.conversation_ids(tokenizer, history), False),
                                 (template.answer_ids(tokenizer, turns[end][1]["content"]), True)], max_length)
            if single is not None:
                samples.append(single)
        return samples
    # Whole earlier turns go first; only the last turn alone may have its answer cut, as a single answer would.
    first, sample = 0, _sample_of(pieces, max_length, cut=len(turns) == 1)
    while sample is None and first < len(turns) - 1:
        first += 1
        later = _conversation_pieces(system, turns[first:], tokenizer, template, last_turn_only)
        sample = _sample_of(later, max_length, cut=first == len(turns) - 1) if later is not None else None
    if first:
        report.conversations_cut += 1
        report.turns_dropped += first
    return [sample] if sample is not None else []


def tokenize_examples(examples: list[Example], tokenizer, template: PromptTemplate, max_length: int,
                      last_turn_only: bool = False) -> tuple[list[dict], TokenizeReport]:
    report = TokenizeReport()
    samples = []
    for example in examples:
        if example.messages is not None:  # a one-turn conversation gives the pair's sample: its prompt is the pair's
            built = tokenize_conversation(example, tokenizer, template, max_length, last_turn_only, report)
            report.conversations += 1
        else:
            built = [s for s in [tokenize_example(example, tokenizer, template, max_length)] if s is not None]
        if not built:
            report.dropped_long_prompt += 1
        for sample in built:
            report.truncated += sample["truncated"]
            report.tokens += len(sample["input_ids"])
            report.trained_tokens += sum(end - start for start, end in sample.get("spans", [(sample["prompt_length"], len(sample["input_ids"]))]))
            samples.append(sample)
    report.samples = len(samples)
    if not samples:
        raise DataError(
            f"every sample's prompt is longer than data.max_length={max_length} tokens; nothing would be trained. "
            "Raise data.max_length"
        )
    return samples, report

