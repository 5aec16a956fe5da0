"""Where lmtune's training step spends its time, per shape: a profile of one optimizer step after a warm-up step.

    .venv/bin/python bench/step_profile.py                         # every shape of bench/train_shapes.py
    .venv/bin/python bench/step_profile.py --shapes smollm2 --top 25

The step is lmtune's default CPU path on bench/train_shapes.py's shapes and data (the same recipe, compiled where
train.compile "auto" compiles). torch.profiler records the second optimizer step; every operator's own time (not
its children's) goes to one of these parts:

  matmul       aten::mm / addmm / bmm / linear kernels, with the GFLOP/s the profiler counts for them
               (frozen weights, LoRA, the output head, and attention where it is not fused)
  attention    scaled-dot-product attention kernels, forward and backward
  compiled     Inductor's fused C++ loops inside the compiled decoder layers (norms, rotary, SiLU gating, LoRA adds)
  casts        dtype conversions and copies outside the compiled code (_to_copy, copy_)
  optimizer    AdamW's foreach kernels and gradient clipping
  other        everything else (element-wise work outside the compiled layers, autograd bookkeeping)

The bf16 (or fp32) matmul ceiling of a 2,048-cube is measured just before, so the matmuls' rate can be read
against it. Shares are of the profiled step's total own time, which includes the profiler's overhead.
Results, with the CPU and date of each run: docs/performance.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_info import describe as cpu_label  # noqa: E402
from train_shapes import SHAPES, run_lmtune, shape_names, tokenizer_for  # noqa: E402
from train_speed import N_SAMPLES, REPO, bpe_tokenizer, matmul_gflops, read_pairs  # noqa: E402

PARTS = ("matmul", "attention", "compiled", "casts", "optimizer", "other")


def part_of(name: str) -> str:
    n = name.lower()
    if "attention" in n or "sdpa" in n or "flash" in n:
        return "attention"
    if n in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear") or "mkldnn" in n:
        return "matmul"
    if "compiled" in n or "cpp_fused" in n or "inductor" in n or n.startswith("graph_"):
        return "compiled"
    if n in ("aten::_to_copy", "aten::copy_", "aten::to", "aten::clone", "aten::contiguous"):
        return "casts"
    if "_foreach" in n or "optimizer" in n or "clip_grad" in n:
        return "optimizer"
    return "other"


def profiler_callback():
    """Profiles the second optimizer step (the first one warms up and, where compiled, compiles)."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    class Profile(TrainerCallback):
        def __init__(self):
            self.prof = None
            self.seconds = None

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 1:
                self.prof = profile(activities=[ProfilerActivity.CPU], with_flops=True)
                self.prof.__enter__()
                self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if self.prof is not None and self.seconds is None:
                self.seconds = time.perf_counter() - self._start
                self.prof.__exit__(None, None, None)

    return Profile()


def profile_shape(name: str, shared_bpe, pairs, top: int, dtype: torch.dtype) -> None:
    shape = SHAPES[name]
    tok = tokenizer_for(shape, shared_bpe)
    ceiling = matmul_gflops(dtype)
    callback = profiler_callback()
    with tempfile.TemporaryDirectory(prefix=f"lmtune-profile-{name}-") as scratch:
        run_lmtune(shape, tok, pairs, 2, "auto", scratch, callbacks=(callback,))
    events = callback.prof.key_averages()
    own = defaultdict(float)
    flops = defaultdict(float)
    for e in events:
        part = part_of(e.key)
        own[part] += e.self_cpu_time_total / 1e6
        flops[part] += e.flops or 0
    total = sum(own.values())
    print(f"{name}: profiled step {callback.seconds:.2f} s; {str(dtype).removeprefix('torch.')} ceiling"
          f" {ceiling:.0f} GFLOP/s ({cpu_label()})", flush=True)
    for part in PARTS:
        rate = f", {flops[part] / own[part] / 1e9:.0f} GFLOP/s" if flops[part] and own[part] else ""
        print(f"  {part:10s} {own[part]:7.2f} s  {own[part] / total:6.1%}{rate}", flush=True)
    print(f"  top operators by own time:")
    for e in sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]:
        rate = f" {e.flops / e.self_cpu_time_total / 1e3:.0f} GFLOP/s" if e.flops else ""
        print(f"    {e.key[:60]:60s} {e.count:6d} calls {e.self_cpu_time_total / 1e6:7.3f} s"
              f" [{part_of(e.key)}]{rate}", flush=True)
    print(f"profile shape={name} " + " ".join(f"{p}={own[p] / total:.3f}" for p in PARTS)
          + f" matmul_gflops={flops['matmul'] / max(own['matmul'], 1e-9) / 1e9:.0f} ceiling_gflops={ceiling:.0f}",
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, from: {', '.join(SHAPES)}")
    parser.add_argument("--top", type=int, default=15, help="operators listed per shape")
    args = parser.parse_args()
    names = shape_names(parser, args.shapes)
    import transformers

    from lmtune.model import choose_precision

    transformers.logging.set_verbosity_error()
    pairs = read_pairs(REPO / "data" / "vi_ai_qa.jsonl")[:N_SAMPLES]
    dtype = choose_precision("cpu", "auto").compute_dtype
    print(f"{cpu_label()}; torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    for name in names:
        profile_shape(name, bpe_tokenizer(), pairs, args.top, dtype)


if __name__ == "__main__":
    main()
