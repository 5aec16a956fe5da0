"""`lmtune data clean`: write the rows worth training on, tidied, and every dropped row with its reason.

What it does about each finding of `inspect` is listed in that module's docstring.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from ..errors import DataError
from ..outputs import atomic_files
from .checks import broken_encoding, duplicate_keys, untidy_whitespace
from .normalize import CONTROL_RE, is_nfc, tidy_text
from .readers import Example, Row, check_not_an_input, iter_rows, resolve_paths
from .source import DataSource

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
        lines = [f"read {self.rows_read:,} row{'' if self.rows_read == 1 else 's'}; kept {self.kept:,} -> {self.output}",
                 f"dropped {sum(self.dropped.values()):,} -> {self.rejects}"]
        lines += [f"  {reason}: {n:,}" for reason, n in self.dropped.most_common()]
        if self.fixed:
            lines.append("fixed fields: " + ", ".join(f"{fix} {n:,}" for fix, n in self.fixed.most_common()))
        return "\n".join(lines)


class Cleaner:
    """Decides, row by row, what to keep (tidied) and what to drop (with the reason).

    `tokens` (an inspect.TokenCounter): drop rows whose training sample (prompt + answer + EOS, or the whole
    conversation) is longer than its max_length, rather than have training cut their answers."""

    def __init__(self, dedupe: str, min_answer_chars: int, tokens=None):
        if dedupe not in DEDUPE_CHOICES:
            raise DataError(f"--dedupe must be one of {', '.join(DEDUPE_CHOICES)}, got '{dedupe}'")
        self.dedupe, self.min_answer_chars, self.tokens = dedupe, min_answer_chars, tokens
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
        if row.messages is not None:
            return self._decide_conversation(row)
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
        too_long = self._too_long(Example(question, answer, context, row.where))
        if too_long:
            return None, "too_long", too_long
        duplicate = self._duplicate(row, "")
        if duplicate:
            return None, *duplicate
        return self._record(row, question, answer, context), "", ""

    def _duplicate(self, row: Row, what: str) -> tuple[str, str] | None:
        """(reason, detail) when the row repeats an earlier one (checks.duplicate_keys: the definition inspect
        counts by too); else None, and the row is remembered."""
        exact, near = duplicate_keys(row)
        if exact in self._exact:
            return "duplicate", f"same {what}as {self._exact[exact]}"
        if self.dedupe == "near":
            if near in self._near:
                return "near_duplicate", f"nearly the same {what}as {self._near[near]}"
            self._near[near] = row.where
        self._exact[exact] = row.where
        return None

    def _decide_conversation(self, row: Row) -> tuple[dict | None, str, str]:
        """A conversation is kept or dropped whole; each turn's text is tidied in place, in the file's own format."""
        contents = [self._tidy(m["content"]) for m in row.messages]
        for index, (message, content) in enumerate(zip(row.messages, contents)):
            if not content:
                return None, "empty_turn", f"turn {index} ({message['role']})"
            broken = broken_encoding(content)
            if broken:
                return None, "broken_encoding", f"turn {index}: {broken}"
        if len(contents[-1]) < self.min_answer_chars:
            return None, "short_answer", (f"last answer {len(contents[-1])} characters, fewer than --min-answer-chars "
                                          f"{self.min_answer_chars}")
        messages = [{**m, "content": c} for m, c in zip(row.messages, contents)]
        too_long = self._too_long(Example(messages[-2]["content"], messages[-1]["content"], "", row.where, messages))
        if too_long:
            return None, "too_long", too_long
        duplicate = self._duplicate(row, "conversation ")
        if duplicate:
            return None, *duplicate
        record = dict(row.record)
        field_name = row.columns[0]
        turns = record[field_name]
        if isinstance(turns, str):  # a CSV cell's JSON text (the reader checked it); in JSONL the turns are a list
            turns = json.loads(turns)
        text_key = "content" if "content" in turns[0] else "value"
        record[field_name] = [{**turn, text_key: content} for turn, content in zip(turns, contents)]
        return record, "", ""

    def _too_long(self, example: Example) -> str:
        if self.tokens is None:
            return ""
        length = self.tokens.length(example)[1]
        limit = self.tokens.max_length
        return f"{length:,} tokens, more than --max-length {limit:,}" if length > limit else ""

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
    source: DataSource | Iterable[str],
    output: str,
    dedupe: str = "exact",
    min_answer_chars: int = 0,
    overwrite: bool = False,
    skip_invalid: bool = False,
    model: str = "",
    max_length: int | None = None,
) -> CleanReport:
    """Write the kept rows (tidied) of `source` (a DataSource, or paths read with every setting detected) to
    `output` as JSONL and the dropped ones, each with its reason, to `<output stem>.rejects.jsonl`. Both appear
    only when complete; inputs are never touched. Every row is cleaned, also those a max_samples would leave out.

    With `max_length`, rows whose training sample is longer (in tokens of `model`'s tokenizer, with the source's
    template, as training builds it) are dropped as too_long."""
    source = DataSource.of(source)
    out = Path(output)
    if out.suffix.lower() not in (".jsonl", ".json"):
        raise DataError(f"{output}: clean writes JSON Lines; give the output a .jsonl name")
    rejects = rejects_path(out)
    if max_length is not None and not model:
        raise DataError("--max-length counts tokens: give --model too (the tokenizer training will use)")
    tokens = None
    if max_length is not None:
        from .inspect import TokenCounter

        tokens = TokenCounter(model, max_length, source.template, source.system_prompt)
    cleaner = Cleaner(dedupe, min_answer_chars, tokens)
    report = CleanReport(str(out), str(rejects))
    unresolved: list[DataError] = []
    files = resolve_paths(source.paths, unresolved.append if skip_invalid else None)
    # Both checked before anything is read: a wrong --output should fail in a second, not after the data.
    check_not_an_input([out, rejects], files)
    with atomic_files([rejects, out], overwrite) as (tmp_rejects, tmp_out):
        with open(tmp_rejects, "wb") as rejected, open(tmp_out, "wb") as kept:

            def on_invalid(error: DataError) -> None:
                report.dropped["invalid"] += 1
                entry = {"reason": "invalid", "error": str(error)}
                # What was read, to fix by hand: the line as written when it did not parse, else the parsed record.
                if getattr(error, "raw", None) is not None:
                    entry["raw"] = error.raw
                if getattr(error, "record", None) is not None:
                    entry["row"] = error.record
                rejected.write(_json_line(entry))

            for error in unresolved:
                on_invalid(error)
            for row in iter_rows(files, source, on_invalid if skip_invalid else None):
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
