"""`lmtune data inspect` and `lmtune data clean`: find and fix what is wrong with a data file
before it costs a training run.

Both read through `data.iter_rows`, the reader training uses, so they see exactly the rows,
columns and errors that training would see. Every check below works on one text (or one row)
and is a plain function, so inspect, clean and the tests share them.

What inspect counts, and what clean does about it:
  * empty or blank question or answer (rows): clean drops the row;
  * answer shorter than --min-answer-chars: clean drops the row (inspect shows answer lengths);
  * exact duplicates (rows with identical texts): clean drops all but the first, comparing the
    texts after its own fixes, so rows differing only in whitespace or NFC count as one;
  * near-duplicates (equal after NFC, case folding, punctuation and whitespace collapsing):
    dropped with --dedupe near;
  * same question (near-equal), different answers: kept, both may be right; a person decides;
  * text not in NFC (fields): normalised;
  * control and invisible characters (fields): removed;
  * broken encoding, i.e. U+FFFD, lone surrogates, mojibake (fields): the row is dropped, the
    original text is lost and guessing it back could be wrong;
  * Vietnamese missing diacritics (fields): kept, only a person can restore them;
  * untidy whitespace (fields): normalised (see tidy_text).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import statistics
import sys
import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .data import Example, PromptTemplate, Row, iter_rows, resolve_paths
from .errors import DataError
from .outputs import atomic_files

MAX_EXAMPLES = 10  # locations kept per finding: enough to find the pattern, small for 100k-row files

# ---------------------------------------------------------------- single-text checks

# C0/C1 controls except tab, line feed and carriage return (those are whitespace, handled by
# tidy_text), plus invisible characters that come from copy-paste and machine translation:
# soft hyphen, zero-width space (Google Translate leaves pairs of them), bidi marks and
# overrides, word joiner, stray byte-order marks, line/paragraph separators, non-characters.
# Zero-width (non-)joiners are left alone: emoji and some scripts need them.
CONTROL_RE = re.compile(
    r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u00ad\u200b\u200e\u200f\u202a-\u202e\u2028\u2029\u2060\u2066-\u2069\ufeff\ufffe\uffff]"
)
SURROGATE_RE = re.compile("[\ud800-\udfff]")  # json.loads accepts "\ud800"; such text cannot even be written as UTF-8


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


def is_nfc(text: str) -> bool:
    # Vietnamese typed on macOS or copied from some PDFs arrives decomposed (NFD): it looks the
    # same but tokenizes into different, longer token sequences than the NFC text the model saw.
    return unicodedata.is_normalized("NFC", text)


# Whitespace that clean changes: surrounding blanks, CR, exotic spaces, spaces at line ends,
# runs of spaces between words, more than one empty line. Leading indentation inside the text
# is kept: answers hold code and indented lists.
_EXOTIC_SPACES = "\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000"
UNTIDY_WHITESPACE_RE = re.compile(rf"\A\s|\s\Z|\r|[{_EXOTIC_SPACES}]|[ \t]+\n|(?<=\S) {{2,}}(?=\S)|\n{{3,}}")


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


def _digest(*parts: str) -> bytes:
    # 128-bit digests instead of the texts themselves keep 100k-row duplicate tables small;
    # "surrogatepass" because a broken row may hold lone surrogates.
    return hashlib.blake2b("\x1f".join(parts).encode("utf-8", "surrogatepass"), digest_size=16).digest()


# ---------------------------------------------------------------- fixing text


_LINE_BREAKS_RE = re.compile("\r\n?|[\x0b\x0c\x85\u2028\u2029]")
_EXOTIC_SPACES_RE = re.compile(f"[{_EXOTIC_SPACES}]")
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


# ---------------------------------------------------------------- one row


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


def _snippet(text: str, width: int = 60) -> str:
    flat = " ".join(text.split())
    quoted = json.dumps(flat if len(flat) <= width else flat[: width - 1] + "…", ensure_ascii=False)
    # A lone surrogate cannot be printed or written as UTF-8: show it as its JSON escape, as the file had it.
    return SURROGATE_RE.sub(lambda m: f"\\u{ord(m.group()):04x}", quoted)


# ---------------------------------------------------------------- the report


@dataclass
class Finding:
    """Rows (or fields) with one kind of problem: how many, the first few, and what exactly."""

    count: int = 0
    examples: list[str] = field(default_factory=list)
    details: dict[str, int] = field(default_factory=dict)  # e.g. which invisible character, how often

    def add(self, example: str, details: Iterable[str] = ()) -> None:
        self.count += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(example)
        for detail in details:
            self.details[detail] = self.details.get(detail, 0) + 1

    def top_details(self, n: int | None = None) -> list[tuple[str, int]]:
        return sorted(self.details.items(), key=lambda item: -item[1])[:n]


@dataclass
class FileInfo:
    path: str
    format: str
    rows: int = 0
    columns: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class LengthStats:
    count: int
    min: int
    median: float
    p95: int
    max: int

    @classmethod
    def of(cls, values: list[int]) -> "LengthStats | None":
        if not values:
            return None
        ordered = sorted(values)
        p95 = ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]  # nearest rank: a value that occurs
        return cls(len(ordered), ordered[0], statistics.median(ordered), p95, ordered[-1])

    def __str__(self) -> str:
        median = f"{self.median:g}" if isinstance(self.median, float) else str(self.median)
        return f"min {self.min:,}, median {median}, p95 {self.p95:,}, max {self.max:,}"


@dataclass
class TokenStats:
    model: str
    max_length: int
    template: str
    lengths: LengthStats | None
    truncated: int  # answer cut at max_length: the sample loses its EOS
    prompt_too_long: int  # the prompt alone fills max_length: training drops the sample


@dataclass
class InspectReport:
    files: list[FileInfo]
    rows_read: int = 0
    invalid: Finding = field(default_factory=Finding)
    findings: dict[str, Finding] = field(default_factory=lambda: {name: Finding() for name in CHECKS})
    conflicting_questions: int = 0
    question_chars: LengthStats | None = None
    answer_chars: LengthStats | None = None
    tokens: TokenStats | None = None
    verdict: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for finding in [data["invalid"], *data["findings"].values()]:
            finding["details"] = dict(sorted(finding["details"].items(), key=lambda item: -item[1]))
        return data


def _file_info(path: str) -> FileInfo:
    """Format and encoding notes of one file; reads its bytes, which is cheap next to parsing them."""
    if path.startswith("hub:"):
        return FileInfo(path, "Hugging Face dataset")
    suffix = Path(path).suffix.lower()
    if suffix in (".parquet", ".csv"):
        return FileInfo(path, suffix[1:].upper())
    try:
        raw = Path(path).read_bytes()
    except OSError:
        return FileInfo(path, "unreadable")  # the reader reports why
    fmt = "JSON Lines"
    if suffix == ".json":
        fmt = "JSON array" if re.match(rb"(\xef\xbb\xbf)?\s*\[", raw) else "JSON Lines (in a .json file)"
    info = FileInfo(path, fmt)
    if raw.startswith(b"\xef\xbb\xbf"):
        info.notes.append("starts with a UTF-8 byte-order mark (read fine; clean writes none)")
    if b"\r\n" in raw:
        info.notes.append("Windows CRLF line ends (read fine; clean writes LF)")
    return info


class TokenCounter:
    """Token lengths of samples exactly as training builds them (see data.tokenize_example)."""

    def __init__(self, model: str, max_length: int, template: str = "auto"):
        from .model import load_tokenizer, resolve_source

        self.model, self.max_length = model, max_length
        self.tokenizer = load_tokenizer(resolve_source(model))
        self.template = PromptTemplate.for_tokenizer(self.tokenizer, template)
        self.lengths: list[int] = []
        self.truncated = self.prompt_too_long = 0

    def add(self, example: Example) -> None:
        prompt = len(self.template.prompt_ids(self.tokenizer, example.question, example.context))
        total = prompt + len(self.template.answer_ids(self.tokenizer, example.answer))
        self.lengths.append(total)
        # The same two conditions as tokenize_example: no room for an answer, or the answer cut.
        if prompt >= self.max_length - 1:
            self.prompt_too_long += 1
        elif total > self.max_length:
            self.truncated += 1

    def stats(self) -> TokenStats:
        return TokenStats(self.model, self.max_length, self.template.kind, LengthStats.of(self.lengths),
                          self.truncated, self.prompt_too_long)


class Inspector:
    """Runs every check over a stream of rows; `finish()` returns the report."""

    def __init__(self, files: list[str], tokens: TokenCounter | None = None):
        self.report = InspectReport(files=[_file_info(path) for path in files])
        self._files = {info.path: info for info in self.report.files}
        self.tokens = tokens
        self._exact: dict[bytes, str] = {}  # digest of the row -> where it first occurred
        self._near: dict[bytes, str] = {}
        # question -> (its first answer, where that was, rows that answer it differently)
        self._answers: dict[bytes, tuple[bytes, str, list[str]]] = {}
        self._question_chars: list[int] = []
        self._answer_chars: list[int] = []

    def invalid(self, error: DataError) -> None:
        self.report.invalid.add(str(error))

    def add(self, row: Row) -> None:
        report = self.report
        report.rows_read += 1
        info = self._files[row.path]
        info.rows += 1
        if not info.columns:
            info.columns = {"question": row.columns[0], "answer": row.columns[1]}
        if row.columns[2] in row.record:
            info.columns.setdefault("context", row.columns[2])
        for check, field_name, details in row_problems(row):
            example = f"{row.where} ({field_name})" + (f": {', '.join(details)}" if details else "")
            if check == "missing_diacritics":
                example += " " + _snippet(getattr(row, field_name))
            report.findings[check].add(example, details)
        self._question_chars.append(len(row.question))
        self._answer_chars.append(len(row.answer))
        if row.question.strip() and row.answer.strip():  # empty rows are reported as such, not as duplicates
            self._duplicates(row)
            if self.tokens:
                self.tokens.add(Example(row.question.strip(), row.answer.strip(), row.context.strip(), row.where))

    def _duplicates(self, row: Row) -> None:
        findings = self.report.findings
        exact = _digest(row.question, row.answer, row.context)
        near_q, near_a, near_c = near_key(row.question), near_key(row.answer), near_key(row.context)
        near = _digest(near_q, near_a, near_c)
        if exact in self._exact:
            findings["exact_duplicate"].add(f"{row.where} repeats {self._exact[exact]}")
        elif near in self._near:
            findings["near_duplicate"].add(f"{row.where} nearly repeats {self._near[near]}")
        self._exact.setdefault(exact, row.where)
        self._near.setdefault(near, row.where)
        question, answer = _digest(near_q, near_c), _digest(near_a)
        first_answer, first_where, others = self._answers.setdefault(question, (answer, row.where, []))
        if first_answer != answer:
            others.append(row.where)

    def finish(self) -> InspectReport:
        report = self.report
        conflicts = [(first, others) for _, first, others in self._answers.values() if others]
        report.conflicting_questions = len(conflicts)
        for first, others in conflicts:
            for where in others:
                report.findings["conflicting_answers"].add(f"{where} answers the question of {first} differently")
        report.question_chars = LengthStats.of(self._question_chars)
        report.answer_chars = LengthStats.of(self._answer_chars)
        if self.tokens:
            report.tokens = self.tokens.stats()
        report.verdict = verdict(report)
        return report


def inspect_data(
    paths: Iterable[str],
    question_field: str = "",
    answer_field: str = "",
    context_field: str = "",
    skip_invalid: bool = False,
    model: str = "",
    max_length: int = 512,
    template: str = "auto",
) -> InspectReport:
    """Read the data once and run every check; token statistics only when a model is given."""
    invalid: list[DataError] = []
    files = resolve_paths(paths, invalid.append if skip_invalid else None)
    tokens = TokenCounter(model, max_length, template) if model else None
    inspector = Inspector(files, tokens)
    for error in invalid:
        inspector.invalid(error)
    rows = iter_rows(files, question_field, answer_field, context_field, inspector.invalid if skip_invalid else None)
    if tokens:  # tokenizing is the slow part: show progress on a terminal
        from tqdm import tqdm

        rows = tqdm(rows, desc="tokenizing", unit=" rows", disable=None)
    for row in rows:
        inspector.add(row)
    if inspector.report.rows_read == 0:
        raise DataError(f"{', '.join(files)}: no rows found")
    return inspector.finish()


# ---------------------------------------------------------------- verdict and text report


def _n(count: int, noun: str) -> str:
    return f"{count:,} {noun}" + ("" if count == 1 else "s")


def verdict(report: InspectReport) -> list[str]:
    """Short advice, most urgent first; one line per thing to do."""
    f = {name: finding.count for name, finding in report.findings.items()}
    lines = []
    if report.invalid.count:
        lines.append(f"{_n(report.invalid.count, 'invalid line or file')} skipped: fix them at the source or they stay out")
    by_clean = []
    if f["empty_question"] or f["empty_answer"]:
        by_clean.append(f"drops the rows with an empty question ({f['empty_question']:,}) or answer ({f['empty_answer']:,})")
    if f["exact_duplicate"]:
        by_clean.append(f"drops {_n(f['exact_duplicate'], 'exact duplicate')}")
    if f["broken_encoding"]:
        by_clean.append(f"drops the rows of {_n(f['broken_encoding'], 'field')} with broken encoding (better: re-export them as UTF-8)")
    if f["not_nfc"]:
        by_clean.append(f"normalises {_n(f['not_nfc'], 'field')} to NFC")
    if f["control_characters"]:
        by_clean.append(f"removes control or invisible characters from {_n(f['control_characters'], 'field')}")
    if f["untidy_whitespace"]:
        by_clean.append(f"tidies whitespace in {_n(f['untidy_whitespace'], 'field')}")
    if by_clean:
        lines.append("run `lmtune data clean`: it " + "; ".join(by_clean))
    if f["near_duplicate"]:
        lines.append(f"{_n(f['near_duplicate'], 'near-duplicate')}: `lmtune data clean --dedupe near` drops them")
    if report.conflicting_questions:
        lines.append(f"{_n(report.conflicting_questions, 'question')} with different answers ({_n(f['conflicting_answers'], 'row')}): "
                     "check by hand that each answer is right")
    if f["missing_diacritics"]:
        lines.append(f"{_n(f['missing_diacritics'], 'field')} of Vietnamese missing diacritics: "
                     "restore them by hand or drop them; clean keeps them")
    tokens = report.tokens
    if tokens and (tokens.truncated or tokens.prompt_too_long):
        advice = (f"raise --max-length to about {tokens.lengths.p95:,} (p95)" if tokens.lengths.p95 > tokens.max_length
                  else "shorten them or raise --max-length")
        lines.append(f"{_n(tokens.truncated, 'sample')} longer than {tokens.max_length} tokens lose their end and EOS, "
                     f"{_n(tokens.prompt_too_long, 'prompt')} leave no room for an answer: {advice}")
    return lines or ["no problems found: ready to train"]


def format_report(report: InspectReport) -> str:
    out = [f"{report.rows_read:,} rows read from {len(report.files)} file(s)"]
    for info in report.files:
        columns = ", ".join(f"{role}={name}" for role, name in info.columns.items()) or "none detected"
        out.append(f"  {info.path}: {info.format}, {info.rows:,} rows, columns {columns}")
        out += [f"    note: {note}" for note in info.notes]
    if report.invalid.count:
        out.append(f"  skipped {report.invalid.count:,} invalid lines or files (--skip-invalid):")
        out += [f"    {message}" for message in report.invalid.examples]
    if report.question_chars:
        out.append(f"question length (characters): {report.question_chars}")
        out.append(f"answer length (characters):   {report.answer_chars}")
    if report.tokens:
        t = report.tokens
        out.append(f"tokens ({t.model}, {t.template} template, prompt + answer + EOS): {t.lengths}")
        out.append(f"  --max-length {t.max_length}: {t.truncated:,} samples truncated, {t.prompt_too_long:,} prompts too long")
    out.append("")
    out.append("checks:")
    for name, label in CHECKS.items():
        finding = report.findings[name]
        count = f"{finding.count:,}"
        if name == "conflicting_answers" and finding.count:
            count += f" rows, {report.conflicting_questions:,} questions"
        out.append(f"  {label:<34} {count}")
        if finding.details and name in ("control_characters", "broken_encoding", "missing_diacritics"):
            out.append("    " + ", ".join(f"{detail}: {n:,}" for detail, n in finding.top_details(5)))
        out += [f"    {example}" for example in finding.examples[:3]]
    out.append("")
    out.append("verdict:")
    out += [f"  - {line}" for line in report.verdict]
    return "\n".join(out)


# ---------------------------------------------------------------- clean


DEDUPE_CHOICES = ("exact", "near")


def rejects_path(output: str | Path) -> Path:
    output = Path(output)
    return output.with_name(output.stem + ".rejects.jsonl")


def _json_line(data: dict) -> bytes:
    try:
        return (json.dumps(data, ensure_ascii=False) + "\n").encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: only the \u escape can carry it
        return (json.dumps(data) + "\n").encode("utf-8")


@dataclass
class CleanReport:
    output: str
    rejects: str
    rows_read: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason -> rows
    fixed: Counter = field(default_factory=Counter)  # fix -> fields

    def summary(self) -> str:
        lines = [f"read {self.rows_read:,} rows; kept {self.kept:,} -> {self.output}",
                 f"dropped {sum(self.dropped.values()):,} -> {self.rejects}"]
        lines += [f"  {reason}: {n:,}" for reason, n in self.dropped.most_common()]
        if self.fixed:
            lines.append("fixed fields: " + ", ".join(f"{fix} {n:,}" for fix, n in self.fixed.most_common()))
        return "\n".join(lines)


def _check_not_an_input(outputs: list[Path], files: list[str]) -> None:
    inputs = {os.path.realpath(path) for path in files if not path.startswith("hub:")}
    for out in outputs:
        if os.path.realpath(out) in inputs:
            raise DataError(f"{out} is one of the input files; clean never edits its input: choose another --output")


class Cleaner:
    """Decides, row by row, what to keep (tidied) and what to drop (with the reason)."""

    def __init__(self, dedupe: str, min_answer_chars: int):
        if dedupe not in DEDUPE_CHOICES:
            raise DataError(f"--dedupe must be one of {', '.join(DEDUPE_CHOICES)}, got '{dedupe}'")
        self.dedupe, self.min_answer_chars = dedupe, min_answer_chars
        self._exact: dict[bytes, str] = {}
        self._near: dict[bytes, str] = {}
        self.fixed: Counter = Counter()
        self._layout: tuple[str, str, str] | None = None  # the first file's column names, used for all rows

    def _tidy(self, text: str) -> str:
        tidy = tidy_text(text)
        if tidy != text:
            # Counted separately so the summary says what changed, not only that something did.
            if not is_nfc(text):
                self.fixed["to NFC"] += 1
            if CONTROL_RE.search(text):
                self.fixed["control/invisible characters removed"] += 1
            if untidy_whitespace(text):
                self.fixed["whitespace"] += 1
        return tidy

    def decide(self, row: Row) -> tuple[dict | None, str, str]:
        """(record to write, "", "") to keep the row, or (None, reason, detail) to drop it."""
        question, answer = self._tidy(row.question), self._tidy(row.answer)
        context = self._tidy(row.context) if row.context else row.context
        if not question:
            return None, "empty_question", ""
        if not answer:
            return None, "empty_answer", ""
        if len(answer) < self.min_answer_chars:
            return None, "short_answer", f"{len(answer)} characters, fewer than --min-answer-chars {self.min_answer_chars}"
        for text in (question, answer, context):
            broken = broken_encoding(text)
            if broken:
                return None, "broken_encoding", broken
        exact = _digest(question, answer, context)
        if exact in self._exact:
            return None, "duplicate", f"same as {self._exact[exact]}"
        if self.dedupe == "near":
            near = _digest(near_key(question), near_key(answer), near_key(context))
            if near in self._near:
                return None, "near_duplicate", f"nearly the same as {self._near[near]}"
            self._near[near] = row.where
        self._exact[exact] = row.where
        return self._record(row, question, answer, context), "", ""

    def _record(self, row: Row, question: str, answer: str, context: str) -> dict:
        """The input record with its texts replaced; other fields and their order are kept."""
        layout = self._layout = self._layout or row.columns
        record = dict(row.record)
        record[row.columns[0]], record[row.columns[1]] = question, answer
        if isinstance(record.get(row.columns[2]), str):
            record[row.columns[2]] = context
        if row.columns != layout:  # a later file with other column names: one output file needs one layout
            record = {dict(zip(row.columns, layout)).get(key, key): value for key, value in record.items()}
        return record


def clean_data(
    paths: Iterable[str],
    output: str,
    dedupe: str = "exact",
    min_answer_chars: int = 0,
    overwrite: bool = False,
    skip_invalid: bool = False,
    question_field: str = "",
    answer_field: str = "",
    context_field: str = "",
) -> CleanReport:
    """Write the kept rows (tidied) to `output` as JSONL and the dropped ones, each with its
    reason, to `<output stem>.rejects.jsonl`. Both appear only when complete; inputs are never touched."""
    out = Path(output)
    if out.suffix.lower() not in (".jsonl", ".json"):
        raise DataError(f"{output}: clean writes JSON Lines; give the output a .jsonl name")
    rejects = rejects_path(out)
    cleaner = Cleaner(dedupe, min_answer_chars)
    report = CleanReport(str(out), str(rejects))
    unresolved: list[DataError] = []
    files = resolve_paths(paths, unresolved.append if skip_invalid else None)
    # Both checked before anything is read: a wrong --output should fail in a second, not after the data.
    _check_not_an_input([out, rejects], files)
    with atomic_files([rejects, out], overwrite) as (tmp_rejects, tmp_out):
        with open(tmp_rejects, "wb") as rejected, open(tmp_out, "wb") as kept:

            def on_invalid(error: DataError) -> None:
                report.dropped["invalid"] += 1
                rejected.write(_json_line({"reason": "invalid", "error": str(error)}))

            for error in unresolved:
                on_invalid(error)
            for row in iter_rows(files, question_field, answer_field, context_field, on_invalid if skip_invalid else None):
                report.rows_read += 1
                record, reason, detail = cleaner.decide(row)
                if record is None:
                    report.dropped[reason] += 1
                    rejected.write(_json_line({"reason": reason, "detail": detail, "where": row.where, "row": row.record}))
                else:
                    report.kept += 1
                    kept.write(_json_line(record))
        if report.rows_read == 0:
            raise DataError(f"{', '.join(files)}: no rows found")
    report.fixed = cleaner.fixed
    return report


def write_json_report(report: InspectReport, path: str, inputs: list[str]) -> None:
    """Write the report as JSON (replacing an older report, never one of the inputs)."""
    _check_not_an_input([Path(path)], inputs)
    with atomic_files([path], overwrite=True) as (tmp,):
        tmp.write_text(json.dumps(report.to_dict(), ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def print_json_report(report: InspectReport, stream=None) -> None:
    json.dump(report.to_dict(), stream or sys.stdout, ensure_ascii=False, indent=2)
    (stream or sys.stdout).write("\n")
