"""`data inspect` and `data clean` on preference data (prompt, chosen, rejected; or prompt, completion, label).

What is reported, each with its file and line: rows that cannot be read (a missing prompt, an empty side, a label
that is not true or false, ...), pairs whose chosen and rejected answers are the same, or differ only in spaces and
line breaks (they teach nothing and pull the loss to log 2), pairs whose rejected answer is another row's chosen
answer (the data contradicts itself), duplicate rows, and the length of the prompt and of each answer (in tokens
with --model, else in characters). `clean` keeps the rows with none of these problems and writes the others, with
their reason, beside the output.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError
from ..outputs import atomic_files, check_output_free
from .preferences import PreferenceExample, read_preference
from .readers import iter_records, resolve_paths

# problem kind -> what it means, in the report's words
PROBLEMS = {
    "unreadable": "row cannot be read",
    "same_answers": "chosen and rejected are the same",
    "whitespace_only": "chosen and rejected differ only in spaces or line breaks",
    "rejected_is_chosen_elsewhere": "the rejected answer is another row's chosen answer",
    "duplicate": "the same row again",
}


@dataclass
class PreferenceRow:
    where: str
    record: dict
    example: PreferenceExample | None
    problem: str = ""
    detail: str = ""


@dataclass
class PreferenceReport:
    files: list[str]
    rows: list[PreferenceRow] = field(default_factory=list)
    lengths: dict[str, list[int]] = field(default_factory=dict)  # prompt/chosen/rejected -> lengths
    unit: str = "characters"

    @property
    def problems(self) -> list[PreferenceRow]:
        return [r for r in self.rows if r.problem]

    def counts(self) -> dict[str, int]:
        return {kind: sum(r.problem == kind for r in self.rows) for kind in PROBLEMS}


def _squash(text: str) -> str:
    return " ".join(text.split())


def _key(example: PreferenceExample) -> str:
    return json.dumps([example.prompt, example.chosen, example.rejected, example.label], ensure_ascii=False)


def read_preference_rows(paths: list[str], csv_delimiter: str = "") -> PreferenceReport:
    """Every row with its problem (the first that applies), the unreadable ones included."""
    report = PreferenceReport(resolve_paths(paths))
    for path in report.files:
        for where, record in iter_records(path, csv_delimiter=csv_delimiter):
            try:
                report.rows.append(PreferenceRow(where, record, read_preference(record, where)))
            except DataError as e:
                report.rows.append(PreferenceRow(where, record if isinstance(record, dict) else {}, None, "unreadable",
                                                 str(e).removeprefix(f"{where}: ")))
    chosen_at = {}
    for row in report.rows:
        if row.example is not None:
            chosen_at.setdefault((json.dumps(row.example.prompt), _squash(row.example.chosen)), row.where)
    seen: dict[str, str] = {}
    for row in report.rows:
        e = row.example
        if e is None:
            continue
        first = seen.setdefault(_key(e), row.where)
        if first != row.where:
            row.problem, row.detail = "duplicate", f"as {first}"
        elif e.paired and e.chosen == e.rejected:
            row.problem = "same_answers"
        elif e.paired and _squash(e.chosen) == _squash(e.rejected):
            row.problem = "whitespace_only"
        elif e.paired and (json.dumps(e.prompt), _squash(e.rejected)) in chosen_at:
            row.problem = "rejected_is_chosen_elsewhere"
            row.detail = f"chosen at {chosen_at[(json.dumps(e.prompt), _squash(e.rejected))]}"
    return report


def inspect_preferences(paths: list[str], tokenizer=None, csv_delimiter: str = "") -> PreferenceReport:
    report = read_preference_rows(paths, csv_delimiter)
    measure = (lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])) if tokenizer else len
    report.unit = "tokens" if tokenizer else "characters"
    sides: dict[str, list[int]] = {"prompt": [], "chosen": [], "rejected": []}
    for row in report.rows:
        if row.example is None:
            continue
        sides["prompt"].append(sum(measure(t["content"]) for t in row.example.prompt))
        sides["chosen"].append(measure(row.example.chosen))
        if row.example.rejected is not None:
            sides["rejected"].append(measure(row.example.rejected))
    report.lengths = {k: v for k, v in sides.items() if v}
    return report


def format_preference_report(report: PreferenceReport, limit: int = 20) -> str:
    readable = [r for r in report.rows if r.example is not None]
    paired = sum(r.example.paired for r in readable)
    lines = [f"preference data: {len(report.rows)} rows in {len(report.files)} file(s): {paired} pairs (prompt, "
             f"chosen, rejected), {len(readable) - paired} unpaired answers (prompt, completion, label)"]
    for side, values in report.lengths.items():
        lines.append(f"  {side} length ({report.unit}): median {statistics.median(values):g}, max {max(values)}")
    counts = report.counts()
    if not any(counts.values()):
        lines.append("no problems found")
        return "\n".join(lines)
    lines.append("problems (data clean drops these rows):")
    for kind, n in counts.items():
        if n:
            lines.append(f"  {PROBLEMS[kind]}: {n}")
    for row in report.problems[:limit]:
        lines.append(f"    {row.where}: {PROBLEMS[row.problem]}" + (f" ({row.detail})" if row.detail else ""))
    if len(report.problems) > limit:
        lines.append(f"    ... and {len(report.problems) - limit} more")
    return "\n".join(lines)


def clean_preferences(paths: list[str], output: str, overwrite: bool = False, csv_delimiter: str = "") -> str:
    """Write the rows without problems to `output` (JSONL) and the others to <output>.rejects.jsonl; the summary."""
    out = Path(output)
    if out.suffix.lower() != ".jsonl":
        raise DataError(f"--output {output}: give a file name ending in .jsonl")
    rejects = out.with_name(out.stem + ".rejects.jsonl")
    check_output_free(str(out), overwrite)
    report = read_preference_rows(paths, csv_delimiter)
    kept = [r for r in report.rows if not r.problem]
    with atomic_files([out, rejects]) as (tmp_out, tmp_rejects):
        tmp_out.write_text("".join(json.dumps(r.record, ensure_ascii=False) + "\n" for r in kept), encoding="utf-8")
        tmp_rejects.write_text("".join(json.dumps({"where": r.where, "reason": PROBLEMS[r.problem], "detail": r.detail,
                                                   "row": r.record}, ensure_ascii=False) + "\n"
                                       for r in report.problems), encoding="utf-8")
    counts = ", ".join(f"{PROBLEMS[k]}: {n}" for k, n in report.counts().items() if n) or "no problems"
    return f"kept {len(kept)} of {len(report.rows)} rows -> {out}; dropped {len(report.problems)} ({counts}) -> {rejects}"
