"""Consistency of the bundled multi-turn conversations in data/vi_ai_conversations.jsonl.

Each line is one conversation in the OpenAI fine-tuning format, {"messages": [...]}: an optional
system message, then user and assistant turns alternating, ending with the assistant. The first
user question of a conversation must not be one of the held-out reworded questions, or training
on the conversations would leak the held-out set.
"""

from __future__ import annotations

import json
import unicodedata
from collections import Counter
from pathlib import Path

import pytest

from lmtune.data.normalize import near_key

DATA = Path(__file__).resolve().parents[2] / "data"
CONVERSATIONS = DATA / "vi_ai_conversations.jsonl"
HELDOUT = DATA / "vi_ai_qa_heldout.jsonl"


def _rows(path: Path) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            assert line.strip(), f"{path.name}:{n}: blank line"
            rows.append(json.loads(line))
    return rows


@pytest.fixture(scope="module")
def conversations() -> list[dict]:
    return _rows(CONVERSATIONS)


def _dialogue(conv: dict) -> list[dict]:
    """The messages after the optional system message."""
    messages = conv["messages"]
    return messages[1:] if messages and messages[0]["role"] == "system" else messages


def test_lines_parse_as_message_lists(conversations):
    for n, conv in enumerate(conversations, 1):
        assert isinstance(conv, dict) and set(conv) == {"messages"}, f"line {n}: not {{'messages': [...]}}"
        assert isinstance(conv["messages"], list) and conv["messages"], f"line {n}: no messages"
        for m in conv["messages"]:
            assert isinstance(m, dict) and set(m) == {"role", "content"}, f"line {n}: message {m!r}"


def test_roles_alternate_and_end_with_assistant(conversations):
    for n, conv in enumerate(conversations, 1):
        roles = [m["role"] for m in conv["messages"]]
        assert "system" not in roles[1:], f"line {n}: system message after the start"
        dialogue = [m["role"] for m in _dialogue(conv)]
        expected = ["user", "assistant"] * (len(dialogue) // 2)
        assert dialogue == expected and len(dialogue) % 2 == 0, f"line {n}: roles {roles}"
        assert roles[-1] == "assistant", f"line {n}: last message is from {roles[-1]}"


def test_contents_are_nonempty_nfc(conversations):
    for n, conv in enumerate(conversations, 1):
        for i, m in enumerate(conv["messages"]):
            text = m["content"]
            assert isinstance(text, str) and text.strip(), f"line {n}, message {i}: empty content"
            assert text == text.strip(), f"line {n}, message {i}: surrounding whitespace"
            assert unicodedata.is_normalized("NFC", text), f"line {n}, message {i}: not NFC"


def test_first_questions_are_not_held_out(conversations):
    held = {near_key(r["question"]) for r in _rows(HELDOUT)}
    firsts = [_dialogue(conv)[0]["content"] for conv in conversations]
    assert [q for q in firsts if near_key(q) in held] == []


def test_size_and_turn_counts(conversations):
    assert len(conversations) >= 48
    turns = Counter(sum(m["role"] == "user" for m in conv["messages"]) for conv in conversations)
    assert set(turns) <= {2, 3, 4}, f"user turns per conversation: {dict(turns)}"


def test_some_conversations_have_a_system_message(conversations):
    assert sum(conv["messages"][0]["role"] == "system" for conv in conversations) >= 10
