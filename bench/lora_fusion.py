"""Fused LoRA A matrices: what one matmul for q/k/v's (and gate/up's) A matrices would save, against one each.

    .venv/bin/python bench/lora_fusion.py                   # SmolLM2, Qwen2.5-0.5B and Llama-3.2-1B shapes
    .venv/bin/python bench/lora_fusion.py --shapes smollm2 --tokens 1280,1584

In a LoRA layer every adapted projection multiplies its input by its own rank-r A matrix; q, k and v read the same
normed hidden states, as gate and up do. Those skinny matmuls ([tokens, hidden] x [hidden, r]) run far below the
CPU's matmul ceiling, and the field fuses them: one [tokens, hidden] x [hidden, 3r] matmul whose output is split,
one for the input gradient, one for the A gradients. This measures exactly that part of a training step, the A
side of the adapted projections that share an input, forward and backward, in bf16 autocast as lmtune's CPU path
runs it (A in fp32, cast per use), separate against fused, alternating after a warm-up:

  separate   h_i = x @ A_i^T per projection; backward dA_i = dh_i^T x and dx = sum_i dh_i @ A_i
  fused      h = x @ cat(A_i)^T, split; backward one dA and one dx matmul

It prints each way's milliseconds per decoder layer and micro-batch, the ratio, and what the fusion would save
over a whole optimizer step of bench/train_shapes.py's shape (its layers times the micro-batches of the given token
counts), to set beside that step's measured time (docs/performance.md, "Fused LoRA A matrices").
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_info import describe as cpu_label  # noqa: E402

# name: (hidden size, k/v width, intermediate size, layers); the shapes of bench/train_shapes.py
SHAPES = {
    "smollm2": (576, 192, 1536, 30),
    "qwen2.5-0.5b": (896, 128, 4864, 24),
    "llama-3.2-1b": (2048, 512, 8192, 16),
}
RANK = 16


def a_side(x: torch.Tensor, a_matrices: list[torch.Tensor], upstream: list[torch.Tensor], fused: bool) -> None:
    """Forward and backward of the A matrices of projections that read `x`."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if fused:
            outs = torch.nn.functional.linear(x, torch.cat(a_matrices)).split(RANK, dim=-1)
        else:
            outs = [torch.nn.functional.linear(x, a) for a in a_matrices]
    torch.autograd.backward(outs, upstream)


def time_way(groups, fused: bool, repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        for x, a_matrices, upstream in groups:
            a_side(x, a_matrices, upstream, fused)
            x.grad = None
            for a in a_matrices:
                a.grad = None
    return (time.perf_counter() - start) / repeats


def measure(name: str, tokens: int, rounds: int, repeats: int) -> tuple[float, float]:
    hidden, _, _, _ = SHAPES[name]
    g = torch.Generator().manual_seed(0)
    groups = []
    for members in (3, 2):  # q/k/v, gate/up
        x = torch.randn(tokens, hidden, generator=g).to(torch.bfloat16).requires_grad_(True)
        a_matrices = [(torch.randn(RANK, hidden, generator=g) / hidden**0.5).requires_grad_(True)
                      for _ in range(members)]
        upstream = [torch.randn(tokens, RANK, generator=g).to(torch.bfloat16) for _ in range(members)]
        groups.append((x, a_matrices, upstream))
    # Both ways give the same gradients (the same dot products, summed in another order).
    grads = []
    for fused in (False, True):
        x, a_matrices, upstream = groups[0]
        a_side(x, a_matrices, upstream, fused)
        grads.append([x.grad.float()] + [a.grad.float() for a in a_matrices])
        x.grad = None
        for a in a_matrices:
            a.grad = None
    for s, f in zip(*grads):
        torch.testing.assert_close(f, s, rtol=2e-2, atol=2e-2)
    for fused in (False, True):
        time_way(groups, fused, 2)
    times = {False: [], True: []}
    for r in range(rounds):
        for fused in ((False, True) if r % 2 == 0 else (True, False)):
            times[fused].append(time_way(groups, fused, repeats))
    return statistics.median(times[False]), statistics.median(times[True])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, from: {', '.join(SHAPES)}")
    parser.add_argument("--tokens", default="1280,1584",
                        help="tokens of each micro-batch of one optimizer step (default: SmolLM2's two merged "
                             "micro-batches of bench/train_shapes.py's 16 samples, one row each)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    from lmtune.model import configure_cpu_threads

    configure_cpu_threads()
    print(f"{cpu_label()}; torch {torch.__version__}, {torch.get_num_threads()} threads; LoRA rank {RANK}", flush=True)
    token_counts = [int(t) for t in args.tokens.split(",")]
    for name in args.shapes.split(","):
        if name not in SHAPES:
            raise SystemExit(f"unknown shape {name!r}: choose from {', '.join(SHAPES)}")
        layers = SHAPES[name][3]
        step_separate = step_fused = 0.0
        for tokens in token_counts:
            separate, fused = measure(name, tokens, args.rounds, args.repeats)
            step_separate += separate * layers
            step_fused += fused * layers
            print(f"  {name} {tokens} tokens: q/k/v and gate/up A matrices, forward and backward, per layer: "
                  f"separate {separate * 1e3:.2f} ms, fused {fused * 1e3:.2f} ms ({separate / fused:.2f}x)", flush=True)
        print(f"shape={name} lora_a_fusion_speedup={step_separate / step_fused:.2f} "
              f"step_separate_s={step_separate:.3f} step_fused_s={step_fused:.3f} "
              f"saved_per_step_s={step_separate - step_fused:.3f}", flush=True)


if __name__ == "__main__":
    main()
