"""Merged micro-batches (training/micro_batches.py): how a step is split, and that the merge trains the same weights."""

from __future__ import annotations

import torch
import yaml
from conftest import QA, train_config, write_jsonl
from safetensors.torch import load_file

from lmtune.training.micro_batches import AUTO_TOKENS, merged_split, typical_width
from lmtune.training.train import train


def test_short_samples_merge_up_to_eight():
    split = merged_split(2, 8, [60] * 16, width_multiple=32, limit=0)
    assert (split.batch_size, split.grad_accum, split.merged) == (8, 2, 4)


def test_the_token_cap_stops_the_merge_of_long_samples():
    # A typical width of 416 (400 rounded up to 32): 4 samples are 1,664 positions, 8 would be 3,328.
    split = merged_split(2, 8, [400] * 16, width_multiple=32, limit=0)
    assert (split.batch_size, split.grad_accum) == (4, 4)
    assert 4 * typical_width([400] * 16, 32) <= AUTO_TOKENS < 8 * typical_width([400] * 16, 32)


def test_the_merge_divides_the_accumulation_so_every_step_keeps_its_samples():
    assert (merged_split(2, 3, [50] * 6, 1, limit=0).batch_size, merged_split(2, 3, [50] * 6, 1, limit=0).grad_accum) == (6, 1)
    assert merged_split(4, 3, [50] * 12, 1, limit=0).merged == 1  # 8 is not 4 x a divisor of 3, 12 is over the cap
    assert merged_split(4, 1, [50] * 4, 1, limit=0).merged == 1


def test_an_explicit_limit_replaces_the_automatic_caps():
    assert merged_split(2, 8, [1000] * 16, 1, limit=16).batch_size == 16  # no token cap when the user says how many
    assert merged_split(2, 8, [10] * 16, 1, limit=1).merged == 1
    assert merged_split(2, 8, [10] * 16, 1, limit=5).batch_size == 4


def test_the_merge_never_turns_gradient_checkpointing_on():
    split = merged_split(2, 8, [60] * 16, 1, limit=0, needs_checkpointing=lambda rows: rows > 4)
    assert split.batch_size == 4
    # A run that checkpoints anyway merges as far as the caps allow.
    assert merged_split(2, 8, [60] * 16, 1, limit=0, needs_checkpointing=lambda rows: True).batch_size == 8


def _rows(n: int) -> list[dict]:
    return [{"question": f"{QA[i % len(QA)]['question']} ({i})", "answer": QA[i % len(QA)]["answer"] + " x" * (i % 3)}
            for i in range(n)]


def test_a_merged_run_trains_the_same_adapter_and_keeps_the_config_as_written(tiny_llama_dir, tmp_path):
    data = write_jsonl(tmp_path / "qa.jsonl", _rows(16))
    runs = {}
    for name, limit in (("merged", 0), ("as configured", 1)):
        lines = []
        config = train_config(tiny_llama_dir, data, tmp_path / name.replace(" ", "_"), **{
            "train.batch_size": 2, "train.grad_accum": 4, "train.epochs": 2, "train.cpu_micro_batch": limit,
            "model.dtype": "float32", "train.compile": False})
        result = train(config, log=lines.append)
        runs[name] = (result, lines)
    merged_result, merged_log = runs["merged"]
    plain_result, plain_log = runs["as configured"]
    assert "micro-batches: 1 of 8 samples per optimizer step, merged from 4 of 2" in "\n".join(merged_log)
    assert not any(line.startswith("micro-batches:") for line in plain_log)
    assert merged_result.steps == plain_result.steps == 4
    merged = load_file(f"{merged_result.output_dir}/adapter_model.safetensors")
    plain = load_file(f"{plain_result.output_dir}/adapter_model.safetensors")
    assert merged.keys() == plain.keys()
    for key in merged:
        torch.testing.assert_close(merged[key], plain[key], rtol=1e-4, atol=1e-5)
    # The loss is normalised by the trained tokens of the whole step, so each step's logged loss agrees too.
    assert [round(e["loss"], 4) for e in merged_result.log if "loss" in e] == \
           [round(e["loss"], 4) for e in plain_result.log if "loss" in e]
    # What the run folder says it was asked for is the config as written: a resume merges again the same way.
    saved = yaml.safe_load((tmp_path / "merged" / "lmtune_config.yaml").read_text())
    assert (saved["train"]["batch_size"], saved["train"]["grad_accum"]) == (2, 4)

