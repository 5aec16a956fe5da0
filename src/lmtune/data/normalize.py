"""Text normalisation shared by every data tool: the NFC test, the near-duplicate key, the digest
that compares rows, and `tidy_text` (what `clean` writes)."""

from __future__ import annotations

import functools
import hashlib
import re
import unicodedata

# C0/C1 controls except tab, line feed and carriage return (those are whitespace, handled by
# tidy_text), plus invisible characters that come from copy-paste and machine translation:
# soft hyphen, zero-width space (Google Translate leaves pairs of them), bidi marks and
# overrides, word joiner, stray byte-order marks, line/paragraph separators, non-characters.
# Zero-width (non-)joiners are left alone: emoji and some scripts need them.
CONTROL_RE = re.compile(
    r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u00ad\u200b\u200e\u200f\u202a-\u202e\u2028\u2029\u2060\u2066-\u2069\ufeff\ufffe\uffff]"
)
SURROGATE_RE = re.compile("[\ud800-\udfff]")  # json.loads accepts "\ud800"; such text cannot even be written as UTF-8


def is_nfc(text: str) -> bool:
    # Vietnamese typed on macOS or copied from some PDFs arrives decomposed (NFD): it looks the
    # same but tokenizes into different, longer token sequences than the NFC text the model saw.
    return unicodedata.is_normalized("NFC", text)


def nfc(text: str) -> str:
    """`text` in NFC, the form keyboards and the model's training text use. Everywhere text enters (training rows,
    prompts): NFD Vietnamese (Unikey's "Unicode tổ hợp", some macOS tools) looks the same but is another, about
    14% longer token sequence that the model rarely saw."""
    return text if unicodedata.is_normalized("NFC", text) else unicodedata.normalize("NFC", text)


# Whitespace that clean changes: surrounding blanks, CR, exotic spaces, spaces at line ends,
# runs of spaces between words, more than one empty line. Leading indentation inside the text
# is kept: answers hold code and indented lists.
EXOTIC_SPACES = "\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000"


@functools.cache
def _near_table() -> dict[int, str | None]:
    """str.translate table: punctuation becomes a space, control and format characters vanish."""
    table: dict[int, str | None] = {}
    for code in range(0x10000):
        category = unicodedata.category(chr(code))
        if category.startswith("P"):
            table[code] = " "
        elif category in ("Cc", "Cf") and not chr(code).isspace():
            table[code] = None
    return table


def near_key(text: str) -> str:
    """Text as compared for near-duplicates: NFC, case-folded, punctuation and whitespace collapsed.

    Symbols (+, =, ^, $) and digits are kept, so "2+3" and "2^3" stay different.
    """
    return " ".join(unicodedata.normalize("NFC", text).casefold().translate(_near_table()).split())


def digest(*parts: str) -> bytes:
    # 128-bit digests instead of the texts themselves keep 100k-row duplicate tables small;
    # "surrogatepass" because a broken row may hold lone surrogates.
    return hashlib.blake2b("\x1f".join(parts).encode("utf-8", "surrogatepass"), digest_size=16).digest()


# ---------------------------------------------------------------- fixing text


_LINE_BREAKS_RE = re.compile("\r\n?|[\x0b\x0c\x85\u2028\u2029]")
_EXOTIC_SPACES_RE = re.compile(f"[{EXOTIC_SPACES}]")
_TRAILING_SPACES_RE = re.compile(r"[ \t]+(?=\n)")
_INNER_SPACES_RE = re.compile(r"(?<=\S) {2,}(?=\S)")
_BLANK_LINES_RE = re.compile(r"\n{3,}")


def tidy_text(text: str) -> str:
    """What clean writes: line breaks as LF, no control or invisible characters, one space
    between words, no blanks at line ends, at most one empty line in a row, NFC."""
    text = _LINE_BREAKS_RE.sub("\n", text)  # first, so NEL and U+2028 become line breaks, not deletions
    text = CONTROL_RE.sub("", text)
    text = _EXOTIC_SPACES_RE.sub(" ", text)
    text = _TRAILING_SPACES_RE.sub("", text)
    text = _INNER_SPACES_RE.sub(" ", text)
    text = _BLANK_LINES_RE.sub("\n\n", text)
    return unicodedata.normalize("NFC", text.strip())
