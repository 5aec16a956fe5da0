"""`lmtune data clean`: kept rows, rejects with reasons, never touching its input."""

from __future__ import annotations

import json
import unicodedata

import pytest
from conftest import QA, SHARED_DATA, read_jsonl, run, write_jsonl

from lmtune.data.checks import (
    row_problems,
)
from lmtune.data.clean import clean_data, rejects_path
from lmtune.data.inspect import inspect_data
from lmtune.data.normalize import tidy_text
from lmtune.data.readers import iter_rows, load_examples
from lmtune.errors import DataError, OutputExistsError

ALPACA = SHARED_DATA / "vi_alpaca_sample.jsonl"








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


@pytest.fixture
def alpaca():
    if not ALPACA.is_file():
        pytest.skip(f"{ALPACA} is absent: the shared data folder is not beside the checkout")
    return str(ALPACA)


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


def test_rejects_keep_the_raw_text_of_invalid_lines(tmp_path):
    """A line that does not parse is lost unless the rejects file holds it as written: a person fixes it there."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "a?", "answer": "b"}\n{"question": "Học máy", "answer": \n{"question": 1, "answer": "x"}\n',
                   encoding="utf-8")
    report = clean_data([str(bad)], str(tmp_path / "out.jsonl"), skip_invalid=True)
    assert report.kept == 1 and report.dropped["invalid"] == 2
    rejects = read_jsonl(rejects_path(tmp_path / "out.jsonl"))
    assert rejects[0]["raw"] == '{"question": "Học máy", "answer": ' and rejects[0]["error"].startswith(f"{bad}:2: malformed JSON")
    assert rejects[1]["row"] == {"question": 1, "answer": "x"} and rejects[1]["error"].startswith(f"{bad}:3: ")
    csv_file = tmp_path / "bad.csv"
    csv_file.write_text('question,answer\n"a?","b"\n"hai\ndòng?","x",thừa\n', encoding="utf-8")
    clean_data([str(csv_file)], str(tmp_path / "csv.jsonl"), skip_invalid=True)
    (reject,) = read_jsonl(rejects_path(tmp_path / "csv.jsonl"))
    assert reject["raw"] == '"hai\ndòng?","x",thừa'
    assert reject["error"].startswith(f"{csv_file}:3: 3 fields")  # the record's first line, not its last (4)


def test_clean_drops_rows_longer_than_max_length_in_tokens(capsys, tmp_path, tiny_llama_dir):
    from lmtune.data.inspect import TokenCounter

    long_row = {"question": "Giải thích?", "answer": ("Học máy là một nhánh của AI. " * 20).strip()}
    data = write_jsonl(tmp_path / "d.jsonl", [*QA, long_row])
    counter = TokenCounter(tiny_llama_dir, 10_000)
    lengths = [counter.length(load_examples([data])[0][i])[1] for i in range(len(QA) + 1)]
    limit = max(lengths[:-1])  # every row fits but the long one
    code, out, err = run(capsys, "data", "clean", data, "--output", tmp_path / "o.jsonl", "--model", tiny_llama_dir,
                         "--max-length", limit)
    assert code == 0, err
    assert "too_long: 1" in out
    assert read_jsonl(tmp_path / "o.jsonl") == QA
    (reject,) = read_jsonl(rejects_path(tmp_path / "o.jsonl"))
    assert reject["reason"] == "too_long" and reject["detail"] == f"{lengths[-1]:,} tokens, more than --max-length {limit:,}"


def test_inspect_promises_the_duplicates_clean_drops(tmp_path):
    """One definition: row 16, the NFD form of row 6, and row 18, row 2 with its blanks untidied, are duplicates to
    inspect (which says clean drops them) exactly as to clean (which does)."""
    rows = [{"question": f"Câu hỏi số {i} về học máy?", "answer": f"Trả lời số {i}."} for i in range(20)]
    rows[15] = {key: unicodedata.normalize("NFD", text) for key, text in rows[5].items()}
    rows[17] = {"question": "  " + rows[1]["question"], "answer": rows[1]["answer"].replace(" ", "  ") + "\t"}
    rows[19] = dict(rows[3])
    conversations = [{"messages": [{"role": "user", "content": "Chào bạn."}, {"role": "assistant", "content": "Chào!"}]}]
    conversations.append({"messages": [{**turn, "content": unicodedata.normalize("NFD", turn["content"])}
                                       for turn in conversations[0]["messages"]]})
    data = write_jsonl(tmp_path / "d.jsonl", rows + conversations)
    report = inspect_data([data])
    cleaned = clean_data([data], str(tmp_path / "c.jsonl"))
    assert report.findings["exact_duplicate"].count == cleaned.dropped["duplicate"] == 4
    assert "drops 4 exact duplicates" in report.verdict[0]
    assert [e.split(" repeats ")[0].rsplit(":", 1)[1] for e in report.findings["exact_duplicate"].examples] == \
           ["16", "18", "20", "22"]


def test_clean_on_a_full_disk_names_its_own_flag(capsys, tmp_path, monkeypatch):
    import errno

    from lmtune.data import clean

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(clean, "_json_line", full)
    code, _, err = run(capsys, "data", "clean", write_jsonl(tmp_path / "d.jsonl", QA), "--output", tmp_path / "c.jsonl")
    assert code == 2 and "no space left on the disk while writing" in err
    assert "choose an --output on another disk" in err and "--output-dir" not in err
