"""Property-based fuzzing of the data reader and `lmtune data inspect` / `clean` (hypothesis).

Inputs: random bytes, random JSON values (one per line and whole files), and random text full of what
breaks text handling: NFD Vietnamese, combining marks, right-to-left text and bidi controls, C0/C1 control
characters, lone surrogates (written with "surrogatepass", so the file is not valid UTF-8), byte-order
marks, CRLF line ends, numbers too long to convert and nesting too deep to parse. The property: either a
correct result (every example has a non-empty, stripped question and answer; the counts add up; valid
records come back exactly) or lmtune's own error naming the file; any other exception is a bug.

Examples per test: $LMTUNE_FUZZ_EXAMPLES (default 200, for CI). The dedicated run:

    LMTUNE_FUZZ_EXAMPLES=10000 python -m pytest -q tests/test_fuzz.py

Deterministic (derandomize) and without an example database, so CI runs are reproducible and no
.hypothesis folder is written into the repository.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import tempfile
import unicodedata
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from lmtune.cli import main
from lmtune.config import ConfigError
from lmtune.data.inspect import format_report, inspect_data
from lmtune.data.readers import load_examples
from lmtune.errors import LmtuneError

EXAMPLES = int(os.environ.get("LMTUNE_FUZZ_EXAMPLES", "200"))
# Hypothesis caches what it learns under ./.hypothesis even without an example database; keep it out of the repo.
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "lmtune-hypothesis")
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])

# ---------------------------------------------------------------- strategies

VIETNAMESE = ["Trí tuệ nhân tạo là gì?", "Học máy khác gì học sâu?", "Thủ đô của Việt Nam là Hà Nội.",
              "Người ta gọi đó là mô hình ngôn ngữ lớn.", "Thu do cua Phap la gi?", "Điều gì được học trước?"]
SPECIAL = [
    "\u0300", "\u0301", "\u0303", "\u0309", "\u0323", "\u0302\u0301", "\u031b",  # combining marks (Vietnamese tones)
    "\u05d0\u05d1", "\u0627\u0644\u0639", "\u200f", "\u200e", "\u202e", "\u202b", "\u2066", "\u2069",  # RTL and bidi
    "\x00", "\x01", "\x07", "\x08", "\x0b", "\x0c", "\x1b", "\x1c", "\x1f", "\x7f",  # C0 and DEL
    "\x80", "\x85", "\x9b", "\x9f",  # C1
    "\ufeff", "\ufffe", "\uffff", "\ufffd", "\u2028", "\u2029", "\u00a0", "\u3000", "\u200b", "\u200d", "\u00ad",
    "\r", "\n", "\r\n", "\t", " ", '"', "'", ",", ";", "\\", "{", "}", "[", "]", ":",
    "\ud800", "\udbff", "\udc00", "\udfff", "\udc80",  # lone surrogates
    "\U0001f44d\U0001f3fd", "\U0001f468\u200d\U0001f469", "\U00010000", "\U0010ffff",
    "Ã¡", "Ä‘", "áº¡",  # mojibake
    "la gi cua", " duoc khong ",  # Vietnamese without diacritics
]
def weighted(common, rare, one_in: int):
    """`rare` once in `one_in` draws, else `common` (st.one_of does not weight repeated branches)."""
    return st.sampled_from(range(one_in)).flatmap(lambda i: rare if i == 0 else common)


SURROGATES = {"\ud800", "\udbff", "\udc00", "\udfff", "\udc80"}
printable_char = st.one_of(
    st.characters(),  # any code point but surrogates
    st.sampled_from([s for s in SPECIAL if s not in SURROGATES]),
    st.integers(0, 0x9F).map(chr),  # C0 and C1 controls
)
vietnamese = st.sampled_from(VIETNAMESE).flatmap(
    lambda s: st.sampled_from(["NFC", "NFD", "NFKC", "NFKD"]).map(lambda form: unicodedata.normalize(form, s)))
printable_text = st.lists(st.one_of(printable_char, vietnamese), max_size=30).map("".join)


@st.composite
def nasty_text(draw) -> str:
    """Printable text, and now and then a lone surrogate in it (from "\ud800" in JSON, or a broken UTF-16
    conversion): often enough to test them, rarely enough that most files are still UTF-8."""
    text = draw(printable_text)
    if draw(st.sampled_from(range(24))) == 0:
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.one_of(st.sampled_from(sorted(SURROGATES)), st.integers(0xD800, 0xDFFF).map(chr))) + text[at:]
    return text


nasty_text = nasty_text()

KEYS = ["question", "answer", "context", "instruction", "input", "output", "prompt", "response", "completion", "query"]
SCHEMAS = [("question", "answer", "context"), ("instruction", "output", "input"), ("input", "output", "context"),
           ("prompt", "response", "context"), ("prompt", "completion", "context"), ("query", "response", "context")]
json_key = st.one_of(st.sampled_from(KEYS), nasty_text)
json_scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), nasty_text)
json_value = st.recursive(json_scalar, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                               st.dictionaries(json_key, inner, max_size=5)), max_leaves=12)
# Records shaped like Q/A rows (mostly with text fields), so the fuzzer gets past the parser to the column
# detection, the text checks and the duplicate finder.
field_value = weighted(nasty_text, json_scalar, 10)
def qa_record(s: tuple[str, str, str]):
    return st.fixed_dictionaries({s[0]: field_value, s[1]: field_value},
                                 optional={s[2]: field_value, "id": json_scalar, "extra": json_value})


qa_like = st.sampled_from(SCHEMAS).flatmap(qa_record)
record = weighted(qa_like, json_value, 8)
# A file mostly keeps one layout; now and then a row has another one, or is no Q/A record at all.
records = st.sampled_from(SCHEMAS).flatmap(lambda s: st.lists(weighted(qa_record(s), record, 8), max_size=8))

# Lines that break JSON parsers rather than lmtune: too many digits for int(), nesting deeper than the recursion limit.
bomb = st.one_of(
    st.integers(4000, 6000).map(lambda n: "1" * n),
    st.integers(4000, 6000).map(lambda n: '{"question": "q", "answer": ' + "9" * n + "}"),
    st.integers(900, 120_000).map(lambda n: "[" * n + "]" * n),
    st.integers(900, 120_000).map(lambda n: '{"a":' * n + "1" + "}" * n),
    st.integers(900, 50_000).map(lambda n: "[" * n),
)


def _dumps(value, ascii_only: bool) -> str:
    return json.dumps(value, ensure_ascii=ascii_only)


@st.composite
def text_to_bytes(draw, text: str) -> bytes:
    """Encode like real files do: UTF-8 (lone surrogates become invalid bytes), maybe a BOM, maybe CRLF."""
    if draw(st.booleans()):
        text = text.replace("\n", "\r\n")
    data = text.encode("utf-8", "surrogatepass")
    boms = [b""] * 8 + [b"\xef\xbb\xbf"] * 3 + [b"\xef\xbb\xbf\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff"]  # UTF-8, doubled, UTF-16
    prefix = draw(st.sampled_from(boms))
    return prefix + data


@st.composite
def jsonl_bytes(draw) -> bytes:
    ascii_only = draw(st.booleans())
    lines = [_dumps(v, ascii_only) for v in draw(records)]
    if draw(st.sampled_from(range(8))) == 0:
        lines.insert(draw(st.integers(0, len(lines))), draw(nasty_text))
    if draw(st.integers(0, 9)) == 0:
        lines.insert(draw(st.integers(0, len(lines))), draw(bomb))
    ending = draw(st.sampled_from(["\n", "", "\n\n"]))
    return draw(text_to_bytes("\n".join(lines) + ending))


@st.composite
def json_file_bytes(draw) -> bytes:
    value = draw(weighted(records, st.one_of(json_value, bomb), 6))
    text = value if isinstance(value, str) and value[:1] in "[{1" else _dumps(value, draw(st.booleans()))
    return draw(text_to_bytes(text))


@st.composite
def csv_bytes(draw) -> bytes:
    header = draw(weighted(st.sampled_from(SCHEMAS).map(list), st.lists(json_key, min_size=1, max_size=4), 6))
    rows = draw(st.lists(weighted(st.lists(nasty_text, min_size=len(header), max_size=len(header)),
                                  st.lists(nasty_text, max_size=5), 10), max_size=8))
    out = io.StringIO(newline="")
    writer = csv.writer(out)
    writer.writerow(header)
    writer.writerows(rows)
    text = out.getvalue()
    if draw(st.integers(0, 3)) == 0:  # or a hand-made one: unbalanced quotes, stray separators
        text = draw(st.lists(st.one_of(nasty_text, st.sampled_from(['"', '""', ",", "\n", "\r\n", "question,answer\n"])),
                             max_size=20).map("".join))
    return draw(text_to_bytes(text))


suffix = st.sampled_from([".jsonl", ".json", ".csv"])
random_file = st.one_of(
    st.tuples(st.sampled_from([".jsonl", ".json", ".csv", ".parquet"]), st.binary(max_size=3000)),
    st.tuples(suffix, nasty_text.flatmap(text_to_bytes)),
    st.tuples(st.just(".jsonl"), jsonl_bytes()),
    st.tuples(st.just(".csv"), csv_bytes()),
    st.tuples(st.just(".jsonl"), jsonl_bytes()),
    st.tuples(st.just(".json"), json_file_bytes()),
    st.tuples(st.just(".json"), jsonl_bytes()),  # JSON Lines in a .json file, as the tutorial's data
    st.tuples(st.just(".csv"), csv_bytes()),
)


# ---------------------------------------------------------------- the properties


@contextlib.contextmanager
def data_file(file: tuple[str, bytes]):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"data{file[0]}"
        path.write_bytes(file[1])
        yield str(path)


def assert_clean_error(error: Exception, path: str) -> None:
    assert isinstance(error, (LmtuneError, ConfigError)), f"{type(error).__name__}: {error}"
    message = str(error)
    assert path in message, message  # names the file
    assert "Traceback" not in message


def check_loaded(path: str, skip_invalid: bool):
    """load_examples gives clean examples whose counts add up, or a DataError naming the file."""
    skipped = []
    try:
        examples, report = load_examples([path], on_invalid=skipped.append if skip_invalid else None)
    except LmtuneError as e:
        assert_clean_error(e, path)
        return None
    for example in examples:
        for text in (example.question, example.answer, example.context):
            assert isinstance(text, str) and text == text.strip()
        assert example.question and example.answer
        assert example.source.startswith(path)
    assert len(examples) + report.skipped_empty == report.rows_read
    for error in skipped:
        assert_clean_error(error, path)
    return examples, report


@FUZZ
@given(file=random_file, skip_invalid=st.booleans())
def test_loader_gives_examples_or_a_clean_error(file, skip_invalid):
    with data_file(file) as path:
        check_loaded(path, skip_invalid)


@FUZZ
@given(rows=st.lists(st.fixed_dictionaries({"question": nasty_text, "answer": nasty_text}), min_size=1, max_size=8),
       form=st.sampled_from(["jsonl", "json", "csv"]), ascii_only=st.booleans(), crlf=st.booleans(), bom=st.booleans())
def test_valid_rows_come_back_exactly(rows, form, ascii_only, crlf, bom):
    """Well-formed files of any text: exactly the rows with a non-blank question and answer, stripped."""
    if form == "csv":
        out = io.StringIO(newline="")
        # With "\n" line ends, csv's minimal quoting leaves a field holding a lone "\r" unquoted: quote all.
        writer = csv.DictWriter(out, ["question", "answer"], lineterminator="\r\n" if crlf else "\n",
                                quoting=csv.QUOTE_MINIMAL if crlf else csv.QUOTE_ALL)
        writer.writeheader()
        writer.writerows(rows)
        text = out.getvalue()
    elif form == "json":
        text = json.dumps(rows, ensure_ascii=ascii_only, indent=1 if crlf else None)
    else:
        text = "".join(json.dumps(r, ensure_ascii=ascii_only) + ("\r\n" if crlf else "\n") for r in rows)
    data = (b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8", "surrogatepass")
    # JSON's \uXXXX escapes turn a high and a low surrogate in a row into one character, as JSON defines.
    read = (lambda s: json.loads(json.dumps(s))) if form != "csv" and ascii_only else (lambda s: s)
    # Training text is normalised to NFC (decomposed Vietnamese would tokenize differently from what users type).
    expected = [(unicodedata.normalize("NFC", read(r["question"])).strip(),
                 unicodedata.normalize("NFC", read(r["answer"])).strip()) for r in rows]
    expected = [(q, a) for q, a in expected if q and a]
    with data_file((f".{form}", data)) as path:
        result = check_loaded(path, skip_invalid=False)
        has_surrogate = any(0xD800 <= ord(c) <= 0xDFFF for r in rows for c in r["question"] + r["answer"])
        if form == "csv" and any("\x00" in r["question"] + r["answer"] for r in rows):
            return  # NUL inside CSV is the csv module's business; a clean error or the rows are both fine
        if has_surrogate and (form == "csv" or not ascii_only):
            assert result is None  # not valid UTF-8: refused with a clean error
            return
        if not expected:
            assert result is None  # "nothing to train on" is a clean error
            return
        assert result is not None
        examples, report = result
        assert [(e.question, e.answer) for e in examples] == expected
        assert report.rows_read == len(rows)


def _run_cli(*argv: str) -> tuple[int, str, str]:
    """main() with a strict UTF-8 stdout and stderr, like a terminal: text that cannot be printed is a bug too."""
    out_bytes, err_bytes = io.BytesIO(), io.BytesIO()
    out = io.TextIOWrapper(out_bytes, encoding="utf-8", errors="strict")
    err = io.TextIOWrapper(err_bytes, encoding="utf-8", errors="strict")
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
        out.flush()
        err.flush()
    return code, out_bytes.getvalue().decode("utf-8"), err_bytes.getvalue().decode("utf-8")


@FUZZ
@given(file=random_file, skip_invalid=st.booleans(), as_json=st.booleans())
def test_data_inspect_reports_or_fails_cleanly(file, skip_invalid, as_json):
    with data_file(file) as path:
        args = ["data", "inspect", path] + (["--skip-invalid"] if skip_invalid else []) + (["--json", "-"] if as_json else [])
        code, out, err = _run_cli(*args)
        if code == 2:
            assert err.startswith("error: ") and path in err and out == ""
            return
        assert code == 0 and err == "", err
        if as_json:
            report = json.loads(out)
            assert report["rows_read"] == sum(f["rows"] for f in report["files"])
        else:
            assert "verdict:" in out
        # inspect reads exactly the rows that training reads
        loaded = check_loaded(path, skip_invalid)
        rows_read = report["rows_read"] if as_json else inspect_data([path], skip_invalid=skip_invalid).rows_read
        if loaded is not None:
            assert loaded[1].rows_read == rows_read


@FUZZ
@given(file=random_file, skip_invalid=st.booleans())
def test_inspect_report_is_consistent(file, skip_invalid):
    with data_file(file) as path:
        try:
            report = inspect_data([path], skip_invalid=skip_invalid)
        except LmtuneError as e:
            assert_clean_error(e, path)
            return
        assert report.rows_read == report.files[0].rows > 0
        for finding in report.findings.values():
            assert 0 <= finding.count and len(finding.examples) <= min(finding.count, 10)
        empty = report.findings["empty_question"].count + report.findings["empty_answer"].count
        assert empty <= 2 * report.rows_read
        assert report.question_chars.count == report.rows_read
        format_report(report).encode("utf-8")  # printable


@FUZZ
@given(file=random_file, skip_invalid=st.booleans(), dedupe=st.sampled_from(["exact", "near"]))
def test_data_clean_writes_valid_jsonl_or_fails_cleanly(file, skip_invalid, dedupe):
    with data_file(file) as path:
        output = str(Path(path).with_name("clean.jsonl"))
        args = ["data", "clean", path, "--output", output, "--dedupe", dedupe] + (["--skip-invalid"] if skip_invalid else [])
        code, out, err = _run_cli(*args)
        if code == 2:
            assert err.startswith("error: ") and path in err
            assert not Path(output).exists()
            return
        assert code == 0, err
        # split at "\n" only: JSON strings may hold U+2028 and other characters str.splitlines() breaks at
        kept = [json.loads(line) for line in Path(output).read_text(encoding="utf-8").split("\n") if line]
        rejects = [line for line in Path(output).with_name("clean.rejects.jsonl").read_text(encoding="utf-8").split("\n") if line]
        assert f"kept {len(kept):,}" in out and f"dropped {len(rejects):,}" in out
        if kept:  # the cleaned file is good training data
            loaded = check_loaded(output, skip_invalid=False)
            assert loaded is not None and len(loaded[0]) == len(kept)
