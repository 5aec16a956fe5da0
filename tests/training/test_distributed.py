"""Multi-process training with torchrun: the same config trains the same adapter on 1 or 2 processes, and only
rank 0 writes. Plus the batch arithmetic and the CPU-thread share it relies on."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, write_jsonl

from lmtune.config import ConfigError, build_config
from lmtune.training.distributed import GlobalBatchSampler, batch_plan, epoch_callback, global_batch_sampler, lost_peer
from lmtune.training.train import total_steps, train

LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def test_global_batch_is_per_device_times_accumulation_times_processes():
    plan = batch_plan(per_device=4, grad_accum=8, global_batch_size=16, processes=2)
    assert (plan.grad_accum, plan.global_batch) == (2, 16)
    assert plan.describe() == "16 samples (4 per device x 2 accumulation x 2 processes)"
    assert batch_plan(4, 8, 16, 1).grad_accum == 4  # the same global batch on one process
    assert batch_plan(2, 8, 0, 3).global_batch == 48  # without global_batch_size the accumulation is kept
    assert batch_plan(2, 1, 0, 1).describe() == "2 samples (2 per device x 1 accumulation x 1 process)"


def test_global_batch_that_processes_cannot_share_is_refused():
    with pytest.raises(ConfigError) as e:
        batch_plan(per_device=4, grad_accum=1, global_batch_size=20, processes=3)
    assert "train.global_batch_size 20 is not a multiple of train.batch_size 4 x 3 processes = 12; use 12 or 24" in str(e.value)
    with pytest.raises(ConfigError, match="multiple of train.batch_size 4"):
        build_config(overrides={"train.batch_size": 4, "train.global_batch_size": 6})


def test_total_steps_count_every_process():
    config = build_config(overrides={"train.batch_size": 2, "train.grad_accum": 2, "train.epochs": 3})
    assert total_steps(config, 40) == 30  # 20 micro-batches, 10 steps an epoch
    assert total_steps(config, 40, processes=2) == 15  # each process takes 10 micro-batches
    assert total_steps(config, 42, processes=4) == 9  # 21 micro-batches -> 6 per process (padded) -> 3 steps an epoch


def _args(per_device: int, grad_accum: int, world: int, group_by_length: bool = True):
    from types import SimpleNamespace

    return SimpleNamespace(train_batch_size=per_device, gradient_accumulation_steps=grad_accum, world_size=world,
                           seed=42, data_seed=42,
                           train_sampling_strategy="group_by_length" if group_by_length else "random")


def test_sample_order_depends_on_the_global_batch_not_on_how_processes_share_it():
    samples = [{"input_ids": [0] * length} for length in (torch.arange(50) * 7 % 23 + 3).tolist()]
    for grouped in (True, False):
        orders = [list(global_batch_sampler(_args(b, a, w, grouped), samples)) for b, a, w in ((4, 2, 1), (4, 1, 2), (2, 2, 2), (1, 1, 8))]
        assert all(order == orders[0] for order in orders), grouped
        order = orders[0]
        # 50 samples -> 7 whole global batches of 8: 6 samples of the epoch's own order come again at its end,
        # for one process as for eight (accelerate would pad only the multi-process run, with other samples).
        assert len(order) == 56 and sorted(set(order)) == list(range(50))
    # transformers' grouping over global batches: within each group of batches, longest first.
    sampler = global_batch_sampler(_args(4, 2, 1), samples)
    lengths = [len(samples[i]["input_ids"]) for i in sampler]
    assert lengths[0] == max(lengths) and lengths[8:16] == sorted(lengths[8:16], reverse=True)
    # Another epoch, another order; the same epoch again (a resumed run), the same order.
    first = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != first
    sampler.set_epoch(0)
    assert list(sampler) == first
    # Sampling strategies lmtune does not use, and data without input_ids, keep transformers' sampler.
    assert global_batch_sampler(_args(4, 2, 1), [{"text": "a"}]) is None
    other = _args(4, 2, 1)
    other.train_sampling_strategy = "sequential"
    assert global_batch_sampler(other, samples) is None
    with pytest.raises(ValueError, match="at least 1"):
        GlobalBatchSampler([3, 4], 0, 0, False)


def test_a_resumed_epoch_reaches_the_sampler_through_the_callback():
    from types import SimpleNamespace

    sampler = GlobalBatchSampler([3] * 16, 8, 0, False)
    callback = epoch_callback()
    callback.sampler = sampler
    callback.on_epoch_begin(None, SimpleNamespace(epoch=1.5), None)  # resumed half way through the second epoch
    assert sampler.epoch == 1
    callback.on_epoch_begin(None, SimpleNamespace(epoch=3.0), None)
    assert sampler.epoch == 3


def test_a_lost_peer_is_named(monkeypatch):
    gloo = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                        "[10.77.0.2]:32929. This is typically caused by a remote worker crashing.")
    assert lost_peer(gloo) is None  # one process: no peer to lose
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert lost_peer(gloo) == ("lost the connection to the process at 10.77.0.2:32929: its machine or its lmtune "
                               "stopped, or the network between them failed")
    assert "another process of this run" in lost_peer(RuntimeError("NCCL communicator was aborted on rank 1."))
    assert lost_peer(RuntimeError("CUDA out of memory")) is None
    assert lost_peer(ValueError("Connection closed by peer [10.0.0.1]:1")) is None


def test_cpu_threads_are_shared_by_the_processes_of_one_machine(monkeypatch):
    from lmtune import model as model_module

    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(model_module, "physical_cores", lambda: 8)
    try:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        assert model_module.configure_cpu_threads() == 4
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
        assert model_module.configure_cpu_threads() == 1
    finally:
        torch.set_num_threads(before)


# Both runs: the same settings on 48 rows of uneven lengths (12 to 60 tokens), 6 optimizer steps of 8 samples; so
# each step trains the same samples only if the sampler's order and length grouping are defined over the global batch,
# and the same gradient only if the loss is normalised over the answer tokens of the whole global batch.
# fp32 (no bf16 autocast), no dropout, no warmup.
SETTINGS = {"train.epochs": 1, "train.batch_size": 4, "train.global_batch_size": 8, "train.learning_rate": 1e-3,
            "train.warmup_steps": 0, "train.logging_steps": 1, "lora.dropout": 0.0, "model.dtype": "float32",
            "model.device": "cpu"}
# The validation run: few rows and steps, as it checks who writes, not what is learned.
VALIDATION_SETTINGS = {"train.max_steps": 3, "train.batch_size": 2, "train.global_batch_size": 4,
                       "train.learning_rate": 1e-2, "train.warmup_steps": 0, "lora.dropout": 0.0,
                       "model.dtype": "float32", "model.device": "cpu"}


def uneven_rows(n: int = 48) -> list[dict]:
    """The first n question/answer pairs of the bundled data: answers of very different lengths."""
    lines = (REPO / "data" / "vi_ai_qa.jsonl").read_text(encoding="utf-8").splitlines()[:n]
    return [json.loads(line) for line in lines]


def _cli_flags(settings: dict) -> list[str]:
    return [arg for key, value in settings.items() for arg in (f"--{key}", str(value))]


def test_two_gloo_processes_train_what_one_process_trains_and_write_once(tiny_bloom_dir, tmp_path):
    from safetensors.torch import load_file

    data = write_jsonl(tmp_path / "qa.jsonl", uneven_rows())
    runs, workdir = tmp_path / "runs", tmp_path / "cwd"
    workdir.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
               "-m", "lmtune", "train", "--model", tiny_bloom_dir, "--data", data,
               "--output-dir", str(runs / "two"), *_cli_flags(SETTINGS)]
    done = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]

    # One process trains with 4 per device x 2 accumulation, from the very same config.
    one = train(build_config(overrides={"model.name_or_path": tiny_bloom_dir, "data.paths": [data],
                                        "train.output_dir": str(runs / "one"), **SETTINGS}), log=lambda _: None)
    assert one.steps == 6

    # Rank 0 alone printed progress; the batch line says how the global batch is made.
    assert output.count("training: 6 optimizer steps of 8 samples (4 per device x 1 accumulation x 2 processes)") == 1
    assert output.count("pre-flight: one tokenized example") == 1
    assert output.count("saved adapter to") == 1

    # Exactly one copy of each output: no temp or partial folders beside it, nothing in the working folder.
    assert sorted(p.name for p in runs.iterdir()) == ["one", "two"]
    assert list(workdir.iterdir()) == []
    two = runs / "two"
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in (runs / "one").iterdir())
    for name in ("adapter_model.safetensors", "adapter_config.json", "lmtune_manifest.json", "lmtune_config.yaml",
                 "train_log.jsonl", "loss.png"):
        assert (two / name).is_file(), name
    assert not any(p.is_dir() for p in two.iterdir())  # no checkpoints or eval folders left behind
    log_two = [json.loads(line) for line in (two / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log_two] == [1, 2, 3, 4, 5, 6]  # one writer: each step once
    manifest = json.loads((two / "lmtune_manifest.json").read_text())
    assert manifest["optimizer_steps"] == 6

    # Tolerance. Both runs compute the same sums: the gradient of the summed token loss over the same 8 samples,
    # divided by the same trained-token count. They differ only in float32 rounding: the one-process run adds
    # two micro-batch gradients and uses the answer-only loss path, the DDP run adds two ranks' gradients in a
    # gloo all-reduce and uses the full-logits path (DDP must see its own forward). Rounding of fp32 sums is
    # ~1e-7 relative; six Adam steps of lr 1e-3 turn a 1e-7 relative gradient difference into weight differences
    # of ~1e-8 (measured: max 1.5e-8 on weights of magnitude up to 0.18). 1e-5 leaves a wide margin, yet a step on
    # other samples moves weights by ~lr = 1e-3 (a sampler whose order depends on the process count: 3.5e-3).
    a, b = load_file(str(runs / "one" / "adapter_model.safetensors")), load_file(str(two / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and a
    for name in a:
        assert (a[name] - b[name]).abs().max() <= 1e-5, name
        assert (a[name] - b[name]).abs().max() < 1e-3 * a[name].abs().max(), name
    # Adam and clipping hide a constant factor in the gradient; the logged loss and gradient norm do not: a wrong
    # normalisation across ranks (e.g. a mean over ranks of per-rank means) would show here.
    log_one = [json.loads(line) for line in (runs / "one" / "train_log.jsonl").read_text().splitlines()]
    for x, y in zip(log_one, log_two, strict=True):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-5)


def test_two_processes_with_validation_keep_the_best_adapter_and_write_one_report(tiny_bloom_dir, tmp_path):
    """Validation makes the Trainer save checkpoints and, at the end, every process read the best one back:
    the run folder must be the same path on both ranks and be removed only after both have read it."""
    rows = [json.loads(line) for line in (REPO / "data" / "vi_ai_qa.jsonl").read_text(encoding="utf-8").splitlines()[:12]]
    data = write_jsonl(tmp_path / "qa.jsonl", rows)
    runs = tmp_path / "runs"
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
               "-m", "lmtune", "train", "--model", tiny_bloom_dir, "--data", data, "--output-dir", str(runs / "val"),
               "--val-size", "2", "--eval-steps", "2", "--max-new-tokens", "4", *_cli_flags(VALIDATION_SETTINGS)]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert output.count("validation: best loss") == 1 and output.count("validation: 2 questions, greedy") == 1
    assert [p.name for p in runs.iterdir()] == ["val"]  # no .partial or temp folder left by either rank
    out = runs / "val"
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["eval"]  # checkpoints gone, one report
    manifest = json.loads((out / "lmtune_manifest.json").read_text())
    assert manifest["validation"]["samples"] == 2 and manifest["validation"]["report"]["n"] == 2
    steps = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines() if '"loss"' in line]
    assert steps == [1, 2, 3]
