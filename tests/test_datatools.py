"""`lmtune data inspect` and `lmtune data clean`: each check, each bad input, and the real Alpaca sample."""

import json
import subprocess
import sys
import unicodedata

import pytest
from conftest import QA, SHARED_DATA, write_jsonl

from lmtune.cli import main
from lmtune.data import Example, PromptTemplate, iter_rows, load_examples, tokenize_example
from lmtune.datatools import (
    broken_encoding,
    clean_data,
    control_characters,
    format_report,
    inspect_data,
    missing_diacritics,
    near_key,
    rejects_path,
    row_problems,
    tidy_text,
    untidy_whitespace,
)
from lmtune.errors import DataError, OutputExistsError

ALPACA = SHARED_DATA / "vi_alpaca_sample.jsonl"


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def inspect_rows(tmp_path, rows, **kwargs):
    return inspect_data([write_jsonl(tmp_path / "d.jsonl", rows)], **kwargs)


def read_jsonl(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


# ---------------------------------------------------------------- single-text checks


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


def test_near_key_collapses_case_punctuation_whitespace_and_nfd_but_not_symbols():
    assert near_key("Học  MÁY, là gì?!") == near_key("học máy là gì") == near_key(unicodedata.normalize("NFD", "Học máy là gì"))
    assert near_key("2+3") != near_key("2^3")


def test_tidy_text_fixes_whitespace_controls_and_nfc_but_keeps_indentation():
    text = "  Câu  trả lời \r\nmột\u00a0dòng\u200b\n\n\n\n    return x  \n\tfoo\u2028bar "
    tidy = tidy_text(unicodedata.normalize("NFD", text))
    assert tidy == "Câu trả lời\nmột dòng\n\n    return x\n\tfoo\nbar"
    assert unicodedata.is_normalized("NFC", tidy)
    assert tidy_text(tidy) == tidy  # idempotent: cleaning clean data changes nothing
    assert untidy_whitespace(text) and not untidy_whitespace(tidy)


# ---------------------------------------------------------------- inspect: row and dataset checks


def test_clean_data_has_no_findings(tmp_path):
    report = inspect_rows(tmp_path, QA)
    assert report.rows_read == len(QA)
    assert {name: f.count for name, f in report.findings.items() if f.count} == {}
    assert report.verdict == ["no problems found: ready to train"]
    assert report.files[0].format == "JSON Lines"
    assert report.files[0].columns == {"question": "question", "answer": "answer"}


def test_empty_and_blank_fields(tmp_path):
    report = inspect_rows(tmp_path, [*QA, {"question": " \t", "answer": "A."}, {"question": "Q?", "answer": ""},
                                     {"question": "Q2?", "answer": "\n  "}])
    assert report.findings["empty_question"].count == 1
    assert report.findings["empty_answer"].count == 2
    assert report.findings["empty_answer"].examples[0].endswith("d.jsonl:6 (answer)")
    assert "empty question (1) or answer (2)" in report.verdict[0]


def test_exact_and_near_duplicates(tmp_path):
    q, a = QA[0]["question"], QA[0]["answer"]
    rows = [*QA, dict(QA[0]), {"question": q.upper(), "answer": a.replace(".", " !")},
            {"question": unicodedata.normalize("NFD", q), "answer": a + "  "}]
    report = inspect_rows(tmp_path, rows)
    exact, near = report.findings["exact_duplicate"], report.findings["near_duplicate"]
    assert exact.count == 1 and exact.examples == [f"{tmp_path / 'd.jsonl'}:5 repeats {tmp_path / 'd.jsonl'}:1"]
    assert near.count == 2
    assert report.findings["conflicting_answers"].count == 0  # near-equal answers are not a conflict


def test_same_question_with_different_answers(tmp_path):
    rows = [*QA, {"question": QA[1]["question"] + " ", "answer": "Một câu trả lời khác hẳn."},
            {"question": QA[1]["question"].lower(), "answer": "Câu thứ ba."}]
    report = inspect_rows(tmp_path, rows)
    assert report.conflicting_questions == 1
    assert report.findings["conflicting_answers"].count == 2
    assert f"answers the question of {tmp_path / 'd.jsonl'}:2 differently" in report.findings["conflicting_answers"].examples[0]


def test_same_instruction_with_other_input_is_no_conflict(tmp_path):
    rows = [{"instruction": "Dịch sang tiếng Anh.", "input": "Xin chào", "output": "Hello"},
            {"instruction": "Dịch sang tiếng Anh.", "input": "Cảm ơn", "output": "Thank you"}]
    report = inspect_rows(tmp_path, rows)
    assert report.findings["conflicting_answers"].count == 0
    assert report.files[0].columns == {"question": "instruction", "answer": "output", "context": "input"}


def test_unicode_findings_name_row_and_field(tmp_path):
    rows = [*QA,
            {"question": unicodedata.normalize("NFD", "Học sâu là gì?"), "answer": "Là học máy nhiều lớp."},
            {"question": "AI là gì?", "answer": "Trí tuệ \u200b\u200bnhân tạo."},
            {"question": "Tiáº¿ng Viá»‡t?", "answer": "Có."},
            {"question": "Thu do cua Phap la gi?", "answer": "Paris."}]
    findings = inspect_rows(tmp_path, rows).findings
    path = tmp_path / "d.jsonl"
    assert findings["not_nfc"].examples == [f"{path}:5 (question)"]
    assert findings["control_characters"].examples == [f"{path}:6 (answer): U+200B ZERO WIDTH SPACE"]
    assert findings["broken_encoding"].examples == [f"{path}:7 (question): mojibake áº¿ -> ế"]
    assert findings["missing_diacritics"].examples == [f'{path}:8 (question): all diacritics missing "Thu do cua Phap la gi?"']
    assert findings["untidy_whitespace"].count == 0


def test_token_length_statistics_match_training(tmp_path, tiny_bloom_dir):
    from transformers import AutoTokenizer

    rows = [*QA, {"question": "Giải thích?", "answer": ("Học máy " * 40).strip()}]
    tokenizer = AutoTokenizer.from_pretrained(tiny_bloom_dir)
    template = PromptTemplate.for_tokenizer(tokenizer, "auto")
    full = [tokenize_example(Example(r["question"], r["answer"]), tokenizer, template, 10_000) for r in rows]
    lengths = sorted(len(s["input_ids"]) for s in full)
    max_length = lengths[-2]  # only the long sample is cut
    report = inspect_rows(tmp_path, rows, model=tiny_bloom_dir, max_length=max_length)
    tokens = report.tokens
    assert (tokens.lengths.min, tokens.lengths.max, tokens.lengths.count) == (lengths[0], lengths[-1], len(rows))
    assert tokens.truncated == 1 and tokens.prompt_too_long == 0
    assert any("--max-length" in line for line in report.verdict)
    # Around each prompt length, inspect counts exactly the samples training would cut or drop.
    prompt_lengths = {len(template.prompt_ids(tokenizer, r["question"])) for r in rows}
    for max_length in sorted({p + d for p in prompt_lengths for d in (0, 1, 2)}):
        samples = [tokenize_example(Example(r["question"], r["answer"]), tokenizer, template, max_length) for r in rows]
        expected = (sum(s is not None and s["truncated"] for s in samples), sum(s is None for s in samples))
        tokens = inspect_rows(tmp_path, rows, model=tiny_bloom_dir, max_length=max_length).tokens
        assert (tokens.truncated, tokens.prompt_too_long) == expected, max_length


def test_inspect_cli_text_and_json(capsys, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [*QA, dict(QA[0])])
    code, out, err = run(capsys, "data", "inspect", data, "--json", tmp_path / "report.json")
    assert code == 0, err
    assert "4 rows" not in out and "5 rows read from 1 file(s)" in out
    assert "exact duplicates                   1" in out and "run `lmtune data clean`: it drops 1 exact duplicate" in out
    saved = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))
    assert saved["rows_read"] == 5 and saved["findings"]["exact_duplicate"]["count"] == 1
    code, out, _ = run(capsys, "data", "inspect", data, "--json", "-")
    assert code == 0 and json.loads(out)["rows_read"] == 5
    code, _, err = run(capsys, "data", "inspect", data, "--json", data)
    assert code == 2 and "is one of the input files" in err
    assert len(read_jsonl(data)) == 5  # the input was not overwritten by the report


# ---------------------------------------------------------------- clean


MESSY = [
    {"question": "Học máy là gì?", "answer": "Học máy giúp máy tính học từ dữ liệu.", "id": 1},
    {"question": unicodedata.normalize("NFD", "Mạng nơ-ron là gì?"), "answer": "Một  mô hình \u200b\u200bgồm nhiều lớp. ", "id": 2},
    {"question": "Học máy là gì?", "answer": "Học máy giúp máy tính học từ dữ liệu.", "id": 3},  # exact duplicate
    {"question": "học máy là gì", "answer": "Học máy giúp máy tính học từ dữ liệu!", "id": 4},  # near duplicate
    {"question": "LoRA là gì?", "answer": "   ", "id": 5},  # empty answer
    {"question": "", "answer": "Không có câu hỏi.", "id": 6},  # empty question
    {"question": "Tiáº¿ng Viá»‡t?", "answer": "Có.", "id": 7},  # mojibake
    {"question": "Bao nhiêu?", "answer": "42", "id": 8},  # short but real
    {"question": "Thu do cua Phap la gi?", "answer": "Paris.", "id": 9},  # kept: only a person can add the marks
]


def test_clean_writes_kept_rows_and_rejects_with_reasons(tmp_path):
    data = write_jsonl(tmp_path / "messy.jsonl", MESSY)
    before = (tmp_path / "messy.jsonl").read_bytes()
    report = clean_data([data], str(tmp_path / "out" / "clean.jsonl"))
    kept = read_jsonl(tmp_path / "out" / "clean.jsonl")
    rejects = read_jsonl(tmp_path / "out" / "clean.rejects.jsonl")
    assert [r["id"] for r in kept] == [1, 2, 4, 8, 9]
    assert kept[1] == {"question": "Mạng nơ-ron là gì?", "answer": "Một mô hình gồm nhiều lớp.", "id": 2}
    assert list(kept[1]) == ["question", "answer", "id"]  # same columns, same order
    assert {r["row"]["id"]: r["reason"] for r in rejects} == {3: "duplicate", 5: "empty_answer", 6: "empty_question", 7: "broken_encoding"}
    assert rejects[0]["where"] == f"{data}:3" and rejects[0]["detail"] == f"same as {data}:1"
    assert dict(report.dropped) == {"duplicate": 1, "empty_answer": 1, "empty_question": 1, "broken_encoding": 1}
    assert report.fixed["to NFC"] == 1 and report.fixed["control/invisible characters removed"] == 1
    assert (tmp_path / "messy.jsonl").read_bytes() == before  # input untouched
    assert len(load_examples([str(tmp_path / "out" / "clean.jsonl")])[0]) == 5  # training reads the output


def test_clean_near_dedupe_and_min_answer_chars(tmp_path):
    data = write_jsonl(tmp_path / "messy.jsonl", MESSY)
    report = clean_data([data], str(tmp_path / "c.jsonl"), dedupe="near", min_answer_chars=5)
    assert [r["id"] for r in read_jsonl(tmp_path / "c.jsonl")] == [1, 2, 9]
    assert report.dropped["near_duplicate"] == 1 and report.dropped["short_answer"] == 2
    reasons = {r["row"]["id"]: r["reason"] for r in read_jsonl(tmp_path / "c.rejects.jsonl")}
    assert reasons[4] == "near_duplicate" and reasons[7] == reasons[8] == "short_answer"


def test_clean_keeps_every_row_inspect_finds_nothing_wrong_with(tmp_path):
    data = write_jsonl(tmp_path / "messy.jsonl", MESSY + QA)
    report = inspect_data([data])
    clean_data([data], str(tmp_path / "c.jsonl"))
    kept = read_jsonl(tmp_path / "c.jsonl")
    duplicates = {e.split(" ")[0] for e in report.findings["exact_duplicate"].examples + report.findings["near_duplicate"].examples}
    problem_free = [row.record for row in iter_rows([data]) if not row_problems(row) and row.where not in duplicates]
    assert len(problem_free) == 6  # ids 1 and 8, and the four QA rows
    assert all(record in kept for record in problem_free)  # kept, and unchanged


def test_clean_refuses_existing_output_and_its_own_input(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", QA)
    clean_data([data], str(tmp_path / "c.jsonl"))
    with pytest.raises(OutputExistsError, match=r"c\.jsonl already exists; choose another output or pass --overwrite"):
        clean_data([data], str(tmp_path / "c.jsonl"))
    clean_data([write_jsonl(tmp_path / "e.jsonl", QA[:1])], str(tmp_path / "c.jsonl"), overwrite=True)
    assert len(read_jsonl(tmp_path / "c.jsonl")) == 1
    with pytest.raises(DataError, match="is one of the input files"):
        clean_data([str(tmp_path / "*.jsonl")], str(tmp_path / "c.jsonl"), overwrite=True)
    with pytest.raises(DataError, match="give the output a .jsonl name"):
        clean_data([data], str(tmp_path / "c.csv"))


def test_clean_failure_leaves_nothing_behind(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(QA[0]) + "\n" + '{"question": 1, "answer": "x"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: field 'question' must be text, got int"):
        clean_data([str(bad)], str(tmp_path / "c.jsonl"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]


def test_clean_cli_prints_counts_per_reason(capsys, tmp_path):
    data = write_jsonl(tmp_path / "messy.jsonl", MESSY)
    code, out, err = run(capsys, "data", "clean", data, "--output", tmp_path / "c.jsonl", "--dedupe", "near")
    assert code == 0, err
    assert "read 9 rows; kept 4" in out and "near_duplicate: 1" in out and "broken_encoding: 1" in out
    code, _, err = run(capsys, "data", "clean", data, "--output", tmp_path / "c.jsonl")
    assert code == 2 and err == f"error: {tmp_path / 'c.jsonl'} already exists; choose another output or pass --overwrite\n"


def test_clean_with_mixed_column_layouts_writes_one_layout(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "P?", "response": "R."}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"question": "Q?", "answer": "A.", "source": "web"}])
    clean_data([a, b], str(tmp_path / "out" / "c.jsonl"))
    assert read_jsonl(tmp_path / "out" / "c.jsonl") == [{"prompt": "P?", "response": "R."},
                                                        {"prompt": "Q?", "response": "A.", "source": "web"}]


# ---------------------------------------------------------------- bad input


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


# ---------------------------------------------------------------- the real Alpaca sample


@pytest.fixture
def alpaca():
    if not ALPACA.is_file():
        pytest.skip(f"{ALPACA} is absent: the shared data folder is not beside the checkout")
    return str(ALPACA)


def test_alpaca_sample_report(alpaca):
    report = inspect_data([alpaca])
    findings = {name: f.count for name, f in report.findings.items()}
    assert report.rows_read == 1000
    assert report.files[0].columns == {"question": "prompt", "answer": "response"}
    assert findings["empty_answer"] == 0 and findings["empty_question"] == 0
    assert report.answer_chars.max > 2000
    assert findings["exact_duplicate"] == 0
    # Its known noise: "Thủ đô của Phap la gi?" at line 11 (decomposed, some marks missing),
    # and Google Translate's pairs of zero-width spaces.
    assert f"{alpaca}:11 (question)" in report.findings["not_nfc"].examples
    assert any(e.startswith(f"{alpaca}:11 (question): some diacritics missing") for e in report.findings["missing_diacritics"].examples)
    assert report.findings["control_characters"].details == {"U+200B ZERO WIDTH SPACE": findings["control_characters"]}
    assert "1,000 rows read" in format_report(report)


def test_alpaca_sample_clean_keeps_every_row_without_a_problem(alpaca, tmp_path):
    out = tmp_path / "alpaca.jsonl"
    report = clean_data([alpaca], str(out))
    kept = read_jsonl(out)
    assert report.dropped == {} and read_jsonl(rejects_path(out)) == []
    assert report.kept == len(kept) == 1000
    rows = list(iter_rows([alpaca]))
    for row, written in zip(rows, kept):
        if not row_problems(row):
            assert written == row.record  # untouched
        else:
            assert written == {"prompt": tidy_text(row.question), "response": tidy_text(row.answer)}
    assert unicodedata.is_normalized("NFC", kept[10]["prompt"]) and not any("\u200b" in r["response"] for r in kept)
    assert inspect_data([str(out)]).findings["control_characters"].count == 0
