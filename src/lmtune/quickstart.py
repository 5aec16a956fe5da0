"""The README's main job: fine-tune on the bundled Vietnamese data, merge, and compare base vs tuned.

Everything here is a plain use of the library (train, merge, generate, score), so it doubles as
an end-to-end example.
"""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path

from tqdm import tqdm

from .bundled import HELDOUT_DATA, TRAIN_DATA, bundled_path
from .config import Config, GenerateConfig
from .data import load_examples
from .evaluate import Scores, score
from .generate import Answer, generate_batch, load_for_inference
from .merge import merge
from .outputs import write_json
from .train import train

DEMO_COUNT = 4
EVAL_BATCH = 24


def _answers(model: str, questions: list[str], cfg: GenerateConfig, label: str) -> list[Answer]:
    loaded = load_for_inference(model)
    answers: list[Answer] = []
    for start in tqdm(range(0, len(questions), EVAL_BATCH), desc=f"answering with the {label} model", unit="batch"):
        answers += generate_batch(loaded, questions[start : start + EVAL_BATCH], cfg, batch_size=EVAL_BATCH)
    del loaded
    gc.collect()
    return answers


def _one_line(text: str, limit: int = 300) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _heldout_for(trained_questions: set[str]) -> list[dict]:
    path = bundled_path(HELDOUT_DATA)
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in rows if r["source_question"] in trained_questions]


def run_quickstart(config: Config, explicit_output_dir: bool = False) -> dict:
    started = time.perf_counter()
    if not config.data.paths:
        config.data.paths = [str(bundled_path(TRAIN_DATA))]
    if not explicit_output_dir or not config.train.output_dir:
        config.train.output_dir = f"runs/quickstart-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(config.train.output_dir)
    adapter_dir, merged_dir = run_dir / "adapter", run_dir / "merged"
    base_model = config.model.name_or_path
    config.train.output_dir = str(adapter_dir)

    print(f"== lmtune quickstart: {base_model} on {', '.join(config.data.paths)} -> {run_dir}")
    result = train(config)
    merge(str(adapter_dir), str(merged_dir))

    examples, _ = load_examples(config.data.paths, config.data.question_field, config.data.answer_field,
                                config.data.context_field, config.data.max_samples)
    heldout = _heldout_for({e.question for e in examples})
    questions = [e.question for e in examples] + [r["question"] for r in heldout]
    references = [e.answer for e in examples] + [r["answer"] for r in heldout]
    n_train = len(examples)

    eval_cfg = GenerateConfig(**{**config.generate.__dict__, "greedy": True})
    base_answers = _answers(base_model, questions, eval_cfg, "base")
    tuned_answers = _answers(str(merged_dir), questions, eval_cfg, "tuned")

    report = {"base_model": base_model, "run_dir": str(run_dir), "final_train_loss": result.final_loss,
              "train_seconds": round(result.seconds, 1), "max_new_tokens": eval_cfg.max_new_tokens}
    table: list[tuple[str, Scores, Scores]] = []
    for key, name, sl in (("training_questions", "training questions", slice(0, n_train)),
                          ("heldout_questions", "reworded held-out questions", slice(n_train, None))):
        if not references[sl]:
            continue
        base_s, tuned_s = score(base_answers[sl], references[sl]), score(tuned_answers[sl], references[sl])
        table.append((name, base_s, tuned_s))
        report[key] = {"base": base_s.__dict__, "tuned": tuned_s.__dict__}

    print("\n== answers, side by side (greedy)")
    demo = list(range(n_train, len(questions)))[: DEMO_COUNT // 2] + list(range(DEMO_COUNT // 2))
    for i in demo:
        print(f"\nQ: {questions[i]}")
        print(f"  reference: {references[i]}")
        print(f"  base:      {_one_line(base_answers[i].text)}")
        print(f"  tuned:     {_one_line(tuned_answers[i].text)}")

    print("\n== scores (chrF vs reference answers; EOS = answer ended before the token limit)")
    for name, base_s, tuned_s in table:
        print(f"{name}:\n  base  {base_s.row()}\n  tuned {tuned_s.row()}")
    report["seconds_total"] = round(time.perf_counter() - started, 1)
    rows = [{"question": q, "reference": r, "base": b.text, "tuned": t.text, "tuned_stopped_at_eos": t.stopped_at_eos}
            for q, r, b, t in zip(questions, references, base_answers, tuned_answers)]
    (run_dir / "predictions.jsonl").write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in rows), encoding="utf-8")
    write_json(run_dir / "quickstart_report.json", report)
    print(f"\nadapter: {adapter_dir}\nmerged model: {merged_dir}\nreport: {run_dir / 'quickstart_report.json'}"
          f"\ntotal time {report['seconds_total']:.0f} s")
    print(f'try: lmtune generate --model {merged_dir} --greedy --prompt "Học máy là gì?"')
    return report
