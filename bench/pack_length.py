"""Packed rows of chosen lengths against lmtune's padded micro-batches, and the matmul rate by row count.

    .venv/bin/python bench/pack_length.py --shape llama-3.2-1b --lengths 384,1152
    .venv/bin/python bench/pack_length.py --matmul-rows --hidden 2048 --intermediate 8192

Two questions a padding-free layout has to answer on a CPU:

  --lengths      does a packed row of this length beat padded micro-batches on a shape of bench/train_shapes.py?
                 (`data.packing` picks its length from a table; this forces one.) The same 16 samples per optimizer
                 step, packed rows one per micro-batch, against lmtune's default path; alternating rounds, order
                 reversed every round, 4 optimizer steps per run (the first, with the compile, not timed).
                 Prints each row's packing efficiency and `packed_<length>_speedup=<padded time / packed time>`.
  --matmul-rows  how fast the frozen weights' matmuls run for a given number of rows (tokens in a micro-batch):
                 [rows, hidden] x [hidden, intermediate], [rows, intermediate] x [intermediate, hidden] and [rows,
                 hidden] x [hidden, hidden], in the precision lmtune trains in, 5 passes over every row count
                 (order reversed every pass). Prints the median GFLOP/s per row count.

Results, with the CPU and date of each run: docs/performance.md ("Packed rows").
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_info import describe as cpu_label  # noqa: E402
from train_shapes import SHAPES, run_lmtune, shape_names, tokenizer_for  # noqa: E402
from train_speed import N_SAMPLES, REPO, bpe_tokenizer, read_pairs, seconds_per_step  # noqa: E402

ROWS = (256, 272, 288, 320, 352, 384, 512, 544, 576, 1024, 1088)


def compare_lengths(shape_name: str, lengths: list[int], rounds: int, steps: int) -> None:
    import transformers

    import lmtune.data.packing as packing

    transformers.logging.set_verbosity_error()
    pairs = read_pairs(REPO / "data" / "vi_ai_qa.jsonl")[:N_SAMPLES]
    shape = SHAPES[shape_name]
    tok = tokenizer_for(shape, bpe_tokenizer())
    chosen = packing.pack_length
    ways: list[str | int] = ["padded", *lengths]
    times: dict[str | int, list[float]] = {w: [] for w in ways}
    for r in range(rounds):
        for way in ways if r % 2 == 0 else ways[::-1]:
            with tempfile.TemporaryDirectory(prefix="lmtune-pack-length-") as scratch:
                if way == "padded":
                    timer, *_ = run_lmtune(shape, tok, pairs, steps, "auto", scratch)
                    seconds = seconds_per_step(timer, shape.grad_accum, full_steps=True)
                else:
                    # run_lmtune asks data/packing.py for the length; force this one.
                    packing.pack_length = lambda *args, _length=way, **kwargs: _length
                    try:
                        timer, _, report, _ = run_lmtune(shape, tok, pairs, steps, "auto", scratch, packed=True)
                    finally:
                        packing.pack_length = chosen
                    seconds = seconds_per_step(timer, 1, full_steps=True)
                    if r == 0:
                        print(f"  {shape_name} {report.packing.describe()}", flush=True)
            times[way].append(seconds)
            print(f"  {shape_name} round {r + 1} {str(way):>7}: {seconds:.2f} s per optimizer step", flush=True)
    padded = statistics.median(times["padded"])
    for length in lengths:
        print(f"shape={shape_name} packed_{length}_speedup={padded / statistics.median(times[length]):.3f}"
              f" cpu=\"{cpu_label()}\"", flush=True)


def matmul_rows(hidden: int, intermediate: int, dtype: torch.dtype, passes: int = 5) -> None:
    torch.manual_seed(0)
    shapes = [(hidden, intermediate), (intermediate, hidden), (hidden, hidden)]
    weights = {s: torch.randn(*s, dtype=dtype) for s in shapes}
    inputs = {(m, k): torch.randn(m, k, dtype=dtype) for m in ROWS for k in (hidden, intermediate)}
    rates: dict[int, list[float]] = {m: [] for m in ROWS}
    for p in range(passes):
        for m in ROWS if p % 2 == 0 else ROWS[::-1]:
            flops, start = 0, time.perf_counter()
            for k, n in shapes:
                a, b = inputs[(m, k)], weights[(k, n)]
                for _ in range(max(2, int(2e10 / (2 * m * k * n)))):
                    a @ b
                    flops += 2 * m * k * n
            rates[m].append(flops / (time.perf_counter() - start) / 1e9)
    for m in ROWS:
        print(f"rows={m} gflops={statistics.median(rates[m]):.0f} passes=" + ",".join(f"{x:.0f}" for x in rates[m]),
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="llama-3.2-1b", help=f"one of: {', '.join(SHAPES)}")
    parser.add_argument("--lengths", default="384,1152", help="comma-separated packed row lengths")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per run, the first not timed")
    parser.add_argument("--matmul-rows", action="store_true", help="only the matmul rate by row count")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=8192)
    args = parser.parse_args()
    from lmtune.model import choose_precision

    dtype = choose_precision("cpu", "auto").compute_dtype
    print(f"{cpu_label()}; torch {torch.__version__}, {torch.get_num_threads()} threads, {dtype}", flush=True)
    if args.matmul_rows:
        matmul_rows(args.hidden, args.intermediate, dtype)
        return
    try:
        lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    except ValueError:
        parser.error(f"--lengths takes whole numbers separated by commas, not {args.lengths!r}")
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first step is not timed)")
    compare_lengths(shape_names(parser, args.shape)[0], lengths, args.rounds, args.steps)


if __name__ == "__main__":
    main()
