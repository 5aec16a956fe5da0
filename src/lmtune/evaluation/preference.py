"""`lmtune eval` on preference data (prompt, chosen, rejected): does the model prefer the chosen answers?

For each model (the tuned one and the baseline):
  * chosen preferred %: the share of pairs whose chosen answer the model finds more likely than the rejected one, per
    answer token (so a long rambling rejected answer is not favoured or punished for its length alone);
  * mean margin: the mean of log p(chosen) - log p(rejected) per answer token;
  * greedy answers to the prompts: the share closer (chrF) to the chosen answer than to the rejected one, their chrF
    against the chosen answer, the length against it and the share that ended with EOS.
With a baseline, the tuned model's implicit reward (DPO's: log p_tuned - log p_baseline of an answer) gives the
reward accuracy (the share of pairs whose chosen answer gains more than the rejected one) and the mean reward margin.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..config import GenerateConfig
from ..data.preferences import PreferenceCollator, PreferenceExample, preference_layout, tokenize_preferences
from ..data.readers import iter_records, resolve_paths
from ..inference.generate import Answer
from ..inference.load import LoadedModel
from ..outputs import atomic_output, write_json
from ..training.methods.preference import answer_logps
from . import tables
from .loaded import evaluate_loaded
from .metrics import Scores, score_texts, sentence_chrf
from .progress import answer_all

REPORT_FILE, PREDICTIONS_FILE, MARKDOWN_FILE = "report.json", "predictions.jsonl", "report.md"


def is_preference_data(paths: list[str]) -> bool:
    """Whether the first record of the first file has preference fields (chosen/rejected, or completion/label)."""
    files = resolve_paths(paths)
    for _, record in iter_records(files[0]):
        return isinstance(record, dict) and preference_layout(record) is not None
    return False


@dataclass
class PreferenceEval:
    label: str
    chosen_logps: list[float]  # per answer token
    rejected_logps: list[float]
    chosen_sums: list[float] = field(repr=False)
    rejected_sums: list[float] = field(repr=False)
    answers: list[Answer] = field(repr=False)
    closer_to_chosen: list[bool] = field(repr=False)
    scores: Scores = None
    template: object = field(default=None, repr=False)  # the prompts it was asked with (a baseline gets the same)

    def figures(self) -> dict:
        pairs = list(zip(self.chosen_logps, self.rejected_logps))
        return {"chosen_preferred": 100 * statistics.mean(c > r for c, r in pairs),
                "mean_margin": statistics.mean(c - r for c, r in pairs),
                "closer_to_chosen": 100 * statistics.mean(self.closer_to_chosen),
                "chrf_vs_chosen": self.scores.chrf, "eos_rate": self.scores.eos_rate,
                "length_ratio": self.scores.length_ratio, "n": len(pairs)}


def evaluate_preferences(loaded: LoadedModel, examples: list[PreferenceExample], cfg: GenerateConfig, label: str,
                         batch_size: int = 16, max_length: int = 1024, questions: str = "",
                         progress: bool = True) -> PreferenceEval:
    samples, _ = tokenize_preferences(examples, loaded.tokenizer, loaded.template, max_length)
    collate = PreferenceCollator(loaded.tokenizer)
    sums, counts = [], []
    with torch.no_grad():
        for start in range(0, len(samples), batch_size):
            batch = {k: v.to(loaded.device) for k, v in collate(samples[start : start + batch_size]).items()}
            s, n = answer_logps(loaded.model, batch["input_ids"], batch["attention_mask"], batch["labels"])
            sums.append(s.view(2, -1).T.cpu())
            counts.append(n.view(2, -1).T.cpu())
    sums, counts = torch.cat(sums), torch.cat(counts).clamp(min=1)
    per_token = sums / counts
    answers = answer_all(loaded, [e.prompt for e in examples], cfg, batch_size,
                         f"{label} model" + (f", {questions}" if questions else ""), progress)
    closer = [sentence_chrf(a.text, e.chosen) > sentence_chrf(a.text, e.rejected) for a, e in zip(answers, examples)]
    scores = score_texts([a.text for a in answers], [e.chosen for e in examples], [a.stopped_at_eos for a in answers])
    return PreferenceEval(label, per_token[:, 0].tolist(), per_token[:, 1].tolist(), sums[:, 0].tolist(),
                          sums[:, 1].tolist(), answers, closer, scores)


def _load_and_evaluate(model, adapter, examples, cfg, label, batch_size, template=None, **safety) -> PreferenceEval:
    return evaluate_loaded(model, adapter, lambda loaded: evaluate_preferences(loaded, examples, cfg, label, batch_size),
                           template, **safety)


ROWS = [("chosen preferred %", "chosen_preferred", "{:.1f}"), ("mean margin (per token)", "mean_margin", "{:.3f}"),
        ("answers closer to chosen %", "closer_to_chosen", "{:.1f}"), ("chrF vs chosen", "chrf_vs_chosen", "{:.1f}"),
        ("ended with EOS %", "eos_rate", "{:.1f}"), ("length / chosen", "length_ratio", "{:.2f}")]


def reward_figures(tuned: PreferenceEval, base: PreferenceEval) -> dict:
    """DPO's implicit reward of the tuned model against the baseline as reference (log-probability sums)."""
    chosen = [t - b for t, b in zip(tuned.chosen_sums, base.chosen_sums)]
    rejected = [t - b for t, b in zip(tuned.rejected_sums, base.rejected_sums)]
    return {"reward_accuracy": 100 * statistics.mean(c > r for c, r in zip(chosen, rejected)),
            "reward_margin": statistics.mean(c - r for c, r in zip(chosen, rejected))}


def table_rows(tuned: PreferenceEval, base: PreferenceEval | None) -> list[list[str]]:
    rows = tables.comparison_rows(ROWS, tuned.figures(), base.figures() if base else None)
    if base is not None:
        rewards = reward_figures(tuned, base)
        rows.append(["reward accuracy % (vs base)", f"{rewards['reward_accuracy']:.1f}", "", ""])
        rows.append(["reward margin (vs base)", f"{rewards['reward_margin']:.3f}", "", ""])
    return rows


def format_table(tuned: PreferenceEval, base: PreferenceEval | None) -> str:
    return tables.text_table(f"{len(tuned.chosen_logps)} preference pairs, greedy answers", table_rows(tuned, base),
                             base is not None)


def run_preference_eval(examples: list[PreferenceExample], paths: list[str], output_dir: str, model: str | None,
                        adapter: str | None, baseline: str | None, max_new_tokens: int, batch_size: int,
                        overwrite: bool, log: Callable[[str], None], **safety) -> dict:
    if any(not e.paired for e in examples):
        raise_unpaired(examples)
    cfg = GenerateConfig(max_new_tokens=max_new_tokens, greedy=True, repetition_penalty=1.0)
    tuned = _load_and_evaluate(model, adapter, examples, cfg, "tuned", batch_size, **safety)
    base = (_load_and_evaluate(baseline, None, examples, cfg, "base", batch_size, template=tuned.template, **safety)
            if baseline else None)
    report = {"model": model or adapter, "adapter": adapter, "baseline": baseline, "data": list(paths),
              "n": len(examples), "max_new_tokens": max_new_tokens, "kind": "preference",
              "tuned": tuned.figures(), "base": base.figures() if base else None,
              **({"rewards_vs_base": reward_figures(tuned, base)} if base else {})}
    with atomic_output(output_dir, overwrite) as out:
        write_preference_report(out, examples, tuned, base, report)
    log(format_table(tuned, base))
    log(f"report: {Path(output_dir) / MARKDOWN_FILE}")
    return report


def write_preference_report(out: Path, examples: list[PreferenceExample], tuned: PreferenceEval,
                            base: PreferenceEval | None, report: dict) -> None:
    with open(out / PREDICTIONS_FILE, "w", encoding="utf-8") as f:
        for i, e in enumerate(examples):
            row = {"prompt": e.prompt, "chosen": e.chosen, "rejected": e.rejected, "tuned": _row(tuned, i)}
            if base is not None:
                row["base"] = _row(base, i)
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    write_json(out / REPORT_FILE, report)
    (out / MARKDOWN_FILE).write_text(_markdown(tuned, base, report), encoding="utf-8")


def raise_unpaired(examples: list[PreferenceExample]) -> None:
    from ..errors import DataError

    first = next(e for e in examples if not e.paired)
    raise DataError(f"{first.where}: eval compares a chosen with a rejected answer; unpaired rows (prompt, completion, "
                    "label) have no pair to compare")


def _row(result: PreferenceEval, i: int) -> dict:
    return {"answer": result.answers[i].text, "closer_to_chosen": result.closer_to_chosen[i],
            "logp_chosen_per_token": round(result.chosen_logps[i], 4),
            "logp_rejected_per_token": round(result.rejected_logps[i], 4),
            "stopped_at_eos": result.answers[i].stopped_at_eos}


def _markdown(tuned: PreferenceEval, base: PreferenceEval | None, report: dict) -> str:
    lines = [f"# Preference evaluation of {report['model']}", "",
             f"{report['n']} pairs from {', '.join(report['data'])}; greedy answers, at most "
             f"{report['max_new_tokens']} new tokens.", "", *tables.markdown_table(table_rows(tuned, base), base is not None)]
    lines += ["", f"Per pair: `{PREDICTIONS_FILE}`. Figures: `{REPORT_FILE}`.", ""]
    return "\n".join(lines)
