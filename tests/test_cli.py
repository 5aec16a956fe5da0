"""The command line: the whole train -> merge -> generate path, and user errors as one-line messages."""

import subprocess
import sys

import pytest

from lmtune.cli import main


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_train_merge_generate(capsys, tiny_bloom_dir, qa_file, tmp_path):
    code, out, err = run(capsys, "train", "--model", tiny_bloom_dir, "--data", qa_file, "--output-dir", tmp_path / "a",
                         "--max-steps", 2, "--lora.r", 4, "--learning-rate", "1e-3", "--batch-size", 2, "--grad-accum", 1)
    assert code == 0, err
    assert "label contract holds" in out and "saved adapter" in out
    assert "r: 4" in (tmp_path / "a" / "lmtune_config.yaml").read_text()
    code, out, err = run(capsys, "merge", "--adapter", tmp_path / "a", "--output-dir", tmp_path / "m")
    assert code == 0, err
    code, out, err = run(capsys, "generate", "--model", tmp_path / "m", "--prompt", "Học máy là gì?", "--greedy",
                         "--max-new-tokens", 5)
    assert code == 0, err
    assert "Human:" not in out and "Assistant:" not in out  # only the answer is printed
    assert "stopped at --max-new-tokens 5" in err


def test_epochs_flag_wins_over_config_max_steps(tmp_path, capsys, tiny_bloom_dir, qa_file):
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  max_steps: 50\n  batch_size: 4\n  grad_accum: 1\n")
    code, out, err = run(capsys, "train", "--config", config, "--model", tiny_bloom_dir, "--data", qa_file, "--epochs", 1,
                         "--dry-run")
    assert code == 0, err
    assert "1 optimizer steps" in out


@pytest.mark.parametrize(
    "args,message",
    [
        (["--learning-rat", "1e-3"], "error: command line: unknown config key 'learning-rat'; did you mean 'learning_rate'?"),
        (["--lora.rank", "4"], "unknown config key 'lora.rank'; did you mean 'lora.r'?"),
        (["--batch-size", "two"], "error: train.batch_size: expected an integer, got 'two'"),
    ],
)
def test_bad_config_keys_and_values(capsys, tiny_bloom_dir, qa_file, tmp_path, args, message):
    code, out, err = run(capsys, "train", "--model", tiny_bloom_dir, "--data", qa_file, "--output-dir", tmp_path / "a", *args)
    assert code == 2
    assert message in err
    assert not (tmp_path / "a").exists()


def test_missing_data_model_and_adapter(capsys, tiny_bloom_dir, qa_file, tmp_path):
    code, _, err = run(capsys, "train", "--model", tiny_bloom_dir, "--data", tmp_path / "nope.jsonl", "--output-dir", tmp_path / "a")
    assert code == 2 and "nope.jsonl: file not found" in err
    code, _, err = run(capsys, "train", "--model", tmp_path / "no-model", "--data", qa_file, "--output-dir", tmp_path / "a")
    assert code == 2 and "model folder not found" in err
    code, _, err = run(capsys, "merge", "--adapter", tmp_path, "--output-dir", tmp_path / "m")
    assert code == 2 and "not a LoRA adapter folder" in err
    code, _, err = run(capsys, "train", "--model", tiny_bloom_dir, "--data", qa_file)
    assert code == 2 and "pass --output-dir" in err


def test_adapter_passed_as_model_is_explained(capsys, tiny_bloom_dir, qa_file, tmp_path):
    assert run(capsys, "train", "--model", tiny_bloom_dir, "--data", qa_file, "--output-dir", tmp_path / "a", "--max-steps", 1)[0] == 0
    code, _, err = run(capsys, "generate", "--model", tmp_path / "a", "--prompt", "x")
    assert code == 2 and "is a LoRA adapter, not a model; pass it as --adapter" in err


def test_user_errors_print_no_traceback(tmp_path, qa_file):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "Q?"}\n', encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "lmtune", "train", "--model", str(tmp_path), "--data", str(bad), "--output-dir", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    # the model is checked when loading; the data error names file, line and field
    assert result.stderr.startswith("error: ")


def test_bad_data_line_through_the_cli(capsys, tiny_bloom_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "Q?", "answer": "A."}\n{"question": "Q2?"}\n', encoding="utf-8")
    code, _, err = run(capsys, "train", "--model", tiny_bloom_dir, "--data", bad, "--output-dir", tmp_path / "o")
    assert code == 2
    assert f"error: {bad}:2: missing field 'answer'" in err
    assert not (tmp_path / "o").exists()


def test_epochs_and_max_steps_conflict(capsys, tiny_bloom_dir, qa_file, tmp_path):
    code, _, err = run(capsys, "train", "--model", tiny_bloom_dir, "--data", qa_file, "--output-dir", tmp_path / "a",
                       "--epochs", 2, "--max-steps", 5)
    assert code == 2 and "--epochs and --max-steps both say when to stop" in err


def test_output_piped_into_head_ends_quietly(tmp_path):
    """`lmtune data inspect ... | head -2` through a real pipe: head leaves after two lines, lmtune stops without a
    traceback. The report (one line per file) is longer than a pipe's buffer, so lmtune is still writing then."""
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(400):
        (folder / f"{i:04d}-{'a-rather-long-file-name-as-exports-make-them-' * 3}.jsonl").write_text(
            '{"question": "Học máy là gì?", "answer": "Một nhánh của AI."}\n', encoding="utf-8")
    script = f'"$0" -m lmtune data inspect "{folder}/*.jsonl" | head -2; echo "lmtune exit ${{PIPESTATUS[0]}}" >&2'
    result = subprocess.run(["bash", "-c", script, sys.executable], capture_output=True, text=True, timeout=300)
    assert result.stdout.splitlines()[0].startswith("400 rows read from 400 file(s)")
    assert len(result.stdout.splitlines()) == 2
    assert "Traceback" not in result.stderr and "BrokenPipeError" not in result.stderr, result.stderr
    assert result.stderr.strip() == "lmtune exit 141"  # as a Unix tool killed by SIGPIPE


def test_version(capsys):
    from importlib import metadata

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"lmtune {metadata.version('lmtune')}"


def test_generate_refuses_an_empty_prompt_before_loading(capsys, tmp_path):
    code, out, err = run(capsys, "generate", "--model", tmp_path / "never-loaded", "--prompt", "  ")
    assert code == 2 and err == "error: --prompt is empty: give the question to answer\n" and not out


def test_serve_reports_a_port_in_use_before_loading_the_model(capsys, monkeypatch, tiny_llama_dir):
    import socket

    from lmtune import cli

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded although the port is taken")

    monkeypatch.setattr(cli, "_load_for_inference", never)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, out, err = run(capsys, "serve", "--model", tiny_llama_dir, "--port", port)
    assert code == 2 and err.startswith(f"error: cannot listen on 127.0.0.1:{port}: ") and "in use" in err


def test_ctrl_c_while_serve_loads_says_only_interrupted(capsys, monkeypatch, tiny_llama_dir):
    """serve writes no output folder: "no output folder was written or changed" would be a puzzling reassurance."""
    from lmtune import cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_load_for_inference", interrupted)
    code, out, err = run(capsys, "serve", "--model", tiny_llama_dir, "--port", 0)
    assert code == 130 and err == "\ninterrupted\n"
    monkeypatch.setattr(cli, "_load_for_inference", interrupted)
    code, out, err = run(capsys, "chat", "--model", tiny_llama_dir)
    assert code == 130 and err == "\ninterrupted\n"


def test_quickstart_help_describes_the_command_and_every_flag(capsys):
    import argparse

    from lmtune.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name in ("quickstart", "train"):
        undocumented = [a.option_strings[0] for a in commands[name]._actions if not a.help]
        assert not undocumented, f"{name}: {undocumented}"
    assert commands["quickstart"].description
    with pytest.raises(SystemExit):
        main(["quickstart", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "merge the adapter" in text and "default runs/quickstart-<time>" in text
    assert "(default: the bundled data/vi_ai_qa.jsonl and its rewordings)" in text
