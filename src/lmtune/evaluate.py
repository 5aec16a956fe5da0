"""Scores for generated answers against references.

chrF works on characters, so Vietnamese diacritics count as they should (a syllable without
its tone mark is a different syllable). Text is NFC-normalised first: the same letter typed as
NFD (base + combining mark) must not score as a different character sequence.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

from .generate import Answer


def nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


def chrf(predictions: list[str], references: list[str]) -> float:
    """Corpus chrF (sacrebleu, default chrF2 settings), 0..100."""
    from sacrebleu.metrics import CHRF

    return CHRF().corpus_score([nfc(p) for p in predictions], [[nfc(r) for r in references]]).score


@dataclass
class Scores:
    chrf: float
    eos_rate: float  # share of answers that ended with EOS before max_new_tokens
    n: int

    def row(self) -> str:
        return f"chrF {self.chrf:5.1f}   ended with EOS {100 * self.eos_rate:5.1f}%   (n={self.n})"


def score(answers: list[Answer], references: list[str]) -> Scores:
    if len(answers) != len(references):
        raise ValueError(f"{len(answers)} answers for {len(references)} references")
    return Scores(
        chrf=chrf([a.text for a in answers], references),
        eos_rate=sum(a.stopped_at_eos for a in answers) / max(1, len(answers)),
        n=len(answers),
    )
