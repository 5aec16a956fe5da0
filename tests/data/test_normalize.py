"""Text normalisation: the near-duplicate key and tidy_text."""

from __future__ import annotations

import unicodedata

from lmtune.data.checks import (
    untidy_whitespace,
)
from lmtune.data.normalize import near_key, tidy_text


def test_near_key_collapses_case_punctuation_whitespace_and_nfd_but_not_symbols():
    assert near_key("Học  MÁY, là gì?!") == near_key("học máy là gì") == near_key(unicodedata.normalize("NFD", "Học máy là gì"))
    assert near_key("2+3") != near_key("2^3")


def test_tidy_text_fixes_whitespace_controls_and_nfc_but_keeps_indentation():
    text = "  Câu  trả lời \r\nmột\u00a0dòng\u200b\n\n\n\n    return x  \n\tfoo\u2028bar "
    tidy = tidy_text(unicodedata.normalize("NFD", text))
    assert tidy == "Câu trả lời\nmột dòng\n\n    return x\n\tfoo\nbar"
    assert unicodedata.is_normalized("NFC", tidy)
    assert tidy_text(tidy) == tidy  # idempotent: cleaning clean data changes nothing
    assert untidy_whitespace(text) and not untidy_whitespace(tidy)
