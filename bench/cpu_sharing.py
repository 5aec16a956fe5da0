"""Two lmtune processes on one CPU: a training-like step alone, and beside a busy neighbour, before and after sharing.

    .venv/bin/python bench/cpu_sharing.py [--seconds 20]

Each process is a real `python` process that sizes its threads with lmtune's `configure_cpu_threads` (so it
registers in, and reads, the registry of lmtune processes) and then runs a fixed workload: forward and backward
of a SmolLM2-shaped MLP block stack in bf16 autocast, batch of 8 x 128 tokens. Measured, one run:
  alone      the step with the machine to itself;
  before     beside a neighbour running the same loop, both with one thread per core (OMP_NUM_THREADS set to the
             core count, which is what a process does when it ignores its neighbours);
  after      beside the same neighbour, each sizing its threads with the registry (the second takes its share).
Prints median seconds per step of each and the slowdown against alone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

WORKER = r"""
import json, sys, time, torch
from lmtune.model import configure_cpu_threads
threads = configure_cpu_threads(log=lambda m: print(m, file=sys.stderr))
torch.manual_seed(0)
layers = [torch.nn.Sequential(torch.nn.Linear(576, 1536), torch.nn.SiLU(), torch.nn.Linear(1536, 576)) for _ in range(8)]
model = torch.nn.Sequential(*layers)
x = torch.randn(8 * 128, 576, requires_grad=True)
deadline, times = time.perf_counter() + float(sys.argv[1]), []
while time.perf_counter() < deadline:
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x).float().pow(2).mean()
    loss.backward()
    times.append(time.perf_counter() - start)
print(json.dumps({"threads": threads, "times": times[1:]}))
"""


def run(seconds: float, neighbour: bool, env: dict) -> dict:
    other = None
    if neighbour:
        other = subprocess.Popen([sys.executable, "-c", WORKER, str(seconds + 10)], env=env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        time.sleep(3)  # the neighbour is registered and busy before the measured process starts
    try:
        done = subprocess.run([sys.executable, "-c", WORKER, str(seconds)], env=env, capture_output=True, text=True,
                              check=True)
    finally:
        if other is not None:
            other.kill()
            other.wait()
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["said"] = done.stderr.strip()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20)
    args = parser.parse_args()
    from lmtune.model import physical_cores

    cores = physical_cores()
    shared = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    unshared = {**shared, "OMP_NUM_THREADS": str(cores)}
    results = {"alone": run(args.seconds, False, shared), "before": run(args.seconds, True, unshared),
               "after": run(args.seconds, True, shared)}
    alone = statistics.median(results["alone"]["times"])
    for name, result in results.items():
        step = statistics.median(result["times"])
        print(f"{name:7s} {result['threads']} threads: {step:.3f} s per step ({step / alone:.1f}x alone)"
              + (f"  [{result['said']}]" if result["said"] else ""))
    before, after = (statistics.median(results[k]["times"]) for k in ("before", "after"))
    print(f"cpu_sharing alone_s={alone:.3f} before_s={before:.3f} after_s={after:.3f} gain={before / after:.1f}x")


if __name__ == "__main__":
    main()
