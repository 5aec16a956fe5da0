"""Train/validation split: deterministic, leak-free; validation loss during training, best adapter kept, early stopping."""

import json
import random

import pytest
import torch
from conftest import write_jsonl

from lmtune.config import build_config
from lmtune.data.readers import Example
from lmtune.data.split import leaked_questions, split_train_val
from lmtune.errors import DataError
from lmtune.training.train import train


def _examples(n=40):
    return [Example(f"Câu hỏi số {i} là gì?", f"Trả lời {i}.") for i in range(n)]


def test_split_is_deterministic_and_independent_of_row_order():
    rows = _examples()
    train_a, val_a = split_train_val(rows, 0.25, seed=1)
    shuffled = rows[:]
    random.Random(0).shuffle(shuffled)
    train_b, val_b = split_train_val(shuffled, 0.25, seed=1)
    assert len(val_a) == 10 and len(train_a) == 30
    assert {e.question for e in val_a} == {e.question for e in val_b}
    assert {e.question for e in split_train_val(rows, 0.25, seed=2)[1]} != {e.question for e in val_a}


def test_a_split_that_leaves_the_training_side_smaller_is_refused():
    """--val-size 0.999 (or a number of rows near the total) once trained on 1 row and validated on 997 without a word."""
    with pytest.raises(DataError, match=r"data.val_size=30 holds out 30 of 40 rows for validation and leaves 10 to train on"):
        split_train_val(_examples(), 30, seed=1)
    train, val = split_train_val(_examples(), 20, seed=1)  # half and half is still allowed
    assert len(train) == len(val) == 20


def test_equal_questions_after_normalisation_stay_on_one_side():
    rows = _examples(20) + [Example("câu hỏi SỐ 3  là gì ?", "Một cách viết khác."), Example("Câu hỏi số 3 là gì?", "Trùng lặp.")]
    for seed in range(10):
        train, val = split_train_val(rows, 0.3, seed)
        assert leaked_questions(train, val) == 0
        sides = {"val" if e in val else "train" for e in rows if "3" in e.question and "13" not in e.question}
        assert len(sides) == 1


def test_val_size_as_a_count_and_bad_sizes():
    assert len(split_train_val(_examples(), 7, seed=0)[1]) == 7
    with pytest.raises(DataError, match="leaves no rows to train on"):
        split_train_val(_examples(5), 5, seed=0)
    with pytest.raises(DataError, match="same question"):
        split_train_val([Example("Q?", "A"), Example("q ?", "B")], 0.5, seed=0)


def test_leak_count_for_a_separate_eval_file():
    train = _examples(10)
    assert leaked_questions(train, [Example("câu hỏi số 1 là gì", "x"), Example("Khác hẳn?", "y")]) == 1


def _val_config(model_dir, data, out, **extra):
    return build_config(overrides={
        "model.name_or_path": model_dir, "data.paths": [data], "train.output_dir": str(out), "data.template": "plain",
        "model.dtype": "float32", "train.batch_size": 2, "train.grad_accum": 1, "lora.dropout": 0.0,
        "data.val_size": 0.25, "generate.max_new_tokens": 16, **extra})


def test_training_logs_validation_loss_and_keeps_the_best_adapter(tiny_bloom_dir, tmp_path):
    from peft import PeftModel

    from lmtune.data.collate import Collator
    from lmtune.evaluation.evaluate import validation_report
    from lmtune.model import load_model, load_tokenizer, resolve_source

    rows = [{"question": f"Câu hỏi số {i} là gì?", "answer": f"Đây là câu trả lời số {i} về học máy."} for i in range(16)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    lines = []
    # A constant, high learning rate on 12 near-identical rows: validation loss falls, then rises as the
    # model memorises the training numbers (measured: best at step 9, 0.3 below the last evaluation).
    config = _val_config(tiny_bloom_dir, data, tmp_path / "a", **{"train.max_steps": 24, "train.eval_steps": 3,
                                                                 "train.learning_rate": 0.05, "train.lr_scheduler": "constant"})
    result = train(config, log=lines.append)
    validation_report(result, config.generate, log=lines.append)  # what the CLI and the quickstart run after train()
    assert any("validation: 4 samples; 0 of their questions also appear in training" in l for l in lines)
    log = [json.loads(l) for l in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    evals = [e for e in log if "eval_loss" in e]
    assert [e["step"] for e in evals] == list(range(3, 25, 3))
    manifest = json.loads((tmp_path / "a" / "lmtune_manifest.json").read_text())["validation"]
    best = min(evals, key=lambda e: e["eval_loss"])
    assert manifest["best_eval_loss"] == best["eval_loss"] and manifest["best_step"] == best["step"]
    assert best["step"] != evals[-1]["step"]  # so keeping the best is not the same as keeping the last
    # and the run ends with a generation report on the validation questions
    report = json.loads((tmp_path / "a" / "eval" / "report.json").read_text())
    assert report["n"] == 4 and (tmp_path / "a" / "eval" / "predictions.jsonl").read_text().count("\n") == 4
    assert "| chrF |" in (tmp_path / "a" / "eval" / "report.md").read_text()

    # The saved adapter is the best one: its validation loss, recomputed from disk, is the best logged loss.
    tok = load_tokenizer(resolve_source(tiny_bloom_dir))
    config = _val_config(tiny_bloom_dir, data, tmp_path / "unused")
    from lmtune.training.methods.supervised import prepare_data

    val = prepare_data(config, tok, log=lambda _: None).val_samples
    model = PeftModel.from_pretrained(load_model(resolve_source(tiny_bloom_dir)), str(tmp_path / "a")).eval()
    batches = [Collator(tok)(val[i:i + 2]) for i in range(0, len(val), 2)]
    with torch.no_grad():
        total = sum(model(**b).loss * (b["labels"][:, 1:] != -100).sum() for b in batches)
    count = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    assert float(total / count) == pytest.approx(best["eval_loss"], rel=1e-3)


def test_early_stopping_ends_the_run(tiny_bloom_dir, tmp_path):
    rows = [{"question": f"Câu hỏi số {i} là gì?", "answer": f"Trả lời {i}."} for i in range(12)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    result = train(_val_config(tiny_bloom_dir, data, tmp_path / "a", **{
        "train.max_steps": 40, "train.eval_steps": 1, "train.early_stopping_patience": 1, "train.learning_rate": 1.0}),
        log=lambda _: None)
    manifest = json.loads((tmp_path / "a" / "lmtune_manifest.json").read_text())["validation"]
    assert manifest["stopped_early"] and result.steps < 40


def test_early_stopping_without_validation_data_is_a_config_error():
    from lmtune.config import ConfigError

    with pytest.raises(ConfigError, match="early_stopping_patience needs validation data"):
        build_config(overrides={"train.early_stopping_patience": 2})
