"""Resident memory over a long training run, lmtune as it is against other ways, in one run.

    .venv/bin/python bench/memory_growth.py [--steps 70] [--rounds 1] [--ways "as it is,none of them,no heap trim"]

Runs `lmtune train` with the quickstart recipe (SmolLM2-135M, all 434 bundled pairs, micro-batches of 4 of
varying length, no validation) as a subprocess, once per way and round, alternating the order round by round:
lmtune as it is (oneDNN's primitive cache capped and the heap trimmed every few steps: lmtune/cpu_memory.py), and
the ways of WAYS below, for example "none of them" (oneDNN's own cache size, no width rounding, no trimming) or "pinned mmap threshold"
(MALLOC_MMAP_THRESHOLD_=131072: glibc then stops raising its mmap threshold, so every freed block of 128 KB or
more goes back to the OS instead of staying in the heap). Resident memory (VmRSS) is
sampled every second and paired with the step the run's train_log.jsonl has reached. Per way: the highest RSS
over steps 40 to 50 ("after 50 steps") and over the last 10 steps ("at the last step"), their ratio (flat memory:
the last within 10% of the first), the peak, and the median seconds per step (from train_log's runtime).

Results, with the CPU and date of each run: docs/performance.md ("Memory over a long run").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PINNED = {"MALLOC_MMAP_THRESHOLD_": "131072"}
WINDOW = 10  # steps over which "after 50 steps" and "at the last step" take their highest RSS
# name -> (environment, extra `lmtune train` arguments). "as it is" is lmtune's default: this recipe's 70 steps are
# already above train.compile auto's threshold (23 of 20 TFLOPs), so it compiles the decoder layers, as "compiled" does.
# "pinned + huge pages" also asks PyTorch's CPU allocator for transparent huge pages (THP_MEM_ALLOC_ENABLE), so that a
# freshly mapped tensor faults in 2 MB pages rather than 4 KB ones. On a CPU training in bf16, lmtune keeps 64 of
# oneDNN's compiled primitives, rounds micro-batch widths up to a multiple of 8 to 32 tokens (by the data's median
# length: 16 for this data) and trims the heap every 10 optimizer steps (cpu_memory.py): "oneDNN cache 256" keeps 256
# primitives, "no heap trim" never trims, "no rounding" pads to the longest sample only, "multiple of 32" rounds to
# 32 whatever the lengths, "none of them" does none of the three (oneDNN's own 1,024 primitives). "packed" trains
# rows of one length (data.packing), so every step has the same shapes.
WAYS = {"as it is": ({}, []), "pinned mmap threshold": (PINNED, []), "compiled": ({}, ["--train.compile", "true"]),
        "eager": ({}, ["--train.compile", "false"]),
        "pinned + huge pages": ({**PINNED, "THP_MEM_ALLOC_ENABLE": "1"}, []),
        "oneDNN cache 256": ({"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "256"}, []),
        "no heap trim": ({"LMTUNE_TRIM_HEAP_EVERY": "0"}, []),
        "no rounding": ({}, ["--data.pad_to_multiple_of", "1"]),
        "multiple of 32": ({}, ["--data.pad_to_multiple_of", "32"]),
        "unmerged": ({}, ["--train.cpu_micro_batch", "1"]),
        "trim every 2": ({"LMTUNE_TRIM_HEAP_EVERY": "2"}, []),
        "none of them": ({"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024", "LMTUNE_TRIM_HEAP_EVERY": "0"},
                         ["--data.pad_to_multiple_of", "1"]),
        "packed": ({}, ["--data.packing", "true"])}


def rss_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def read_log(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError):
        return []


def run(env: dict, steps: int, scratch: Path, extra: list[str] = ()) -> dict:
    out = scratch / f"run-{time.monotonic_ns()}"
    log_file = out.with_name(out.name + ".partial") / "train_log.jsonl"
    cmd = [sys.executable, "-m", "lmtune", "train", "--config", str(REPO / "configs" / "quickstart.yaml"),
           "--data", str(REPO / "data" / "vi_ai_qa.jsonl"), "--max-samples", "0", "--max-steps", str(steps),
           "--val-size", "0", "--output-dir", str(out), *extra]
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**os.environ, **env})
    samples: list[tuple[int, int]] = []  # (step reached, RSS in kB)
    while child.poll() is None:
        kb = rss_kb(child.pid)
        if kb:
            entries = read_log(log_file)
            samples.append((entries[-1]["step"] if entries else 0, kb))
        time.sleep(1.0)
    if child.returncode != 0:
        raise SystemExit(f"lmtune train failed ({child.returncode}): {child.stderr.read()[-2000:]}")
    entries = read_log(out / "train_log.jsonl")
    runtimes = [e["train_runtime"] for e in entries if "train_runtime" in e]
    per_step = statistics.median(b - a for a, b in zip(runtimes, runtimes[1:])) if len(runtimes) > 1 else float("nan")
    # The highest RSS over the 10 steps up to step 50 and up to the last step: lmtune trims the heap every 10 steps
    # (cpu_memory.TRIM_HEAP_EVERY), so one sample would land anywhere between a trimmed low and the high before it.
    after_50 = max(kb for step, kb in samples if min(50, steps) - WINDOW <= step <= min(50, steps))
    last = [kb for step, kb in samples if step >= steps - WINDOW] or [samples[-1][1]]
    return {"after_50_gb": after_50 / 1e6, "last_gb": max(last) / 1e6, "peak_gb": max(kb for _, kb in samples) / 1e6,
            "seconds_per_step": per_step}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=70)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--ways", default="as it is,none of them",
                        help=f"comma-separated, of: {', '.join(WAYS)}")
    args = parser.parse_args()
    if args.steps < 60:
        parser.error("--steps must be at least 60 (memory is compared after 50 steps and at the end)")
    scratch = Path(tempfile.mkdtemp(prefix="lmtune-memory-"))
    names = [n.strip() for n in args.ways.split(",") if n.strip()]
    unknown = [n for n in names if n not in WAYS]
    if unknown or not names:
        parser.error(f"--ways: unknown {unknown}; choose from {list(WAYS)}")
    ways = {name: WAYS[name] for name in names}
    results: dict[str, list[dict]] = {name: [] for name in ways}
    for round_index in range(args.rounds):
        for name in (list(ways) if round_index % 2 == 0 else list(ways)[::-1]):
            env, extra = ways[name]
            r = run(env, args.steps, scratch, extra)
            results[name].append(r)
            print(f"round {round_index + 1} {name:30s}: RSS after 50 steps {r['after_50_gb']:.2f} GB, at step"
                  f" {args.steps} {r['last_gb']:.2f} GB ({r['last_gb'] / r['after_50_gb']:.2f}x), peak {r['peak_gb']:.2f} GB,"
                  f" {r['seconds_per_step']:.2f} s per step", flush=True)
    summary = {}
    for name, rs in results.items():
        summary[name] = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
    first = summary[names[0]]
    short = {"as it is": "now", "pinned mmap threshold": "pinned", "compiled": "compiled", "eager": "eager",
             "pinned + huge pages": "pinned_thp", "oneDNN cache 256": "onednn_cache_256", "no heap trim": "no_trim",
             "no rounding": "no_rounding", "multiple of 32": "multiple_32", "unmerged": "unmerged",
             "trim every 2": "trim_2", "none of them": "none", "packed": "packed"}
    print("memory " + " ".join(
        f"{short[name]}_growth={r['last_gb'] / r['after_50_gb']:.2f} {short[name]}_peak_gb={r['peak_gb']:.2f}"
        f" {short[name]}_step_time_ratio={r['seconds_per_step'] / first['seconds_per_step']:.2f}"
        for name, r in summary.items()))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
