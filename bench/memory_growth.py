"""Resident memory over a long training run, lmtune as it is against other ways, in one run.

    .venv/bin/python bench/memory_growth.py [--steps 300] [--rounds 1] [--ways "as it is,none of them,no heap trim"]

Runs `lmtune train` with the quickstart recipe (SmolLM2-135M, all 434 bundled pairs, micro-batches of 4 of
varying length, no validation) as a subprocess, once per way and round, alternating the order round by round:
lmtune as it is (oneDNN's primitive cache capped and the heap trimmed every few steps: lmtune/cpu_memory.py), and
the ways of WAYS below, for example "none of them" (oneDNN's own cache size, no width rounding, no trimming) or "pinned mmap threshold"
(MALLOC_MMAP_THRESHOLD_=131072: glibc then stops raising its mmap threshold, so every freed block of 128 KB or
more goes back to the OS instead of staying in the heap). Each step's peak resident memory is read from the
child's VmHWM whenever its train_log.jsonl reaches a new step (then reset). Per way: the highest step peak over
steps 51 to 100 ("after 50 steps") and over the last 50 steps ("at the end"), their ratio (flat memory: the end
within 10% of the first), step 50's and the last step's own peaks with their tokens (they follow the two
micro-batches' widths), the peak, and the median seconds per step (from train_log's runtime); --peaks writes every
step's peak and its tokens to a file.

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
POLL = 0.1  # seconds between looks at the child
# Steps over which "after 50 steps" and "at the end" take their highest step peak. A step's peak follows its
# micro-batch's width (about 1.8 GB at 550 tokens, 2.4 GB at 1,000 for this recipe), and length-grouped batches come
# in rounds of transformers' mega-batches (at most 50 micro-batches, the widest first), so a window of 50 steps
# holds a whole round and both windows see a widest batch; 10 steps compared a round's narrow end with a wide start.
WINDOW = 50
# name -> (environment, extra `lmtune train` arguments). "as it is" is lmtune's default: this recipe's 300 steps are
# above train.compile auto's threshold (23 of 20 TFLOPs), so it compiles the decoder layers, as "compiled" does.
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


def status_kb(pid: int, field: str = "VmRSS") -> int | None:
    """A memory figure of /proc/<pid>/status in kB: VmRSS (resident now) or VmHWM (the highest since the last reset)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak(pid: int) -> bool:
    """Reset the child's VmHWM to its current RSS (Linux: "5" to clear_refs), so the next reading is the peak of the
    step in between; False where the kernel refuses."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


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
    # The peak RSS of every step: the log is polled every POLL seconds, and when it reaches a new step the child's
    # VmHWM (its highest RSS since the last reset) is that step's peak and is reset. A sampled RSS would catch a
    # step's high only when a sample happens to fall on it.
    step_peaks: dict[int, int] = {}
    rss_samples: list[int] = []
    seen, log_size = 0, -1
    while child.poll() is None:
        kb = status_kb(child.pid)
        if kb:
            rss_samples.append(kb)
        size = log_file.stat().st_size if log_file.exists() else -1
        if size != log_size:
            log_size = size
            entries = read_log(log_file)
            step = entries[-1]["step"] if entries else 0
            if step > seen:
                hwm = status_kb(child.pid, "VmHWM")
                if hwm:
                    for s in range(seen + 1, step + 1):
                        step_peaks[s] = hwm
                reset_peak(child.pid)
                seen = step
        time.sleep(POLL)
    if child.returncode != 0:
        raise SystemExit(f"lmtune train failed ({child.returncode}): {child.stderr.read()[-2000:]}")
    entries = read_log(out / "train_log.jsonl")
    runtimes = [e["train_runtime"] for e in entries if "train_runtime" in e]
    per_step = statistics.median(b - a for a, b in zip(runtimes, runtimes[1:])) if len(runtimes) > 1 else float("nan")
    # The highest of the step peaks over the WINDOW steps after step 50 and over the last WINDOW steps.
    after_50 = max(kb for step, kb in step_peaks.items() if 50 < step <= 50 + WINDOW)
    last = max(kb for step, kb in step_peaks.items() if step > steps - WINDOW)
    return {"after_50_gb": after_50 / 1e6, "last_gb": last / 1e6, "peak_gb": max(rss_samples + list(step_peaks.values())) / 1e6,
            "seconds_per_step": per_step, "step_peaks_gb": {s: kb / 1e6 for s, kb in sorted(step_peaks.items())},
            "step_tokens": {b["step"]: b["num_input_tokens_seen"] - a["num_input_tokens_seen"] for a, b in zip(entries, entries[1:])
                            if "num_input_tokens_seen" in a and "num_input_tokens_seen" in b}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--ways", default="as it is,none of them",
                        help=f"comma-separated, of: {', '.join(WAYS)}")
    parser.add_argument("--peaks", type=Path, default=None,
                        help="write every run's peak RSS per step (GB) to this JSON file")
    args = parser.parse_args()
    if args.steps < 50 + 2 * WINDOW:
        parser.error(f"--steps must be at least {50 + 2 * WINDOW} (memory is compared over the {WINDOW} steps after"
                     f" step 50 and over the last {WINDOW})")
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
            at = {s: (r["step_peaks_gb"].get(s, float("nan")), r["step_tokens"].get(s, 0)) for s in (50, args.steps)}
            print(f"round {round_index + 1} {name:30s}: highest step RSS in steps 51-{50 + WINDOW} {r['after_50_gb']:.2f} GB,"
                  f" in the last {WINDOW} {r['last_gb']:.2f} GB ({r['last_gb'] / r['after_50_gb']:.2f}x); step 50 alone"
                  f" {at[50][0]:.2f} GB ({at[50][1]} tokens), step {args.steps} {at[args.steps][0]:.2f} GB"
                  f" ({at[args.steps][1]} tokens); peak {r['peak_gb']:.2f} GB, {r['seconds_per_step']:.2f} s per step", flush=True)
    if args.peaks:
        args.peaks.write_text(json.dumps({name: [{"peak_gb": r["step_peaks_gb"], "tokens": r["step_tokens"]} for r in rs]
                                          for name, rs in results.items()}))
    summary = {}
    for name, rs in results.items():
        summary[name] = {k: statistics.median(r[k] for r in rs) for k in rs[0] if k not in ("step_peaks_gb", "step_tokens")}
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
