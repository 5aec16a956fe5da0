"""`lmtune data inspect`: every finding, token lengths as training counts them, the text and JSON reports."""

from __future__ import annotations

import json
import unicodedata

import pytest
from conftest import QA, SHARED_DATA, inspect_rows, read_jsonl, run, write_jsonl

from lmtune.data.inspect import format_report, inspect_data
from lmtune.data.readers import Example
from lmtune.data.template import PromptTemplate
from lmtune.data.tokenize import tokenize_example

ALPACA = SHARED_DATA / "vi_alpaca_sample.jsonl"








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
    # The NFD copy with trailing blanks is the same row once clean has tidied it: an exact duplicate, as clean says.
    data = tmp_path / "d.jsonl"
    assert exact.count == 2 and exact.examples == [f"{data}:5 repeats {data}:1", f"{data}:7 repeats {data}:1"]
    assert near.count == 1
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


def test_counts_of_one_are_singular(tmp_path):
    from lmtune.data.inspect import format_report

    rows = [{"question": "Q?", "answer": "A."}, {"question": "Q?", "answer": "B."}]
    text = format_report(inspect_rows(tmp_path, rows[:1]))
    assert "1 row," in text and "1 rows" not in text
    text = format_report(inspect_rows(tmp_path, rows))
    assert "1 row, 1 question" in text and "1 rows" not in text and "1 questions" not in text


def test_invalid_lines_and_files_are_counted_by_kind(tmp_path):
    """Not "4 invalid line or files": lines and files are counted apart, each in its number."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "a?", "answer": "b"}\n{bad\n{bad\n{"question": 1, "answer": "x"}\n{bad\n', encoding="utf-8")
    text = format_report(inspect_data([str(bad)], skip_invalid=True))
    assert "skipped 4 invalid lines (--skip-invalid)" in text and "- 4 invalid lines skipped" in text
    text = format_report(inspect_data([str(bad), str(tmp_path / "missing.jsonl")], skip_invalid=True))
    assert "skipped 4 invalid lines and 1 invalid file (--skip-invalid)" in text and "line or file" not in text
    one = tmp_path / "one.jsonl"
    one.write_text('{"question": "a?", "answer": "b"}\n{bad\n', encoding="utf-8")
    assert "- 1 invalid line skipped" in format_report(inspect_data([str(one)], skip_invalid=True))


def test_length_advice_stays_within_the_models_context(tmp_path, tiny_llama_dir):
    """Advice once said "raise --max-length to about 740,066 (p95)" for a model of 8,192 tokens: never beyond the
    context (the tiny Llama's is 512); past it, only dropping or cutting the long rows helps, and clean does that."""
    rows = [*QA] + [{"question": f"Giải thích {i}?", "answer": ("Học máy là một nhánh của AI. " * 60).strip()} for i in range(30)]
    report = inspect_rows(tmp_path, rows, model=tiny_llama_dir, max_length=256)
    assert report.tokens.context == 512 and report.tokens.lengths.p95 > 512
    (advice,) = [line for line in report.verdict if "--max-length" in line]
    assert "raise --max-length to 512 at most (the model's context" in advice
    assert f"`lmtune data clean --model {tiny_llama_dir} --max-length 512` drops the longer rows" in advice
    assert f"{report.tokens.lengths.p95:,} (p95)" not in advice
    report = inspect_rows(tmp_path, rows, model=tiny_llama_dir, max_length=512)
    (advice,) = [line for line in report.verdict if "--max-length" in line]
    assert "the model's context is 512 tokens, so no --max-length helps" in advice
    assert "the model's context: 512" in format_report(report)


def test_max_length_without_a_model_is_refused(capsys, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", QA)
    code, out, err = run(capsys, "data", "inspect", data, "--max-length", 100)
    assert code == 2 and not out and err.startswith("error: --max-length counts tokens: give --model too")
    code, out, err = run(capsys, "data", "clean", data, "--output", tmp_path / "o.jsonl", "--max-length", 100)
    assert code == 2 and err.startswith("error: --max-length counts tokens: give --model too")
    assert not (tmp_path / "o.jsonl").exists()
