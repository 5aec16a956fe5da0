"""Consistency of the bundled Vietnamese AI Q&A data in data/.

vi_ai_qa.jsonl is the training set, vi_ai_qa_heldout.jsonl holds reworded questions that
measure generalisation, and vi_ai_qa_rewordings.jsonl is a knowledge-augmentation file with
two rewordings of every training question; vi_ai_qa_rewordings_extra.jsonl adds more for the pairs that have a
held-out question. The held-out set is only a fair test if none of its
questions leaked into the training questions or the rewordings, so that is checked here.
"""

from __future__ import annotations

import json
import unicodedata
from collections import Counter
from pathlib import Path

import pytest

from lmtune.data.normalize import near_key

DATA = Path(__file__).resolve().parents[2] / "data"
TRAIN = DATA / "vi_ai_qa.jsonl"
HELDOUT = DATA / "vi_ai_qa_heldout.jsonl"
REWORDINGS = DATA / "vi_ai_qa_rewordings.jsonl"
EXTRA = DATA / "vi_ai_qa_rewordings_extra.jsonl"

FIELDS = {
    TRAIN: ("question", "answer"),
    HELDOUT: ("question", "answer", "source_question"),
    REWORDINGS: ("question", "answer", "source_question"),
    EXTRA: ("question", "answer", "source_question"),
}


def _rows(path: Path) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            assert line.strip(), f"{path.name}:{n}: blank line"
            row = json.loads(line)
            assert isinstance(row, dict), f"{path.name}:{n}: not a JSON object"
            rows.append(row)
    return rows


@pytest.fixture(scope="module")
def train() -> list[dict]:
    return _rows(TRAIN)


@pytest.fixture(scope="module")
def heldout() -> list[dict]:
    return _rows(HELDOUT)


@pytest.fixture(scope="module")
def rewordings() -> list[dict]:
    return _rows(REWORDINGS)


@pytest.mark.parametrize("path", list(FIELDS), ids=lambda p: p.name)
def test_lines_parse_with_nonempty_nfc_fields(path):
    rows = _rows(path)
    assert rows
    for n, row in enumerate(rows, 1):
        assert set(row) == set(FIELDS[path]), f"{path.name}:{n}: fields {sorted(row)}"
        for field in FIELDS[path]:
            value = row[field]
            assert isinstance(value, str) and value.strip(), f"{path.name}:{n}: empty {field}"
            assert value == value.strip(), f"{path.name}:{n}: {field} has surrounding whitespace"
            assert unicodedata.is_normalized("NFC", value), f"{path.name}:{n}: {field} is not NFC"


def test_training_questions_are_unique(train):
    counts = Counter(near_key(r["question"]) for r in train)
    assert [k for k, c in counts.items() if c > 1] == []


def test_rewordings_answer_matches_source(train, rewordings):
    answers = {r["question"]: r["answer"] for r in train}
    for n, row in enumerate(rewordings, 1):
        assert row["source_question"] in answers, f"line {n}: unknown source_question"
        assert row["answer"] == answers[row["source_question"]], f"line {n}: answer differs from source"


def test_every_training_question_has_two_distinct_rewordings(train, rewordings):
    by_source: dict[str, list[str]] = {}
    for row in rewordings:
        by_source.setdefault(row["source_question"], []).append(row["question"])
    assert len(rewordings) == 2 * len(train)
    for r in train:
        got = by_source.get(r["question"], [])
        assert len(got) == 2, f"{r['question']!r}: {len(got)} rewordings"
        keys = {near_key(q) for q in got}
        assert len(keys) == 2, f"{r['question']!r}: the two rewordings are the same"
        assert near_key(r["question"]) not in keys, f"{r['question']!r}: a rewording repeats it"


def test_rewordings_follow_training_order(train, rewordings):
    order = [row["source_question"] for row in rewordings[::2]]
    assert order == [r["question"] for r in train]
    assert [row["source_question"] for row in rewordings[1::2]] == order


def test_rewordings_do_not_repeat_training_questions(train, rewordings):
    train_keys = {near_key(r["question"]) for r in train}
    clash = [row["question"] for row in rewordings if near_key(row["question"]) in train_keys]
    assert clash == []


def test_heldout_questions_do_not_leak(train, heldout, rewordings):
    held_keys = {near_key(r["question"]) for r in heldout}
    seen = {near_key(r["question"]) for r in train} | {near_key(r["question"]) for r in rewordings}
    assert sorted(held_keys & seen) == []


def test_heldout_sources_exist_in_training(train, heldout):
    answers = {r["question"]: r["answer"] for r in train}
    for n, row in enumerate(heldout, 1):
        assert row["source_question"] in answers, f"held-out line {n}: unknown source_question"


def _trigrams(text: str) -> set[str]:
    key = near_key(text)
    return {key[i : i + 3] for i in range(len(key) - 2)}


def _similarity(a: str, b: str) -> float:
    x, y = _trigrams(a), _trigrams(b)
    return len(x & y) / len(x | y)


def test_extra_rewordings_serve_the_heldout_pairs_and_are_not_near_them(train, heldout, rewordings):
    extra = _rows(EXTRA)
    answers = {r["question"]: r["answer"] for r in train}
    held = {}
    for r in heldout:
        held.setdefault(r["source_question"], []).append(r["question"])
    seen = {near_key(r["question"]) for r in train} | {near_key(r["question"]) for r in rewordings}
    keys = [near_key(r["question"]) for r in extra]
    assert len(set(keys)) == len(keys) and not set(keys) & seen, "an extra rewording repeats another question"
    assert {r["source_question"] for r in extra} == set(held), "extra rewordings are for the held-out pairs, all of them"
    for n, r in enumerate(extra, 1):
        assert r["answer"] == answers[r["source_question"]], f"{EXTRA.name}:{n}: answer differs from its pair's"
        assert near_key(r["question"]) not in {near_key(q) for qs in held.values() for q in qs}, f"{EXTRA.name}:{n}"


@pytest.mark.parametrize("path", [REWORDINGS, EXTRA], ids=lambda p: p.name)
def test_no_rewording_is_a_near_copy_of_its_pairs_heldout_question(path, heldout):
    """A trained phrasing that shares most of its letter trigrams with the held-out question of the same pair would
    make the held-out figure a memorisation figure."""
    held = {}
    for r in heldout:
        held.setdefault(r["source_question"], []).append(r["question"])
    near = [(r["question"], q) for r in _rows(path) for q in held.get(r["source_question"], ())
            if _similarity(r["question"], q) >= 0.6]
    assert near == []
