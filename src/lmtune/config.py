"""Typed settings for every lmtune step, loaded from YAML and overridden from the command line.

One `Config` holds five sections (model, lora, data, train, generate). A YAML file gives
defaults, `--section.field value` (or `--field value` when the name is unique) overrides
them, and `build_config` validates the result: unknown keys are rejected with the closest
valid name, and every problem is reported at once in a single `ConfigError`.

Why not `HfArgumentParser`: it neither suggests the closest key nor collects all problems,
and it flattens sections so that `lora.dropout` and a training dropout would collide.
"""

from __future__ import annotations

import difflib
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """A user mistake in a config file or command-line override. Carries every problem found."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass
class ModelConfig:
    # Hub id, local folder, or path to a .gguf file.
    name_or_path: str = "bigscience/bloom-560m"
    # Off unless asked: the models we target need no custom code, and running code from the Hub is a risk.
    trust_remote_code: bool = False
    # "auto": bf16 autocast where the hardware supports it, else fp32 (fp16 on older CUDA GPUs).
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"


@dataclass
class LoraConfig:
    r: int = 8
    alpha: int = 32
    dropout: float = 0.05
    bias: Literal["none", "all", "lora_only"] = "none"
    # "auto" = peft's own per-architecture default (query_key_value for BLOOM, q_proj/v_proj for Llama);
    # "attention" = every attention projection; "all-linear" = attention and MLP linears;
    # or an explicit list of module names.
    target_modules: Union[str, list[str]] = "auto"


@dataclass
class DataConfig:
    # Files (jsonl, json, csv, parquet), globs, or "hub:<dataset id>" entries.
    paths: list[str] = field(default_factory=list)
    # Explicit column names; empty means detect (question/answer, input/output[/context],
    # prompt/response, instruction/input/output).
    question_field: str = ""
    answer_field: str = ""
    context_field: str = ""
    # "auto" = the tokenizer's chat template when it has one, else "plain";
    # "plain" = "Human: {question}\nAssistant:" + " " + answer; "chat" = require a chat template.
    template: Literal["auto", "plain", "chat"] = "auto"
    # System message for chat templates; empty keeps the template's own default.
    system_prompt: str = ""
    # Samples longer than this are truncated on the answer side (the prompt is never cut silently).
    max_length: int = 512
    # Train on the first N rows only (0 = all). Useful for quick runs.
    max_samples: int = 0
    # Validation: a share (< 1) or number (>= 1) of rows held out from `paths`, whole question groups
    # at a time (see split.py), and/or separate files.
    val_size: float = 0.0
    eval_paths: list[str] = field(default_factory=list)
    seed: int = 42


@dataclass
class TrainConfig:
    output_dir: str = ""
    epochs: float = 3.0
    # Stops after this many optimizer steps when > 0 (overrides epochs).
    max_steps: int = -1
    batch_size: int = 2
    grad_accum: int = 8
    learning_rate: float = 2e-4
    warmup_steps: int = 2
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    # "auto": only when the activations of the longest micro-batch would not fit in half the free memory
    # (it costs about a third more compute); true/false force it.
    gradient_checkpointing: Union[bool, Literal["auto"]] = "auto"
    # Sort samples into batches of similar length so little padding is computed.
    group_by_length: bool = True
    logging_steps: int = 1
    # With validation data: evaluate every N optimizer steps (0 = about ten times per run), keep the
    # adapter with the lowest validation loss, and stop after this many evaluations without improvement (0 = never).
    eval_steps: int = 0
    early_stopping_patience: int = 0
    seed: int = 42
    overwrite_output_dir: bool = False


@dataclass
class GenerateConfig:
    max_new_tokens: int = 128
    greedy: bool = False
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50
    repetition_penalty: float = 1.1


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True), encoding="utf-8")


SECTIONS: dict[str, type] = {"model": ModelConfig, "lora": LoraConfig, "data": DataConfig, "train": TrainConfig, "generate": GenerateConfig}


def all_keys() -> list[str]:
    """Every valid dotted key, e.g. 'lora.r'."""
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in fields(cls)]


def _owners(name: str) -> list[str]:
    return [s for s, cls in SECTIONS.items() if name in {f.name for f in fields(cls)}]


def resolve_key(key: str) -> tuple[str | None, str]:
    """Map 'lora.r', 'train.learning-rate' or a unique bare name like 'learning_rate' to (section, field).

    Returns (None, message) when the key is unknown or ambiguous.
    """
    typed = key.strip().lstrip("-")
    key = typed.replace("-", "_")
    if "." in key:
        section, name = key.split(".", 1)
        if section in SECTIONS and name in {f.name for f in fields(SECTIONS[section])}:
            return section, name
    else:
        owners = _owners(key)
        if len(owners) == 1:
            return owners[0], key
        if len(owners) > 1:
            choices = ", ".join(f"{o}.{key}" for o in owners)
            return None, f"'{typed}' is ambiguous: write one of {choices}"
    candidates = all_keys() + [f.name for cls in SECTIONS.values() for f in fields(cls) if len(_owners(f.name)) == 1]
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(all_keys())}"
    return None, f"unknown config key '{typed}'{hint}"


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check `value` against a dataclass field annotation, converting the harmless cases (int -> float)."""
    if isinstance(annotation, str):  # `from __future__ import annotations` leaves strings
        annotation = eval(annotation, {**typing.__dict__, **globals()})
    origin = get_origin(annotation)
    if origin is Literal:
        allowed = get_args(annotation)
        if value not in allowed:
            raise ValueError(f"{where}: {value!r} is not one of {', '.join(map(repr, allowed))}")
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for option in get_args(annotation):
            try:
                return _coerce(value, option, where)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(f"{where}: {value!r} is neither " + " nor ".join(_type_name(a) for a in get_args(annotation)))
    if origin is list:
        (item_type,) = get_args(annotation)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item_type, where) for v in value]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{where}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"{where}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ValueError(f"{where}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ValueError(f"{where}: expected text, got {value!r}")
    return value


def _type_name(annotation: Any) -> str:
    if get_origin(annotation) is list:
        return "a list"
    return {str: "text", int: "an integer", float: "a number", bool: "true/false"}.get(annotation, str(annotation))


def parse_cli_value(text: str) -> Any:
    """'16' -> 16, '1e-3' -> 0.001, 'true' -> True, '[a, b]' -> list; anything else stays text."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str) and value != text.strip():
        return text
    # YAML 1.1 reads "1e-3" as text; numbers written that way are common for learning rates.
    if isinstance(value, str):
        try:
            return float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            return value
    return text if value is None else value


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"config file not found: {path}"])
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError([f"{path}: not valid YAML ({e})"]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: the top level must be a mapping of sections (model, lora, data, train, generate)"])
    return data


def build_config(base: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None, source: str = "config") -> Config:
    """Validate nested `base` (as read from YAML) plus flat `overrides` ({'lora.r': 16, 'epochs': 2}).

    Raises ConfigError listing every problem.
    """
    problems: list[str] = []
    values: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for section, content in (base or {}).items():
        if section not in SECTIONS:
            close = difflib.get_close_matches(str(section), list(SECTIONS), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; sections are {', '.join(SECTIONS)}"
            problems.append(f"{source}: unknown section '{section}'{hint}")
            continue
        if content is None:
            continue
        if not isinstance(content, dict):
            problems.append(f"{source}: section '{section}' must be a mapping of keys to values")
            continue
        for name, value in content.items():
            sec, resolved = resolve_key(f"{section}.{name}")
            if sec is None:
                problems.append(f"{source}: {resolved}")
            else:
                values[sec][resolved] = value
    for key, value in (overrides or {}).items():
        sec, resolved = resolve_key(key)
        if sec is None:
            problems.append(f"command line: {resolved}")
        else:
            values[sec][resolved] = value

    sections = {}
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for name, value in values[section].items():
            try:
                kwargs[name] = _coerce(value, hints[name], f"{section}.{name}")
            except ValueError as e:
                problems.append(str(e))
        sections[section] = cls(**kwargs)
    config = Config(**sections)
    problems += _check_ranges(config)
    if problems:
        raise ConfigError(problems)
    return config


def _check_ranges(c: Config) -> list[str]:
    checks = [
        (c.lora.r > 0, "lora.r must be positive"),
        (c.lora.alpha > 0, "lora.alpha must be positive"),
        (0 <= c.lora.dropout < 1, "lora.dropout must be in [0, 1)"),
        (c.data.max_length >= 8, "data.max_length must be at least 8 tokens"),
        (c.data.max_samples >= 0, "data.max_samples must be 0 (all) or positive"),
        (c.train.batch_size > 0, "train.batch_size must be positive"),
        (c.train.grad_accum > 0, "train.grad_accum must be positive"),
        (c.train.learning_rate > 0, "train.learning_rate must be positive"),
        (c.train.epochs > 0 or c.train.max_steps > 0, "train.epochs or train.max_steps must be positive"),
        (c.train.warmup_steps >= 0, "train.warmup_steps must not be negative"),
        (c.data.val_size >= 0, "data.val_size must be 0 (none), a share below 1, or a number of rows"),
        (c.train.eval_steps >= 0 and c.train.early_stopping_patience >= 0, "train.eval_steps and train.early_stopping_patience must not be negative"),
        (c.train.early_stopping_patience == 0 or c.data.val_size > 0 or bool(c.data.eval_paths),
         "train.early_stopping_patience needs validation data: set data.val_size or data.eval_paths"),
        (c.generate.max_new_tokens > 0, "generate.max_new_tokens must be positive"),
        (c.generate.temperature > 0, "generate.temperature must be positive (use greedy: true for deterministic answers)"),
        (0 < c.generate.top_p <= 1, "generate.top_p must be in (0, 1]"),
    ]
    if isinstance(c.lora.target_modules, str) and c.lora.target_modules not in ("auto", "attention", "all-linear"):
        checks.append((False, "lora.target_modules must be 'auto', 'attention', 'all-linear' or a list of module names"))
    return [message for ok, message in checks if not ok]


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Read a YAML config (if given), apply overrides, validate."""
    base = load_yaml(path) if path else {}
    return build_config(base, overrides, source=str(path) if path else "config")
