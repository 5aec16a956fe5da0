"""Reading data files into rows and examples: formats, columns, and errors naming file, line and field."""

from __future__ import annotations

import json

import pytest
from conftest import QA, write_jsonl

from lmtune.data.readers import load_examples
from lmtune.errors import DataError


@pytest.mark.parametrize(
    "row,expected",
    [
        ({"question": "Q?", "answer": "A."}, ("Q?", "A.", "")),
        ({"input": "Q?", "output": "A.", "context": "C"}, ("Q?", "A.", "C")),
        ({"input": "Q?", "output": "A."}, ("Q?", "A.", "")),
        ({"prompt": "Q?", "response": "A."}, ("Q?", "A.", "")),
        ({"instruction": "Q?", "input": "C", "output": "A."}, ("Q?", "A.", "C")),
        ({"prompt": "Q?", "completion": "A."}, ("Q?", "A.", "")),
    ],
    ids=["question/answer", "input/output/context", "input/output", "prompt/response", "alpaca", "prompt/completion"],
)
def test_columns_detected_without_configuration(tmp_path, row, expected):
    examples, _ = load_examples([write_jsonl(tmp_path / "d.jsonl", [row])])
    e = examples[0]
    assert (e.question, e.answer, e.context) == expected


def test_explicit_column_mapping(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"hoi": "Q?", "dap": "A."}])
    examples, _ = load_examples([path], question_field="hoi", answer_field="dap")
    assert (examples[0].question, examples[0].answer) == ("Q?", "A.")


def test_unknown_columns_error_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"a": 1, "b": 2}])
    with pytest.raises(DataError, match=r"d\.jsonl:1: cannot tell question and answer columns apart"):
        load_examples([path])


def test_shared_alpaca_sample_trains_without_options():
    from conftest import SHARED_DATA

    path = SHARED_DATA / "vi_alpaca_sample.jsonl"
    if not path.is_file():
        pytest.skip("../shared/data is not beside the checkout")
    examples, report = load_examples([str(path)])
    assert report.columns[:2] == ("prompt", "response")
    assert len(examples) == 1000


def test_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(QA[0]) + "\n" + '{"question": "x", "answer": \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.jsonl:2: malformed JSON"):
        load_examples([str(path)])


def test_missing_field_names_file_line_and_field(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [QA[0], {"question": "Q?"}])
    with pytest.raises(DataError, match=r"d\.jsonl:2: missing field 'answer'"):
        load_examples([path])


@pytest.mark.parametrize("value,kind", [(None, "null"), (42, "int")])
def test_non_text_field_is_rejected(tmp_path, value, kind):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "Q?", "answer": value}])
    with pytest.raises(DataError, match=rf"d\.jsonl:1: field 'answer' must be text, got {kind}"):
        load_examples([path])


def test_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('"just a string"\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.jsonl:1: expected a JSON object"):
        load_examples([str(path)])


def test_missing_file_and_empty_glob(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: file not found"):
        load_examples([str(tmp_path / "nope.jsonl")])
    with pytest.raises(DataError, match=r"\*\.json: the pattern matches no file"):
        load_examples([str(tmp_path / "*.json")])


def test_not_utf8(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes('{"question": "Tr\u00ed", "answer": "x"}\n'.encode("cp1258"))
    with pytest.raises(DataError, match=r"d\.jsonl:1: not UTF-8"):
        load_examples([str(path)])


def test_bom_and_crlf_are_tolerated(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(json.dumps(r, ensure_ascii=False) for r in QA).encode("utf-8") + b"\r\n")
    examples, _ = load_examples([str(path)])
    assert [e.question for e in examples] == [r["question"] for r in QA]


def test_empty_rows_are_skipped_and_counted(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [QA[0], {"question": "Q?", "answer": "   "}])
    examples, report = load_examples([path])
    assert len(examples) == 1 and report.skipped_empty == 1


def test_all_empty_answers_refused(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "Q?", "answer": ""}])
    with pytest.raises(DataError, match="nothing to train on"):
        load_examples([path])


def test_json_array_csv_and_parquet(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(QA, ensure_ascii=False), encoding="utf-8")
    (tmp_path / "b.csv").write_text("question,answer\n" + "\n".join(f'"{r["question"]}","{r["answer"]}"' for r in QA), encoding="utf-8")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(QA), tmp_path / "c.parquet")
    for name in ("a.json", "b.csv", "c.parquet"):
        examples, _ = load_examples([str(tmp_path / name)])
        assert [(e.question, e.answer) for e in examples] == [(r["question"], r["answer"]) for r in QA], name



def test_glob_reads_all_matching_files(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", QA[:2])
    write_jsonl(tmp_path / "b.jsonl", QA[2:])
    examples, report = load_examples([str(tmp_path / "*.jsonl")])
    assert len(examples) == len(QA) and len(report.files) == 2
