"""train(): LoRA parameters change and only they, the loss falls, the adapter folder, overwriting, dry runs."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch
from conftest import QA, train_config

from lmtune.errors import LmtuneError, ModelError, OutputExistsError
from lmtune.export.merge import merge
from lmtune.model import add_lora, load_model, resolve_source
from lmtune.training.train import train
from lmtune.training.methods import supervised

train_module = importlib.import_module("lmtune.training.train")  # the package re-exports train(), which hides the module attribute


QUIET = {"log": lambda _: None}


def test_only_lora_parameters_changed_and_all_of_them(trained_bloom):
    result, before, _, _ = trained_bloom
    after = dict(result.model.named_parameters())
    lora = [n for n in before if "lora_" in n]
    assert lora
    for name, value in before.items():
        changed = not torch.equal(value, after[name].detach())
        assert changed == ("lora_" in name), name


def test_loss_falls(trained_bloom):
    result, _, _, _ = trained_bloom
    losses = [e["loss"] for e in result.log]
    assert len(losses) == result.steps == 20
    assert losses[-1] < 0.8 * losses[0]


def test_adapter_folder_holds_everything(trained_bloom):
    result, _, _, data = trained_bloom
    out = Path(result.output_dir)
    for name in ("adapter_model.safetensors", "adapter_config.json", "lmtune_config.yaml", "lmtune_manifest.json",
                 "lmtune_template.json", "train_log.jsonl", "loss.png", "tokenizer.json"):
        assert (out / name).is_file(), name
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    manifest = json.loads((out / "lmtune_manifest.json").read_text())
    assert manifest["data"]["rows_read"] == len(QA) and manifest["data"]["files"][0]["path"] == data
    assert len(manifest["data"]["files"][0]["sha256"]) == 64
    assert manifest["seed"] == 42 and manifest["final_loss"] == pytest.approx(result.final_loss)
    assert {"torch", "transformers", "peft"} <= set(manifest["versions"])
    assert manifest["started"] <= manifest["finished"]
    log_lines = (out / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log_lines] == list(range(1, result.steps + 1))
    assert not list(out.parent.glob(".adapter.tmp-*"))


def test_existing_output_is_never_silently_overwritten(trained_bloom, tiny_bloom_dir):
    result, _, root, data = trained_bloom
    before = (Path(result.output_dir) / "adapter_model.safetensors").read_bytes()
    with pytest.raises(OutputExistsError, match="already exists"):
        train(train_config(tiny_bloom_dir, data, result.output_dir, **{"train.max_steps": 1}), **QUIET)
    assert (Path(result.output_dir) / "adapter_model.safetensors").read_bytes() == before
    with pytest.raises(OutputExistsError, match="already exists"):
        merge(result.output_dir, result.output_dir, **QUIET)


def test_overwrite_replaces_when_asked(tiny_bloom_dir, qa_file, tmp_path):
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "old.txt").write_text("old")
    train(train_config(tiny_bloom_dir, qa_file, out, **{"train.max_steps": 1, "train.overwrite_output_dir": True}), **QUIET)
    assert not (out / "old.txt").exists() and (out / "adapter_model.safetensors").is_file()


def test_llama_lora_targets(tiny_llama_dir):
    model = load_model(resolve_source(tiny_llama_dir))
    names = lambda m: {n.split(".")[-4] for n, p in m.named_parameters() if p.requires_grad}
    assert names(add_lora(load_model(resolve_source(tiny_llama_dir)), 4, 8, 0.0, "none", "auto")) == {"q_proj", "v_proj"}
    assert names(add_lora(load_model(resolve_source(tiny_llama_dir)), 4, 8, 0.0, "none", "attention")) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert names(add_lora(model, 4, 8, 0.0, "none", "all-linear")) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    with pytest.raises(ModelError, match=r"\['query_key_value'\] not found in LlamaForCausalLM; its linear layers are: .*q_proj"):
        add_lora(load_model(resolve_source(tiny_llama_dir)), 4, 8, 0.0, "none", ["query_key_value"])


def test_dry_run_trains_nothing_and_estimates(tiny_bloom_dir, qa_file, tmp_path):
    lines = []
    result = train(train_config(tiny_bloom_dir, qa_file, tmp_path / "a"), dry_run=True, log=lines.append)
    assert not (tmp_path / "a").exists()
    estimate = result.dry_run_estimate
    assert estimate["samples"] == len(QA) and estimate["optimizer_steps"] == 20 and estimate["seconds_per_epoch"] > 0
    text = "\n".join(lines)
    assert "ignored | Human: Trí tuệ nhân tạo (AI) là gì?" in text
    assert "trained |  AI là khả năng" in text and "</s>" in text
    assert "label contract holds on all 2 batches" in text


def test_an_nfd_copy_of_the_data_gives_the_same_samples_and_says_so_once(tiny_bloom_dir, tmp_path):
    import unicodedata

    from conftest import TRAIN_DATA

    from lmtune.model import load_tokenizer

    nfd = tmp_path / "nfd.jsonl"
    nfd.write_text(unicodedata.normalize("NFD", TRAIN_DATA.read_text(encoding="utf-8")), encoding="utf-8")
    tokenizer = load_tokenizer(resolve_source(tiny_bloom_dir), False)
    normal_log, nfd_log = [], []
    normal = supervised.prepare_data(train_config(tiny_bloom_dir, str(TRAIN_DATA), tmp_path / "a"), tokenizer, normal_log.append)
    decomposed = supervised.prepare_data(train_config(tiny_bloom_dir, str(nfd), tmp_path / "b"), tokenizer, nfd_log.append)
    assert decomposed.samples == normal.samples  # the same token ids and labels, row for row
    rows = normal.load_report.rows_read
    assert [m for m in nfd_log if "NFC" in m] == [
        f"data: normalised {rows} of {rows} rows to NFC (they held decomposed Unicode, as Unikey's 'Unicode tổ hợp' "
        f"or some macOS tools write it)"]
    assert not [m for m in normal_log if "NFC" in m]


def test_the_data_log_names_only_the_columns_the_file_has(tmp_path, tiny_bloom_dir, bloom_tokenizer):
    """A file without a context column was logged as `context='context'`, a column nobody wrote."""
    from conftest import write_jsonl

    from lmtune.training.methods.supervised import prepare_data

    plain, with_context = [], []
    prepare_data(train_config(tiny_bloom_dir, write_jsonl(tmp_path / "a.jsonl", QA), tmp_path / "o"), bloom_tokenizer,
                 plain.append)
    assert "4 pairs (columns question='question' answer='answer');" in plain[0] and "context" not in plain[0]
    rows = [{**QA[0], "context": "Về AI."}]
    prepare_data(train_config(tiny_bloom_dir, write_jsonl(tmp_path / "b.jsonl", rows), tmp_path / "o"), bloom_tokenizer,
                 with_context.append)
    assert "1 pair (columns question='question' answer='answer' context='context');" in with_context[0]


def test_dry_run_states_the_whole_run_with_its_validation(tiny_bloom_dir, tmp_path):
    """The estimate once timed one micro-batch (27 s to 265 s per step between two runs), never gave the run's
    total and left out the end-of-run validation report (most of 9 minutes in one run)."""
    from conftest import write_jsonl

    from lmtune.evaluation.evaluate import VALIDATION_REPORT_QUESTIONS

    train_module = importlib.import_module("lmtune.training.train")
    assert train_module.REPORT_QUESTIONS == VALIDATION_REPORT_QUESTIONS  # the report's own size, not a copy gone stale
    rows = [{"question": f"Câu hỏi số {i} là gì?", "answer": f"Đây là câu trả lời số {i}."} for i in range(20)]
    config = train_config(tiny_bloom_dir, write_jsonl(tmp_path / "d.jsonl", rows), tmp_path / "a",
                          **{"data.val_size": 0.25, "train.epochs": 2})
    lines = []
    estimate = train(config, dry_run=True, log=lines.append).dry_run_estimate
    assert estimate["micro_batches_timed"] > 1
    assert estimate["seconds_training"] == pytest.approx(estimate["seconds_per_optimizer_step"] * estimate["optimizer_steps"])
    assert estimate["validation_report_questions"] == 5 and estimate["seconds_validation_report"] > 0
    assert estimate["validation_evaluations"] == estimate["optimizer_steps"] == 16 and estimate["seconds_validation_loss"] > 0
    assert estimate["seconds_total"] == pytest.approx(estimate["seconds_training"] + estimate["seconds_validation_loss"]
                                                      + estimate["seconds_validation_report"])
    text = "\n".join(lines)
    assert "validation report: greedy answers to 5 questions, up to 128 new tokens each, at most " in text
    assert "  whole run: about " in text and f"{estimate['micro_batches_timed']} micro-batches of 2" in text
    # Without validation data the total is the training alone.
    estimate = train(train_config(tiny_bloom_dir, write_jsonl(tmp_path / "d.jsonl", rows), tmp_path / "a"),
                     dry_run=True, log=lambda _: None).dry_run_estimate
    assert estimate["seconds_total"] == estimate["seconds_training"] and estimate["seconds_validation_report"] == 0


def test_a_short_run_and_its_merge_print_a_console_a_person_can_read(tiny_llama_dir, tmp_path):
    """Real processes whose output goes to files (not a terminal): no warning a user cannot act on, no cursor-up
    escapes from progress bars, no raw per-step dictionaries (those are in train_log.jsonl); plain progress lines."""
    import os
    import subprocess
    import sys

    from conftest import write_jsonl

    data = write_jsonl(tmp_path / "d.jsonl", QA * 3)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)

    def lmtune(*args):
        result = subprocess.run([sys.executable, "-m", "lmtune", *map(str, args)], capture_output=True, text=True,
                                env=env, timeout=600)
        assert result.returncode == 0, result.stderr
        return result.stdout, result.stderr

    out, err = lmtune("train", "--model", tiny_llama_dir, "--data", data, "--output-dir", tmp_path / "a", "--max-steps", 4,
                      "--batch-size", 2, "--grad-accum", 1, "--val-size", 2)
    merged_out, merged_err = lmtune("merge", "--adapter", tmp_path / "a", "--output-dir", tmp_path / "m")
    for text in (out + err, merged_out + merged_err):
        assert not [line for line in text.splitlines() if "Warning" in line or "warning" in line.split(":")[0]], text
        assert "\x1b[" not in text and "\r" not in text
        assert "{'loss'" not in text and "'learning_rate'" not in text and "train_runtime" not in text
    assert "step 4/4: loss " in err and ", lr " in err and " tok/s " in err and "ETA" in err
    assert "validation loss " in err
    logged = [json.loads(line) for line in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in logged if "loss" in e] == [1, 2, 3, 4]
    out, err = lmtune("train", "--model", tiny_llama_dir, "--data", data, "--output-dir", tmp_path / "b", "--max-steps", 1,
                      "--batch-size", 2, "--grad-accum", 1, "--verbose")
    assert "'learning_rate'" in err  # --verbose shows the entries too


def test_a_run_whose_outputs_cannot_fit_is_refused_before_the_first_step(tiny_bloom_dir, qa_file, tmp_path, monkeypatch):
    """The run's outputs (weights and the checkpoints kept) against the disk's free space, before training starts."""
    train_module = importlib.import_module("lmtune.training.train")  # the package re-exports train(), hiding the module

    monkeypatch.setattr(train_module, "free_disk_bytes", lambda path: 50_000)
    calls = []
    monkeypatch.setattr(train_module, "_train_in", lambda *a, **k: calls.append(1))
    with pytest.raises(LmtuneError, match=r"not enough free disk space for this run: it writes up to \d+ kB \(the "
                                          r"adapter \d+ kB and up to 3 checkpoints of \d+ kB\) and .* has 50 kB free"):
        train(train_config(tiny_bloom_dir, qa_file, tmp_path / "a", **{"train.keep_checkpoints": 2}), log=lambda _: None)
    assert calls == [] and not (tmp_path / "a").exists()
    needed, _ = train_module.run_disk_bytes(torch.nn.Linear(10, 10), 2, "adapter")
    assert needed == 440 + 3 * (440 + 2 * 440)  # weights + 3 x (weights + AdamW's two moments), fp32
