"""Answer questions, one at a time (streaming) or batched, with the template the model was trained with."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..config import GenerateConfig
from ..data.template import PromptTemplate
from .batching import Row, run_batch
from .load import LoadedModel


def _row(loaded: LoadedModel, question: str | list[dict], cfg: GenerateConfig, emit=lambda text, reason: None) -> Row:
    """A batching row for one question (or a conversation ending with a user turn), with the template's prompt ids
    and the config's sampling settings."""
    template, tokenizer = loaded.template, loaded.tokenizer
    prompt = (template.conversation_ids(tokenizer, question) if isinstance(question, list)
              else template.prompt_ids(tokenizer, question))
    # Seeded from torch's generator, so torch.manual_seed() makes sampled answers repeatable, as generate() did.
    seed = int(torch.randint(0, 2**62, (1,)))
    return Row(prompt, cfg.max_new_tokens, emit,
               temperature=0.0 if cfg.greedy else cfg.temperature, top_p=1.0 if cfg.greedy else cfg.top_p,
               top_k=0 if cfg.greedy else cfg.top_k, repetition_penalty=cfg.repetition_penalty, seed=seed, strip=True)


def _answer(row: Row, template: PromptTemplate) -> Answer:
    return Answer(template.clean_answer(row.text), len(row.ids), row.finish_reason == "stop")


@dataclass
class Answer:
    text: str
    new_tokens: int
    stopped_at_eos: bool


def generate_batch(loaded: LoadedModel, questions: list[str | list[dict]], cfg: GenerateConfig,
                   batch_size: int = 16) -> list[Answer]:
    """Answer many questions (or conversations ending with a user turn), batched with left padding so every
    prompt ends where generation starts."""
    answers: list[Answer] = []
    for start in range(0, len(questions), batch_size):
        rows = [_row(loaded, q, cfg) for q in questions[start : start + batch_size]]
        run_batch(loaded, rows)
        answers += [_answer(row, loaded.template) for row in rows]
    return answers


def generate(loaded: LoadedModel, question: str, cfg: GenerateConfig, on_text: Callable[[str], None] | None = None) -> Answer:
    """Answer one question; `on_text` receives the answer piece by piece as it is generated."""
    row = _row(loaded, question, cfg, emit=lambda text, reason: on_text(text) if on_text and text else None)
    run_batch(loaded, [row])
    return _answer(row, loaded.template)
