"""Config file and command-line mistakes: every problem at once, each naming the key, the bad value,
what is allowed, and (for a typo) the closest valid name. Exit code 2, never a traceback."""

from __future__ import annotations

import pytest

from lmtune.cli import main
from lmtune.config import ConfigError, build_config, load_config


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert "Traceback" not in err + out
    return code, out, err


def _problems(**kwargs) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        build_config(**kwargs)
    return caught.value.problems


TRAIN = ["train", "--model", "some/model", "--data", "d.jsonl", "--output-dir", "out"]


# ---------------------------------------------------------------- unknown keys


def test_unknown_key_in_yaml_names_file_key_and_closest(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  learning_rat: 1.0e-3\nlora:\n  rnak: 4\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    assert caught.value.problems == [
        f"{config}: unknown config key 'train.learning_rat'; did you mean 'train.learning_rate'?",
        f"{config}: unknown config key 'lora.rnak'; did you mean 'lora.r'?",
    ]


def test_unknown_key_without_a_close_name_lists_the_valid_keys():
    (problem,) = _problems(overrides={"zzzzqqqq": 1})
    assert "unknown config key 'zzzzqqqq'; valid keys: model.name_or_path, " in problem and "lora.r" in problem


def test_unknown_key_on_the_command_line(capsys):
    code, _, err = run(capsys, *TRAIN, "--lora.rnak", "4")
    assert code == 2
    assert err.strip() == "error: command line: unknown config key 'lora.rnak'; did you mean 'lora.r'?"


def test_a_mistyped_flag_is_answered_with_the_flag_people_type(capsys):
    """`--dta` once got "did you mean 'dtype'?" (closest config key by spelling); the command's own --data is meant."""
    code, _, err = run(capsys, "train", "--model", "some/model", "--dta", "a.jsonl", "b.jsonl", "--output-dir", "out")
    assert code == 2 and err == "error: command line: unknown option '--dta'; did you mean '--data'?\n"
    code, _, err = run(capsys, "train", "--modle", "x", "--data", "d.jsonl", "--output-dir", "out")
    assert code == 2 and "did you mean '--model'?" in err
    # A config key still wins where it is the closer one.
    code, _, err = run(capsys, *TRAIN, "--learning-rat", "1e-3")
    assert code == 2 and "did you mean 'learning_rate'?" in err


def test_the_library_does_not_call_its_overrides_the_command_line():
    with pytest.raises(ConfigError) as caught:
        load_config(None, {"lora.rnak": 4, "batch_size": "two"})
    assert caught.value.problems == ["overrides: unknown config key 'lora.rnak'; did you mean 'lora.r'?",
                                     "train.batch_size: expected an integer, got 'two'"]


def test_lr_is_the_learning_rate(capsys):
    assert build_config(overrides={"lr": 1e-3}).train.learning_rate == 1e-3
    assert build_config(overrides={"--lr": 5e-4}).train.learning_rate == 5e-4
    code, _, err = run(capsys, *TRAIN, "--lr", "fast")
    assert code == 2 and "error: train.learning_rate: expected a number, got 'fast'" in err  # not "did you mean 'r'?"


def test_a_flag_without_its_value_says_so(capsys):
    code, _, err = run(capsys, *TRAIN, "--batch-size", "--lora.r", "4", "--learning-rate")
    assert code == 2
    assert err.splitlines() == ["error: command line: --batch-size needs a value (an integer; default 2)",
                                "error: command line: --learning-rate needs a value (a number; default 0.0002)"]
    code, _, err = run(capsys, *TRAIN, "--group-by-length", "--max-length")  # a true/false key alone means true
    assert err.splitlines() == ["error: command line: --max-length needs a value (an integer; default 512)"]


# ---------------------------------------------------------------- wrong types and choices


@pytest.mark.parametrize("section,key,value,message", [
    ("lora", "r", "big", "lora.r: expected an integer, got 'big'"),
    ("lora", "r", 2.5, "lora.r: expected an integer, got 2.5"),
    ("train", "learning_rate", "fast", "train.learning_rate: expected a number, got 'fast'"),
    ("train", "learning_rate", float("inf"), "train.learning_rate: expected a finite number, got inf"),
    ("train", "group_by_length", "yes", "train.group_by_length: expected true or false, got 'yes'"),
    ("data", "paths", {"a": 1}, "data.paths: expected a list, got {'a': 1}"),
    ("train", "gradient_checkpointing", "sometimes", "train.gradient_checkpointing: 'sometimes' is neither true/false nor one of 'auto'"),
])
def test_wrong_type_names_key_value_and_allowed(section, key, value, message):
    assert _problems(base={section: {key: value}}) == [message]


def test_invalid_choice_suggests_the_closest():
    assert _problems(overrides={"model.dtype": "bfloat"}) == [
        "model.dtype: 'bfloat' is not one of 'auto', 'float32', 'bfloat16', 'float16'; did you mean 'bfloat16'?"]
    assert _problems(overrides={"target_modules": "all-linaer"}) == [
        "lora.target_modules must be 'auto', 'attention', 'all-linear' or a list of module names, got 'all-linaer'; "
        "did you mean 'all-linear'?"]


def test_wrong_type_on_the_command_line(capsys):
    code, _, err = run(capsys, *TRAIN, "--learning-rate", "fast")
    assert code == 2 and "error: train.learning_rate: expected a number, got 'fast'" in err


# ---------------------------------------------------------------- out of range


@pytest.mark.parametrize("overrides,message", [
    ({"learning_rate": -1e-4}, "train.learning_rate must be positive, got -0.0001"),
    ({"lora.r": 0}, "lora.r must be positive, got 0"),
    ({"lora.dropout": 1.0}, "lora.dropout must be in [0, 1), got 1.0"),
    ({"val_size": 1.5}, "data.val_size must be 0 (none), a share below 1, or a whole number of rows, got 1.5"),
    ({"val_size": -0.1}, "data.val_size must be 0 (none), a share below 1, or a whole number of rows, got -0.1"),
    ({"val_size": 0.999}, "data.val_size 0.999 holds out most of the data and trains on the rest"),
    ({"max_length": 4}, "data.max_length must be at least 8 tokens, got 4"),
    ({"cpu_micro_batch": -2}, "train.cpu_micro_batch must be 0 (automatic) or a number of samples, got -2"),
    ({"top_p": 0}, "generate.top_p must be in (0, 1], got 0.0"),
    ({"epochs": 0, "max_steps": -1}, "train.epochs or train.max_steps must be positive, got epochs 0.0 and max_steps -1"),
    ({"early_stopping_patience": 2}, "train.early_stopping_patience needs validation data, got 2 and none"),
])
def test_out_of_range_names_key_value_and_range(overrides, message):
    (problem,) = _problems(overrides=overrides)
    assert problem.startswith(message), problem


def test_val_size_as_a_whole_number_of_rows_is_allowed():
    assert build_config(overrides={"val_size": 5}).data.val_size == 5


# ---------------------------------------------------------------- conflicts and everything at once


@pytest.mark.parametrize("flags,epochs", [(["--epochs", "2", "--max-steps", "5"], "2.0"),
                                          (["--train.epochs", "2", "--max-steps", "5"], "2"),
                                          (["--epochs", "2", "--train.max_steps", "5"], "2.0")])
def test_epochs_with_max_steps_is_refused(capsys, flags, epochs):
    code, out, err = run(capsys, *TRAIN, *flags)
    assert code == 2 and out == ""
    assert err.strip() == (f"error: --epochs and --max-steps both say when to stop (got --epochs {epochs} and --max-steps 5): "
                           "give one of them")


def test_every_problem_in_a_file_is_reported_in_one_error(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(
        "lora:\n  r: 0\n  bias: nnone\n"
        "train:\n  learning_rate: -1\n  batch_size: two\n  epochs_: 3\n"
        "data:\n  val_size: 1.5\n"
        "generat:\n  top_p: 2\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    problems = caught.value.problems
    assert len(problems) == 7, problems
    for expected in [f"{config}: unknown section 'generat'; did you mean 'generate'?",
                     f"{config}: unknown config key 'train.epochs_'; did you mean 'train.epochs'?",
                     "lora.bias: 'nnone' is not one of 'none', 'all', 'lora_only'; did you mean 'none'?",
                     "train.batch_size: expected an integer, got 'two'",
                     "lora.r must be positive, got 0",
                     "train.learning_rate must be positive, got -1.0",
                     "data.val_size must be 0 (none), a share below 1, or a whole number of rows, got 1.5"]:
        assert expected in problems


def test_file_and_command_line_problems_come_out_together(capsys, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("lora:\n  r: 0\n", encoding="utf-8")
    code, _, err = run(capsys, *TRAIN, "--config", config, "--epochs", "1", "--max-steps", "3", "--bogus", "--learning-rate", "-1",
                       "stray")
    assert code == 2
    lines = err.strip().splitlines()
    assert all(line.startswith("error: ") for line in lines)
    assert len(lines) == 5, lines
    text = "\n".join(lines)
    for expected in ["unexpected argument 'stray'", "--epochs and --max-steps both say when to stop",
                     "unknown config key 'bogus'", "lora.r must be positive, got 0", "train.learning_rate must be positive, got -1"]:
        assert expected in text


def test_inference_commands_report_every_problem_before_loading(capsys, tmp_path):
    code, _, err = run(capsys, "generate", "--prompt", "x", "--temperature", "0", "--top-p", "2", "--bogus", "1")
    assert code == 2
    text = err.strip()
    assert len(text.splitlines()) == 4, text
    for expected in ["give --model", "generate.temperature must be positive", "generate.top_p must be in (0, 1], got 2.0",
                     "unknown config key 'bogus'"]:
        assert expected in text
    code, _, err = run(capsys, "serve", "--model", tmp_path / "missing", "--port", "70000", "--top-k", "-1")
    assert code == 2
    assert "--port must be 0..65535, got 70000" in err and "generate.top_k must be 0 (off) or positive, got -1" in err
