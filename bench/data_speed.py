"""Rows per second of `lmtune data inspect` and `lmtune data clean` on 100,000 rows.

The file is built by repeating ../shared/data/vi_alpaca_sample.jsonl (1,000 real rows) and
perturbing each copy the way real data is noisy: most rows get a distinct suffix, some are exact
or near duplicates (other case, other punctuation), some are decomposed (NFD), carry zero-width
spaces or untidy whitespace, a few have empty answers. Reading alone (the reader training uses)
is timed too, so the cost of the checks themselves shows as a ratio. No tokenizer statistics.

    python bench/data_speed.py [--rows 100000]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
import unicodedata
from pathlib import Path

from lmtune.data.clean import clean_data
from lmtune.data.inspect import inspect_data
from lmtune.data.readers import iter_rows

SAMPLE = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "vi_alpaca_sample.jsonl"
LIMIT_SECONDS = 30.0


def perturb(row: dict, copy: int, rng: random.Random) -> dict:
    question, answer = row["prompt"], row["response"]
    roll = rng.random()
    if roll < 0.05:
        return dict(row)  # exact duplicate of the original
    if roll < 0.08:
        return {"prompt": question.upper().rstrip("?.") + " ?", "response": answer}  # near duplicate
    question = f"{question} (#{copy})"
    if roll < 0.10:
        question = unicodedata.normalize("NFD", question)
    elif roll < 0.12:
        answer = answer.replace(" ", " \u200b", 3)
    elif roll < 0.14:
        answer = "  " + answer.replace(" ", "   ", 5) + " \r\n"
    elif roll < 0.145:
        answer = "   "
    return {"prompt": question, "response": answer}


def build(path: Path, rows: int) -> None:
    base = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines() if line.strip()]
    rng = random.Random(0)
    with open(path, "w", encoding="utf-8") as f:
        for index in range(rows):
            row = perturb(base[index % len(base)], index // len(base), rng)
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def timed(label: str, rows: int, fn) -> float:
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    verdict = "ok" if seconds <= LIMIT_SECONDS else f"OVER the {LIMIT_SECONDS:.0f} s target"
    print(f"{label:<8} {rows:,} rows in {seconds:6.2f} s = {rows / seconds:10,.0f} rows/s  ({verdict})")
    return seconds, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    args = parser.parse_args()
    if not SAMPLE.is_file():
        print(f"{SAMPLE} not found: the benchmark needs ../shared/data beside the checkout", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "big.jsonl"
        build(data, args.rows)
        print(f"{data.stat().st_size / 1e6:.1f} MB, {args.rows:,} rows built from {SAMPLE.name}")
        read_s, _ = timed("read", args.rows, lambda: sum(1 for _ in iter_rows([str(data)])))
        inspect_s, report = timed("inspect", args.rows, lambda: inspect_data([str(data)]))
        clean_s, cleaned = timed("clean", args.rows, lambda: clean_data([str(data)], str(Path(tmp) / "out.jsonl")))
    print(f"inspect takes {inspect_s / read_s:.1f}x and clean {clean_s / read_s:.1f}x the time of reading alone")
    found = {name: f.count for name, f in report.findings.items() if f.count}
    print(f"inspect found: {found}")
    print(f"clean kept {cleaned.kept:,}, dropped {dict(cleaned.dropped)}")
    return 0 if max(inspect_s, clean_s) <= LIMIT_SECONDS else 1


if __name__ == "__main__":
    sys.exit(main())
