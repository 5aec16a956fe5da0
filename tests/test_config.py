import pytest

from lmtune.bundled import config_files
from lmtune.config import ConfigError, build_config, load_config, parse_cli_value


def test_defaults_are_the_tutorial_recipe_without_dropout():
    c = build_config()  # the tutorial's LoRA dropout (0.05) stays in configs/bloom-560m.yaml
    assert (c.lora.r, c.lora.alpha, c.lora.dropout, c.lora.bias) == (8, 32, 0.0, "none")
    assert (c.train.batch_size, c.train.grad_accum, c.train.warmup_steps, c.train.learning_rate) == (2, 8, 2, 2e-4)
    assert c.model.trust_remote_code is False


def test_overrides_accept_dotted_bare_and_dashed_names():
    c = build_config({"lora": {"r": 4}}, {"lora.r": 16, "learning-rate": 1e-3, "train.batch_size": 4})
    assert c.lora.r == 16 and c.train.learning_rate == 1e-3 and c.train.batch_size == 4


def test_unknown_key_gets_closest_valid_name():
    with pytest.raises(ConfigError) as e:
        build_config(overrides={"learning_rat": 1e-3})
    assert "unknown config key 'learning_rat'" in str(e.value)
    assert "did you mean 'learning_rate'" in str(e.value)


def test_unknown_yaml_section_and_key_suggest():
    with pytest.raises(ConfigError) as e:
        build_config({"lora": {"rank": 8}, "trian": {"epochs": 1}}, source="x.yaml")
    text = str(e.value)
    assert "x.yaml: unknown section 'trian'; did you mean 'train'?" in text
    assert "unknown config key 'lora.rank'" in text


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as e:
        build_config({"lora": {"r": "big", "dropout": 2.0}}, {"batch_size": 0, "bogus": 1, "model.dtype": "fp8"})
    problems = e.value.problems
    assert len(problems) == 5, problems
    assert any("lora.r: expected an integer" in p for p in problems)
    assert any("model.dtype: 'fp8' is not one of" in p for p in problems)
    assert any("train.batch_size must be positive" in p for p in problems)
    assert any("lora.dropout must be in [0, 1)" in p for p in problems)
    assert any("unknown config key 'bogus'" in p for p in problems)


def test_ambiguous_bare_name_is_rejected():
    with pytest.raises(ConfigError, match="'seed' is ambiguous: write one of data.seed, train.seed"):
        build_config(overrides={"seed": 1})


@pytest.mark.parametrize("text,value", [("16", 16), ("1e-3", 1e-3), ("2.0e-4", 2e-4), ("true", True), ("[a, b]", ["a", "b"]), ("hello", "hello")])
def test_cli_values_are_typed(text, value):
    assert parse_cli_value(text) == value


def test_target_modules_accepts_list_or_mode():
    from_cli = parse_cli_value("[q_proj, v_proj]")
    assert build_config(overrides={"target_modules": from_cli}).lora.target_modules == ["q_proj", "v_proj"]
    assert build_config(overrides={"target_modules": ["q_proj", "v_proj"]}).lora.target_modules == ["q_proj", "v_proj"]
    with pytest.raises(ConfigError, match="target_modules"):
        build_config(overrides={"target_modules": "everything"})


@pytest.mark.parametrize("path", config_files(), ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path):
    config = load_config(path)
    assert config.model.name_or_path


def test_bloom_config_keeps_tutorial_values():
    from lmtune.bundled import bundled_path

    c = load_config(bundled_path("configs/bloom-560m.yaml"))
    assert c.model.name_or_path == "bigscience/bloom-560m"
    assert (c.lora.r, c.lora.alpha, c.lora.dropout, c.lora.bias) == (8, 32, 0.05, "none")
    assert (c.train.batch_size, c.train.grad_accum, c.train.warmup_steps, c.train.learning_rate) == (2, 8, 2, 2e-4)
    assert c.lora.target_modules in ("auto", ["query_key_value"])


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file not found: nope.yaml"):
        load_config("nope.yaml")


def test_training_methods_are_off_by_default():
    c = build_config()
    assert (c.lora.use_rslora, c.lora.use_dora, c.lora.init, c.lora.modules_to_save) == (False, False, "default", [])
    assert (c.train.method, c.train.neftune_noise_alpha, c.train.loraplus_lr_ratio, c.train.report_to) == ("lora", 0.0, 0.0, "none")


def test_training_methods_are_set_by_their_usual_names():
    c = build_config(overrides={"use_dora": True, "use-rslora": True, "lora.init": "gaussian", "modules_to_save": "lm_head",
                                "neftune_noise_alpha": 5, "loraplus_lr_ratio": 16, "report_to": "tensorboard"})
    assert c.lora.use_dora and c.lora.use_rslora and c.lora.init == "gaussian"
    assert build_config(overrides={"method": "full"}).train.method == "full"
    assert c.lora.modules_to_save == ["lm_head"] and c.train.neftune_noise_alpha == 5.0 and c.train.report_to == "tensorboard"


def test_training_method_problems_are_reported_together():
    with pytest.raises(ConfigError) as e:
        build_config(overrides={"lora.init": "pisa", "train.method": "partial", "train.neftune_noise_alpha": -1,
                                "train.loraplus_lr_ratio": 0.5, "train.report_to": "tensorbord"})
    text = str(e.value)
    assert "lora.init: 'pisa' is not one of" in text and "did you mean 'pissa'?" in text
    assert "train.method: 'partial' is not one of 'lora', 'full'" in text
    assert "train.report_to: 'tensorbord'" in text and "did you mean 'tensorboard'?" in text
    assert "train.neftune_noise_alpha must be 0 (off) or positive, got -1.0" in text
    assert "train.loraplus_lr_ratio must be 0 (off) or at least 1, got 0.5" in text


def test_training_methods_that_cannot_be_combined():
    with pytest.raises(ConfigError) as e:
        build_config(overrides={"lora.use_dora": True, "lora.init": "olora"})
    assert "lora.use_dora cannot be combined with lora.init 'olora'" in str(e.value)
    with pytest.raises(ConfigError) as e:
        build_config(overrides={"train.method": "full", "lora.use_dora": True, "train.loraplus_lr_ratio": 16})
    assert "lora.use_dora, train.loraplus_lr_ratio apply to LoRA training, but train.method is 'full'" in str(e.value)
    with pytest.raises(ConfigError, match="train.method 'full' trains every weight and cannot use a quantized base"):
        build_config(overrides={"train.method": "full", "model.quantization": "4bit"})
