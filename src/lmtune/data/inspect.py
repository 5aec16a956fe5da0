"""`lmtune data inspect`: find what is wrong with a data file
before it costs a training run (`clean` fixes it).

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

import json
import math
import re
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ..errors import DataError
from ..outputs import atomic_files
from .checks import CHECKS, duplicate_keys, row_problems, snippet
from .normalize import digest, near_key
from .readers import (
    DELIMITED_SUFFIXES,
    Example,
    Row,
    RowsUpToMaxSamples,
    byte_order_mark,
    check_not_an_input,
    resolve_paths,
    usable,
    wrapped_rows,
)
from .source import DataSource
from .template import PromptTemplate
from .tokenize import tokenize_conversation

MAX_EXAMPLES = 10  # locations kept per finding: enough to find the pattern, small for 100k-row files


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
    # [low, high, samples] per bin of equal width from the shortest to the longest sample (the UI draws it)
    histogram: list[list[int]] = field(default_factory=list)
    context: int | None = None  # tokens the model can attend to: no --max-length beyond it helps (None: not known)


@dataclass
class InspectReport:
    files: list[FileInfo]
    rows_read: int = 0
    # With max_samples (data.max_samples): the rows after the first max_samples usable ones, counted, not inspected.
    max_samples: int = 0
    left_out: int = 0
    invalid: Finding = field(default_factory=Finding)
    findings: dict[str, Finding] = field(default_factory=lambda: {name: Finding() for name in CHECKS})
    conflicting_questions: int = 0
    conversations: int = 0  # rows that are conversations (the others are question/answer pairs)
    turns_per_conversation: LengthStats | None = None
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
    if suffix == ".parquet":
        return FileInfo(path, "PARQUET")
    try:
        raw = Path(path).read_bytes()
    except OSError:
        return FileInfo(path, "unreadable")  # the reader reports why
    bom = byte_order_mark(raw)
    if suffix in DELIMITED_SUFFIXES:
        info = FileInfo(path, {".csv": "CSV", ".tsv": "TSV (CSV with tabs)", ".txt": "text table (CSV)"}[suffix])
        if bom and bom[1] != "utf-8":
            info.notes.append(f"{bom[2]} with a byte-order mark (read fine; clean writes UTF-8)")
        return info
    fmt = "JSON Lines"
    if suffix == ".json":
        fmt = "JSON array" if re.match(rb"(\xef\xbb\xbf)?\s*\[", raw) else "JSON Lines (in a .json file)"
    if re.match(rb"(\xef\xbb\xbf)?\s*\{", raw) and (bom is None or bom[1] == "utf-8"):
        try:
            key = wrapped_rows(json.loads(raw.decode("utf-8-sig")))
        except (ValueError, RecursionError):  # several lines of JSONL (or malformed: the reader says where)
            key = None
        fmt = f"JSON object with its rows under '{key}'" if key else fmt
    info = FileInfo(path, fmt)
    if bom:
        info.notes.append(f"starts with a {bom[2]} byte-order mark (read fine; clean writes "
                          + ("none)" if bom[1] == "utf-8" else "UTF-8)"))
    if b"\r\n" in raw:
        info.notes.append("Windows CRLF line ends (read fine; clean writes LF)")
    return info


class TokenCounter:
    """Token lengths of samples exactly as training builds them (see data.tokenize_example)."""

    def __init__(self, model: str, max_length: int, template: str = "auto", system_prompt: str = ""):
        from ..model import load_tokenizer, resolve_source

        self.model, self.max_length = model, max_length
        source = resolve_source(model)
        self.tokenizer = load_tokenizer(source)
        self.template = PromptTemplate.for_tokenizer(self.tokenizer, template, system_prompt)
        self.context = model_context(source, self.tokenizer)
        self.lengths: list[int] = []
        self.truncated = self.prompt_too_long = 0

    def length(self, example: Example) -> tuple[int, int]:
        """(prompt tokens, sample tokens) of the sample training builds from `example`, at any length; a
        conversation's prompt length is 0 (training cuts it at turn boundaries, never to nothing)."""
        if example.messages is not None:
            return 0, len(tokenize_conversation(example, self.tokenizer, self.template, 1 << 30)[0]["input_ids"])
        prompt = len(self.template.prompt_ids(self.tokenizer, example.question, example.context))
        return prompt, prompt + len(self.template.answer_ids(self.tokenizer, example.answer))

    def add(self, example: Example) -> None:
        prompt, total = self.length(example)
        self.lengths.append(total)
        if example.messages is not None:
            self.truncated += total > self.max_length  # training drops its earliest turns
            return
        # The same two conditions as tokenize_example: no room for an answer, or the answer cut.
        if prompt >= self.max_length - 1:
            self.prompt_too_long += 1
        elif total > self.max_length:
            self.truncated += 1

    def stats(self) -> TokenStats:
        return TokenStats(self.model, self.max_length, self.template.kind, LengthStats.of(self.lengths),
                          self.truncated, self.prompt_too_long, histogram(self.lengths), self.context)


def model_context(source, tokenizer) -> int | None:
    """How many tokens the model attends to, from its config (max_position_embeddings and its other names), else
    the tokenizer's model_max_length; None when neither says (BLOOM's ALiBi has no limit in its config)."""
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(source.path, **source.kwargs())
    except Exception:  # a tokenizer-only folder, an unknown architecture: only the tokenizer can tell
        config = None
    for name in ("max_position_embeddings", "n_positions", "seq_length", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", 0)
    return value if isinstance(value, int) and 0 < value < 1_000_000 else None


def histogram(values: list[int], bins: int = 12) -> list[list[int]]:
    """[low, high, count] for `bins` integer ranges of equal width covering min..max (fewer when the range is narrow)."""
    if not values:
        return []
    low, high = min(values), max(values)
    width = max(1, math.ceil((high - low + 1) / bins))
    counts = [0] * math.ceil((high - low + 1) / width)
    for value in values:
        counts[(value - low) // width] += 1
    return [[low + i * width, low + (i + 1) * width - 1, n] for i, n in enumerate(counts)]


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
        self._turns: list[int] = []  # user turns of each conversation

    def invalid(self, error: DataError) -> None:
        # A line or row ("f.jsonl:3: ...", "f.parquet[row 3]: ...") or a whole file ("f.csv: the file is empty")
        is_line = re.match(r".*?(:\d+|\[[^\]]*\]): ", str(error)) is not None
        self.report.invalid.add(str(error), ["line" if is_line else "file"])

    def add(self, row: Row) -> None:
        report = self.report
        report.rows_read += 1
        info = self._files[row.path]
        info.rows += 1
        if row.messages is not None:
            info.columns.setdefault("conversation", row.columns[0])
        elif "question" not in info.columns:
            info.columns.update({"question": row.columns[0], "answer": row.columns[1]})
        if row.messages is None and row.columns[2] in row.record:
            info.columns.setdefault("context", row.columns[2])
        for check, field_name, details in row_problems(row):
            example = f"{row.where} ({field_name})" + (f": {', '.join(details)}" if details else "")
            if check == "missing_diacritics":
                example += " " + snippet(getattr(row, field_name))
            report.findings[check].add(example, details)
        self._question_chars.append(len(row.question))
        self._answer_chars.append(len(row.answer))
        if row.question.strip() and row.answer.strip():  # empty rows are reported as such, not as duplicates
            self._duplicates(row)
            if self.tokens:
                self.tokens.add(Example(row.question.strip(), row.answer.strip(), row.context.strip(), row.where,
                                        row.messages))
        if row.messages is not None:
            report.conversations += 1
            self._turns.append(sum(m["role"] == "user" for m in row.messages))

    def _duplicates(self, row: Row) -> None:
        findings = self.report.findings
        exact, near = duplicate_keys(row)
        near_q, near_a, near_c = near_key(row.question), near_key(row.answer), near_key(row.context)
        if exact in self._exact:
            findings["exact_duplicate"].add(f"{row.where} repeats {self._exact[exact]}")
        elif near in self._near:
            findings["near_duplicate"].add(f"{row.where} nearly repeats {self._near[near]}")
        self._exact.setdefault(exact, row.where)
        self._near.setdefault(near, row.where)
        question, answer = digest(near_q, near_c), digest(near_a)
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
        report.turns_per_conversation = LengthStats.of(self._turns)
        report.answer_chars = LengthStats.of(self._answer_chars)
        if self.tokens:
            report.tokens = self.tokens.stats()
        report.verdict = verdict(report)
        return report


def inspect_data(
    source: DataSource | Iterable[str],
    skip_invalid: bool = False,
    model: str = "",
    max_length: int = 512,
) -> InspectReport:
    """Read the data once, as `source` says (a DataSource, or paths read with every setting detected), and run every
    check; token statistics, with the source's template, only when a model is given. With max_samples, the rows
    training would read: the rows after them are counted (report.left_out), as training counts them."""
    source = DataSource.of(source)
    invalid: list[DataError] = []
    files = resolve_paths(source.paths, invalid.append if skip_invalid else None)
    tokens = TokenCounter(model, max_length, source.template, source.system_prompt) if model else None
    inspector = Inspector(files, tokens)
    for error in invalid:
        inspector.invalid(error)
    limited = RowsUpToMaxSamples(files, source, inspector.invalid if skip_invalid else None)
    rows = iter(limited)
    if tokens:  # tokenizing is the slow part: show progress on a terminal
        from tqdm import tqdm

        rows = tqdm(rows, desc="tokenizing", unit=" rows", disable=None)
    for row in rows:
        limited.used += usable(row)
        inspector.add(row)
    if inspector.report.rows_read == 0:
        raise DataError(f"{', '.join(files)}: no rows found")
    inspector.report.max_samples, inspector.report.left_out = source.max_samples, limited.left_out
    return inspector.finish()


# ---------------------------------------------------------------- verdict and text report


def _n(count: int, noun: str) -> str:
    return f"{count:,} {noun}" + ("" if count == 1 else "s")


def _invalid_counts(invalid: Finding) -> str:
    """'4 invalid lines', '1 invalid file', '3 invalid lines and 1 invalid file'."""
    kinds = [_n(invalid.details.get(kind, 0), f"invalid {kind}") for kind in ("line", "file") if invalid.details.get(kind)]
    return " and ".join(kinds) or _n(invalid.count, "invalid line")


def verdict(report: InspectReport) -> list[str]:
    """Short advice, most urgent first; one line per thing to do."""
    f = {name: finding.count for name, finding in report.findings.items()}
    lines = []
    if report.invalid.count:
        lines.append(f"{_invalid_counts(report.invalid)} skipped: fix them at the source or they stay out")
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
        lines.append(f"{_n(tokens.truncated, 'sample')} longer than {tokens.max_length} tokens lose their end and EOS, "
                     f"{_n(tokens.prompt_too_long, 'prompt')} leave no room for an answer: {_length_advice(tokens)}")
    return lines or ["no problems found: ready to train"]


def _length_advice(tokens: TokenStats) -> str:
    """Raise --max-length as far as the samples need and the model's context allows; beyond the context, only
    dropping or cutting the long rows helps."""
    p95, context = tokens.lengths.p95, tokens.context
    drop = f"`lmtune data clean --model {tokens.model} --max-length {{n}}` drops the longer rows; or cut them at the source"
    if context is None or p95 <= context:
        if p95 > tokens.max_length:
            return f"raise --max-length to about {p95:,} (p95)"
        return "shorten them, raise --max-length, or drop them: " + drop.format(n=tokens.max_length)
    if tokens.max_length < context:
        return (f"raise --max-length to {context:,} at most (the model's context; p95 is {p95:,}) and drop the rows "
                f"still longer: " + drop.format(n=context))
    return f"the model's context is {context:,} tokens, so no --max-length helps: " + drop.format(n=context)


def format_report(report: InspectReport) -> str:
    out = [f"{_n(report.rows_read, 'row')} read from {len(report.files)} file(s)" if not report.left_out else
           f"{report.rows_read:,} of {report.rows_read + report.left_out:,} rows read from {len(report.files)} file(s) "
           f"(data.max_samples {report.max_samples:,} left out {report.left_out:,}, as training would)"]
    for info in report.files:
        columns = ", ".join(f"{role}={name}" for role, name in info.columns.items()) or "none detected"
        out.append(f"  {info.path}: {info.format}, {_n(info.rows, 'row')}, columns {columns}")
        out += [f"    note: {note}" for note in info.notes]
    if report.invalid.count:
        out.append(f"  skipped {_invalid_counts(report.invalid)} (--skip-invalid):")
        out += [f"    {message}" for message in report.invalid.examples]
    if report.conversations:
        out.append(f"conversations: {report.conversations:,} of {report.rows_read:,} rows; user turns per conversation: "
                   f"{report.turns_per_conversation} (a conversation's question and answer below are its turns joined)")
    if report.question_chars:
        out.append(f"question length (characters): {report.question_chars}")
        out.append(f"answer length (characters):   {report.answer_chars}")
    if report.tokens:
        t = report.tokens
        out.append(f"tokens ({t.model}, {t.template} template, prompt + answer + EOS): {t.lengths}"
                   + (f"; the model's context: {t.context:,}" if t.context else ""))
        out.append(f"  --max-length {t.max_length}: {t.truncated:,} samples truncated, {t.prompt_too_long:,} prompts too long")
    out.append("")
    out.append("checks:")
    for name, label in CHECKS.items():
        finding = report.findings[name]
        count = f"{finding.count:,}"
        if name == "conflicting_answers" and finding.count:
            count = f"{_n(finding.count, 'row')}, {_n(report.conflicting_questions, 'question')}"
        out.append(f"  {label:<34} {count}")
        if finding.details and name in ("control_characters", "broken_encoding", "missing_diacritics"):
            out.append("    " + ", ".join(f"{detail}: {n:,}" for detail, n in finding.top_details(5)))
        out += [f"    {example}" for example in finding.examples[:3]]
    out.append("")
    out.append("verdict:")
    out += [f"  - {line}" for line in report.verdict]
    return "\n".join(out)


def write_json_report(report: InspectReport, path: str, inputs: list[str]) -> None:
    """Write the report as JSON (replacing an older report, never one of the inputs)."""
    check_not_an_input([Path(path)], inputs)
    with atomic_files([path], overwrite=True, flag="--json") as (tmp,):
        tmp.write_text(json.dumps(report.to_dict(), ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def print_json_report(report: InspectReport, stream=None) -> None:
    json.dump(report.to_dict(), stream or sys.stdout, ensure_ascii=False, indent=2)
    (stream or sys.stdout).write("\n")
