"""One DataSource for every reader of data: inspect, clean, train and eval read the same rows the same way."""

from __future__ import annotations

import csv
import json

import pytest
from conftest import QA, conversation, read_jsonl, run, train_config, write_jsonl

from lmtune.config import build_config
from lmtune.data.inspect import LengthStats
from lmtune.data.readers import load_examples
from lmtune.data.source import DataSource
from lmtune.model import load_tokenizer, resolve_source

DIALOGS = [conversation("Học máy là gì?", "Một nhánh của AI, học từ dữ liệu."),
           conversation("LoRA là gì?", "Tinh chỉnh ma trận hạng thấp; rẻ.", "Còn QLoRA?", "LoRA trên mô hình 4 bit."),
           conversation("AI là gì?", "Máy móc mô phỏng trí thông minh.")]


def _semicolon_csv_with_a_renamed_messages_column(path) -> str:
    """A `;` CSV whose header also holds a comma (so the separator read off the header would be wrong) and whose
    conversations sit, as JSON text, in a column named `dialog` (not one lmtune detects)."""
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter=";")
        writer.writerow(["dialog", "source,origin"])
        for index, turns in enumerate(DIALOGS):
            writer.writerow([json.dumps(turns, ensure_ascii=False), f"row {index}, test"])
    return str(path)


def test_inspect_and_train_read_a_semicolon_csv_with_a_renamed_messages_column_identically(capsys, tmp_path,
                                                                                          tiny_llama_dir):
    from lmtune.training.methods.supervised import prepare_data

    data = _semicolon_csv_with_a_renamed_messages_column(tmp_path / "chats.csv")
    code, out, err = run(capsys, "data", "inspect", data, "--csv-delimiter", ";", "--messages-field", "dialog",
                         "--template", "plain", "--model", tiny_llama_dir, "--max-length", "256", "--json", "-")
    assert code == 0, err
    inspected = json.loads(out)

    config = train_config(tiny_llama_dir, data, tmp_path / "out", **{"data.csv_delimiter": ";",
                          "data.messages_field": "dialog", "data.template": "plain", "data.max_length": 256})
    logged = []
    prepared = prepare_data(config, load_tokenizer(resolve_source(tiny_llama_dir)), log=logged.append)

    assert inspected["rows_read"] == prepared.load_report.rows_read == len(DIALOGS)
    assert inspected["conversations"] == prepared.load_report.conversations == len(DIALOGS)
    # The same samples, token for token: inspect's lengths are those of the samples training builds.
    trained_lengths = [len(sample["input_ids"]) for sample in prepared.samples]
    assert inspected["tokens"]["lengths"] == LengthStats.of(trained_lengths).__dict__
    assert inspected["files"][0]["columns"] == {"conversation": "dialog"}


def test_data_commands_take_the_data_flags_and_config_of_train(capsys, tmp_path):
    data = _semicolon_csv_with_a_renamed_messages_column(tmp_path / "chats.csv")
    config = tmp_path / "c.yaml"
    config.write_text(f"data:\n  paths: [{data}]\n  csv_delimiter: ';'\n  messages_field: dialog\n", encoding="utf-8")
    code, out, err = run(capsys, "data", "inspect", "--config", config)  # the files, separator and column from the config
    assert code == 0, err
    assert f"{len(DIALOGS)} rows read" in out and "conversation=dialog" in out
    code, out, err = run(capsys, "data", "clean", "--config", config, "--output", tmp_path / "clean.jsonl")
    assert code == 0, err
    assert [row["dialog"] for row in read_jsonl(tmp_path / "clean.jsonl")] == DIALOGS
    # Checked as train checks them, every problem at once.
    code, out, err = run(capsys, "data", "inspect", data, "--csv-delimiter", ";;", "--max-samples", "-1")
    assert code == 2 and "data.csv_delimiter must be empty" in err and "data.max_samples must be 0" in err
    code, out, err = run(capsys, "data", "inspect")
    assert code == 2 and "no data given" in err


def test_eval_takes_the_data_flags(capsys, tmp_path):
    data = tmp_path / "hoi.jsonl"
    write_jsonl(data, [{"hoi": r["question"], "dap": r["answer"]} for r in QA])
    # Read with the named columns; stops at the model check (no model folder), after the data was read.
    code, out, err = run(capsys, "eval", "--data", data, "--question-field", "hoi", "--answer-field", "dap",
                         "--model", tmp_path / "no-model", "--output-dir", tmp_path / "e")
    assert code == 2 and "model folder not found" in err and "cannot tell question and answer" not in err


def test_from_config_carries_every_data_setting():
    config = build_config(overrides={"data.paths": ["a.csv"], "question_field": "q", "answer_field": "a",
                                     "context_field": "c", "messages_field": "m", "csv_delimiter": "tab",
                                     "data.template": "plain", "system_prompt": "Bạn là trợ lý.", "max_samples": 5})
    source = DataSource.from_config(config.data)
    assert source == DataSource(("a.csv",), "q", "a", "c", "m", "tab", "plain", "Bạn là trợ lý.", 5)
    assert source.other_files(["b.csv"]) == source.replace(paths=("b.csv",), max_samples=0)
    assert DataSource.of("a.jsonl").paths == ("a.jsonl",) and DataSource.of(["a", "b"]).paths == ("a", "b")


@pytest.mark.parametrize("skipped_rows", [0, 2])
def test_max_samples_says_how_many_rows_it_left_out(tmp_path, skipped_rows):
    rows = [{"question": f"Câu hỏi {i}?", "answer": f"Trả lời {i}."} for i in range(1000)]
    for i in range(skipped_rows):
        rows[i]["answer"] = ""  # empty rows before the limit are read and skipped, not left out by it
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    examples, report = load_examples(DataSource([data], max_samples=48))
    assert len(examples) == 48
    assert report.rows_read == 48 + skipped_rows and report.left_out == 1000 - 48 - skipped_rows
    assert report.summary() == (f"{48 + skipped_rows} of 1,000 rows from 1 file(s) "
                                f"(data.max_samples 48 left out {952 - skipped_rows:,})")
    assert load_examples([data])[1].summary() == "1,000 rows from 1 file(s)"


def test_training_says_which_setting_left_rows_out(tmp_path, tiny_bloom_dir):
    from lmtune.training.methods.supervised import prepare_data

    rows = [{"question": f"Câu hỏi {i}?", "answer": f"Trả lời {i}."} for i in range(100)]
    config = train_config(tiny_bloom_dir, write_jsonl(tmp_path / "d.jsonl", rows), tmp_path / "o", **{"max_samples": 8})
    logged = []
    prepare_data(config, load_tokenizer(resolve_source(tiny_bloom_dir)), log=logged.append)
    assert logged[0].startswith("data: 8 of 100 rows from 1 file(s) (data.max_samples 8 left out 92)")


def test_rows_left_out_are_not_checked(tmp_path):
    """A bad line beyond max_samples does not stop a run that would not read it; it is counted as left out."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in QA) + "{not json\n", encoding="utf-8")
    examples, report = load_examples(DataSource([str(data)], max_samples=2))
    assert len(examples) == 2 and report.left_out == len(QA) - 2 + 1


def test_inspect_reads_the_rows_training_reads_and_says_what_max_samples_left_out(capsys, tmp_path):
    rows = [{"question": f"Câu hỏi {i}?", "answer": f"Trả lời {i}."} for i in range(1000)]
    rows[500]["answer"] = ""  # beyond the limit: neither inspected nor reported
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    code, out, err = run(capsys, "data", "inspect", data, "--max-samples", "48")
    assert code == 0, err
    assert out.splitlines()[0] == ("48 of 1,000 rows read from 1 file(s) (data.max_samples 48 left out 952, as "
                                   "training would)")
    assert "empty or blank answer              0" in out
    # clean is no reader for training: a config's max_samples does not shorten what it writes, and it says so.
    config = tmp_path / "c.yaml"
    config.write_text("data:\n  max_samples: 48\n", encoding="utf-8")
    code, out, err = run(capsys, "data", "clean", data, "--config", config, "--output", tmp_path / "c.jsonl")
    assert code == 0 and "clean cleans every row" in err
    assert len(read_jsonl(tmp_path / "c.jsonl")) == 999
