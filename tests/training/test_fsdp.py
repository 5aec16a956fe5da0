"""configs/accelerate/fsdp.yaml on CPUs. accelerate (1.x) turns FSDP on only for GPU-like devices: on CPUs its
processes run DDP (gloo). The run says so instead of letting a user believe the model is sharded, still trains what
one process trains, and its adapter works with merge, generate and export. Full fine-tuning across 2 processes
trains what one process trains too. FSDP itself runs only on GPUs (bench/gpu_check.sh)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, write_jsonl

pytestmark = pytest.mark.slow

LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
FSDP = REPO / "configs" / "accelerate" / "fsdp.yaml"
SETTINGS = {"train.epochs": 1, "train.batch_size": 4, "train.global_batch_size": 8, "train.warmup_steps": 0,
            "train.logging_steps": 1, "lora.dropout": 0.0, "model.dtype": "float32", "model.device": "cpu"}


def _flags(settings: dict) -> list[str]:
    return [arg for key, value in settings.items() for arg in (f"--{key}", str(value))]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    return env


def _run(command: list[str], cwd: Path) -> str:
    done = subprocess.run(command, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    return output


def one_process(model_dir: str, data: str, out: Path, settings: dict) -> None:
    from lmtune.config import build_config
    from lmtune.training.train import train

    train(build_config(overrides={"model.name_or_path": model_dir, "data.paths": [data], "train.output_dir": str(out),
                                  **settings}), log=lambda _: None)


def assert_same(a_file: Path, b_file: Path) -> None:
    from safetensors.torch import load_file

    a, b = load_file(str(a_file)), load_file(str(b_file))
    assert a.keys() == b.keys() and a
    for name in a:
        assert a[name].shape == b[name].shape and (a[name] - b[name]).abs().max() <= 1e-5, name


def uneven_rows(n: int = 48) -> list[dict]:
    lines = (REPO / "data" / "vi_ai_qa.jsonl").read_text(encoding="utf-8").splitlines()[:n]
    return [json.loads(line) for line in lines]


def test_fsdp_config_on_cpus_says_it_runs_ddp_and_its_adapter_merges_generates_exports(tiny_bloom_dir, tmp_path):
    data = write_jsonl(tmp_path / "qa.jsonl", uneven_rows())
    settings = {**SETTINGS, "train.learning_rate": 1e-3}
    out = tmp_path / "fsdp"
    output = _run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP), "-m", "lmtune",
                   "train", "--model", tiny_bloom_dir, "--data", data, "--output-dir", str(out), *_flags(settings)],
                  tmp_path)
    assert output.count("training: 6 optimizer steps of 8 samples (4 per device x 1 accumulation x 2 processes) with "
                        "DDP (not FSDP: accelerate runs FSDP only on GPUs; each process holds the whole model)") == 1
    one_process(tiny_bloom_dir, data, tmp_path / "one", settings)
    assert_same(tmp_path / "one" / "adapter_model.safetensors", out / "adapter_model.safetensors")

    lmtune = [sys.executable, "-m", "lmtune"]
    _run([*lmtune, "merge", "--adapter", str(out), "--output-dir", str(tmp_path / "merged")], tmp_path)
    assert _run([*lmtune, "generate", "--model", str(tmp_path / "merged"), "--prompt", "LoRA là gì?", "--greedy",
                 "--max-new-tokens", "4", "--device", "cpu"], tmp_path).strip()
    _run([*lmtune, "export", "--adapter", str(out), "--output", str(tmp_path / "model.gguf"), "--quant", "f32"], tmp_path)
    assert (tmp_path / "model.gguf").stat().st_size > 0


def test_full_fine_tuning_on_two_processes_trains_what_one_process_trains(tiny_llama_dir, tmp_path):
    data = write_jsonl(tmp_path / "qa.jsonl", uneven_rows())
    settings = {**SETTINGS, "train.method": "full", "train.learning_rate": 1e-4}
    out = tmp_path / "two"
    output = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
                   "lmtune", "train", "--model", tiny_llama_dir, "--data", data, "--output-dir", str(out),
                   *_flags(settings)], tmp_path)
    assert output.count("(4 per device x 1 accumulation x 2 processes) with DDP\n") == 1
    assert output.count("saved model to") == 1
    one_process(tiny_llama_dir, data, tmp_path / "one", settings)
    assert_same(tmp_path / "one" / "model.safetensors", out / "model.safetensors")
    assert _run([sys.executable, "-m", "lmtune", "generate", "--model", str(out), "--prompt", "LoRA là gì?",
                 "--greedy", "--max-new-tokens", "4", "--device", "cpu"], tmp_path).strip()
