"""What can be wrong with one text or one row: each check a plain function, shared by inspect, clean and the tests."""

from __future__ import annotations

import json
import re
import unicodedata

from .normalize import CONTROL_RE, EXOTIC_SPACES, SURROGATE_RE, digest, is_nfc, near_key, tidy_text
from .readers import Row


def _mojibake_tables() -> tuple[re.Pattern, dict[str, int]]:
    """UTF-8 bytes decoded as cp1252 or Latin-1 turn each multi-byte letter into a lead letter
    (Ã, á, â, ...) followed by continuation characters (¡, º, », €, ...): "á" becomes "Ã¡",
    "ạ" becomes "áº¡". Match exactly that shape, then confirm by re-encoding (see _mojibake)."""
    to_byte: dict[str, int] = {}
    for b in range(0x80, 0x100):
        to_byte.setdefault(chr(b), b)  # Latin-1
        cp = bytes([b]).decode("cp1252", errors="ignore")
        if cp:
            to_byte.setdefault(cp, b)
    # Byte 0xA0 (no-break space) is left out: "Ô" + NBSP is real Vietnamese ("Ô tô"), and real
    # mojibake has plenty of other continuation bytes to be caught by.
    cont = "".join(re.escape(ch) for ch, b in to_byte.items() if 0x80 <= b <= 0xBF and b != 0xA0)
    pattern = re.compile(f"[\u00c2-\u00df][{cont}]|[\u00e0-\u00ef][{cont}]{{2}}|[\u00f0-\u00f4][{cont}]{{3}}")
    return pattern, to_byte


MOJIBAKE_RE, _MOJIBAKE_BYTES = _mojibake_tables()


def _mojibake(text: str) -> str | None:
    """The first stretch that is UTF-8 read in the wrong code page, as 'Ã¡ -> á'; None if none."""
    for match in MOJIBAKE_RE.finditer(text):
        try:
            fixed = bytes(_MOJIBAKE_BYTES[ch] for ch in match.group()).decode("utf-8")
        except UnicodeDecodeError:  # the right shape but not valid UTF-8: a real letter pair
            continue
        return f"{match.group()} -> {fixed}"
    return None


def broken_encoding(text: str) -> str | None:
    """Why the text was damaged by a wrong encoding somewhere upstream, or None."""
    if "\ufffd" in text:
        return "U+FFFD replacement character (bytes lost when decoding)"
    if SURROGATE_RE.search(text):
        return "lone UTF-16 surrogate"
    found = _mojibake(text)
    return f"mojibake {found}" if found else None


def control_characters(text: str) -> list[str]:
    """Names of the control and invisible characters in the text (one entry per kind)."""
    return sorted({f"U+{ord(ch):04X} {unicodedata.name(ch, 'control')}" for ch in CONTROL_RE.findall(text)})


UNTIDY_WHITESPACE_RE = re.compile(rf"\A\s|\s\Z|\r|[{EXOTIC_SPACES}]|[ \t]+\n|(?<=\S) {{2,}}(?=\S)|\n{{3,}}")


def untidy_whitespace(text: str) -> bool:
    return UNTIDY_WHITESPACE_RE.search(text) is not None


# Vietnamese letters with a diacritic, and the subset no other Latin-script language uses.
VI_SPECIFIC_LETTERS = "ăđĩũơưĂĐĨŨƠƯ" + "".join(chr(c) for c in range(0x1EA0, 0x1EFA))
VI_LETTERS = VI_SPECIFIC_LETTERS + "àáâãèéêìíòóôõùúýÀÁÂÃÈÉÊÌÍÒÓÔÕÙÚÝ"
_VI_LETTER_RE = re.compile(f"[{VI_LETTERS}]")
_VI_SPECIFIC_RE = re.compile(f"[{VI_SPECIFIC_LETTERS}]")

# Frequent Vietnamese words as they look with every mark dropped: là, gì, của, các, được, không,
# người, những, nhiều, việc, hoặc, nhất, biết, trước, điều, phải, nước, đường, học, tiếng, nào,
# cuộc, dưới, trên, giữa, hiện, điện, cách. Chosen because their bare spelling is (almost) never
# right in Vietnamese and is not a common English, French or Spanish word; words whose bare form
# is itself a frequent word ("cho", "trong", "nay", "voi", "cung") are left out on purpose.
VI_BARE_WORDS = (
    "la gi cua cac duoc khong nguoi nhung nhieu viec hoac nhat biet truoc dieu phai nuoc duong "
    "hoc tieng nao cuoc duoi tren giua hien dien cach"
).split()
# Case-sensitive on purpose: "LA", "GI" or "La Liga" are names and abbreviations, not bare Vietnamese.
_VI_BARE_RE = re.compile(r"\b(?:" + "|".join(VI_BARE_WORDS) + r")\b")


def missing_diacritics(text: str) -> str | None:
    """'all' or 'some' when a field looks like Vietnamese written without its diacritics, else None.

    Heuristic, per field: at least two different lower-case words from VI_BARE_WORDS must occur
    (one could be a name or a foreign word). Then the field is
      * 'all'  when it has no Vietnamese letter with a mark at all ("Thu do cua Phap la gi?");
      * 'some' when it also has letters only Vietnamese uses (ơ, ư, ă, đ, ạ, ả, ...) and so is
        certainly Vietnamese, with some words left bare ("Thủ đô của Phap la gi?");
    and not flagged when its only marks are ones other languages use too (é, à, ô, ...).
    """
    if not is_nfc(text):  # a decomposed mark is not a word character: "la" + U+0300 would match "la"
        text = unicodedata.normalize("NFC", text)
    if len(set(_VI_BARE_RE.findall(text))) < 2:
        return None
    if not _VI_LETTER_RE.search(text):
        return "all"
    if _VI_SPECIFIC_RE.search(text):
        return "some"
    return None


# Checks in report order, with the label the text report shows.
CHECKS = {
    "empty_question": "empty or blank question",
    "empty_answer": "empty or blank answer",
    "exact_duplicate": "exact duplicates",
    "near_duplicate": "near-duplicates",
    "conflicting_answers": "same question, different answers",
    "not_nfc": "text not in Unicode NFC",
    "control_characters": "control or invisible characters",
    "broken_encoding": "broken encoding",
    "missing_diacritics": "Vietnamese missing diacritics",
    "untidy_whitespace": "untidy whitespace",
}


def _row_fields(row: Row) -> list[tuple[str, str]]:
    fields = [("question", row.question), ("answer", row.answer)]
    return fields + [("context", row.context)] if row.context else fields


def field_problems(text: str) -> list[tuple[str, list[str]]]:
    """(check, details) for every single-text check the text fails; one entry per check."""
    problems = []
    if not is_nfc(text):
        problems.append(("not_nfc", []))
    controls = control_characters(text)
    if controls:
        problems.append(("control_characters", controls))
    broken = broken_encoding(text)
    if broken:
        problems.append(("broken_encoding", [broken]))
    diacritics = missing_diacritics(text)
    if diacritics:
        problems.append(("missing_diacritics", [f"{diacritics} diacritics missing"]))
    if untidy_whitespace(text):
        problems.append(("untidy_whitespace", []))
    return problems


def row_problems(row: Row) -> list[tuple[str, str, list[str]]]:
    """(check, field, details) for every check of one row that needs no other row."""
    problems = []
    if not row.question.strip():
        problems.append(("empty_question", "question", []))
    if not row.answer.strip():
        problems.append(("empty_answer", "answer", []))
    for name, text in _row_fields(row):
        problems += [(check, name, details) for check, details in field_problems(text)]
    return problems


def duplicate_keys(row: Row) -> tuple[bytes, bytes]:
    """(exact, near): what two rows share when they are duplicates, the one definition inspect counts and clean
    drops by. Exact: equal after clean's fixes (tidy_text: NFC, whitespace, invisible characters), so an NFD copy
    of a row is its duplicate; near: also ignoring case and punctuation. A conversation compares its turns, each
    with its role."""
    if row.messages is not None:
        parts = [(m["role"] + ":", tidy_text(m["content"])) for m in row.messages]
    else:
        parts = [("", tidy_text(row.question)), ("", tidy_text(row.answer)), ("", tidy_text(row.context))]
    return digest(*(role + text for role, text in parts)), digest(*(role + near_key(text) for role, text in parts))


def snippet(text: str, width: int = 60) -> str:
    flat = " ".join(text.split())
    quoted = json.dumps(flat if len(flat) <= width else flat[: width - 1] + "…", ensure_ascii=False)
    # A lone surrogate cannot be printed or written as UTF-8: show it as its JSON escape, as the file had it.
    return SURROGATE_RE.sub(lambda m: f"\\u{ord(m.group()):04x}", quoted)
