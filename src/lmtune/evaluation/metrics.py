"""Text metrics that fit Vietnamese: nothing here strips diacritics.

Vietnamese words are space-separated syllables, and a syllable without its tone mark is a
different syllable ("tri" is not "trí"). So ROUGE-L and exact match work on syllables after NFC
normalisation (the same letter typed as NFD must compare equal), case folding and punctuation
removal, and chrF (sacrebleu) works on characters. `rouge_score`'s default tokenizer keeps only
a-z0-9 and would turn "Trí tuệ nhân tạo" into "tr tu nh n t o"; that is why ROUGE-L is written here.
"""

from __future__ import annotations

import functools
import statistics
import unicodedata
from dataclasses import asdict, dataclass


def nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


@functools.cache
def _punctuation_table() -> dict[int, str]:
    return {c: " " for c in range(0x10000) if unicodedata.category(chr(c)).startswith("P")}


def syllables(text: str) -> list[str]:
    """'Trí tuệ, NHÂN tạo!' -> ['trí', 'tuệ', 'nhân', 'tạo'] (NFC, case-folded, punctuation removed)."""
    return nfc(text).casefold().translate(_punctuation_table()).split()


def _lcs_length(a: list[str], b: list[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 over syllables, 0..1."""
    p, r = syllables(prediction), syllables(reference)
    if not p or not r:
        return float(p == r)
    lcs = _lcs_length(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, reference: str) -> bool:
    return syllables(prediction) == syllables(reference)


def length_ratio(prediction: str, reference: str) -> float:
    """Answer length in syllables relative to the reference: 1.0 = same length, > 1 rambling."""
    return len(syllables(prediction)) / max(1, len(syllables(reference)))


def chrf(predictions: list[str], references: list[str]) -> float:
    """Corpus chrF (sacrebleu's default chrF2), 0..100."""
    from sacrebleu.metrics import CHRF

    return CHRF().corpus_score([nfc(p) for p in predictions], [[nfc(r) for r in references]]).score


def sentence_chrf(prediction: str, reference: str) -> float:
    from sacrebleu.metrics import CHRF

    return CHRF().sentence_score(nfc(prediction), [nfc(reference)]).score


@dataclass
class Scores:
    """Generation scores of one model on one set of questions (percentages, except length_ratio)."""

    chrf: float
    rouge_l: float
    exact_match: float
    eos_rate: float  # share of answers that ended with EOS before the token limit
    length_ratio: float
    n: int

    def as_dict(self) -> dict:
        return asdict(self)


def score_texts(predictions: list[str], references: list[str], stopped: list[bool]) -> Scores:
    if not (len(predictions) == len(references) == len(stopped)):
        raise ValueError(f"{len(predictions)} predictions, {len(references)} references, {len(stopped)} stop flags")
    n = len(predictions)
    if n == 0:
        raise ValueError("nothing to score")
    return Scores(
        chrf=chrf(predictions, references),
        rouge_l=100 * statistics.mean(rouge_l(p, r) for p, r in zip(predictions, references)),
        exact_match=100 * statistics.mean(exact_match(p, r) for p, r in zip(predictions, references)),
        eos_rate=100 * statistics.mean(stopped),
        length_ratio=statistics.mean(length_ratio(p, r) for p, r in zip(predictions, references)),
        n=n,
    )
