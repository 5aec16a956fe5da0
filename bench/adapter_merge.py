"""Answering with an adapter: merged into the weights on load (what load_for_inference does) against peft's
unmerged LoRA layers, alternating, in one run.

    .venv/bin/python bench/adapter_merge.py --adapter runs/quickstart-<time>/adapter [--rounds 4]

Both ways load the same adapter as `load_for_inference` does by default (its precision: bf16 on a CPU with native
bf16, fp32 elsewhere): merged, as `load_for_inference` returns it, and unmerged (the base loaded the same way with
peft's LoRA layers attached: each linear layer a base matmul plus two small ones). Per round and way: one greedy answer to one question, single
stream through the eager loop (tokens/s), and a batch of the first 24 held-out questions decoded for 48 steps
(the evaluation shape, tokens/s). Prints the medians and `adapter_merge single_speedup=... batch_speedup=...`.

Results, with the CPU and date: docs/performance.md ("An adapter merged on load").
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

from lmtune.config import GenerateConfig
from lmtune.inference.batching import run_batch
from lmtune.inference.chat import answer_row
from lmtune.decoding import decode, greedy
from lmtune.inference.load import inference_autocast, load_for_inference, padding_id
from lmtune.model import apply_adapter, base_model_of_adapter, configure_cpu_threads

REPO = Path(__file__).resolve().parent.parent


def single(loaded, question: str, tokens: int) -> tuple[float, str]:
    prompt = loaded.template.prompt_ids(loaded.tokenizer, question)
    row = answer_row(GenerateConfig(greedy=True, max_new_tokens=tokens), prompt, tokens, lambda text: None)
    start = time.perf_counter()
    run_batch(loaded, [row])
    return len(row.ids) / (time.perf_counter() - start), row.text


def batch(loaded, questions: list[str], steps: int) -> float:
    prompts = [loaded.template.prompt_ids(loaded.tokenizer, q) for q in questions]
    start = time.perf_counter()
    with inference_autocast(loaded):
        decode(loaded.model, prompts, padding_id(loaded.tokenizer), steps, greedy, lambda t: [False] * len(t),
               loaded.device)
    return len(prompts) * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", required=True, help="an adapter folder (a quickstart run's adapter/)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=120, help="new tokens of the single answer")
    args = parser.parse_args()
    configure_cpu_threads()
    merged = load_for_inference(adapter=args.adapter)
    # The unmerged way: the base loaded the same way, the adapter's LoRA layers attached as peft does, the adapter's
    # tokenizer and template.
    base_name = base_model_of_adapter(args.adapter)
    base = load_for_inference(base_name)
    unmerged = replace(merged, model=apply_adapter(base.model, args.adapter, base_name).eval())
    print(f"precision: {merged.compute_dtype}", flush=True)
    rows = [json.loads(line) for line in (REPO / "data" / "vi_ai_qa_heldout.jsonl").read_text(encoding="utf-8").splitlines()
            if line.strip()][:24]
    questions = [r["question"] for r in rows]
    results: dict[str, list[tuple[float, float]]] = {"merged": [], "unmerged": []}
    texts = {}
    for round_index in range(args.rounds):
        ways = [("merged", merged), ("unmerged", unmerged)]
        for name, loaded in ways if round_index % 2 == 0 else ways[::-1]:
            one, texts[name] = single(loaded, "Học máy là gì?", args.tokens)
            many = batch(loaded, questions, 48)
            results[name].append((one, many))
            print(f"round {round_index + 1} {name:8s}: one answer {one:5.1f} tokens/s, batch of 24 {many:6.1f} tokens/s",
                  flush=True)
    med = {name: (statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs)) for name, rs in results.items()}
    print(f"greedy answers the same: {texts['merged'] == texts['unmerged']}")
    print(f"adapter_merge single_speedup={med['merged'][0] / med['unmerged'][0]:.2f} "
          f"batch_speedup={med['merged'][1] / med['unmerged'][1]:.2f}")


if __name__ == "__main__":
    main()
