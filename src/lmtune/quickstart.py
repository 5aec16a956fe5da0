"""The README's main job: fine-tune on the bundled Vietnamese data, merge, and compare base vs tuned.

Everything here is a plain use of the library (train, merge, generate, score), so it doubles as
an end-to-end example.
"""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path

from dataclasses import replace

from .bundled import (
    EXTRA_REWORDINGS_DATA,
    HELDOUT_DATA,
    KTO_DATA,
    PREFERENCE_DATA,
    PREFERENCE_HELDOUT_DATA,
    REWORDINGS_DATA,
    TRAIN_DATA,
    bundled_path,
)
from .config import Config, GenerateConfig
from .data.readers import Example, load_examples
from .data.source import DataSource
from .evaluation.evaluate import (
    ModelEval,
    evaluate_model,
    format_table,
    validation_report,
    write_report,
)
from .export.merge import merge
from .inference.load import load_for_inference
from .outputs import PLOT_FILE, write_json
from .training.train import train

DEMO_COUNT = 4
TRAINING_QUESTIONS_ASKED = 48  # a fixed, evenly spaced sample: generation is the slow part of the evaluation
# The bundled pairs the quickstart trains (data.max_samples, when set, counts them instead): 30 held-out questions
# make its figure for reworded questions more than noise, and 30 pairs in all their phrasings train within minutes.
QUICKSTART_PAIRS = 30
EVAL_BATCH = 32  # each question set of the quickstart (30 questions) in one batch: a second, short batch costs as many steps


def _evaluate(model: str, sets: dict[str, list[Example]], cfg: GenerateConfig, label: str, template=None,
              safety: dict | None = None) -> dict[str, ModelEval]:
    """Load once, evaluate every question set, free the memory."""
    loaded = load_for_inference(model, **(safety or {}))
    if template is not None:
        loaded.template = template  # the base model is asked with exactly the prompts the tuned one saw
    results = {name: evaluate_model(loaded, examples, cfg, label, EVAL_BATCH, questions=name)
               for name, examples in sets.items()}
    for r in results.values():
        r.template = loaded.template
    del loaded
    gc.collect()
    return results


def _one_line(text: str, limit: int = 300) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def evenly_spaced(items: list, count: int) -> list:
    """`count` different items spread evenly from first to last (all of them where there are no more)."""
    count = min(len(items), count)
    return [items[i * len(items) // count] for i in range(count)]


def _heldout_for(trained_questions: set[str]) -> list[dict]:
    return [r for r in _read_jsonl(HELDOUT_DATA) if r["source_question"] in trained_questions]


def _read_jsonl(relative: str) -> list[dict]:
    text = bundled_path(relative).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def write_training_files(folder: Path, pairs: int) -> list[str]:
    """The quickstart's training data: the first `pairs` bundled pairs that have a reworded held-out question (all of
    them when 0), then every team-written rewording of their questions, in two files under `folder`.

    Why these: a fact seen in several phrasings is what lets a model answer it asked in new words, and these pairs'
    held-out questions measure exactly that, so the evaluation asks as many reworded questions as there are pairs."""
    with_heldout = {row["source_question"] for row in _read_jsonl(HELDOUT_DATA)}
    chosen = [row for row in _read_jsonl(TRAIN_DATA) if row["question"] in with_heldout]
    chosen = chosen[:pairs] if pairs else chosen
    questions = {row["question"] for row in chosen}
    rewordings = [{"question": row["question"], "answer": row["answer"]}
                  for relative in (REWORDINGS_DATA, EXTRA_REWORDINGS_DATA) for row in _read_jsonl(relative)
                  if row["source_question"] in questions]
    folder.mkdir(parents=True, exist_ok=True)
    files = [folder / "pairs.jsonl", folder / "rewordings.jsonl"]
    for path, rows in zip(files, (chosen, rewordings)):
        path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return [str(path) for path in files]


def run_quickstart(config: Config, explicit_output_dir: bool = False) -> dict:
    if config.train.method in PREFERENCE_METHODS:
        return run_preference_quickstart(config, explicit_output_dir)
    started = time.perf_counter()
    if not explicit_output_dir or not config.train.output_dir:
        config.train.output_dir = f"runs/quickstart-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(config.train.output_dir)
    if not config.data.paths:  # the bundled data: data.max_samples counts pairs, each trained in all its phrasings
        config.data.paths = write_training_files(run_dir / "data", config.data.max_samples or QUICKSTART_PAIRS)
        config.data.max_samples = 0
    adapter_dir, merged_dir = run_dir / "adapter", run_dir / "merged"
    base_model = config.model.name_or_path
    config.train.output_dir = str(adapter_dir)

    print(f"== lmtune quickstart: {base_model} on {', '.join(config.data.paths)} -> {run_dir}")
    result = train(config)
    validation_report(result, config.generate, config.train.batch_size)
    safety = {"allow_pickle": config.model.allow_pickle, "trust_remote_code": config.model.trust_remote_code}
    merge(str(adapter_dir), str(merged_dir), **safety)

    # The pairs as the data file states them (the first file: rewordings repeat its answers in other words).
    examples, _ = load_examples(DataSource.from_config(config.data, paths=config.data.paths[:1]))
    sets = {"training questions": evenly_spaced(examples, TRAINING_QUESTIONS_ASKED)}
    heldout = [Example(r["question"], r["answer"]) for r in _heldout_for({e.question for e in examples})]
    if heldout:
        sets["reworded held-out questions"] = heldout

    eval_cfg = GenerateConfig(**{**config.generate.__dict__, "greedy": True, "repetition_penalty": 1.0})
    print(f"\n== evaluation: greedy answers to {' and '.join(f'{len(v)} {k}' for k, v in sets.items())}, "
          "by the tuned model, then by the base model")
    tuned = _evaluate(str(merged_dir), sets, eval_cfg, "tuned", safety=safety)
    base = _evaluate(base_model, sets, eval_cfg, "base", template=tuned["training questions"].template, safety=safety)

    print("\n== answers, side by side (greedy)")
    demo = [("reworded held-out questions", i) for i in range(min(DEMO_COUNT // 2, len(heldout)))]
    demo += [("training questions", i) for i in range(DEMO_COUNT - len(demo))]
    for name, i in demo:
        print(f"\nQ: {sets[name][i].question}")
        print(f"  reference: {sets[name][i].answer}")
        print(f"  base:      {_one_line(base[name].answers[i].text)}")
        print(f"  tuned:     {_one_line(tuned[name].answers[i].text)}")

    report = {"base_model": base_model, "run_dir": str(run_dir), "final_train_loss": result.final_loss,
              "train_seconds": round(result.seconds, 1), "max_new_tokens": eval_cfg.max_new_tokens}
    for name, examples_of_set in sets.items():
        key = "training_questions" if name == "training questions" else "heldout_questions"
        folder = run_dir / f"eval-{key.split('_')[0]}"
        folder.mkdir()
        figures = {"model": str(merged_dir), "baseline": base_model, "data": [name], "n": len(examples_of_set),
                   "max_new_tokens": eval_cfg.max_new_tokens, "tuned": tuned[name].figures(), "base": base[name].figures()}
        write_report(folder, examples_of_set, tuned[name], base[name], figures, adapter_dir / PLOT_FILE)
        report[key] = {"tuned": tuned[name].figures(), "base": base[name].figures(), "report": str(folder / "report.md")}
        print(f"\n== {name}: {format_table(tuned[name], base[name], len(examples_of_set))}")
    report["seconds_total"] = round(time.perf_counter() - started, 1)
    write_json(run_dir / "quickstart_report.json", report)
    print(f"\nadapter: {adapter_dir}\nmerged model: {merged_dir}\nreport: {run_dir / 'quickstart_report.json'}"
          f"\ntotal time {report['seconds_total']:.0f} s")
    print(f'try: lmtune generate --model {merged_dir} --greedy --prompt "Học máy là gì?"')
    return report


# ---------------------------------------------------------------- quickstart --method dpo | orpo | kto

PREFERENCE_METHODS = ("dpo", "orpo", "kto")
# The preference stage after the quickstart's SFT stage: LoRA keeps training the SFT adapter on the bundled pairs. A
# learning rate well below SFT's (DPO moves a model that already answers; TRL's default for full fine-tuning is 1e-6,
# LoRA takes more), one pass over the pairs.
PREFERENCE_STAGE = {"epochs": 1.0, "learning_rate": 1e-4, "warmup_steps": 5, "max_steps": -1}
PREFERENCE_PAIRS = 240  # of the bundled training pairs (all 312 cost a third more time)
# The SFT stage before it: the first 48 bundled pairs as written, 12 epochs, whatever the config file says (they reach
# chrF >= 95 on those pairs; the preference figures in docs/performance.md were measured after it). Not the plain
# quickstart's recipe, which trains each pair in all its phrasings to answer reworded questions at twice this time.
PREFERENCE_SFT_STAGE = {"epochs": 12.0}
PREFERENCE_SFT_ROWS = 48


def run_preference_quickstart(config: Config, explicit_output_dir: bool = False) -> dict:
    """SFT on the bundled pairs (as the plain quickstart trains), then the preference method from that adapter on the
    bundled preference pairs; both models merged and compared on the held-out preference pairs."""
    from .evaluation.preference import run_preference_eval
    from .data.preferences import load_preferences

    started = time.perf_counter()
    method = config.train.method
    if not explicit_output_dir or not config.train.output_dir:
        config.train.output_dir = f"runs/quickstart-{method}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(config.train.output_dir)
    sft_dir, adapter_dir = run_dir / "sft-adapter", run_dir / "adapter"
    safety = {"allow_pickle": config.model.allow_pickle, "trust_remote_code": config.model.trust_remote_code}
    preference_paths = config.data.paths or [str(bundled_path(KTO_DATA if method == "kto" else PREFERENCE_DATA))]

    sft = replace(config, data=replace(config.data, paths=[str(bundled_path(TRAIN_DATA))],
                                       max_samples=PREFERENCE_SFT_ROWS),
                  train=replace(config.train, **PREFERENCE_SFT_STAGE, method="lora", output_dir=str(sft_dir)))
    print(f"== lmtune quickstart --method {method}: 1. SFT of {config.model.name_or_path} on the bundled pairs -> {sft_dir}")
    sft_result = train(sft)
    stage = PREFERENCE_STAGE
    preference = replace(config, data=replace(config.data, paths=preference_paths,
                                              max_samples=0 if config.data.paths else PREFERENCE_PAIRS),
                         train=replace(config.train, **stage, output_dir=str(adapter_dir), init_adapter=str(sft_dir)))
    print(f"\n== 2. {method.upper()} from the SFT adapter on {', '.join(preference_paths)} -> {adapter_dir}")
    result = train(preference)
    merge(str(sft_dir), str(run_dir / "sft-merged"), **safety)
    merge(str(adapter_dir), str(run_dir / "merged"), **safety)

    heldout = str(bundled_path(PREFERENCE_HELDOUT_DATA))
    pairs, _ = load_preferences([heldout])
    print(f"\n== 3. {len(pairs)} held-out preference pairs: the {method.upper()} model (tuned) against the SFT model (base)")
    report = run_preference_eval(pairs, [heldout], str(run_dir / "eval-preferences"), str(run_dir / "merged"), None,
                                 str(run_dir / "sft-merged"), config.generate.max_new_tokens, EVAL_BATCH, False, print,
                                 **safety)
    summary = {"base_model": config.model.name_or_path, "method": method, "run_dir": str(run_dir),
               "sft_train_seconds": round(sft_result.seconds, 1), "preference_train_seconds": round(result.seconds, 1),
               "preference_final_loss": result.final_loss, "heldout": report,
               "seconds_total": round(time.perf_counter() - started, 1)}
    write_json(run_dir / "quickstart_report.json", summary)
    print(f"\nadapter: {adapter_dir}\nmerged model: {run_dir / 'merged'}\nreport: {run_dir / 'quickstart_report.json'}"
          f"\ntotal time {summary['seconds_total']:.0f} s")
    return summary
