"""Malformed data through inspect, clean and training alike: one line naming file and line, --skip-invalid."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import QA, read_jsonl, run, write_jsonl

from lmtune.data.clean import clean_data
from lmtune.data.inspect import inspect_data
from lmtune.data.readers import load_examples
from lmtune.errors import DataError

GOOD = json.dumps(QA[0], ensure_ascii=False)


# case -> (file name, its content, the text the one-line error must contain); "+good" cases pass a good file too.
BAD_INPUTS = {
    "not UTF-8": ("not_utf8.jsonl", GOOD.encode() + b"\n" + '{"question": "Trí", "answer": "x"}\n'.encode("cp1258"),
                  "not_utf8.jsonl:2: not UTF-8 text (byte 0x"),
    "truncated last line": ("truncated.jsonl", (GOOD + "\n" + json.dumps(QA[1], ensure_ascii=False) + "\n" + GOOD[:30]).encode(),
                            "truncated.jsonl:3: malformed JSON"),
    "JSON array in .jsonl": ("array.jsonl", json.dumps(QA, ensure_ascii=False, indent=2).encode(),
                             "array.jsonl:1: holds a JSON array, not JSON Lines"),
    "line is a JSON string": ("string.jsonl", (GOOD + '\n"just a string"\n').encode(),
                              "string.jsonl:2: expected a JSON object with question and answer fields, got str"),
    "field is a number": ("number.jsonl", (GOOD + '\n{"question": "Q?", "answer": 42}\n').encode(),
                          "number.jsonl:2: field 'answer' must be text, got int"),
    "field is null": ("null.jsonl", (GOOD + '\n{"question": null, "answer": "A."}\n').encode(),
                      "null.jsonl:2: field 'question' must be text, got null"),
    "10 MB line": ("huge.jsonl", (GOOD + "\n" + json.dumps({"question": "Q?", "answer": "x" * 10_485_760}) + "\n").encode(),
                   "huge.jsonl:2: line is 10,485,7"),
    "empty file": ("empty.jsonl+good", b"", "empty.jsonl: the file is empty"),
    "missing file": ("missing.jsonl+good", None, "missing.jsonl: file not found"),
    "glob matches nothing": ("*.parquet+good", None, "*.parquet: the pattern matches no file"),
}


def _bad_input(tmp_path, case):
    """(paths to pass, text the one-line error must contain) for one bad-input case."""
    name, content, message = BAD_INPUTS[case]
    name, plus_good = name.removesuffix("+good"), name.endswith("+good")
    if content is not None:
        (tmp_path / name).write_bytes(content)
    paths = [tmp_path / name] + ([write_jsonl(tmp_path / "good.jsonl", QA)] if plus_good else [])
    return paths, message


BAD_CASES = list(BAD_INPUTS)


# Rows still readable with --skip-invalid: the good line of each file, or the good file beside a bad one.
READABLE = {"not UTF-8": 1, "truncated last line": 2, "JSON array in .jsonl": 0, "line is a JSON string": 1,
            "field is a number": 1, "field is null": 1, "10 MB line": 1, "empty file": 4, "missing file": 4,
            "glob matches nothing": 4}


@pytest.mark.parametrize("case", BAD_CASES)
@pytest.mark.parametrize("command", ["inspect", "clean"])
def test_bad_input_is_one_line_naming_file_and_line(capsys, tmp_path, case, command):
    paths, message = _bad_input(tmp_path, case)
    extra = ["--output", tmp_path / "out.jsonl"] if command == "clean" else []
    code, out, err = run(capsys, "data", command, *paths, *extra)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err
    if case == "truncated last line":
        assert "truncated?" in err
    assert not (tmp_path / "out.jsonl").exists() and not (tmp_path / "out.rejects.jsonl").exists()


@pytest.mark.parametrize("case", BAD_CASES)
def test_training_reader_still_fails_fast_on_bad_input(tmp_path, case):
    paths, message = _bad_input(tmp_path, case)
    with pytest.raises(DataError) as error:
        load_examples([str(p) for p in paths])
    assert message in str(error.value)


@pytest.mark.parametrize("case", BAD_CASES)
def test_skip_invalid_skips_and_counts(capsys, tmp_path, case):
    paths, message = _bad_input(tmp_path, case)
    if READABLE[case] == 0:  # nothing left to read: still an error, not an empty report
        code, _, err = run(capsys, "data", "inspect", *paths, "--skip-invalid")
        assert code == 2 and "no rows found" in err
        return
    code, out, err = run(capsys, "data", "inspect", *paths, "--skip-invalid", "--json", "-")
    assert code == 0, err
    report = json.loads(out)
    assert report["rows_read"] == READABLE[case]
    assert report["invalid"]["count"] == 1 and message in report["invalid"]["examples"][0]
    code, out, err = run(capsys, "data", "clean", *paths, "--skip-invalid", "--output", tmp_path / "c.jsonl")
    assert code == 0, err
    assert len(read_jsonl(tmp_path / "c.jsonl")) == READABLE[case]
    rejected = read_jsonl(tmp_path / "c.rejects.jsonl")
    assert [r["reason"] for r in rejected] == ["invalid"] and message in rejected[0]["error"]


def test_bom_and_crlf_are_read_and_reported_and_clean_writes_neither(tmp_path):
    path = tmp_path / "win.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(json.dumps(r, ensure_ascii=False) for r in QA).encode() + b"\r\n")
    report = inspect_data([str(path)])
    assert report.rows_read == len(QA) and report.findings["untidy_whitespace"].count == 0
    assert any("byte-order mark" in n for n in report.files[0].notes) and any("CRLF" in n for n in report.files[0].notes)
    clean_data([str(path)], str(tmp_path / "c.jsonl"))
    raw = (tmp_path / "c.jsonl").read_bytes()
    assert not raw.startswith(b"\xef\xbb\xbf") and b"\r" not in raw
    assert read_jsonl(tmp_path / "c.jsonl") == QA
    # `cat a.jsonl b.jsonl` of two files that each start with a BOM puts one inside the file
    joined = tmp_path / "joined.jsonl"
    joined.write_bytes(path.read_bytes() * 2)
    assert inspect_data([str(joined)]).rows_read == 2 * len(QA)


def test_line_separator_inside_a_json_string_is_not_a_line_break(tmp_path):
    # json.dumps(ensure_ascii=False) writes U+2028 raw; str.splitlines() used to cut the line there.
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "Q?", "answer": "một\u2028hai\x85ba"}, QA[0]])
    examples, _ = load_examples([path])
    assert [e.answer for e in examples] == ["một\u2028hai\x85ba", QA[0]["answer"]]
    controls = inspect_data([path]).findings["control_characters"]
    assert controls.count == 1 and controls.details == {"U+0085 control": 1, "U+2028 LINE SEPARATOR": 1}


def test_csv_multiline_field_and_oversized_field(tmp_path):
    (tmp_path / "a.csv").write_text('question,answer\n"Q?","dòng 1\ndòng 2"\n', encoding="utf-8")
    assert load_examples([str(tmp_path / "a.csv")])[0][0].answer == "dòng 1\ndòng 2"
    (tmp_path / "b.csv").write_text('question,answer\nQ?,"' + "x" * 200_000 + '"\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"b\.csv:\d+: malformed CSV \(field larger than field limit"):
        load_examples([str(tmp_path / "b.csv")])


def test_bad_input_through_a_real_process_has_no_traceback(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(GOOD + '\n{"question": "Q?", "answer": null}\n', encoding="utf-8")
    result = subprocess.run([sys.executable, "-m", "lmtune", "data", "inspect", str(bad)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr == f"error: {bad}:2: field 'answer' must be text, got null\n"
