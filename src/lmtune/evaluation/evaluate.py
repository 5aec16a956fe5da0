"""Evaluate a model on question/answer data, optionally against a baseline, and write a report.

Two kinds of evidence: the answer-token loss (teacher-forced, answer tokens only, so the figure
means "how well does the model know these answers") and greedy generations scored with the
metrics of `metrics.py` (does it say them, and does it stop).
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..config import GenerateConfig
from ..data.collate import Collator
from ..data.preferences import PreferenceExample, load_preferences
from ..data.readers import Example, load_examples
from ..data.source import DataSource
from ..data.template import PromptTemplate
from ..data.tokenize import tokenize_examples
from ..inference.generate import Answer
from ..inference.load import LoadedModel
from ..model import base_model_of_adapter, resolve_source
from ..safeload import check_adapter_weights
from ..outputs import (
    MANIFEST_FILE,
    PLOT_FILE,
    atomic_output,
    check_output_free,
    read_json,
    write_json,
)
from ..training.loss import answer_only_loss, causal_lm_of, supports_answer_only
from ..training.train import TrainResult
from . import tables
from .loaded import evaluate_loaded
from .metrics import Scores, exact_match, rouge_l, score_texts, sentence_chrf
from .preference import evaluate_preferences, is_preference_data, run_preference_eval, write_preference_report
from .preference import format_table as format_preference_table
from .progress import answer_all

REPORT_FILE, PREDICTIONS_FILE, MARKDOWN_FILE = "report.json", "predictions.jsonl", "report.md"


@dataclass
class ModelEval:
    label: str
    answer_loss: float
    scores: Scores
    answers: list[Answer] = field(repr=False)
    template: PromptTemplate | None = field(default=None, repr=False)  # the prompts it was asked with

    @property
    def perplexity(self) -> float:
        return math.exp(self.answer_loss) if self.answer_loss < 50 else float("inf")

    def figures(self) -> dict:
        return {"answer_loss": self.answer_loss, "perplexity": self.perplexity, **self.scores.as_dict()}


def answer_loss(loaded: LoadedModel, examples: list[Example], max_length: int = 1024, batch_size: int = 8) -> float:
    """Mean cross-entropy per answer token (EOS included), teacher-forced; a conversation's last answer only."""
    samples, _ = tokenize_examples(examples, loaded.tokenizer, loaded.template, max_length, last_turn_only=True)
    collate = Collator(loaded.tokenizer)
    lm = causal_lm_of(loaded.model)
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(samples), batch_size):
            batch = {k: v.to(loaded.device) for k, v in collate(samples[start : start + batch_size]).items()}
            n = int((batch["labels"][:, 1:] != -100).sum())
            if supports_answer_only(lm):
                total += float(answer_only_loss(lm, **batch, num_items=1))
            else:
                total += float(loaded.model(**batch).loss) * n
            count += n
    return total / count


def evaluate_model(loaded: LoadedModel, examples: list[Example], cfg: GenerateConfig, label: str,
                   batch_size: int = 16, questions: str = "", progress: bool = True) -> ModelEval:
    """Answer loss plus greedy generations for every question, batched with left padding. With `progress`, a line
    on stderr says how far the answers are ("answering: tuned model, <questions> 24/89 (31 s, 180 tokens/s, ...)")."""
    cfg = GenerateConfig(**{**cfg.__dict__, "greedy": True})
    loss = answer_loss(loaded, examples)
    # A conversation is asked its last question after the earlier turns, as chat would ask it.
    prompts = [e.messages[:-1] if e.messages else loaded.template.user_text(e.question, e.context) for e in examples]
    answers = answer_all(loaded, prompts, cfg, batch_size, f"{label} model" + (f", {questions}" if questions else ""),
                         progress)
    scores = score_texts([a.text for a in answers], [e.answer for e in examples], [a.stopped_at_eos for a in answers])
    return ModelEval(label, loss, scores, answers)


def load_and_evaluate(model: str | None, adapter: str | None, examples: list[Example], cfg: GenerateConfig,
                      label: str, template: PromptTemplate | None = None, batch_size: int = 16,
                      allow_pickle: bool = False, trust_remote_code: bool = False, progress: bool = True,
                      engine: str = "lmtune") -> ModelEval:
    """Load, evaluate, free. A baseline gets the tuned model's `template`, so both see the same prompts."""
    return evaluate_loaded(model, adapter,
                           lambda loaded: evaluate_model(loaded, examples, cfg, label, batch_size, progress=progress),
                           template, engine, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)


ROWS = [("answer loss", "answer_loss", "{:.3f}"), ("perplexity", "perplexity", "{:.2f}"), ("chrF", "chrf", "{:.1f}"),
        ("ROUGE-L (syllables)", "rouge_l", "{:.1f}"), ("exact match %", "exact_match", "{:.1f}"),
        ("ended with EOS %", "eos_rate", "{:.1f}"), ("length / reference", "length_ratio", "{:.2f}")]


def comparison_rows(tuned: ModelEval, base: ModelEval | None) -> list[list[str]]:
    return tables.comparison_rows(ROWS, tuned.figures(), base.figures() if base else None)


def format_table(tuned: ModelEval, base: ModelEval | None, n: int) -> str:
    return tables.text_table(f"{n} questions, greedy", comparison_rows(tuned, base), base is not None)


def _markdown(tuned: ModelEval, base: ModelEval | None, report: dict, has_plot: bool) -> str:
    lines = [f"# Evaluation of {report['model']}", "",
             f"{report['n']} questions from {', '.join(report['data'])}; greedy answers, at most {report['max_new_tokens']} new tokens.",
             "", *tables.markdown_table(comparison_rows(tuned, base), base is not None)]
    if has_plot:
        lines += ["", "## Training loss", "", f"![training loss]({PLOT_FILE})"]
    lines += ["", f"Per question: `{PREDICTIONS_FILE}`. Figures: `{REPORT_FILE}`.", ""]
    return "\n".join(lines)


def _row_scores(answer: Answer, reference: str) -> dict:
    return {"answer": answer.text, "chrf": round(sentence_chrf(answer.text, reference), 2),
            "rouge_l": round(100 * rouge_l(answer.text, reference), 2), "exact_match": exact_match(answer.text, reference),
            "stopped_at_eos": answer.stopped_at_eos}


def write_report(out: Path, examples: list[Example], tuned: ModelEval, base: ModelEval | None, report: dict,
                 loss_plot: Path | None) -> None:
    with open(out / PREDICTIONS_FILE, "w", encoding="utf-8") as f:
        for i, e in enumerate(examples):
            row = {"question": e.question, "reference": e.answer, "tuned": _row_scores(tuned.answers[i], e.answer)}
            if base is not None:
                row["base"] = _row_scores(base.answers[i], e.answer)
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    if loss_plot is not None:
        shutil.copy2(loss_plot, out / PLOT_FILE)
    write_json(out / REPORT_FILE, report)
    (out / MARKDOWN_FILE).write_text(_markdown(tuned, base, report, loss_plot is not None), encoding="utf-8")


def _loss_plot_of(model: str | None, adapter: str | None) -> Path | None:
    for folder in (adapter, model):
        if folder and (Path(folder) / PLOT_FILE).is_file():
            return Path(folder) / PLOT_FILE
    return None


def check_models(model: str | None, adapter: str | None, baseline: str | None, allow_pickle: bool = False) -> None:
    """Every model eval will load, found before the first answer: a baseline that is a hub id out of reach (or a
    folder that is not there) must not wait until the tuned model has answered every question. The same quick
    checks `load_for_inference` makes first (resolve_source: folder, .gguf, pypi:, or the Hub reachable)."""
    base = base_model_of_adapter(adapter) if adapter else None  # says so when the folder is no adapter
    if adapter:
        check_adapter_weights(adapter, allow_pickle)
    resolve_source(model or base)
    if baseline:
        resolve_source(baseline)


def run_eval(data: DataSource | list[str], output_dir: str, model: str | None = None, adapter: str | None = None,
             baseline: str | None = None, max_new_tokens: int = 256, batch_size: int = 16, overwrite: bool = False,
             log: Callable[[str], None] = print, allow_pickle: bool = False, trust_remote_code: bool = False,
             engine: str = "lmtune") -> dict:
    """The `lmtune eval` command as a function: evaluate `data` (a DataSource, or paths read with every setting
    detected), compare with `baseline`, write the report folder. The prompts are the tuned model's own template.
    `engine` "llama.cpp" answers question/answer data through llama.cpp (preference data is scored by lmtune)."""
    source = DataSource.of(data)
    check_output_free(output_dir, overwrite)
    safety = {"allow_pickle": allow_pickle, "trust_remote_code": trust_remote_code}
    if is_preference_data(list(source.paths)):  # prompt, chosen, rejected: evaluation/preference.py
        pairs, _ = load_preferences(source.paths, source.max_samples, source.csv_delimiter)
        check_models(model, adapter, baseline, allow_pickle)
        return run_preference_eval(pairs, list(source.paths), output_dir, model, adapter, baseline, max_new_tokens,
                                   batch_size, overwrite, log, **safety)
    examples, _ = load_examples(source)
    check_models(model, adapter, baseline, allow_pickle)
    cfg = GenerateConfig(max_new_tokens=max_new_tokens, greedy=True, repetition_penalty=1.0)
    tuned = load_and_evaluate(model, adapter, examples, cfg, "tuned", batch_size=batch_size, engine=engine, **safety)
    base = (load_and_evaluate(baseline, None, examples, cfg, "base", template=tuned.template, batch_size=batch_size,
                              engine=engine, **safety)
            if baseline else None)
    report = {"model": model or adapter, "adapter": adapter, "baseline": baseline, "data": list(source.paths), "n": len(examples),
              "engine": engine, "max_new_tokens": max_new_tokens, "tuned": tuned.figures(), "base": base.figures() if base else None}
    if base:
        report["difference"] = {k: tuned.figures()[k] - base.figures()[k] for k in tuned.figures() if k != "n"}
    with atomic_output(output_dir, overwrite) as out:
        write_report(out, examples, tuned, base, report, _loss_plot_of(model, adapter))
    log(format_table(tuned, base, len(examples)))
    log(f"report: {Path(output_dir) / MARKDOWN_FILE}")
    return report


VALIDATION_REPORT_QUESTIONS = 200  # generation is the slow part of evaluation; a sample this size is enough to compare runs


def validation_report(result: TrainResult, generate: GenerateConfig, batch_size: int = 8,
                      log: Callable[[str], None] = print) -> dict | None:
    """After a run with validation data: greedy answers to the validation questions, scored, written to
    <adapter>/eval/ (report.md, predictions.jsonl) and into the adapter's manifest. None when there is nothing to do.

    Run by the callers of `train()` (the CLI, the quickstart), not by training itself, so training never depends
    on inference or evaluation; the trained model is used as it is in memory, not loaded again.
    """
    if not result.val_examples or result.model is None:
        return None
    out = Path(result.output_dir)
    if result.sharded_engine:  # generating needs every shard, and the other processes have stopped
        log(f"validation: no generation report under {result.sharded_engine}; run `lmtune eval --adapter {out}` for one")
        return None
    examples = result.val_examples[:VALIDATION_REPORT_QUESTIONS]
    loaded = LoadedModel(result.model.eval(), result.tokenizer, result.template, result.device, result.compute_dtype)
    if isinstance(examples[0], PreferenceExample):  # validation pairs of a preference method
        tuned = evaluate_preferences(loaded, examples, GenerateConfig(**{**generate.__dict__, "greedy": True}), "tuned",
                                     batch_size=max(batch_size, 8), questions="validation prompts")
        figures = {"model": str(out), "data": ["validation split"], "n": len(examples), "kind": "preference",
                   "max_new_tokens": generate.max_new_tokens, "tuned": tuned.figures(), "base": None}
        with atomic_output(out / "eval", overwrite=True) as folder:
            write_preference_report(folder, examples, tuned, None, figures)
        table = format_preference_table(tuned, None)
    else:
        tuned = evaluate_model(loaded, examples, generate, "tuned", batch_size=max(batch_size, 8),
                               questions="validation questions")
        figures = {"model": str(out), "data": ["validation split"], "n": len(examples),
                   "max_new_tokens": generate.max_new_tokens, "tuned": tuned.figures(), "base": None}
        with atomic_output(out / "eval", overwrite=True) as folder:
            write_report(folder, examples, tuned, None, figures, out / PLOT_FILE)
        table = format_table(tuned, None, len(examples))
    manifest = read_json(out / MANIFEST_FILE)
    manifest.setdefault("validation", {})["report"] = {"n": len(examples), **tuned.figures()}
    write_json(out / MANIFEST_FILE, manifest)
    log(f"validation: {table}")
    return manifest["validation"]["report"]
