"""Metrics that fit Vietnamese: syllables keep their diacritics; ROUGE-L, exact match and corpus scores by hand."""

from __future__ import annotations

import unicodedata

import pytest

from lmtune.evaluation.metrics import (
    exact_match,
    length_ratio,
    rouge_l,
    score_texts,
    syllables,
)


def test_syllables_keep_diacritics_fold_case_and_drop_punctuation():
    assert syllables("Trí tuệ, NHÂN tạo!") == ["trí", "tuệ", "nhân", "tạo"]
    nfd = unicodedata.normalize("NFD", "Trí tuệ nhân tạo")
    assert nfd != "Trí tuệ nhân tạo" and syllables(nfd) == ["trí", "tuệ", "nhân", "tạo"]


def test_rouge_l_by_hand():
    # LCS("trí tuệ nhân tạo", "trí tuệ nhân tạo là gì") = 4: P = 4/4, R = 4/6, F = 2PR/(P+R) = 0.8
    assert rouge_l("Trí tuệ nhân tạo", "trí tuệ NHÂN tạo là gì") == pytest.approx(0.8)
    # tone marks matter: "tri tue" shares no syllable with "trí tuệ"
    assert rouge_l("tri tue nhan tao", "trí tuệ nhân tạo") == 0.0
    # order matters: LCS("b a c", "a b c") = 2, P = R = 2/3
    assert rouge_l("học máy sâu", "máy học sâu") == pytest.approx(2 / 3)
    assert rouge_l("", "trí tuệ") == 0.0 and rouge_l("", "") == 1.0


def test_exact_match_and_length_ratio_by_hand():
    assert exact_match("AI là gì?", "ai là gì")
    assert not exact_match("AI la gi", "AI là gì")
    assert length_ratio("một hai ba bốn", "một hai") == 2.0
    assert length_ratio("", "một hai") == 0.0


def test_corpus_scores_by_hand():
    s = score_texts(["Trí tuệ nhân tạo", "", "học máy"], ["trí tuệ nhân tạo là gì", "dữ liệu", "Học máy!"], [True, False, True])
    assert s.rouge_l == pytest.approx(100 * (0.8 + 0 + 1) / 3)
    assert s.exact_match == pytest.approx(100 / 3)
    assert s.eos_rate == pytest.approx(200 / 3)
    assert s.length_ratio == pytest.approx((4 / 6 + 0 + 1) / 3)
    assert 0 < s.chrf < 100
    assert score_texts(["dữ liệu"], ["dữ liệu"], [True]).chrf == pytest.approx(100)
