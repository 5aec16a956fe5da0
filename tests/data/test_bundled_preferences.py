"""Consistency of the bundled Vietnamese preference data in data/.

vi_ai_preferences.jsonl (training) and vi_ai_preferences_heldout.jsonl (held out) hold
{"prompt", "chosen", "rejected"} pairs on the topics of the bundled Q&A data: the chosen answer is a
short, correct Vietnamese answer and the rejected one a failure typical of a small model (a wrong
fact, an answer in English, rambling that does not stop, a vague non-answer). vi_ai_kto.jsonl holds
unpaired {"prompt", "completion", "label"} rows taken from the training pairs.

Preference tuning measured on the held-out pairs is only fair if their prompts were never trained
on, so the prompts are compared with near_key (the normalisation the SFT data's test uses) against
the other split and against the SFT data's held-out questions.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from pathlib import Path

import pytest

from lmtune.data.normalize import near_key

DATA = Path(__file__).resolve().parents[2] / "data"
TRAIN = DATA / "vi_ai_preferences.jsonl"
HELDOUT = DATA / "vi_ai_preferences_heldout.jsonl"
KTO = DATA / "vi_ai_kto.jsonl"
SFT_TRAIN = DATA / "vi_ai_qa.jsonl"
SFT_HELDOUT = DATA / "vi_ai_qa_heldout.jsonl"
SFT_REWORDINGS = DATA / "vi_ai_qa_rewordings.jsonl"

PAIR_FIELDS = ("prompt", "chosen", "rejected")
KINDS = ("wrong", "english", "ramble", "vague")

# Phrases a vague non-answer leans on ("it depends on many factors", "it varies by case", ...).
HEDGES = (
    "phụ thuộc", "tùy", "tuỳ", "nhiều yếu tố", "khó nói", "tìm hiểu thêm", "không có câu trả lời",
    "nhiều khía cạnh", "bối cảnh", "trường hợp cụ thể", "nhiều cách", "còn nhiều tranh luận",
    "không thể nói chắc", "khá phức tạp",
)


def _rows(path: Path) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            assert line.strip(), f"{path.name}:{n}: blank line"
            row = json.loads(line)
            assert isinstance(row, dict), f"{path.name}:{n}: not a JSON object"
            rows.append(row)
    return rows


def _spaces(text: str) -> str:
    return " ".join(text.split())


def _vietnamese_share(text: str) -> float:
    """Share of words that carry a non-ASCII letter: most Vietnamese syllables do, English words do not."""
    words = re.findall(r"[^\W\d_]+", text)
    return sum(1 for w in words if any(ord(c) > 127 for c in w)) / max(1, len(words))


def _most_repeated_trigram(text: str) -> int:
    words = near_key(text).split()
    counts = Counter(tuple(words[i : i + 3]) for i in range(len(words) - 2))
    return max(counts.values(), default=0)


def _failure_kind(row: dict) -> str:
    rejected = row["rejected"]
    if _vietnamese_share(rejected) < 0.1:
        return "english"
    if _most_repeated_trigram(rejected) >= 3 and len(rejected) > len(row["chosen"]):
        return "ramble"
    if any(h in rejected.lower() for h in HEDGES):
        return "vague"
    return "wrong"


@pytest.fixture(scope="module")
def train() -> list[dict]:
    return _rows(TRAIN)


@pytest.fixture(scope="module")
def heldout() -> list[dict]:
    return _rows(HELDOUT)


@pytest.fixture(scope="module")
def kto() -> list[dict]:
    return _rows(KTO)


def test_sizes(train, heldout, kto):
    assert len(train) >= 220
    assert len(heldout) >= 55
    assert len(kto) >= 100
    labels = Counter(row["label"] for row in kto)
    assert set(labels) == {True, False}
    # KTO weighs desirable and undesirable examples separately; a lopsided file would need tuning.
    assert min(labels.values()) >= 0.4 * len(kto), labels


@pytest.mark.parametrize("path", [TRAIN, HELDOUT], ids=lambda p: p.name)
def test_pairs_are_well_formed(path):
    for n, row in enumerate(_rows(path), 1):
        assert set(row) == set(PAIR_FIELDS), f"{path.name}:{n}: fields {sorted(row)}"
        for field in PAIR_FIELDS:
            value = row[field]
            assert isinstance(value, str) and value.strip(), f"{path.name}:{n}: empty {field}"
            assert value == value.strip(), f"{path.name}:{n}: {field} has surrounding whitespace"
            assert unicodedata.is_normalized("NFC", value), f"{path.name}:{n}: {field} is not NFC"
        assert _spaces(row["chosen"]) != _spaces(row["rejected"]), f"{path.name}:{n}: chosen equals rejected"
        assert near_key(row["chosen"]) != near_key(row["rejected"]), f"{path.name}:{n}: sides differ only in punctuation"


@pytest.mark.parametrize("path", [TRAIN, HELDOUT], ids=lambda p: p.name)
def test_chosen_answers_are_short_finished_vietnamese(path):
    for n, row in enumerate(_rows(path), 1):
        chosen = row["chosen"]
        assert re.search(r"[à-ỹđ]", chosen.lower()), f"{path.name}:{n}: chosen has no Vietnamese diacritics"
        assert _vietnamese_share(chosen) >= 0.25, f"{path.name}:{n}: chosen reads as English"
        assert chosen[-1] in '.!?)"', f"{path.name}:{n}: chosen does not end a sentence: {chosen[-30:]!r}"
        assert _most_repeated_trigram(chosen) < 3, f"{path.name}:{n}: chosen repeats itself"
        assert len(chosen) <= 450, f"{path.name}:{n}: chosen is {len(chosen)} characters, not 1-3 sentences"


@pytest.mark.parametrize("path", [TRAIN, HELDOUT], ids=lambda p: p.name)
def test_prompts_are_unique(path):
    counts = Counter(near_key(row["prompt"]) for row in _rows(path))
    assert [k for k, c in counts.items() if c > 1] == []


def test_splits_do_not_share_prompts(train, heldout):
    held = {near_key(row["prompt"]) for row in heldout}
    assert sorted(held & {near_key(row["prompt"]) for row in train}) == []


def test_prompts_are_not_sft_heldout_questions(train, heldout):
    sft_held = {near_key(row["question"]) for row in _rows(SFT_HELDOUT)}
    for name, rows in (("training", train), ("held-out", heldout)):
        clash = [row["prompt"] for row in rows if near_key(row["prompt"]) in sft_held]
        assert clash == [], f"{name} preference prompts that are SFT held-out questions: {clash}"


def test_heldout_prompts_were_not_seen_in_sft_training(heldout):
    # The demo runs SFT before DPO; a held-out pair whose prompt SFT trained on would measure recall.
    seen = {near_key(row["question"]) for row in _rows(SFT_TRAIN) + _rows(SFT_REWORDINGS)}
    assert [row["prompt"] for row in heldout if near_key(row["prompt"]) in seen] == []


def test_no_rejected_answer_is_a_chosen_answer(train, heldout):
    chosen = {near_key(row["chosen"]) for row in train + heldout}
    assert [row["rejected"] for row in train + heldout if near_key(row["rejected"]) in chosen] == []


@pytest.mark.parametrize("path", [TRAIN, HELDOUT], ids=lambda p: p.name)
def test_every_failure_kind_is_well_represented(path):
    rows = _rows(path)
    kinds = Counter(_failure_kind(row) for row in rows)
    for kind in KINDS:
        assert kinds[kind] >= 0.15 * len(rows), f"{path.name}: {kind} rejected answers {kinds[kind]} of {len(rows)}"


def test_failure_kinds_are_told_apart():
    # The classifier above must separate the kinds, or the representation test proves nothing.
    chosen = "LoRA đóng băng trọng số gốc và chỉ học hai ma trận hạng thấp."
    assert _failure_kind({"chosen": chosen, "rejected": "LoRA trains two small low-rank matrices."}) == "english"
    assert _failure_kind({"chosen": chosen, "rejected": "LoRA là ma trận hạng thấp, ma trận hạng thấp là LoRA, " * 3}) == "ramble"
    assert _failure_kind({"chosen": chosen, "rejected": "Điều này phụ thuộc vào nhiều yếu tố."}) == "vague"
    assert _failure_kind({"chosen": chosen, "rejected": "LoRA cập nhật toàn bộ trọng số của mô hình."}) == "wrong"


def test_kto_rows_come_from_the_training_pairs(train, heldout, kto):
    pairs = {row["prompt"]: row for row in train}
    held = {near_key(row["prompt"]) for row in heldout}
    for n, row in enumerate(kto, 1):
        assert set(row) == {"prompt", "completion", "label"}, f"{KTO.name}:{n}: fields {sorted(row)}"
        assert isinstance(row["label"], bool), f"{KTO.name}:{n}: label is not true/false"
        assert row["prompt"] in pairs, f"{KTO.name}:{n}: prompt is not a training pair's prompt"
        side = "chosen" if row["label"] else "rejected"
        assert row["completion"] == pairs[row["prompt"]][side], f"{KTO.name}:{n}: completion is not the pair's {side}"
        assert near_key(row["prompt"]) not in held, f"{KTO.name}:{n}: held-out prompt"
    counts = Counter(near_key(row["prompt"]) for row in kto)
    assert [k for k, c in counts.items() if c > 1] == [], "KTO rows are unpaired: one per prompt"
    undesirable = Counter(_failure_kind(pairs[row["prompt"]]) for row in kto if not row["label"])
    assert set(undesirable) == set(KINDS), undesirable
