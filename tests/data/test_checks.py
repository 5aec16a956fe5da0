"""Single-text checks: missing Vietnamese diacritics, broken encodings, control characters."""

from __future__ import annotations

import unicodedata

import pytest

from lmtune.data.checks import (
    broken_encoding,
    control_characters,
    missing_diacritics,
)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("Thu do cua Phap la gi?", "all"),
        ("Thủ đô của Phap la gi?", "some"),  # the known row of the Alpaca sample
        (unicodedata.normalize("NFD", "Thủ đô của Phap la gi?"), "some"),  # decomposed marks must not hide words
        ("Hoc may la gi va duoc dung de lam gi?", "all"),
        ("Thủ đô của Pháp là gì?", None),
        ("The capital of France is Paris.", None),
        ("Giá là 5 đô la, còn sô cô la thì rẻ hơn.", None),  # "la" alone is a real word here
        ("La Liga là giải bóng đá; GI là viết tắt.", None),  # capitalised names and abbreviations are not bare words
        ("le mot de la fin, c'est génial", None),  # French: only one bare word, and no Vietnamese-only letter
    ],
)
def test_missing_diacritics(text, expected):
    assert missing_diacritics(text) == expected


@pytest.mark.parametrize(
    "text,kind",
    [
        ("Trí tuệ nhân t\ufffdo", "U+FFFD"),
        ("Tiáº¿ng Viá»‡t", "mojibake áº¿ -> ế"),
        ("Cà phê Ã¡", "mojibake Ã¡ -> á"),
        ("nhiệt độ 30Â°C", "mojibake Â° -> °"),
        ("a\ud800b", "surrogate"),
    ],
)
def test_broken_encoding_found(text, kind):
    assert kind in broken_encoding(text)


@pytest.mark.parametrize("text", ["Tiếng Việt có dấu", "naïve résumé, São Paulo", "café » «ok»", "Ô\u00a0tô", "30°C, x² → y"])
def test_broken_encoding_not_claimed_for_good_text(text):
    assert broken_encoding(text) is None


def test_control_characters_named():
    assert control_characters("kiến \u200b\u200bthức") == ["U+200B ZERO WIDTH SPACE"]
    assert control_characters("bell\x07 and bom\ufeff") == ["U+0007 control", "U+FEFF ZERO WIDTH NO-BREAK SPACE"]
    assert control_characters("tab\tand\nnewline, emoji 👩\u200d💻") == []
