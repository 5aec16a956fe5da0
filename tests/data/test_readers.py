"""Reading data files into rows and examples: formats, columns, and errors naming file, line and field."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import unicodedata

import pytest
from conftest import QA, write_jsonl

from lmtune.data.readers import load_examples
from lmtune.data.source import DataSource
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
    examples, _ = load_examples(DataSource([path], question_field="hoi", answer_field="dap"))
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


def _excel_csv(path, header: str, rows: list[tuple[str, str]], separator: str = ";"):
    """A CSV as Excel saves "CSV UTF-8" under Vietnamese regional settings: BOM, CRLF, ';', quotes where needed."""
    lines = [header] + [separator.join(f'"{cell}"' if separator in cell or "," in cell else cell for cell in row)
                        for row in rows]
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode("utf-8") + b"\r\n")
    return str(path)


EXCEL_ROWS = [("Thủ đô của Việt Nam là gì?", "Hà Nội, thủ đô của Việt Nam."), ("LoRA là gì?", "Một kỹ thuật tinh chỉnh; rất nhẹ.")]


def test_excel_csv_with_semicolons_bom_crlf_and_capitalised_headers(tmp_path):
    examples, report = load_examples([_excel_csv(tmp_path / "excel.csv", "Question;Answer", EXCEL_ROWS)])
    assert [(e.question, e.answer) for e in examples] == EXCEL_ROWS
    assert report.columns[:2] == ("Question", "Answer")


def test_csv_separator_can_be_forced_and_is_a_config_key(tmp_path):
    from lmtune.config import ConfigError, build_config

    tabs = tmp_path / "tabs.csv"
    tabs.write_text("question\tanswer\nHọc máy là gì?\tMột nhánh của AI; học từ dữ liệu.\n", encoding="utf-8")
    examples, _ = load_examples(DataSource([str(tabs)], csv_delimiter="tab"))
    assert (examples[0].question, examples[0].answer) == ("Học máy là gì?", "Một nhánh của AI; học từ dữ liệu.")
    with pytest.raises(DataError, match=r"excel\.csv:2: 2 fields, but the header has 1"):  # forced wrong: one column
        load_examples(DataSource([_excel_csv(tmp_path / "excel.csv", "Question;Answer", EXCEL_ROWS)], csv_delimiter=","))
    assert build_config(overrides={"csv-delimiter": ";"}).data.csv_delimiter == ";"
    with pytest.raises(ConfigError, match="data.csv_delimiter must be empty"):
        build_config(overrides={"data.csv_delimiter": ";;"})


def test_column_names_match_in_any_case(tmp_path):
    rows = [{"Question": "Q?", "ANSWER ": "A."}]
    assert load_examples([write_jsonl(tmp_path / "d.jsonl", rows)])[0][0].answer == "A."
    rows = [{"Câu hỏi": "Q?", "Trả lời": "A."}]
    examples, report = load_examples(DataSource([write_jsonl(tmp_path / "v.jsonl", rows)], "câu hỏi", "trả lời"))
    assert (examples[0].question, examples[0].answer) == ("Q?", "A.") and report.columns[:2] == ("Câu hỏi", "Trả lời")


def test_unknown_columns_error_names_the_flags(tmp_path):
    with pytest.raises(DataError, match="name them with --question-field and --answer-field"):
        load_examples([write_jsonl(tmp_path / "d.jsonl", [{"hoi": "Q?", "dap": "A."}])])


def test_a_control_character_in_json_is_reported_once_with_its_column(tmp_path):
    bad = tmp_path / "d.jsonl"
    bad.write_text('{"question": "Q\x01?", "answer": "A."}\n', encoding="utf-8")
    with pytest.raises(DataError) as error:
        load_examples([str(bad)])
    assert str(error.value) == f"{bad}:1: malformed JSON (Invalid control character at column 16)"


def test_an_nfd_copy_of_the_bundled_data_reads_as_the_same_examples(tmp_path):
    """Decomposed Vietnamese (Unikey's "Unicode tổ hợp") is trained on as the NFC text it looks like."""
    import unicodedata

    from conftest import TRAIN_DATA

    nfd = tmp_path / "nfd.jsonl"
    nfd.write_text(unicodedata.normalize("NFD", TRAIN_DATA.read_text(encoding="utf-8")), encoding="utf-8")
    assert nfd.read_bytes() != TRAIN_DATA.read_bytes()
    normal, normal_report = load_examples([str(TRAIN_DATA)])
    decomposed, report = load_examples([str(nfd)])
    assert [(e.question, e.answer) for e in decomposed] == [(e.question, e.answer) for e in normal]
    assert normal_report.normalized == 0 and report.normalized == report.rows_read == normal_report.rows_read


def test_a_multi_line_csv_record_is_reported_at_its_first_line(tmp_path):
    """A quoted field with line breaks spans lines 3 to 5: the error (and the row's location) say line 3, where an
    editor finds the record, with blank lines before it counted."""
    path = tmp_path / "d.csv"
    path.write_text('question,answer\n"Q1?","A1"\n"Câu hỏi\ntrên\nba dòng?"\n\n"Q3?","A\n3"\n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:3: field 'answer'"):
        load_examples([str(path)], on_invalid=None)
    examples, _ = load_examples([str(path)], on_invalid=lambda e: None)
    assert [e.source for e in examples] == [f"{path}:2", f"{path}:7"]


# ---------------------------------------------------------------- encodings, wrappers, file kinds, the Hub offline


def _cp1258(text: str) -> bytes:
    """Vietnamese as Windows-1258 writes it: the letters it has whole (ă, ê, ơ, ư, ...) as one byte, the tone mark
    as a combining byte after them."""
    out = []
    for char in unicodedata.normalize("NFC", text):
        try:
            out.append(char.encode("cp1258"))
        except UnicodeEncodeError:
            tones = "\u0300\u0301\u0303\u0309\u0323"
            parts = unicodedata.normalize("NFD", char)
            letter = unicodedata.normalize("NFC", "".join(c for c in parts if c not in tones))
            out.append((letter + "".join(c for c in parts if c in tones)).encode("cp1258"))
    return b"".join(out)


def _qa_csv_text(delimiter: str = ",") -> str:
    lines = [f"question{delimiter}answer"] + [f'"{r["question"]}"{delimiter}"{r["answer"]}"' for r in QA]
    return "\r\n".join(lines) + "\r\n"


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-8-sig", "utf-32"])
@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_a_file_with_a_byte_order_mark_is_read_in_its_encoding(tmp_path, encoding, suffix):
    text = _qa_csv_text() if suffix == ".csv" else "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in QA)
    raw = text.encode(encoding)
    if encoding in ("utf-16-le", "utf-16-be"):  # these codecs write no mark: add the one Windows tools write
        raw = "\ufeff".encode(encoding) + raw
    path = tmp_path / f"d{suffix}"
    path.write_bytes(raw)
    examples, _ = load_examples([str(path)])
    assert [{"question": e.question, "answer": e.answer} for e in examples] == QA


def test_excel_unicode_text_txt_and_tsv_are_read_as_tab_separated(tmp_path):
    txt = tmp_path / "excel.txt"  # Excel's "Unicode Text": UTF-16 LE with a mark, tabs, CRLF
    txt.write_bytes("\ufeff".encode("utf-16-le") + _qa_csv_text("\t").encode("utf-16-le"))
    tsv = tmp_path / "d.tsv"  # a comma inside a field: the tab is the separator because the file says .tsv
    tsv.write_text("question\tanswer\n" + "".join(f"{r['question']}\t{r['answer']}, đúng.\n" for r in QA), encoding="utf-8")
    for path, suffix in ((txt, ""), (tsv, ", đúng.")):
        examples, _ = load_examples([str(path)])
        assert [(e.question, e.answer) for e in examples] == [(r["question"], r["answer"] + suffix) for r in QA]
    glob_examples, _ = load_examples([str(tmp_path / "*")])
    assert len(glob_examples) == 2 * len(QA)
    prose = tmp_path / "notes.txt"
    prose.write_text("Một đoạn văn bản thường.\nKhông có cột nào.\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"notes\.txt: a \.txt file is read as a table whose first line names the columns"):
        load_examples([str(prose)])


def test_a_windows_1258_file_is_named_with_its_conversion(tmp_path):
    path = tmp_path / "cu.csv"
    path.write_bytes(_cp1258(_qa_csv_text(";")))
    with pytest.raises(DataError) as caught:
        load_examples([str(path)])
    message = str(caught.value)
    assert message.startswith(f"{path}:2: not UTF-8 text (byte 0x")
    assert "most likely Windows-1258 (CP1258, Vietnamese)" in message
    assert f"iconv -f CP1258 -t UTF-8 '{path}' > '{tmp_path / 'cu.utf8.csv'}'" in message
    # The Python line of the message converts the file into one that reads as the pairs.
    python_line = re.search(r'python -c "(.*?)" ', message).group(1)
    subprocess.run([sys.executable, "-c", python_line, str(path), str(tmp_path / "cu.utf8.csv")], check=True)
    examples, _ = load_examples([str(tmp_path / "cu.utf8.csv")])
    assert [{"question": e.question, "answer": e.answer} for e in examples] == QA
    # A UTF-8 file with one broken byte gets no guess: it is UTF-8 with a fault.
    broken = tmp_path / "broken.jsonl"
    good = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in QA).encode("utf-8")
    broken.write_bytes(good + b'{"question": "\xff"}\n')
    with pytest.raises(DataError, match=r"broken\.jsonl:5: not UTF-8 text \(byte 0xff\); save the file as UTF-8$"):
        load_examples([str(broken)])


@pytest.mark.parametrize("key", ["data", "rows", "examples", "train"])
def test_json_that_wraps_its_rows_is_read(tmp_path, key):
    path = tmp_path / "wrapped.json"
    path.write_text(json.dumps({"version": "1.0", key: QA}, ensure_ascii=False, indent=2), encoding="utf-8")
    examples, _ = load_examples([str(path)])
    assert [{"question": e.question, "answer": e.answer} for e in examples] == QA
    assert examples[1].source == f"{path}[{key}][1]"
    one_line = tmp_path / "wrapped.jsonl"
    one_line.write_text(json.dumps({key: QA}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert len(load_examples([str(one_line)])[0]) == len(QA)


def test_rows_under_another_key_are_pointed_at(tmp_path):
    path = tmp_path / "items.json"
    path.write_text(json.dumps({"items": QA}, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(DataError, match=r"the rows seem to be inside the field 'items'"):
        load_examples([str(path)])
    dialog = write_jsonl(tmp_path / "dialog.jsonl", [{"dialog": [{"role": "user", "content": "Q?"},
                                                                 {"role": "assistant", "content": "A."}]}])
    with pytest.raises(DataError, match=r"'dialog' looks like a conversation .*--messages-field dialog"):
        load_examples([dialog])


def test_a_folder_is_answered_with_a_glob_inside_it(tmp_path):
    (tmp_path / "data").mkdir()
    for given in (f"{tmp_path}/data/", f"{tmp_path}/data"):
        with pytest.raises(DataError, match=re.escape(f"glob such as '{tmp_path}/data/*.jsonl'")):
            load_examples([given])


@pytest.fixture
def no_hub(monkeypatch):
    """The Hub as on a machine without a network: not offline mode, an endpoint nothing answers on."""
    import socket

    from huggingface_hub import constants

    from lmtune import model

    with socket.socket() as closed:  # bound, never listening: connections to it are refused
        closed.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{closed.getsockname()[1]}"
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    model.hub_unreachable.cache_clear()
    yield endpoint
    model.hub_unreachable.cache_clear()


def test_a_hub_dataset_out_of_reach_fails_at_once_with_what_works_offline(no_hub, tmp_path, monkeypatch):
    from lmtune import safeload

    (tmp_path / "datasets--someone--cached").mkdir()
    monkeypatch.setattr(safeload, "hub_cache_dir", lambda: str(tmp_path))
    started = time.monotonic()
    with pytest.raises(DataError) as caught:
        load_examples(["hub:someone/dataset"])
    assert time.monotonic() - started < 10
    message = str(caught.value)
    assert message.startswith(f"hub:someone/dataset: 'someone/dataset' is a Hugging Face Hub dataset, but the Hub "
                              f"cannot be reached ({no_hub}: ")
    assert "pass its files (--data train.jsonl, csv or parquet)" in message
    assert "set HF_HUB_OFFLINE=1 to use datasets downloaded before (someone/cached)" in message
