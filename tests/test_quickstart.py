"""The README's main job as a function: `lmtune quickstart` trains, merges, and compares base and tuned answers on the
training questions and the reworded held-out ones (a tiny model and one epoch: the path, not the result)."""

import json
import re

from conftest import run


def test_quickstart_trains_merges_and_writes_both_reports(tiny_llama_dir, tmp_path, capsys):
    code, out, err = run(capsys, "quickstart", "--config", "configs/quickstart.yaml", "--model", tiny_llama_dir,
                         "--output-dir", tmp_path / "q", "--epochs", "1", "--max-new-tokens", "4", "--max-samples", "8",
                         "--lora.target_modules", "auto", "--dtype", "float32")
    assert code == 0, err
    report = json.loads((tmp_path / "q" / "quickstart_report.json").read_text())
    assert report["training_questions"]["tuned"]["n"] == 8  # the first 8 pairs, as max_samples says
    assert report["heldout_questions"]["tuned"]["n"] >= 1  # their reworded held-out questions
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
