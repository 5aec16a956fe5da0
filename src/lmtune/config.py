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
import math
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Literal, Union, get_args, get_origin

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
    # Off unless asked: .bin/.pt weights are Python pickles, and unpickling a file can run any code it
    # carries; safetensors and GGUF files hold only tensors. True also loads pickled weights and adapters.
    allow_pickle: bool = False
    # "auto": bf16 autocast where the hardware supports it, else fp32 (fp16 on older CUDA GPUs).
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # Where to train and answer: "auto" picks a CUDA GPU, then Apple's mps, else the CPU.
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    # QLoRA: load the frozen base in 4 bits (nf4, double quantization) or 8 bits through bitsandbytes and
    # train LoRA on top. Needs a CUDA GPU and `pip install 'lmtune[gpu]'`; merging uses the full-precision base.
    quantization: Literal["none", "4bit", "8bit"] = "none"


@dataclass
class LoraConfig:
    # Rank of the low-rank update (A is r x in, B is out x r): more capacity, a larger adapter.
    r: int = 8
    # Scale of the update: it is multiplied by alpha / r (alpha / sqrt(r) with use_rslora).
    alpha: int = 32
    # Dropout on the input of the LoRA branch while training, in [0, 1). 0 by default, as in peft, LLaMA-Factory and
    # Unsloth: on a CPU, drawing a random mask over every LoRA input takes a large share of a step
    # (docs/performance.md, "LoRA dropout"), and it keeps a shared prompt prefix from running once.
    dropout: float = 0.0
    # Which biases train with the adapter: "none", "all", or only those of the adapted layers ("lora_only").
    bias: Literal["none", "all", "lora_only"] = "none"
    # "auto" = peft's own per-architecture default (query_key_value for BLOOM, q_proj/v_proj for Llama);
    # "attention" = every attention projection; "all-linear" = attention and MLP linears;
    # or an explicit list of module names.
    target_modules: Union[str, list[str]] = "auto"
    # LoRA variants (peft; see the README's table of methods). rsLoRA scales the update by alpha/sqrt(r) instead of
    # alpha/r, so higher ranks still learn; DoRA trains a magnitude per output feature apart from the direction.
    use_rslora: bool = False
    # DoRA (see use_rslora above); cannot be combined with init pissa or olora.
    use_dora: bool = False
    # How A and B start: "default" (B = 0, so training starts from the base); "gaussian"; "pissa" / "olora" start
    # from the weights' principal (SVD) / orthonormal (QR) directions, moved out of the base. Those adapters are
    # saved converted to a plain LoRA of twice the rank that applies to the original base.
    init: Literal["default", "gaussian", "pissa", "olora"] = "default"
    # Whole modules trained and saved beside the adapter, e.g. [lm_head] or [embed_tokens] (names as in the model).
    modules_to_save: list[str] = field(default_factory=list)


@dataclass
class DataConfig:
    # Files (jsonl, json, csv, tsv, txt, parquet), globs, or "hub:<dataset id>" entries.
    paths: list[str] = field(default_factory=list)
    # Explicit column names; empty means detect (question/answer, input/output[/context],
    # prompt/response, instruction/input/output).
    question_field: str = ""
    # Answer column; empty means detect (see question_field).
    answer_field: str = ""
    # Optional context column, added to the prompt after the question; empty means detect.
    context_field: str = ""
    # Conversation column (OpenAI `messages` or ShareGPT `conversations`); empty means detect. Conversations and
    # question/answer rows may be mixed: a pair is a one-turn conversation.
    messages_field: str = ""
    # Which assistant turns of a conversation are trained: "all" (every answer) or "last" (the final one only;
    # the earlier turns are context).
    train_on_turns: Literal["all", "last"] = "all"
    # CSV separator; empty = read it off the header line (Excel writes ";" under Vietnamese and other regional
    # settings where the comma is the decimal separator; a .tsv file's is the tab). One character, or "tab".
    csv_delimiter: str = ""
    # "auto" = the tokenizer's chat template when it has one, else "plain";
    # "plain" = "Human: {question}\nAssistant:" + " " + answer; "chat" = require a chat template.
    template: Literal["auto", "plain", "chat"] = "auto"
    # System message for chat templates; empty keeps the template's own default.
    system_prompt: str = ""
    # Samples longer than this are truncated on the answer side (the prompt is never cut silently).
    max_length: int = 512
    # Train on the first N rows only (0 = all); how many rows it leaves out is said. Useful for quick runs.
    max_samples: int = 0
    # Validation: a share (< 1) or number (>= 1) of rows held out from `paths`, whole question groups
    # at a time (see split.py), and/or separate files.
    val_size: float = 0.0
    # Validation files (same formats as paths), used beside or instead of val_size.
    eval_paths: list[str] = field(default_factory=list)
    # Seed of the validation split (which question groups are held out).
    seed: int = 42
    # Lay samples end to end in rows of one fixed length, each sample attending only to itself (data/packing.py):
    # no padding is computed and every micro-batch has one shape. "auto" does not pack: on the CPUs measured,
    # length-grouped padded micro-batches trained faster (docs/performance.md, "Packed rows"). true packs (on
    # families whose attention reads packed rows, not BLOOM; supervised methods only); false never packs.
    packing: Union[bool, Literal["auto"]] = "auto"
    # Tokens per packed row; 0 = about train.batch_size samples' worth, rounded up to 256, 512, 768, 1024, 1536, ...
    # With packing a micro-batch is one such row, so an optimizer step trains about as many tokens as unpacked.
    pack_length: int = 0
    # Unpacked micro-batches are as wide as their longest sample rounded up to a multiple of this. 0 = where a CPU
    # trains in bf16, 8, 16 or 32, about an eighth of the data's median length (a few widths instead of one per
    # length keep oneDNN's compiled matmuls and the heap from growing over a long run: docs/performance.md, "Memory
    # over a long run"), 1 elsewhere; 1 = no rounding.
    pad_to_multiple_of: int = 0


@dataclass
class TrainConfig:
    # Folder the adapter (or, with method full, the model) is written to; required by train.
    output_dir: str = ""
    # Passes over the training rows; fractions allowed (ignored when max_steps > 0).
    epochs: float = 3.0
    # Stops after this many optimizer steps when > 0 (overrides epochs).
    max_steps: int = -1
    batch_size: int = 2  # per device (per process)
    # Micro-batches accumulated per optimizer step (derived from global_batch_size when that is set).
    grad_accum: int = 8
    # On a CPU with one process, the micro-batches of one optimizer step are merged into micro-batches of up to this
    # many samples (training/micro_batches.py): the same samples, loss and gradients per step, but larger matrix
    # products, which ran 1.07 to 1.7x faster (docs/performance.md, "Merged micro-batches"). 0 = up to 8 samples and
    # 2,048 token positions; 1 = as train.batch_size and train.grad_accum say. Not with packing or preference methods.
    cpu_micro_batch: int = 0
    # Samples per optimizer step over all processes = batch_size x grad_accum x processes. When > 0, grad_accum is
    # derived from it at launch, so the same config trains with the same global batch on 1 or N processes.
    global_batch_size: int = 0
    # Peak learning rate of AdamW, reached after warmup_steps.
    learning_rate: float = 2e-4
    # Optimizer steps of linear warmup from 0 to learning_rate.
    warmup_steps: int = 2
    # How the learning rate moves after warmup (transformers' scheduler of that name).
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    # AdamW's decoupled weight decay (0 = none).
    weight_decay: float = 0.0
    # Gradients are clipped to this total norm (0 = no clipping).
    max_grad_norm: float = 1.0
    # "auto": only when the activations of the longest micro-batch would not fit in half the free memory
    # (it costs about a third more compute); true/false force it.
    gradient_checkpointing: Union[bool, Literal["auto"]] = "auto"
    # torch.compile of each decoder layer (training/compiled.py): about 1.5x faster LoRA steps on a CPU after a
    # minute of compiling (cached on disk for later runs). "auto": on a CPU, for runs long enough to repay it, when a
    # C++ compiler is installed; true/false force it.
    compile: Union[bool, Literal["auto"]] = "auto"
    # Int8 matmuls for the frozen base weights of a LoRA run on a CPU that trains in fp32 (training/int8_matmuls.py):
    # 1.3 to 1.9x faster steps on a CPU with int8 dot-product instructions (VNNI), at about 1% error in each of the
    # frozen weights' products; LoRA, attention, the head and the saved adapter stay fp32. "auto": on for supervised
    # LoRA with compiled decoder layers on such a CPU without native bf16; true/false force it.
    int8_matmuls: Union[bool, Literal["auto"]] = "auto"
    # Sort samples into batches of similar length so little padding is computed.
    group_by_length: bool = True
    # On a CPU, each micro-batch runs as one row without its padding, and the prompt tokens that every sample begins
    # with (a chat template's system prompt) run through the model once, not once per sample
    # (training/shared_prefix.py): the same loss and gradients for less work. Not with packing, dropout or gradient
    # checkpointing.
    share_prefix: bool = True
    # Print and log the loss every N optimizer steps.
    logging_steps: int = 1
    # With validation data: evaluate every N optimizer steps (0 = about ten times per run), keep the
    # adapter with the lowest validation loss, and stop after this many evaluations without improvement (0 = never).
    eval_steps: int = 0
    # Stop after this many evaluations without a lower validation loss (0 = never; needs validation data).
    early_stopping_patience: int = 0
    # Seed of the LoRA initialisation, the data order and dropout: the same seed trains the same weights.
    seed: int = 42
    # Replace an existing output_dir (or discard an interrupted run); without it both are refused.
    overwrite_output_dir: bool = False
    # Interrupt and resume: a run writes to <output_dir>.partial/ and saves a resumable checkpoint (adapter,
    # optimizer, scheduler, RNG states, data position) at least every checkpoint_minutes (0 = only when
    # stopped by Ctrl-C/SIGTERM), keeping the newest keep_checkpoints complete ones.
    checkpoint_minutes: float = 10.0
    # How many complete checkpoints are kept (the best one with validation is kept as well).
    keep_checkpoints: int = 2
    # true: continue the interrupted run of this output_dir from its newest complete checkpoint;
    # a path: continue from that run folder or checkpoint.
    resume: Union[bool, str] = False
    # "lora": train an adapter (see the lora section); "full": train every weight of the model and save a whole model
    # folder (no merge needed). Full needs about four times the model's size in memory for weights, gradients and
    # AdamW's two moments: for small models. Preference tuning on a LoRA adapter, from rows with a prompt and a chosen
    # and a rejected answer: "dpo" (against a reference: the model as training starts) or "orpo" (no reference, SFT
    # loss included); "kto" from rows with a prompt, one completion and a good/bad label. See the preference section.
    method: Literal["lora", "full", "dpo", "orpo", "kto"] = "lora"
    # An adapter folder of an earlier run to keep training instead of a new adapter (the usual start of preference
    # tuning: the SFT run's adapter). Its own LoRA settings (rank, targets) apply; the lora section's are not used.
    init_adapter: str = ""
    # NEFTune: uniform noise of this scale on the input embeddings while training (0 = off; 5 is the paper's usual value).
    neftune_noise_alpha: float = 0.0
    # LoRA+: the B matrices learn this many times faster than A (0 = off; the paper suggests 16).
    loraplus_lr_ratio: float = 0.0
    # Where the Trainer also logs: "tensorboard" writes <output_dir>/tensorboard (pip install tensorboard).
    report_to: Literal["none", "tensorboard", "wandb", "mlflow", "trackio", "comet_ml", "clearml", "dvclive",
                       "swanlab", "neptune"] = "none"


@dataclass
class GenerateConfig:
    # Most tokens an answer may have (it stops earlier at EOS or an end-of-turn token).
    max_new_tokens: int = 128
    # Always take the most likely token (deterministic); temperature, top_p and top_k are then unused.
    greedy: bool = False
    # Sampling temperature: below 1 sharper, above 1 more varied.
    temperature: float = 0.7
    # Nucleus sampling: sample among the most likely tokens whose probabilities add up to top_p (1 = off).
    top_p: float = 0.9
    # Sample among the k most likely tokens only (0 = off).
    top_k: int = 50
    # Makes tokens the answer already holds less likely: their scores are divided by it (negative ones multiplied);
    # 1.0 = off.
    repetition_penalty: float = 1.1
    # Single answers (chat, serve) through a compiled one-token step (lmtune/decoding.py): about 1.8-2x the
    # tokens/s on a CPU after a minute or two of compiling (cached on disk). "auto": on a CPU with bf16 or fp32 weights,
    # for Llama-family models of 200 MB or more, in chat and serve, when a C++ compiler is installed; true/false force it.
    compile: Union[bool, Literal["auto"]] = "auto"
    # Which engine chooses the tokens of `generate`, `chat` and `serve`: "lmtune" (PyTorch, the model as loaded) or
    # "llama.cpp" (a GGUF of the same model, exported and verified on the first run and kept in the adapter's or
    # model's folder: faster single answers on CPUs where llama.cpp's kernels beat lmtune's, see
    # docs/performance.md; needs llama-cpp-python, CPU only).
    engine: Literal["lmtune", "llama.cpp"] = "lmtune"


@dataclass
class PreferenceConfig:
    # How far the tuned model may move from the reference (DPO, KTO: higher stays closer; 0.1 as in TRL); for
    # ORPO the weight of the odds-ratio term beside the SFT loss; for SimPO the scale of the length-normalised reward.
    beta: float = 0.1
    # DPO's loss: "sigmoid" (the DPO paper), "ipo" (squared, on length-normalised log-probabilities) or "simpo"
    # (length-normalised margin with no reference model).
    loss_type: Literal["sigmoid", "ipo", "simpo"] = "sigmoid"
    # Share of pairs assumed mislabelled (conservative DPO; 0 = off). sigmoid and simpo only.
    label_smoothing: float = 0.0
    # SimPO's target margin between the chosen and rejected rewards.
    simpo_gamma: float = 0.5
    # KTO: weights of the loss of answers marked good and of those marked bad (raise the smaller side's weight when
    # one kind is much rarer than the other).
    desirable_weight: float = 1.0
    # KTO: the weight of the loss of answers marked bad (see desirable_weight).
    undesirable_weight: float = 1.0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True), encoding="utf-8")


SECTIONS: dict[str, type] = {"model": ModelConfig, "lora": LoraConfig, "data": DataConfig, "train": TrainConfig,
                             "generate": GenerateConfig, "preference": PreferenceConfig}


def all_keys() -> list[str]:
    """Every valid dotted key, e.g. 'lora.r'."""
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in fields(cls)]


def _owners(name: str) -> list[str]:
    return [s for s, cls in SECTIONS.items() if name in {f.name for f in fields(cls)}]


# Names people bring from other tools' flags. Accepted as the key they mean, and so never answered with a far-off
# suggestion ("lr" is closest to "r" by spelling).
ALIASES = {"lr": "train.learning_rate"}


def resolve_key(key: str) -> tuple[str | None, str]:
    """Map 'lora.r', 'train.learning-rate', an alias ('lr') or a unique bare name like 'learning_rate' to
    (section, field).

    Returns (None, message) when the key is unknown or ambiguous.
    """
    typed = key.strip().lstrip("-")
    key = typed.replace("-", "_")
    key = ALIASES.get(key, key)
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
            close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"{where}: {value!r} is not one of {', '.join(map(repr, allowed))}{hint}")
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
            if not math.isfinite(value):  # YAML reads .inf and .nan; no setting means anything with them
                raise ValueError(f"{where}: expected a finite number, got {value!r}")
            return float(value)
        raise ValueError(f"{where}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ValueError(f"{where}: expected text, got {value!r}")
    return value


def value_needed(key: str) -> str | None:
    """For a key given as a bare flag (`--batch-size` and nothing after it): what value it needs, e.g.
    "an integer; default 2", or None when the flag alone means true (or the key is unknown: reported elsewhere)."""
    section, name = resolve_key(key)
    if section is None:
        return None
    annotation = typing.get_type_hints(SECTIONS[section])[name]
    try:
        _coerce(True, annotation, key)
        return None
    except ValueError:
        return f"{_type_name(annotation)}; default {getattr(SECTIONS[section](), name)!r}"


def _type_name(annotation: Any) -> str:
    if get_origin(annotation) is list:
        return "a list"
    if get_origin(annotation) is Literal:
        return "one of " + ", ".join(map(repr, get_args(annotation)))
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


def build_config(base: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None, source: str = "config",
                 overrides_source: str = "overrides") -> Config:
    """Validate nested `base` (as read from YAML) plus flat `overrides` ({'lora.r': 16, 'epochs': 2}).

    Raises ConfigError listing every problem; those of `base` start with `source`, those of `overrides` with
    `overrides_source` (the command line says "command line").
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
            problems.append(f"{source}: section '{section}' must be a mapping of keys to values, got {content!r}")
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
            problems.append(f"{overrides_source}: {resolved}")
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
    """Every value out of its range, each message with the key, the bad value and what is allowed."""
    l, d, t, g = c.lora, c.data, c.train, c.generate
    checks = [
        (l.r > 0, f"lora.r must be positive, got {l.r!r}"),
        (l.alpha > 0, f"lora.alpha must be positive, got {l.alpha!r}"),
        (0 <= l.dropout < 1, f"lora.dropout must be in [0, 1), got {l.dropout!r}"),
        (d.max_length >= 8, f"data.max_length must be at least 8 tokens, got {d.max_length!r}"),
        (d.max_samples >= 0, f"data.max_samples must be 0 (all) or positive, got {d.max_samples!r}"),
        (d.pack_length >= 0, f"data.pack_length must be 0 (chosen from the data) or positive, got {d.pack_length!r}"),
        (d.pad_to_multiple_of >= 0,
         f"data.pad_to_multiple_of must be 0 (chosen for the device) or positive, got {d.pad_to_multiple_of!r}"),
        (len(d.csv_delimiter) <= 1 or d.csv_delimiter == "tab",
         f"data.csv_delimiter must be empty (detect), one character or 'tab', got {d.csv_delimiter!r}"),
        (t.batch_size > 0, f"train.batch_size must be positive, got {t.batch_size!r}"),
        (t.grad_accum > 0, f"train.grad_accum must be positive, got {t.grad_accum!r}"),
        (t.cpu_micro_batch >= 0, f"train.cpu_micro_batch must be 0 (automatic) or a number of samples, got {t.cpu_micro_batch!r}"),
        (t.global_batch_size >= 0 and (t.batch_size <= 0 or t.global_batch_size % t.batch_size == 0),
         f"train.global_batch_size must be 0 (off) or a multiple of train.batch_size {t.batch_size!r}, got {t.global_batch_size!r}"),
        (t.learning_rate > 0, f"train.learning_rate must be positive, got {t.learning_rate!r}"),
        (t.epochs > 0 or t.max_steps > 0,
         f"train.epochs or train.max_steps must be positive, got epochs {t.epochs!r} and max_steps {t.max_steps!r}"),
        (t.warmup_steps >= 0, f"train.warmup_steps must not be negative, got {t.warmup_steps!r}"),
        (t.checkpoint_minutes >= 0,
         f"train.checkpoint_minutes must be 0 (only when interrupted) or positive, got {t.checkpoint_minutes!r}"),
        (t.keep_checkpoints >= 1, f"train.keep_checkpoints must be at least 1, got {t.keep_checkpoints!r}"),
        (t.weight_decay >= 0, f"train.weight_decay must not be negative, got {t.weight_decay!r}"),
        (t.max_grad_norm >= 0, f"train.max_grad_norm must not be negative (0 = no clipping), got {t.max_grad_norm!r}"),
        (t.logging_steps > 0, f"train.logging_steps must be positive, got {t.logging_steps!r}"),
        # Below 1 a share of the rows, from 1 on a number of rows: 1.5 rows means nothing.
        (d.val_size >= 0 and (d.val_size < 1 or float(d.val_size).is_integer()),
         f"data.val_size must be 0 (none), a share below 1, or a whole number of rows, got {d.val_size!r}"),
        # A larger share trains on fewer rows than it validates on (0.999: one row trained, the rest validated).
        (not 0.5 < d.val_size < 1,
         f"data.val_size {d.val_size!r} holds out most of the data and trains on the rest: validation should be the "
         f"small side; use a share of at most 0.5 (0.1 is usual) or a number of rows"),
        (t.eval_steps >= 0, f"train.eval_steps must not be negative, got {t.eval_steps!r}"),
        (t.early_stopping_patience >= 0, f"train.early_stopping_patience must not be negative, got {t.early_stopping_patience!r}"),
        (t.early_stopping_patience == 0 or d.val_size > 0 or bool(d.eval_paths),
         f"train.early_stopping_patience needs validation data, got {t.early_stopping_patience!r} and none: "
         "set data.val_size or data.eval_paths"),
        (g.max_new_tokens > 0, f"generate.max_new_tokens must be positive, got {g.max_new_tokens!r}"),
        (g.temperature > 0, f"generate.temperature must be positive (use greedy: true for deterministic answers), got {g.temperature!r}"),
        (0 < g.top_p <= 1, f"generate.top_p must be in (0, 1], got {g.top_p!r}"),
        (g.top_k >= 0, f"generate.top_k must be 0 (off) or positive, got {g.top_k!r}"),
        (g.repetition_penalty > 0, f"generate.repetition_penalty must be positive (1.0 = off), got {g.repetition_penalty!r}"),
    ]
    checks += _method_checks(c)
    modes = ("auto", "attention", "all-linear")
    if isinstance(l.target_modules, str) and l.target_modules not in modes:
        close = difflib.get_close_matches(l.target_modules, modes, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        checks.append((False, f"lora.target_modules must be 'auto', 'attention', 'all-linear' or a list of module names, "
                              f"got {l.target_modules!r}{hint}"))
    return [message for ok, message in checks if not ok]


def _method_checks(c: Config) -> list[str]:
    """Training methods that cannot be combined, each message naming both keys."""
    l, t = c.lora, c.train
    checks = [
        (t.neftune_noise_alpha >= 0, f"train.neftune_noise_alpha must be 0 (off) or positive, got {t.neftune_noise_alpha!r}"),
        (t.loraplus_lr_ratio == 0 or t.loraplus_lr_ratio >= 1,
         f"train.loraplus_lr_ratio must be 0 (off) or at least 1, got {t.loraplus_lr_ratio!r}"),
        # PiSSA/OLoRA move part of the base into the adapter; the saved adapter is converted to a plain LoRA on the
        # original base. DoRA's magnitudes are relative to the moved base and have no such conversion.
        (not (l.use_dora and l.init in ("pissa", "olora")),
         f"lora.use_dora cannot be combined with lora.init {l.init!r} (its adapter could not be converted back to "
         f"the original base for merging); use one of them"),
        (not (l.init in ("pissa", "olora") and c.model.quantization != "none"),
         f"lora.init {l.init!r} needs a full-precision base, got model.quantization {c.model.quantization!r}"),
    ]
    return checks + METHOD_RULES.get(t.method, lambda _: [])(c)


def _lora_keys_set(c: Config) -> list[str]:
    l, t = c.lora, c.train
    return [name for name, on in [("lora.use_rslora", l.use_rslora), ("lora.use_dora", l.use_dora),
                                  ("lora.init", l.init != "default"), ("lora.modules_to_save", bool(l.modules_to_save)),
                                  ("train.loraplus_lr_ratio", t.loraplus_lr_ratio > 0)] if on]


def _full_rules(c: Config) -> list[tuple[bool, str]]:
    lora_only = _lora_keys_set(c)
    return [(not lora_only, f"{', '.join(lora_only)} appl{'ies' if len(lora_only) == 1 else 'y'} to LoRA "
                            f"training, but train.method is 'full' (every weight is trained)"),
            (c.model.quantization == "none", f"train.method 'full' trains every weight and cannot use a "
                                             f"quantized base, got model.quantization {c.model.quantization!r}")]


def _preference_rules(c: Config, method: str) -> list[tuple[bool, str]]:
    p = c.preference
    return [(p.beta > 0, f"preference.beta must be positive, got {p.beta!r}"),
            (0 <= p.label_smoothing < 0.5, f"preference.label_smoothing must be in [0, 0.5), got {p.label_smoothing!r}"),
            (not (p.label_smoothing and p.loss_type == "ipo"), "preference.label_smoothing does not apply to loss_type ipo"),
            (p.desirable_weight > 0 and p.undesirable_weight > 0, "preference.desirable_weight and undesirable_weight "
                                                                  "must be positive"),
            # With the adapter switched off a PiSSA/OLoRA model is the residual base, not the model training started from.
            (c.lora.init not in ("pissa", "olora"), f"train.method {method} takes its reference with the adapter switched "
                                                    f"off, which lora.init {c.lora.init!r} moves part of the base into"),
            (c.model.quantization == "none", f"train.method {method} needs a full-precision base, got "
                                             f"model.quantization {c.model.quantization!r}"),
            # Chosen and rejected answers share one forward pass per pair; they are not packed with other pairs.
            (c.data.packing is not True, f"train.method {method} does not pack its pairs; set data.packing to auto or false")]


# train.method -> the settings that method cannot run with, each (holds, message naming both keys). One entry per
# method whose settings conflict with others; the method itself lives in training/methods/.
METHOD_RULES: dict[str, Callable[[Config], list[tuple[bool, str]]]] = {
    "full": _full_rules,
    "dpo": lambda c: _preference_rules(c, "dpo"),
    "orpo": lambda c: _preference_rules(c, "orpo"),
    "kto": lambda c: _preference_rules(c, "kto"),
}


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                overrides_source: str = "overrides") -> Config:
    """Read a YAML config (if given), apply overrides, validate. A problem of an override is reported as
    "overrides: ..." (`overrides_source`; the command line passes "command line")."""
    base = load_yaml(path) if path else {}
    return build_config(base, overrides, source=str(path) if path else "config", overrides_source=overrides_source)
