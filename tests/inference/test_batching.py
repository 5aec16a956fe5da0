"""The batching engine's text handling: what `chat` and `serve` show when an answer is cut."""

from __future__ import annotations

import pytest
from conftest import conversation

from lmtune.config import GenerateConfig
from lmtune.inference.batching import Row, run_batch
from lmtune.inference.chat import chat_loop
from lmtune.inference.load import load_for_inference

QUESTIONS = ["Học máy là gì?", "LoRA là gì?", "Overfitting là gì?"]


@pytest.fixture(scope="module")
def loaded(tiny_llama_dir):
    return load_for_inference(tiny_llama_dir)


def cut_mid_character(loaded, longest: int = 40) -> tuple[str, int]:
    """(question, token limit) such that the greedy chat answer stops inside a multi-byte character.

    The tiny model's byte-level tokenizer splits Vietnamese letters (2 or 3 UTF-8 bytes) over tokens,
    so some prefix of its greedy answer always ends with an incomplete character.
    """
    for question in QUESTIONS:
        prompt = loaded.template.conversation_ids(loaded.tokenizer, conversation(question))
        row = Row(prompt, longest, emit=lambda text, finish: None)
        run_batch(loaded, [row])
        for n in range(2, len(row.ids) + 1):
            if loaded.tokenizer.decode(row.ids[:n], skip_special_tokens=True).endswith("\ufffd"):
                return question, n
    pytest.skip("no greedy answer of the tiny model ends inside a character")


def test_a_row_cut_at_its_token_limit_never_ends_with_half_a_character(loaded):
    question, limit = cut_mid_character(loaded)
    prompt = loaded.template.conversation_ids(loaded.tokenizer, conversation(question))
    pieces, reasons = [], []
    row = Row(prompt, limit, emit=lambda text, finish: (pieces.append(text), reasons.append(finish)))
    run_batch(loaded, [row])
    cut = loaded.tokenizer.decode(row.ids, skip_special_tokens=True)
    assert row.finish_reason == "length" and cut.endswith("\ufffd")
    assert "".join(pieces) == row.text == cut.rstrip("\ufffd")  # the streamed text and the whole text agree
    assert reasons[-1] == "length"


def test_chat_shows_no_half_character_at_the_token_limit(loaded):
    question, limit = cut_mid_character(loaded)
    written = []
    lines = iter([question])

    def read(prompt: str) -> str:
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    history = chat_loop(loaded, GenerateConfig(greedy=True, max_new_tokens=limit, repetition_penalty=1.0), read,
                        written.append)
    shown = "".join(written)
    assert f"[answer cut at {limit} tokens]" in shown
    assert "\ufffd\n[answer cut" not in shown
    assert not history[0][1].endswith("\ufffd")


def test_a_question_typed_in_decomposed_unicode_gets_the_same_answer(loaded):
    import unicodedata

    from lmtune.inference.generate import generate

    cfg = GenerateConfig(greedy=True, max_new_tokens=12, repetition_penalty=1.0)
    for question in QUESTIONS:
        decomposed = unicodedata.normalize("NFD", question)
        assert decomposed != question
        assert generate(loaded, decomposed, cfg).text == generate(loaded, question, cfg).text
