"""The README's main job as a function: `lmtune quickstart` trains, merges, and compares base and tuned answers on the
training questions and the reworded held-out ones (a tiny model and one epoch: the path, not the result)."""

import json
import re

from conftest import run

from lmtune.bundled import bundled_path
from lmtune.data.normalize import near_key
from lmtune.quickstart import evenly_spaced, write_training_files


def test_quickstart_trains_merges_and_writes_both_reports(tiny_llama_dir, tmp_path, capsys):
    code, out, err = run(capsys, "quickstart", "--config", "configs/quickstart.yaml", "--model", tiny_llama_dir,
                         "--output-dir", tmp_path / "q", "--epochs", "1", "--max-new-tokens", "4", "--max-samples", "8",
                         "--lora.target_modules", "auto", "--dtype", "float32")
    assert code == 0, err
    report = json.loads((tmp_path / "q" / "quickstart_report.json").read_text())
    assert report["training_questions"]["tuned"]["n"] == 8  # the first 8 pairs, as max_samples says
    pairs = [json.loads(line)["question"] for line in (tmp_path / "q" / "data" / "pairs.jsonl").read_text().splitlines()]
    predictions = (tmp_path / "q" / "eval-training" / "predictions.jsonl").read_text().splitlines()
    assert [json.loads(line)["question"] for line in predictions] == pairs  # each pair asked once
    assert report["heldout_questions"]["tuned"]["n"] == 8  # each of them has a reworded held-out question
    trained = [json.loads(line) for line in (tmp_path / "q" / "data" / "rewordings.jsonl").read_text().splitlines()]
    assert len(trained) >= 8 * 5  # every pair in its other phrasings too
    for folder in ("adapter", "merged", "eval-training", "eval-heldout"):
        assert (tmp_path / "q" / folder).is_dir(), folder
    assert "== training questions" in out and "== reworded held-out questions" in out
    # While the models answer: a line per batch on stderr (no terminal here), the tuned model first, then the base.
    assert "== evaluation: greedy answers to 8 training questions and " in out
    answering = [line for line in err.split("\n") if line.startswith("answering: ")]
    heldout = report["heldout_questions"]["tuned"]["n"]
    assert [line.split(" (")[0] for line in answering] == [
        "answering: tuned model, training questions 0/8", "answering: tuned model, training questions 8/8",
        f"answering: tuned model, reworded held-out questions 0/{heldout}",
        f"answering: tuned model, reworded held-out questions {heldout}/{heldout}",
        "answering: base model, training questions 0/8", "answering: base model, training questions 8/8",
        f"answering: base model, reworded held-out questions 0/{heldout}",
        f"answering: base model, reworded held-out questions {heldout}/{heldout}"], answering
    assert all(re.search(r"\(\d+ s, [\d,]+ tokens/s\)$", line) for line in answering[1::2]), answering


def test_training_questions_are_spread_over_all_pairs_each_asked_once():
    assert evenly_spaced(list(range(30)), 48) == list(range(30))
    assert evenly_spaced(list(range(8)), 48) == list(range(8))
    spread = evenly_spaced(list(range(434)), 48)
    assert len(set(spread)) == 48 and spread[0] == 0 and 434 - spread[-1] <= 10  # from first to last
    assert all(9 <= b - a <= 10 for a, b in zip(spread, spread[1:]))


def _rows(path):
    path = bundled_path(path) if path.startswith("data/") else path
    return [json.loads(line) for line in open(path, encoding="utf-8").read().splitlines()]


def test_the_bundled_training_files_hold_pairs_with_a_heldout_question_and_all_their_rewordings(tmp_path):
    pairs_file, rewordings_file = write_training_files(tmp_path, 12)
    pairs, rewordings = _rows(pairs_file), _rows(rewordings_file)
    heldout = _rows("data/vi_ai_qa_heldout.jsonl")
    bundled = _rows("data/vi_ai_qa.jsonl")
    with_heldout = [row for row in bundled if row["question"] in {h["source_question"] for h in heldout}]
    assert pairs == with_heldout[:12]  # the first 12 such pairs, as written
    answers = {row["answer"] for row in pairs}
    every = _rows("data/vi_ai_qa_rewordings.jsonl") + _rows("data/vi_ai_qa_rewordings_extra.jsonl")
    expected = [{"question": r["question"], "answer": r["answer"]} for r in every
                if r["source_question"] in {p["question"] for p in pairs}]
    assert rewordings == expected and {r["answer"] for r in rewordings} == answers
    assert len(rewordings) >= 12 * 5  # two plus two to six more phrasings of each
    asked = {near_key(h["question"]) for h in heldout}
    assert not asked & {near_key(r["question"]) for r in pairs + rewordings}  # the held-out questions stay unseen
    assert len(_rows(write_training_files(tmp_path / "all", 0)[0])) == len(with_heldout) == len(heldout)
