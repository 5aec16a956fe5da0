"""Read data files into rows and question/answer examples: JSONL, JSON, CSV, parquet, `hub:` datasets.

Why hand-written readers: `datasets.load_dataset("json")` reports malformed lines as pyarrow
errors without file or line, and silently unifies schemas; users need "file:line: field".
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

from ..errors import DataError
from .normalize import nfc
from .source import DataSource

# Column layouts found without configuration, tried in this order: (question, answer, context).
KNOWN_SCHEMAS: list[tuple[str, str, str]] = [
    ("question", "answer", "context"),  # the tutorial
    ("instruction", "output", "input"),  # Alpaca
    ("input", "output", "context"),  # the schema the tutorial describes
    ("prompt", "response", "context"),
    ("prompt", "completion", "context"),  # TRL's prompt/completion
    ("query", "response", "context"),
]

# .tsv is CSV with tabs; .txt is read as a table with a header line too, as Excel saves "Text (Tab delimited)" and
# "Unicode Text" (UTF-16 with a byte-order mark), the two .txt formats a spreadsheet of pairs arrives in.
SUPPORTED_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".txt", ".parquet")
DELIMITED_SUFFIXES = (".csv", ".tsv", ".txt")

# No question/answer pair is a million characters long; a longer line is a file whose line breaks
# were lost (or binary junk), and parsing it would only produce a confusing error later.
MAX_LINE_CHARS = 1_000_000

# What to do with a bad file, line or row: None raises its DataError (the default, so training
# fails fast); a callable receives the error and the reader skips that item and goes on
# (`lmtune data --skip-invalid` counts them this way).
OnInvalid = Optional[Callable[[DataError], None]]


def _invalid(error: DataError, on_invalid: OnInvalid) -> None:
    if on_invalid is None:
        raise error
    on_invalid(error)


@dataclass
class Example:
    """A question/answer pair, or a conversation (`messages`: OpenAI roles, the last one the assistant's).

    For a conversation, `question` and `answer` are its last user and assistant turns (what `eval` asks and
    scores, given the earlier turns) and `context` is empty."""

    question: str
    answer: str
    context: str = ""
    source: str = ""  # "file:line" for messages
    messages: list[dict] | None = None


@dataclass
class LoadReport:
    files: list[str] = field(default_factory=list)
    rows_read: int = 0
    columns: tuple[str, str, str] | None = None
    has_context: bool = False  # some row has the context column (columns names it either way)
    skipped_empty: int = 0
    # Rows whose question, answer or context was not in NFC (decomposed Unicode) and was normalised.
    normalized: int = 0
    conversations: int = 0  # rows that were conversations (the others are question/answer pairs)
    # Rows after the first `max_samples` usable ones (data.max_samples): read to be counted, left out of training.
    max_samples: int = 0
    left_out: int = 0

    def summary(self) -> str:
        """'1,000 rows from 1 file(s)', or with data.max_samples '48 of 1,000 rows ... (data.max_samples 48 left out
        952)': rows a setting leaves out are said, with the setting."""
        files = f"from {len(self.files)} file(s)"
        if not self.left_out:
            return f"{self.rows_read:,} rows {files}"
        return (f"{self.rows_read:,} of {self.rows_read + self.left_out:,} rows {files} (data.max_samples "
                f"{self.max_samples:,} left out {self.left_out:,})")


# ---------------------------------------------------------------- reading


def _resolve_one(pattern: str) -> list[str]:
    if pattern.startswith("hub:"):
        return [pattern]
    expanded = os.path.expanduser(pattern)
    if glob.has_magic(expanded):
        matches = sorted(glob.glob(expanded, recursive=True))
        if not matches:
            raise DataError(f"{pattern}: the pattern matches no file")
        data_files = [m for m in matches if m.lower().endswith(SUPPORTED_SUFFIXES)]
        if not data_files:
            raise DataError(f"{pattern}: matches {len(matches)} file(s), none of them {', '.join(SUPPORTED_SUFFIXES)}")
        return data_files
    path = Path(expanded)
    if path.is_dir():
        folder = pattern.rstrip("/\\") or pattern
        raise DataError(f"{pattern}: is a folder; give files or a glob such as '{folder}{os.sep}*.jsonl'")
    if not path.is_file():
        raise DataError(f"{pattern}: file not found")
    if not path.name.lower().endswith(SUPPORTED_SUFFIXES):
        raise DataError(f"{pattern}: unsupported file type; use one of {', '.join(SUPPORTED_SUFFIXES)}")
    return [str(path)]


def resolve_paths(patterns: Iterable[str], on_invalid: OnInvalid = None) -> list[str]:
    """Expand globs; every entry must match at least one supported file. `hub:<id>` passes through.

    With `on_invalid`, an entry that matches nothing is reported to it and left out.
    """
    resolved: list[str] = []
    for pattern in patterns:
        try:
            resolved += _resolve_one(pattern)
        except DataError as e:
            _invalid(e, on_invalid)
    if not resolved:
        raise DataError("no data given: pass --data FILE (jsonl, json, csv, tsv or parquet)")
    return resolved


# Byte-order marks, longest first (UTF-32 LE starts with UTF-16 LE's mark). A BOM names its encoding beyond doubt:
# Excel's "Unicode Text" and Windows Notepad's "Unicode" write UTF-16 LE with one.
BOMS = [(b"\xff\xfe\x00\x00", "utf-32-le", "UTF-32 LE"), (b"\x00\x00\xfe\xff", "utf-32-be", "UTF-32 BE"),
        (b"\xef\xbb\xbf", "utf-8", "UTF-8"), (b"\xff\xfe", "utf-16-le", "UTF-16 LE"), (b"\xfe\xff", "utf-16-be", "UTF-16 BE")]


def byte_order_mark(raw: bytes) -> tuple[int, str, str] | None:
    """(length of the mark, Python codec, name) of the byte-order mark `raw` starts with, or None."""
    return next(((len(mark), codec, name) for mark, codec, name in BOMS if raw.startswith(mark)), None)


# What Windows-1258 Vietnamese decodes to and Western European text hardly ever holds: ă đ ơ ư (and capitals) and
# the five tone marks, which CP1258 writes as combining characters after the vowel (where Windows-1252 has Ì ì Ò ò Þ).
_CP1258_VIETNAMESE = re.compile("[\u0102\u0103\u0110\u0111\u01a0\u01a1\u01af\u01b0\u0300\u0301\u0303\u0309\u0323]")


def guess_encoding(raw: bytes) -> tuple[str, str] | None:
    """(codec, name) of the encoding a file that is not UTF-8 most likely has, or None when nothing fits well.

    Old Windows tools (and Excel's plain "CSV" on a Vietnamese Windows) write Vietnamese in Windows-1258: decoded
    as CP1258, a good share of its non-ASCII characters are those only Vietnamese uses. UTF-16 without a mark shows
    as a NUL byte beside every ASCII letter. A UTF-8 file with a few broken bytes gets no guess: it is UTF-8."""
    sample = raw[: 1 << 20]
    if sample.count(0) > len(sample) // 4:
        return ("utf-16-be", "UTF-16 BE") if sample[0::2].count(0) > sample[1::2].count(0) else ("utf-16-le", "UTF-16 LE")
    high = sum(byte >= 0x80 for byte in sample)
    if not high or sample.decode("utf-8", errors="replace").count("\ufffd") < high // 2:
        return None
    for codec, name, share in (("cp1258", "Windows-1258 (CP1258, Vietnamese)", 0.2),
                               ("cp1252", "Windows-1252 (Western European)", 0.0)):
        try:
            text = sample.decode(codec)
        except UnicodeDecodeError:
            continue
        non_ascii = sum(ord(char) >= 0x80 for char in text)
        if len(_CP1258_VIETNAMESE.findall(text)) >= share * non_ascii:
            return codec, name
    return None


def _conversion(path: str, codec: str) -> str:
    """The one line that converts `path` to UTF-8 (iconv on Linux and macOS; Python where there is no iconv)."""
    iconv = {"cp1258": "CP1258", "cp1252": "CP1252"}.get(codec, codec.upper())
    out = str(Path(path).with_name(Path(path).stem + ".utf8" + Path(path).suffix))
    return (f"iconv -f {iconv} -t UTF-8 '{path}' > '{out}' (or: python -c \"import sys; open(sys.argv[2], 'w', "
            f"encoding='utf-8').write(open(sys.argv[1], encoding='{codec}').read())\" '{path}' '{out}')")


def _not_utf8(path: str, line: int, byte: int, guess: tuple[str, str] | None) -> DataError:
    if guess is None:
        return DataError(f"{path}:{line}: not UTF-8 text (byte 0x{byte:02x}); save the file as UTF-8")
    codec, name = guess
    return DataError(f"{path}:{line}: not UTF-8 text (byte 0x{byte:02x}); it is most likely {name}: convert it to "
                     f"UTF-8 with {_conversion(path, codec)}")


def _read_text(path: str, on_invalid: OnInvalid = None) -> str:
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    bom = byte_order_mark(raw)
    if bom and bom[1] != "utf-8":
        length, codec, name = bom
        try:
            return raw[length:].decode(codec)
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: starts with a {name} byte-order mark but is not {name} text (bytes "
                            f"{e.start + length}-{e.end + length}); save the file again as UTF-8") from None
    try:
        return raw.decode("utf-8-sig")  # tolerate a UTF-8 byte-order mark
    except UnicodeDecodeError as e:
        if on_invalid is None:
            raise _not_utf8(path, raw[: e.start].count(b"\n") + 1, raw[e.start], guess_encoding(raw)) from None
    # Skipping invalid input: blank out only the lines that are not UTF-8, so the other lines
    # are still read and keep their line numbers.
    lines, guess = [], guess_encoding(raw)
    for number, line in enumerate(raw.removeprefix(b"\xef\xbb\xbf").split(b"\n"), start=1):
        try:
            lines.append(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            on_invalid(_not_utf8(path, number, line[e.start], guess))
            lines.append("")
    return "\n".join(lines)


def _iter_jsonl(path: str, text: str, on_invalid: OnInvalid = None) -> Iterator[tuple[str, Any]]:
    if re.match(r"\s*\[", text):
        _invalid(DataError(f"{path}:1: holds a JSON array, not JSON Lines (one object per line); "
                           "rename the file to .json or write one object per line"), on_invalid)
        return
    if re.match(r"\s*\{", text):  # one object wrapping the rows, in a file named .jsonl
        wrapped = _iter_wrapped(path, text)
        if wrapped is not None:
            yield from wrapped
            return
    # Split at "\n" only: str.splitlines() also splits at U+2028, U+0085 and other characters that
    # JSON allows raw inside strings. The "\r" of CRLF line ends is JSON whitespace and parses fine.
    lines = text.split("\n")
    cut_off = not text.endswith("\n")  # a truncated file ends in the middle of its last line
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        raw = line.removesuffix("\r")
        if len(line) > MAX_LINE_CHARS:
            _invalid(DataError(f"{where}: line is {len(line):,} characters long (limit {MAX_LINE_CHARS:,}); "
                               "are its line breaks missing?", raw=raw), on_invalid)
            continue
        try:
            record = json.loads(line.lstrip("\ufeff"))  # a BOM inside the file comes from concatenated files
        except json.JSONDecodeError as e:
            hint = "; the file ends in the middle of this line (truncated?)" if cut_off and number == len(lines) else ""
            _invalid(DataError(f"{where}: malformed JSON ({_json_message(e)} at column {e.colno}){hint}", raw=raw),
                     on_invalid)
            continue
        except (ValueError, RecursionError) as e:
            _invalid(DataError(f"{where}: unreadable JSON ({_json_limit(e)})", raw=raw), on_invalid)
            continue
        yield where, record


def _json_message(error: json.JSONDecodeError) -> str:
    # Some of json's messages end in "at" ("Invalid control character at"), meant to be followed by the position.
    return error.msg.removesuffix(" at")


def _json_limit(error: Exception) -> str:
    """Valid JSON that Python's parser still refuses: a number over 4,300 digits (int() refuses it, against a
    denial of service) or nesting deeper than the interpreter's recursion limit. Neither is a Q/A record."""
    if isinstance(error, RecursionError):
        return "nested too deeply"
    return str(error).split(";")[0]


# Keys under which exported datasets wrap their list of rows: {"data": [...]} (many APIs and tools), {"rows": [...]}
# (the Hub's datasets-server), {"examples": [...]}, {"train": [...], "test": [...]} (splits; the training one is read).
ROW_WRAPPERS = ("data", "rows", "examples", "train")


def wrapped_rows(value: Any) -> str | None:
    """The key of `value` (a parsed JSON document) that holds its rows as a list of objects, or None."""
    if not isinstance(value, dict) or conversation_field(value) or any(q in value for q, _, _ in KNOWN_SCHEMAS):
        return None  # a row of its own (a one-line JSONL file)
    return next((key for key in ROW_WRAPPERS if isinstance(value.get(key), list) and value[key]
                 and all(isinstance(row, dict) for row in value[key])), None)


def _iter_wrapped(path: str, text: str) -> Iterator[tuple[str, Any]] | None:
    """The rows of a file holding one JSON object that wraps them ({"data": [...]}); None for any other file."""
    try:
        document = json.loads(text)
    except (ValueError, RecursionError):  # not one JSON document: several lines of JSONL, or malformed
        return None
    key = wrapped_rows(document)
    if key is None:
        return None
    return ((f"{path}[{key}][{index}]", row) for index, row in enumerate(document[key]))


def _iter_json(path: str, text: str, on_invalid: OnInvalid = None) -> Iterator[tuple[str, Any]]:
    stripped = text.lstrip()
    if not stripped:
        return
    if stripped[0] == "{":
        wrapped = _iter_wrapped(path, text)
        if wrapped is not None:
            yield from wrapped
            return
    if stripped[0] == "[":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            _invalid(DataError(f"{path}:{e.lineno}: malformed JSON ({_json_message(e)} at column {e.colno})"), on_invalid)
            return
        except (ValueError, RecursionError) as e:
            _invalid(DataError(f"{path}: unreadable JSON ({_json_limit(e)})"), on_invalid)
            return
        for index, row in enumerate(rows):
            yield f"{path}[{index}]", row
        return
    # A .json file holding one object per line is common (the tutorial's own data); read it as JSONL.
    yield from _iter_jsonl(path, text, on_invalid)


CSV_DELIMITERS = ",;\t|"


def sniff_delimiter(text: str) -> str:
    """The separator of a CSV file, read off its header line: the candidate that occurs most often there outside
    quotes. Excel writes `;` where the decimal separator is a comma (Vietnamese, German, French regional settings),
    and a header has no free text in which a comma could hide."""
    counts = dict.fromkeys(CSV_DELIMITERS, 0)
    quoted = False
    for char in text:
        if char == '"':
            quoted = not quoted
        elif not quoted and char in "\r\n":
            break
        elif not quoted and char in counts:
            counts[char] += 1
    best = max(counts, key=lambda d: counts[d])
    return best if counts[best] else ","


class _RecordLines:
    """The lines the csv module reads, kept until the record they make is returned: a record spans several lines
    when a quoted field holds line breaks, and it is reported at its first line (where an editor finds it), with
    its text as written."""

    def __init__(self, text: str):
        self._lines = iter(io.StringIO(text, newline=""))
        self.pending: list[str] = []

    def __iter__(self):
        return self

    def __next__(self) -> str:
        line = next(self._lines)
        self.pending.append(line)
        return line

    def take(self, lines_before: int) -> tuple[int, str]:
        """(first line number, raw text) of the record just read; blank lines before it are skipped, as csv does."""
        blank = 0
        while blank < len(self.pending) - 1 and not self.pending[blank].strip("\r\n"):
            blank += 1
        raw = "".join(self.pending[blank:]).rstrip("\r\n")
        self.pending.clear()
        return lines_before + blank + 1, raw


def _iter_csv(path: str, text: str, on_invalid: OnInvalid = None, delimiter: str = "") -> Iterator[tuple[str, Any]]:
    # newline="" keeps the line breaks inside quoted fields (splitlines() would drop them); CRLF ends are read as
    # line ends, and _read_text already dropped a UTF-8 BOM: Excel's "CSV UTF-8" reads as is.
    delimiter = "\t" if delimiter == "tab" else delimiter or sniff_delimiter(text)
    lines = _RecordLines(text)
    reader = csv.DictReader(lines, delimiter=delimiter)
    before = 0
    try:
        reader.fieldnames  # the header, read now so that its line is not taken as the first record's
        lines.pending.clear()
        while True:
            before = reader.line_num
            try:
                row = next(reader)
            except StopIteration:
                break
            first, raw = lines.take(before)
            where = f"{path}:{first}"
            if None in row:  # DictReader files the values beyond the header's columns under the key None
                count = len(reader.fieldnames) + len(row[None])
                _invalid(DataError(f"{where}: {count} fields, but the header has {len(reader.fieldnames)}; put fields "
                                   f"that hold {_separator_name(delimiter)} in double quotes", raw=raw), on_invalid)
                continue
            yield where, dict(row)
    except csv.Error as e:  # e.g. a field over csv.field_size_limit(); the parser cannot resume after it
        first, raw = lines.take(before)
        _invalid(DataError(f"{path}:{first}: malformed CSV ({e})", raw=raw), on_invalid)


def _separator_name(delimiter: str) -> str:
    return {",": "commas", ";": "semicolons", "\t": "tabs", "|": "'|'"}.get(delimiter, repr(delimiter))


def _iter_parquet(path: str, on_invalid: OnInvalid = None) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq  # ships with `datasets`

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several unrelated types for a bad file
        _invalid(DataError(f"{path}: not a readable parquet file ({e})"), on_invalid)
        return
    for index, row in enumerate(table.to_pylist()):
        yield f"{path}[row {index}]", row


def cached_hub_datasets() -> list[str]:
    """Ids of the datasets in the Hugging Face cache ('datasets--org--name' folders beside the models)."""
    from ..safeload import hub_cache_dir

    try:
        entries = list(Path(hub_cache_dir()).iterdir())
    except OSError:
        return []
    return sorted(p.name[len("datasets--"):].replace("--", "/") for p in entries if p.name.startswith("datasets--"))


def check_hub_dataset_reachable(spec: str) -> None:
    """Without a network, `datasets` retries with back-off for half a minute before failing; look once, quickly, as
    the model loader does (model.check_hub_reachable): a cached dataset is read offline, any other refused at once."""
    from ..model import go_offline, hub_out_of_reach

    out_of_reach = hub_out_of_reach()
    if out_of_reach is None:
        return
    name, cached = spec[len("hub:"):], cached_hub_datasets()
    if name in cached:
        go_offline()
        import datasets

        datasets.config.HF_HUB_OFFLINE = True  # read when `datasets` was imported
        return
    raise DataError(f"{spec}: '{name}' is a Hugging Face Hub dataset, but the Hub cannot be reached ({out_of_reach}) "
                    f"and the dataset is not in the cache. Without a network: download it where there is one and "
                    f"pass its files (--data train.jsonl, csv or parquet), or set HF_HUB_OFFLINE=1 to use datasets "
                    f"downloaded before" + (f" ({', '.join(cached[:5])})" if cached else ""))


def _iter_hub(spec: str) -> Iterator[tuple[str, Any]]:
    check_hub_dataset_reachable(spec)
    import datasets

    name = spec[len("hub:") :]
    try:
        ds = datasets.load_dataset(name, split="train")
    except Exception as e:  # network, missing dataset, bad config: all mean "cannot get it"
        offline = " (HF_HUB_OFFLINE is set: only datasets downloaded before can be read)" if datasets.config.HF_HUB_OFFLINE else ""
        raise DataError(f"{spec}: cannot load the dataset from the Hugging Face Hub ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}){offline}") from None
    for index, row in enumerate(ds):
        yield f"{spec}[row {index}]", row


def iter_records(path: str, on_invalid: OnInvalid = None, csv_delimiter: str = "") -> Iterator[tuple[str, Any]]:
    """Yield (location, raw record) from one file; bad lines and files go to `on_invalid` (None: raise).
    A CSV file's separator is `csv_delimiter`, or read off its header when empty."""
    if path.startswith("hub:"):
        yield from _iter_hub(path)
        return
    suffix = Path(path).suffix.lower()
    if suffix == ".parquet":
        yield from _iter_parquet(path, on_invalid)
        return
    try:
        text = _read_text(path, on_invalid)
    except DataError as e:
        _invalid(e, on_invalid)
        return
    if not text.strip():
        _invalid(DataError(f"{path}: the file is empty"), on_invalid)
        return
    if suffix == ".jsonl":
        yield from _iter_jsonl(path, text, on_invalid)
    elif suffix == ".json":
        yield from _iter_json(path, text, on_invalid)
    else:
        if suffix == ".tsv":
            csv_delimiter = csv_delimiter or "tab"
        header = text.lstrip("\ufeff").split("\n", 1)[0]
        if suffix == ".txt" and not csv_delimiter and not any(d in header for d in CSV_DELIMITERS):
            _invalid(DataError(f"{path}: a .txt file is read as a table whose first line names the columns, separated "
                               "by tabs (as Excel's 'Text (Tab delimited)' and 'Unicode Text' save it), commas or "
                               "semicolons; its first line has none of them. Save the pairs as .csv, .tsv or .jsonl"),
                     on_invalid)
            return
        yield from _iter_csv(path, text, on_invalid, csv_delimiter)


def _by_lower(keys: Iterable[str]) -> dict[str, str]:
    """Column names by their case-folded, stripped form: spreadsheets write `Question`, `ANSWER `."""
    found: dict[str, str] = {}
    for key in keys:
        found.setdefault(str(key).strip().casefold(), key)
    return found


def detect_columns(keys: Iterable[str], where: str) -> tuple[str, str, str]:
    keys = list(keys)
    exact, folded = set(keys), _by_lower(keys)
    for question, answer, context in KNOWN_SCHEMAS:
        if question in exact and answer in exact:
            return question, answer, context
    for question, answer, context in KNOWN_SCHEMAS:
        if question in folded and answer in folded:
            return folded[question], folded[answer], folded.get(context, context)
    known = ", ".join(f"{q}/{a}" for q, a, _ in KNOWN_SCHEMAS)
    raise DataError(
        f"{where}: cannot tell question and answer columns apart among {sorted(map(str, keys))}; "
        f"known layouts are {known}; or name them with --question-field and --answer-field"
    )


def _text_field(record: dict, name: str, where: str, required: bool) -> str:
    if name not in record:
        if required:
            raise DataError(f"{where}: missing field '{name}'")
        return ""
    value = record[name]
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        kind = "null" if value is None else type(value).__name__
        raise DataError(f"{where}: field '{name}' must be text, got {kind}")
    return value


@dataclass
class Row:
    """One record as read, with its question, answer and context texts untouched (not stripped).

    A conversation row has `messages` (roles mapped to system/user/assistant, contents untouched) and
    `columns` = (its messages field, "", ""); its question, answer and context are its user turns, its
    assistant turns and its system message, each joined, so the data tools compare whole conversations."""

    path: str
    where: str  # "file:line" for messages
    record: dict
    columns: tuple[str, str, str]  # (question, answer, context) field names
    question: str
    answer: str
    context: str
    messages: list[dict] | None = None


# ---------------------------------------------------------------- conversations

# Conversation layouts found without configuration: the OpenAI fine-tuning format and ShareGPT.
CONVERSATION_FIELDS = ("messages", "conversations")
_ROLE_KEYS = (("role", "content"), ("from", "value"))
# ShareGPT's speaker names (and the common variants) as OpenAI roles.
ROLE_NAMES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
              "bot": "assistant", "model": "assistant"}


def conversation_field(record: dict, explicit: str = "") -> str | None:
    """The record's conversation column: the one named, else `messages` or `conversations` if it holds a list (or,
    in a CSV cell, the text of a JSON list)."""
    if explicit:
        return explicit if explicit in record else None
    return next((name for name in CONVERSATION_FIELDS if isinstance(record.get(name), list)
                 or (isinstance(record.get(name), str) and record[name].lstrip().startswith("["))), None)


def _turns_of(value: Any, where: str, field_name: str) -> Any:
    """A conversation as stored: a list (JSON, parquet), or in a CSV cell the text of a JSON list."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except (ValueError, RecursionError):
        raise DataError(f"{where}: field '{field_name}' holds text that is not a JSON list of turns "
                        "(a CSV cell with a conversation holds it as JSON: [{\"role\": \"user\", \"content\": ...}, ...])") from None


def read_messages(value: Any, where: str, field_name: str) -> list[dict]:
    """The turns of one conversation as {"role", "content"} with OpenAI roles; DataError naming the turn otherwise.

    The order rule is the one chat and serve apply: an optional system message first, then user and
    assistant alternating, ending with the assistant (the turn that is trained last)."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field '{field_name}' must be a non-empty list of turns")
    messages = []
    for index, turn in enumerate(value):
        at = f"{where}: turn {index}"
        if not isinstance(turn, dict):
            raise DataError(f"{at}: expected an object with role and content, got {type(turn).__name__}")
        keys = next(((r, c) for r, c in _ROLE_KEYS if r in turn), None)
        if keys is None:
            raise DataError(f"{at}: no 'role' (OpenAI) or 'from' (ShareGPT) field")
        role_name, content = turn[keys[0]], turn.get(keys[1])
        role = ROLE_NAMES.get(str(role_name).strip().lower())
        if role is None:
            raise DataError(f"{at}: unknown role '{role_name}'; known: {', '.join(sorted(ROLE_NAMES))}")
        if not isinstance(content, str):
            kind = "missing" if content is None else type(content).__name__
            raise DataError(f"{at}: '{keys[1]}' must be text, got {kind}")
        if not content.strip():
            raise DataError(f"{at}: empty {role} turn")
        messages.append({"role": role, "content": content})
    first = 1 if messages[0]["role"] == "system" else 0
    for index in range(first, len(messages)):
        expected = "user" if (index - first) % 2 == 0 else "assistant"
        role = messages[index]["role"]
        if role != expected:
            what = ("a system message after the first turn" if role == "system"
                    else f"two {role} turns in a row" if index > first and messages[index - 1]["role"] == role
                    else f"a conversation that starts with the {role}")
            raise DataError(f"{where}: turn {index}: {what}; expected the {expected} (an optional system message "
                            "first, then user and assistant alternate)")
    if len(messages) == first or messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: turn {len(messages) - 1}: the conversation ends with a "
                        f"{messages[-1]['role']} turn; it must end with the assistant's answer")
    return messages


def _conversation_row(path: str, where: str, record: dict, name: str) -> Row:
    if name not in record:
        raise DataError(f"{where}: missing field '{name}'")
    messages = read_messages(_turns_of(record[name], where, name), where, name)
    joined = {role: "\n\n".join(m["content"] for m in messages if m["role"] == role) for role in ("user", "assistant", "system")}
    return Row(path, where, record, (name, "", ""), joined["user"], joined["assistant"], joined["system"], messages)


def _choose_columns(record: dict, where: str, question_field: str, answer_field: str, context_field: str) -> tuple[str, str, str]:
    if question_field or answer_field:
        folded = _by_lower(record.keys())
        names = (question_field or "question", answer_field or "answer", context_field or "context")
        # A name given in another case than the file's header (`--question-field question` for `Question`) is that column.
        q, a, c = (name if name in record else folded.get(name.strip().casefold(), name) for name in names)
        return q, a, c
    nested = [key for key, value in record.items() if isinstance(value, list) and value and isinstance(value[0], dict)]
    turns = [key for key in nested if any(role in record[key][0] for role, _ in _ROLE_KEYS)]
    if turns:
        raise DataError(f"{where}: the field '{turns[0]}' looks like a conversation (a list of turns with roles); "
                        f"read it as one with --messages-field {turns[0]} (data.messages_field)")
    if nested and not (set(record) & {q for q, _, _ in KNOWN_SCHEMAS}):
        # {"items": [{...}, ...]}: a wrapper under a key that is not one of ROW_WRAPPERS
        raise DataError(f"{where}: the rows seem to be inside the field '{nested[0]}' (a list of objects); lmtune "
                        f"reads rows wrapped under {', '.join(ROW_WRAPPERS)}: rename it, or write the rows one object "
                        "per line (JSONL) or as a JSON array")
    detected = detect_columns(record.keys(), where)
    return (detected[0], detected[1], context_field or detected[2])


def iter_rows(files: Iterable[str], source: DataSource | None = None, on_invalid: OnInvalid = None) -> Iterator[Row]:
    """Yield every row of already resolved files, read as `source` says (its columns, separator, messages field;
    detected where it names none); columns are detected on each file's first row.

    A record that is not an object, or lacks a text question or answer, raises DataError naming
    file, line and field; with `on_invalid` it is handed over and skipped instead.
    """
    s = source or DataSource()
    named_columns = bool(s.question_field or s.answer_field)
    for path in files:
        columns: tuple[str, str, str] | None = None
        for where, record in iter_records(path, on_invalid, s.csv_delimiter):
            try:
                if not isinstance(record, dict):
                    raise DataError(f"{where}: expected a JSON object with question and answer fields, got {type(record).__name__}")
                # Conversations and question/answer pairs may be mixed, even in one file: each record says which it is.
                conversation = conversation_field(record, s.messages_field) if not named_columns else None
                if conversation or s.messages_field:
                    yield _conversation_row(path, where, record, conversation or s.messages_field)
                    continue
                columns = columns or _choose_columns(record, where, s.question_field, s.answer_field, s.context_field)
                q_name, a_name, c_name = columns
                row = Row(path, where, record, columns,
                          _text_field(record, q_name, where, required=True),
                          _text_field(record, a_name, where, required=True),
                          _text_field(record, c_name, where, required=False))
            except DataError as e:
                if e.record is None:
                    e.record = record
                _invalid(e, on_invalid)
                continue
            yield row


class RowsUpToMaxSamples:
    """The rows of `files` read as `source` says, until the caller has `used` max_samples of them (the rows with a
    question and an answer: what training trains on); the rows after those are only counted (`left_out`), bad ones
    included, since nothing reads them. Training and `data inspect` both stop here, so both see the same rows."""

    def __init__(self, files: list[str], source: DataSource, on_invalid: OnInvalid = None):
        self.files, self.source, self.on_invalid = files, source, on_invalid
        self.used = self.left_out = 0

    @property
    def full(self) -> bool:
        return bool(self.source.max_samples) and self.used >= self.source.max_samples

    def _invalid(self, error: DataError) -> None:
        if self.full:
            self.left_out += 1
        else:
            _invalid(error, self.on_invalid)

    def __iter__(self) -> Iterator[Row]:
        for row in iter_rows(self.files, self.source, self._invalid):
            if self.full:
                self.left_out += 1
                continue
            yield row


def usable(row: Row) -> bool:
    """Whether training gets an example from the row: a conversation (read checked it), or a pair whose question
    and answer are not empty after normalising."""
    return row.messages is not None or bool(nfc(row.question).strip() and nfc(row.answer).strip())


def load_examples(source: DataSource | Iterable[str], on_invalid: OnInvalid = None) -> tuple[list[Example], LoadReport]:
    """Read every file of `source` (a DataSource, or paths read with every setting detected), detect (or use the
    given) columns, and return the usable examples.

    Raises DataError naming file, line and field for malformed input (or, with `on_invalid`,
    hands it over and skips that row or file). Rows whose question or answer is empty after
    stripping are skipped and counted (they would teach nothing). Text is normalised to NFC,
    as prompts are at inference, and the rows that changed are counted. With max_samples, the rows after the
    first max_samples usable ones are still read, to count them (report.left_out), but neither checked nor kept.
    """
    source = DataSource.of(source)
    report = LoadReport(files=resolve_paths(source.paths, on_invalid), max_samples=source.max_samples)
    examples: list[Example] = []
    rows = RowsUpToMaxSamples(report.files, source, on_invalid)
    for row in rows:
        rows.used += usable(row)
        report.rows_read += 1
        if row.messages is not None:
            messages = [{"role": m["role"], "content": nfc(m["content"]).strip()} for m in row.messages]
            report.normalized += any(nfc(m["content"]) != m["content"] for m in row.messages)
            report.conversations += 1
            examples.append(Example(messages[-2]["content"], messages[-1]["content"], "", row.where, messages))
        else:
            report.columns = report.columns or row.columns
            report.has_context = report.has_context or row.columns[2] in row.record
            texts = (row.question, row.answer, row.context)
            question, answer, context = (nfc(text).strip() for text in texts)
            report.normalized += any(nfc(text) != text for text in texts)
            if not question or not answer:
                report.skipped_empty += 1
                continue
            examples.append(Example(question, answer, context, row.where))
    report.left_out = rows.left_out
    if report.rows_read == 0:
        raise DataError(f"{', '.join(report.files)}: no rows found (empty file?)")
    if not examples:
        raise DataError(f"{', '.join(report.files)}: all {report.rows_read} rows have an empty question or answer; nothing to train on")
    return examples, report


def check_not_an_input(outputs: list[Path], files: list[str]) -> None:
    """Data tools never write over what they read: refuse an output path that is one of the input files."""
    inputs = {os.path.realpath(path) for path in files if not path.startswith("hub:")}
    for out in outputs:
        if os.path.realpath(out) in inputs:
            raise DataError(f"{out} is one of the input files; clean never edits its input: choose another --output")
