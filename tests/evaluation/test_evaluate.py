"""`lmtune eval`: a report whose figures agree with its per-question rows; an existing report folder is refused."""

from __future__ import annotations

import io
import json
import re

import pytest
from conftest import QA

from lmtune.cli import main


def test_eval_command_writes_consistent_report(capsys, tiny_bloom_dir, qa_file, tmp_path):
    assert main(["train", "--model", tiny_bloom_dir, "--data", qa_file, "--output-dir", str(tmp_path / "a"),
                 "--max-steps", "2", "--batch-size", "2", "--grad-accum", "1"]) == 0
    out = tmp_path / "report"
    code = main(["eval", "--adapter", str(tmp_path / "a"), "--data", qa_file, "--baseline", tiny_bloom_dir,
                 "--output-dir", str(out), "--max-new-tokens", "8"])
    printed, progress = capsys.readouterr()
    assert code == 0
    assert "chrF" in printed and "tuned - base" in printed
    # How far the answers are, on stderr: plain lines when it is no terminal (4 questions, batches of 16: one batch).
    answering = [line for line in progress.split("\n") if "answering: " in line]
    assert answering[0] == "answering: tuned model 0/4" and answering[2] == "answering: base model 0/4", answering
    assert re.fullmatch(r"answering: tuned model 4/4 \(\d+ s, [\d,]+ tokens/s\)", answering[1]), answering
    assert re.fullmatch(r"answering: base model 4/4 \(\d+ s, [\d,]+ tokens/s\)", answering[3]), answering
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


def test_eval_checks_the_baseline_before_the_first_answer(capsys, tiny_bloom_dir, qa_file, tmp_path, monkeypatch):
    """A baseline that cannot be loaded is said before the tuned model answers a single question."""
    from lmtune.evaluation import evaluate

    answered = []
    monkeypatch.setattr(evaluate, "evaluate_model", lambda *args, **kwargs: answered.append(args) or 1 / 0)
    code = main(["eval", "--model", tiny_bloom_dir, "--data", qa_file, "--baseline", str(tmp_path / "no-such-model"),
                 "--output-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and f"model folder not found: {tmp_path / 'no-such-model'}" in err
    assert answered == [] and not (tmp_path / "r").exists()


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_answer_progress_updates_one_line_on_a_terminal_and_prints_plain_lines_elsewhere():
    from lmtune.evaluation.progress import AnswerProgress

    terminal = _Terminal()
    with AnswerProgress("tuned model, training questions", 48, batch_size=24, stream=terminal) as shown:
        shown.update(24, 960)
        shown.write("a line of its own")
        shown.update(24, 960)
    text = terminal.getvalue()
    assert text.count("\n") == 2  # the message, and the progress line left in place at the end
    drawn = [part.strip() for part in re.split(r"[\r\n]", text) if part.strip()]
    assert drawn[0] == "answering: tuned model, training questions 0/48"
    assert "a line of its own" in drawn
    assert re.fullmatch(r"answering: tuned model, training questions 24/48 \(\d+ s, [\d,]+ tokens/s, ETA \d+ s\)",
                        drawn[drawn.index("a line of its own") - 1]), drawn
    assert re.fullmatch(r"answering: tuned model, training questions 48/48 \(\d+ s, [\d,]+ tokens/s\)", drawn[-1])

    plain = io.StringIO()
    with AnswerProgress("base model", 100, batch_size=1, stream=plain) as shown:
        for _ in range(100):
            shown.update(1, 10)
    lines = plain.getvalue().splitlines()
    assert lines[0] == "answering: base model 0/100" and "\r" not in plain.getvalue()
    assert [line.split()[3] for line in lines[1:]] == [f"{n}/100" for n in range(5, 101, 5)]  # PLAIN_LINES of them
    assert "ETA" in lines[1] and "ETA" not in lines[-1]
