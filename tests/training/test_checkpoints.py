"""Interrupt and resume, tested the way runs are broken in real life: a real training process gets
SIGTERM (or two Ctrl-Cs) mid-run, a checkpoint is left half-written, the command is run again."""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmtune.cli import main
from lmtune.config import ConfigError, build_config
from lmtune.errors import LmtuneError, OutputExistsError, TrainingInterrupted
from lmtune.training.checkpoints import (
    COMPLETE_MARKER,
    complete_checkpoints,
    open_run_folder,
    partial_dir,
)
from lmtune.training.train import train

QUIET = {"log": lambda _: None}
STEPS = 1000  # a tiny model takes a few ms per step: long enough to be interrupted mid-run, short enough to rerun


def _args(model_dir, data, out, *extra):
    return ["train", "--model", model_dir, "--data", data, "--output-dir", str(out), "--max-steps", str(STEPS),
            "--batch-size", "2", "--grad-accum", "2", "--learning-rate", "5e-3", "--warmup-steps", "3",
            "--lora.dropout", "0.1", *extra]  # dropout > 0: the resumed run must also restore the RNG state


def _config(model_dir, data, out, **overrides):
    base = {"model.name_or_path": model_dir, "data.paths": [data], "train.output_dir": str(out), "train.max_steps": STEPS,
            "train.batch_size": 2, "train.grad_accum": 2, "train.learning_rate": 5e-3, "train.warmup_steps": 3,
            "lora.dropout": 0.1}
    return build_config(overrides={**base, **overrides})


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    return subprocess.Popen([sys.executable, "-m", "lmtune", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_for_step(proc: subprocess.Popen, log_file: Path, step: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log_file.is_file():
            lines = [json.loads(x) for x in log_file.read_text().splitlines() if x.strip()]
            if any(e["step"] >= step for e in lines):
                return
        if proc.poll() is not None:
            raise AssertionError(f"training ended before step {step}: {proc.communicate()}")
        time.sleep(0.01)
    proc.kill()
    raise AssertionError(f"step {step} not reached in {timeout} s")


def _lora_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(tiny_bloom_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    from conftest import QA, write_jsonl

    data = write_jsonl(root / "qa.jsonl", QA)
    train(_config(tiny_bloom_dir, data, root / "adapter"), **QUIET)
    return _lora_weights(root / "adapter")


def test_sigterm_mid_run_then_resume_equals_an_uninterrupted_run(tiny_bloom_dir, qa_file, tmp_path, uninterrupted):
    out = tmp_path / "adapter"
    run = partial_dir(out)
    proc = _start(_args(tiny_bloom_dir, qa_file, out), tmp_path)
    _wait_for_step(proc, run / "train_log.jsonl", 5)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)

    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    checkpoints = complete_checkpoints(run)
    assert len(checkpoints) == 1
    step = int(checkpoints[0].name.split("-")[1])
    assert 5 <= step < STEPS  # stopped mid-run, after the step that was running when the signal came
    assert "SIGTERM received" in stderr + stdout
    assert f"checkpoint of step {step} of {STEPS}" in stderr
    resume_line = stderr.strip().splitlines()[-1].strip()
    # the command as it was invoked (`python -m lmtune` here), so that it works when pasted
    assert resume_line.startswith(f"{shlex.join([sys.executable, '-m', 'lmtune'])} train ") and resume_line.endswith("--resume")
    assert not out.exists()  # the adapter folder appears only when training is finished

    # The process could also have died while writing a later checkpoint: that one must be ignored.
    broken = checkpoints[0].parent / f"checkpoint-{step + 1}"
    shutil.copytree(checkpoints[0], broken)
    (broken / COMPLETE_MARKER).unlink()
    (broken / "optimizer.pt").write_bytes(b"\x80\x04 half-written")

    messages = []
    result = train(_config(tiny_bloom_dir, qa_file, out, **{"train.resume": True}), log=messages.append)
    assert any(f"ignored 1 half-written checkpoint(s) (checkpoint-{step + 1})" in m for m in messages)
    assert any(f"continuing from {checkpoints[0]} (step {step} of {STEPS})" in m for m in messages)
    assert result.steps == STEPS
    assert not run.exists() and (out / "adapter_model.safetensors").is_file()

    resumed = _lora_weights(out)
    assert resumed.keys() == uninterrupted.keys()
    for name, value in uninterrupted.items():
        # Same CPU, same seed, same data order, same RNG stream: the same arithmetic, so exactly equal.
        assert torch.equal(resumed[name], value), name
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log if "loss" in e] == list(range(1, STEPS + 1))  # no step logged twice or lost
    assert json.loads((out / "lmtune_manifest.json").read_text())["resumed_from_step"] == step


def test_second_ctrl_c_while_saving_exits_at_once_and_keeps_the_last_complete_checkpoint(tiny_bloom_dir, qa_file, tmp_path, monkeypatch,
                                                                                             capsys):
    """Real signals, delivered to this process at the worst moments: the first Ctrl-C after two periodic
    checkpoints, the second while the stop checkpoint is half-written."""
    import transformers

    out = tmp_path / "adapter"
    run = partial_dir(out)
    real_save = transformers.Trainer._save_checkpoint
    saves = []

    def save_and_press_ctrl_c(self, model, trial):
        saves.append(self.state.global_step)
        if len(saves) == 3:  # the checkpoint the first Ctrl-C asked for: killed after its weights are written
            self.save_model(str(Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"), _internal_call=True)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the KeyboardInterrupt arrives long before this ends
            raise AssertionError("the second Ctrl-C did not stop training at once")
        real_save(self, model, trial)
        if len(saves) == 2:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(transformers.Trainer, "_save_checkpoint", save_and_press_ctrl_c)
    # checkpoint_minutes tiny: a periodic checkpoint after every step; keep_checkpoints 1: only the newest stays.
    config = _config(tiny_bloom_dir, qa_file, out, **{"train.checkpoint_minutes": 1e-9, "train.keep_checkpoints": 1})
    messages = []
    with pytest.raises(TrainingInterrupted, match=r"(?s)stopped at once\); checkpoint of step 2 of 1000 saved in .*resume with") as stopped:
        train(config, log=messages.append)
    command = str(stopped.value).splitlines()[-1].split()
    assert command == ["lmtune", "train", "--config", str(run / "lmtune_config.yaml"), "--resume"]  # run from Python
    assert any("SIGINT received: finishing this optimizer step" in m for m in messages)
    assert saves == [1, 2, 3]
    assert [p.name for p in complete_checkpoints(run)] == ["checkpoint-2"]  # checkpoint-1 pruned, 3 never completed
    assert (run / "checkpoints" / "checkpoint-3").is_dir()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored

    monkeypatch.setattr(transformers.Trainer, "_save_checkpoint", real_save)
    capsys.readouterr()
    assert main(command[1:]) == 0  # the printed command itself continues the run, from the run's saved config
    assert "ignored 1 half-written checkpoint(s) (checkpoint-3)" in capsys.readouterr().out
    assert (out / "adapter_model.safetensors").is_file() and not run.exists()
    assert json.loads((out / "lmtune_manifest.json").read_text())["optimizer_steps"] == STEPS


def _fake_interrupted_run(out: Path, config) -> Path:
    """A run folder as an interrupted run leaves it: the run's config and one complete checkpoint."""
    checkpoint = partial_dir(out) / "checkpoints" / "checkpoint-7"
    checkpoint.mkdir(parents=True)
    (checkpoint / "adapter_model.safetensors").write_bytes(b"x")
    (checkpoint / COMPLETE_MARKER).write_text('{"step": 7}')
    config.save_yaml(partial_dir(out) / "lmtune_config.yaml")
    return checkpoint


def test_a_new_run_refuses_to_discard_an_interrupted_one(tiny_bloom_dir, qa_file, tmp_path):
    out = tmp_path / "adapter"
    _fake_interrupted_run(out, _config(tiny_bloom_dir, qa_file, out))
    with pytest.raises(OutputExistsError, match=r"interrupted run \(last checkpoint: step 7\); continue it with --resume"):
        train(_config(tiny_bloom_dir, qa_file, out), **QUIET)
    assert complete_checkpoints(partial_dir(out))  # untouched
    result = train(_config(tiny_bloom_dir, qa_file, out, **{"train.max_steps": 3, "train.overwrite_output_dir": True}), **QUIET)
    assert result.steps == 3 and not partial_dir(out).exists()


def test_resume_refuses_settings_that_would_train_differently(tiny_bloom_dir, qa_file, tmp_path):
    out = tmp_path / "adapter"
    _fake_interrupted_run(out, _config(tiny_bloom_dir, qa_file, out))
    changed = _config(tiny_bloom_dir, qa_file, out, **{"train.resume": True, "train.learning_rate": 1e-3})
    with pytest.raises(LmtuneError, match=r"trains differently.*train\.learning_rate: 0\.005 -> 0\.001"):
        train(changed, **QUIET)


def test_resume_accepts_a_run_saved_before_a_setting_existed(tiny_bloom_dir, qa_file, tmp_path):
    import yaml

    out = tmp_path / "adapter"
    config = _config(tiny_bloom_dir, qa_file, out)
    _fake_interrupted_run(out, config)
    saved = partial_dir(out) / "lmtune_config.yaml"
    older = yaml.safe_load(saved.read_text(encoding="utf-8"))
    del older["data"]["csv_delimiter"]  # as an lmtune version without that key wrote it
    saved.write_text(yaml.safe_dump(older), encoding="utf-8")
    run = open_run_folder(out, False, True, lambda _: None, config)
    assert run.resume_step == 7
    run.release()


def test_resume_without_an_interrupted_run_says_so(tiny_bloom_dir, qa_file, tmp_path, capsys):
    out = tmp_path / "adapter"
    assert main(_args(tiny_bloom_dir, qa_file, out, "--resume")) == 2
    err = capsys.readouterr().err
    assert f"{partial_dir(out)} does not exist, so there is no interrupted run to continue" in err
    assert "Traceback" not in err and not partial_dir(out).exists()


def test_a_failed_run_without_checkpoints_leaves_nothing(tiny_bloom_dir, qa_file, tmp_path, monkeypatch):
    out = tmp_path / "adapter"
    import transformers

    def boom(self, *a, **k):
        raise RuntimeError("simulated crash inside the training loop")

    monkeypatch.setattr(transformers.Trainer, "train", boom)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(_config(tiny_bloom_dir, qa_file, out), **QUIET)
    assert not out.exists() and not partial_dir(out).exists()


def test_resume_with_validation_keeps_the_best_checkpoint_and_ends_like_an_uninterrupted_run(tiny_bloom_dir, tmp_path, monkeypatch):
    """With validation the Trainer saves at every evaluation and reloads the best one at the end: that best
    checkpoint must survive pruning and the interruption, and the resumed run must pick the same one."""
    import transformers
    from conftest import write_jsonl

    # The validation answers contradict the trained ones for the same questions: once the model starts to learn its
    # 4 pairs by heart (training loss 7.6 -> 1.6), the validation loss climbs steadily. The best step is then early
    # (6 or 12, about 0.35 below steps 21 and 24, on AVX-512 and on AVX2 arithmetic alike), so it must outlive the
    # later checkpoint 20, which keep_checkpoints 1 alone would keep. (Validation answers like the trained ones kept
    # improving to the last step on some CPUs, which left nothing to test.)
    rows = [{"question": f"Câu hỏi số {i} là gì?", "answer": f"Đây là câu trả lời số {i} về học máy."} for i in range(4)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    validation = write_jsonl(tmp_path / "v.jsonl", [{**row, "answer": "Tôi không biết điều đó, xin hãy hỏi người khác."}
                                                    for row in rows])
    settings = {"data.eval_paths": [validation], "train.max_steps": 24, "train.eval_steps": 3,
                "train.learning_rate": 0.02, "train.lr_scheduler": "constant", "train.keep_checkpoints": 1,
                "lora.r": 16, "lora.dropout": 0.0, "model.dtype": "float32", "generate.max_new_tokens": 8}
    train(_config(tiny_bloom_dir, data, tmp_path / "reference", **settings), **QUIET)
    reference = json.loads((tmp_path / "reference" / "lmtune_manifest.json").read_text())["validation"]
    assert reference["best_step"] <= 18

    real_step_end = transformers.trainer_callback.CallbackHandler.on_step_end

    def press_ctrl_c_at_step_20(self, args, state, control):
        if state.global_step == 20:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step_end(self, args, state, control)

    monkeypatch.setattr(transformers.trainer_callback.CallbackHandler, "on_step_end", press_ctrl_c_at_step_20)
    out = tmp_path / "adapter"
    with pytest.raises(TrainingInterrupted, match="checkpoint of step 20 of 24"):
        train(_config(tiny_bloom_dir, data, out, **settings), **QUIET)
    kept = [p.name for p in complete_checkpoints(partial_dir(out))]
    assert kept == [f"checkpoint-{reference['best_step']}", "checkpoint-20"]  # keep 1, plus the best one
    monkeypatch.undo()

    train(_config(tiny_bloom_dir, data, out, **settings, **{"train.resume": True}), **QUIET)
    resumed = json.loads((out / "lmtune_manifest.json").read_text())["validation"]
    assert (resumed["best_step"], resumed["best_eval_loss"]) == (reference["best_step"], reference["best_eval_loss"])
    for name, value in _lora_weights(tmp_path / "reference").items():
        assert torch.equal(_lora_weights(out)[name], value), name


def test_the_printed_resume_command_keeps_overwrite_and_resumes_from_the_newest(monkeypatch, tmp_path):
    from lmtune.training.checkpoints import resume_command

    monkeypatch.setattr(sys, "argv", ["lmtune", "train", "--data", "a b.jsonl", "--overwrite", "--resume",
                                      "out.partial/checkpoints/checkpoint-40", "--lora.r", "4"])
    assert resume_command(tmp_path / "x.yaml") == "lmtune train --data 'a b.jsonl' --overwrite --lora.r 4 --resume"
    monkeypatch.setattr(sys, "argv", ["lmtune", "train", "--resume=out.partial", "--epochs", "2"])
    assert resume_command(tmp_path / "x.yaml") == "lmtune train --epochs 2 --resume"


def test_resuming_an_older_checkpoint_drops_the_later_ones(tiny_bloom_dir, qa_file, tmp_path):
    out = tmp_path / "adapter"
    config = _config(tiny_bloom_dir, qa_file, out)
    older = _fake_interrupted_run(out, config)  # checkpoint-7
    later = older.parent / "checkpoint-9"
    shutil.copytree(older, later)
    (later / COMPLETE_MARKER).write_text('{"step": 9}')
    messages = []
    run = open_run_folder(out, False, str(older), messages.append, config)
    assert run.resume_from == older and not later.exists()  # else a later --resume would pick the abandoned step 9
    assert any("removed 1 checkpoint(s) later than checkpoint-7 (checkpoint-9)" in m for m in messages)


def test_keep_checkpoints_below_one_is_refused():
    with pytest.raises(ConfigError, match="train.keep_checkpoints must be at least 1, got 0"):
        build_config(overrides={"train.keep_checkpoints": 0})


def test_the_printed_resume_command_is_the_program_as_invoked(monkeypatch, tmp_path):
    from lmtune.training.checkpoints import resume_command

    monkeypatch.setattr(sys, "argv", [".venv/bin/lmtune", "train", "--data", "d.jsonl"])  # venv not activated
    assert resume_command(tmp_path / "x.yaml") == ".venv/bin/lmtune train --data d.jsonl --resume"
    monkeypatch.setattr(sys, "argv", ["/opt/lib/python3/site-packages/lmtune/__main__.py", "quickstart"])
    assert resume_command(tmp_path / "x.yaml") == f"{shlex.join([sys.executable, '-m', 'lmtune'])} train --config " \
                                                  f"{tmp_path / 'x.yaml'} --resume"


def _lock_file(out: Path) -> Path:
    return partial_dir(out).parent / (partial_dir(out).name + ".lock")


def test_a_second_run_on_a_running_output_is_refused_and_a_killed_runs_lock_is_taken_over(tiny_bloom_dir, qa_file, tmp_path):
    """Two real processes on one --output-dir; then the first is killed with SIGKILL (nothing of it runs after)."""
    import socket

    out = tmp_path / "adapter"
    # Long enough to still be running while three more processes start and are refused (it is killed below).
    first = _start(_args(tiny_bloom_dir, qa_file, out, "--max-steps", "100000"), tmp_path)
    try:
        _wait_for_step(first, partial_dir(out) / "train_log.jsonl", 2)
        holder = json.loads(_lock_file(out).read_text())
        assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()
        for extra in ([], ["--resume"], ["--overwrite"]):
            second = _start(_args(tiny_bloom_dir, qa_file, out, *extra), tmp_path)
            _, stderr = second.communicate(timeout=300)
            assert second.returncode == 2, stderr[-2000:]
            assert "Traceback" not in stderr
            assert (f"another training run is still writing to {partial_dir(out)}: pid {first.pid} on "
                    f"{socket.gethostname()}, started {holder['started']}") in stderr
            assert "--overwrite" not in stderr.split("(--overwrite does not change this)")[0]  # no advice to discard it
        assert first.poll() is None  # the first run was not disturbed
        assert (partial_dir(out) / "train_log.jsonl").is_file()
    finally:
        first.kill()  # SIGKILL: no handler, no atexit, the lock file stays behind naming a dead process
        first.communicate(timeout=60)
    assert json.loads(_lock_file(out).read_text())["pid"] == first.pid

    messages = []
    result = train(_config(tiny_bloom_dir, qa_file, out, **{"train.max_steps": 2}), log=messages.append)
    assert result.steps == 2 and (out / "adapter_model.safetensors").is_file()
    notice = [m for m in messages if m.startswith("lock:")]
    assert len(notice) == 1 and f"pid {first.pid} on {socket.gethostname()}" in notice[0]
    assert "is no longer running" in notice[0] and "taking over" in notice[0]
    assert not _lock_file(out).exists()  # a finished run leaves no lock behind


def test_only_rank_0_takes_the_lock(tiny_bloom_dir, qa_file, tmp_path, monkeypatch):
    """torchrun and accelerate start one process per device: the job holds one lock, taken by rank 0."""
    out = tmp_path / "adapter"
    monkeypatch.setenv("RANK", "1")
    other_rank = open_run_folder(out, False, False, lambda _: None)
    assert not _lock_file(out).exists()
    monkeypatch.setenv("RANK", "0")
    rank_0 = open_run_folder(out, False, False, lambda _: None)
    assert json.loads(_lock_file(out).read_text())["pid"] == os.getpid()
    other_rank.release()
    assert _lock_file(out).exists()  # the other ranks' folders hold no lock, so they cannot drop rank 0's
    rank_0.release()
    assert not _lock_file(out).exists()


def test_resume_of_a_finished_run_says_so_and_touches_nothing(trained_bloom, tiny_bloom_dir, capsys):
    result, _, root, data = trained_bloom
    out = Path(result.output_dir)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    finished = json.loads((out / "lmtune_manifest.json").read_text())["finished"]
    capsys.readouterr()
    assert main(["train", "--model", tiny_bloom_dir, "--data", data, "--output-dir", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: --resume: the run of {out} finished ({finished}); its adapter is in {out}. There is nothing "
                   f"to resume and nothing was changed; to train further, start a new run with another --output-dir\n")
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    assert not partial_dir(out).exists() and not _lock_file(out).exists()


def test_a_run_that_fails_before_it_starts_leaves_its_output_unlocked(tiny_bloom_dir, tmp_path):
    """A notebook's failed train() (bad data here) must not keep the output locked against a terminal run."""
    from lmtune.errors import DataError

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "a"}\n', encoding="utf-8")
    out = tmp_path / "adapter"
    with pytest.raises(DataError, match="cannot tell question and answer columns apart"):
        train(_config(tiny_bloom_dir, str(bad), out), log=lambda _: None)
    assert not list(tmp_path.glob("*.lock"))
