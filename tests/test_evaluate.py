"""Metrics checked against values worked out by hand; the eval command's report files agree with each other."""

import json
import unicodedata

import pytest
from conftest import QA

from lmtune.cli import main
from lmtune.metrics import exact_match, length_ratio, rouge_l, score_texts, syllables


def test_syllables_keep_diacritics_fold_case_and_drop_punctuation():
    assert syllables("Trí tuệ, NHÂN tạo!") == ["trí", "tuệ", "nhân", "tạo"]
    nfd = unicodedata.normalize("NFD", "Trí tuệ nhân tạo")
    assert nfd != "Trí tuệ nhân tạo" and syllables(nfd) == ["trí", "tuệ", "nhân", "tạo"]


def test_rouge_l_by_hand():
    # LCS("trí tuệ nhân tạo", "trí tuệ nhân tạo là gì") = 4: P = 4/4, R = 4/6, F = 2PR/(P+R) = 0.8
    assert rouge_l("Trí tuệ nhân tạo", "trí tuệ NHÂN tạo là gì") == pytest.approx(0.8)
    # tone marks matter: "tri tue" shares no syllable with "trí tuệ"
    assert rouge_l("tri tue nhan tao", "trí tuệ nhân tạo") == 0.0
    # order matters: LCS("b a c", "a b c") = 2, P = R = 2/3
    assert rouge_l("học máy sâu", "máy học sâu") == pytest.approx(2 / 3)
    assert rouge_l("", "trí tuệ") == 0.0 and rouge_l("", "") == 1.0


def test_exact_match_and_length_ratio_by_hand():
    assert exact_match("AI là gì?", "ai là gì")
    assert not exact_match("AI la gi", "AI là gì")
    assert length_ratio("một hai ba bốn", "một hai") == 2.0
    assert length_ratio("", "một hai") == 0.0


def test_corpus_scores_by_hand():
    s = score_texts(["Trí tuệ nhân tạo", "", "học máy"], ["trí tuệ nhân tạo là gì", "dữ liệu", "Học máy!"], [True, False, True])
    assert s.rouge_l == pytest.approx(100 * (0.8 + 0 + 1) / 3)
    assert s.exact_match == pytest.approx(100 / 3)
    assert s.eos_rate == pytest.approx(200 / 3)
    assert s.length_ratio == pytest.approx((4 / 6 + 0 + 1) / 3)
    assert 0 < s.chrf < 100
    assert score_texts(["dữ liệu"], ["dữ liệu"], [True]).chrf == pytest.approx(100)


def test_eval_command_writes_consistent_report(capsys, tiny_bloom_dir, qa_file, tmp_path):
    assert main(["train", "--model", tiny_bloom_dir, "--data", qa_file, "--output-dir", str(tmp_path / "a"),
                 "--max-steps", "2", "--batch-size", "2", "--grad-accum", "1"]) == 0
    out = tmp_path / "report"
    code = main(["eval", "--adapter", str(tmp_path / "a"), "--data", qa_file, "--baseline", tiny_bloom_dir,
                 "--output-dir", str(out), "--max-new-tokens", "8"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "chrF" in printed and "tuned - base" in printed
    report = json.loads((out / "report.json").read_text())
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert report["n"] == len(rows) == len(QA)
    assert [r["question"] for r in rows] == [q["question"] for q in QA]
    for side in ("tuned", "base"):
        eos = 100 * sum(r[side]["stopped_at_eos"] for r in rows) / len(rows)
        assert report[side]["eos_rate"] == pytest.approx(eos)
        assert report[side]["exact_match"] == pytest.approx(100 * sum(r[side]["exact_match"] for r in rows) / len(rows))
        assert report[side]["perplexity"] == pytest.approx(2.718281828 ** report[side]["answer_loss"], rel=1e-6)
    assert report["difference"]["answer_loss"] == pytest.approx(report["tuned"]["answer_loss"] - report["base"]["answer_loss"])
    markdown = (out / "report.md").read_text()
    assert "| chrF |" in markdown and "![training loss](loss.png)" in markdown and (out / "loss.png").is_file()


def test_eval_refuses_an_existing_report_folder(capsys, tiny_bloom_dir, qa_file, tmp_path):
    (tmp_path / "r").mkdir()
    assert main(["eval", "--model", tiny_bloom_dir, "--data", qa_file, "--output-dir", str(tmp_path / "r")]) == 2
    assert "already exists" in capsys.readouterr().err
