"""The output head's loss and gradient on a CPU, eager against compiled, in one run, per shape.

    .venv/bin/python bench/head_loss.py                 # about 2 minutes on a 2-core CPU
    .venv/bin/python bench/head_loss.py --rows 1300

lmtune's answer-only loss fuses the head's matmul and the cross-entropy (training/loss.py: the gradient with
respect to the hidden states is computed in the forward pass, chunk by chunk). Between the two matmuls, the
softmax, the loss and the gradient of the logits are element-wise work over a [rows, vocabulary] block of floats:

  eager     torch's kernels, one pass over fp32 copies each (the path of a run whose layers are not compiled)
  compiled  the same function compiled by Inductor into a reduction and one pass that writes the gradient in the
            logits' dtype (the path while the decoder layers run compiled, training/compiled.py)

Each shape's head (vocabulary x hidden size of bench/train_shapes.py's shapes, in the precision lmtune trains in on
this CPU) runs forward + backward on `--rows` trained positions, the two paths alternating after a warm-up (the
first compiled call compiles, and is not timed). Prints the median seconds of each and the ratio, and the
matmuls' share as a reference (the two matmuls alone, no loss).

Then the row padding (loss.ROW_MULTIPLE), on an odd number of trained positions (`--rows` less one where it is
even), compiled:

  padded    the head's matmuls take one zero row more, an even count (lmtune's path)
  unpadded  the odd count as it is (ROW_MULTIPLE 1)

Prints the median seconds of each and `row_padding_speedup` = unpadded / padded.
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

# (vocabulary, hidden size) of bench/train_shapes.py's shapes
HEADS = {"bloom-560m": (250880, 1024), "smollm2": (49152, 576), "qwen2.5-0.5b": (151936, 896),
         "llama-3.2-1b": (128256, 2048)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1024, help="trained positions per micro-batch (default 1024)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    import lmtune.training.loss as loss_module
    from lmtune.model import choose_precision, configure_cpu_threads
    from lmtune.training import compiled

    configure_cpu_threads()
    dtype = choose_precision("cpu", "auto").compute_dtype
    print(f"{cpu_label()}; torch {torch.__version__}, {torch.get_num_threads()} threads, {str(dtype)[6:]},"
          f" {args.rows} rows", flush=True)
    for name, (vocab, hidden_size) in HEADS.items():
        torch.manual_seed(0)
        weight = torch.randn(vocab, hidden_size, dtype=dtype) * 0.02
        hidden = torch.randn(args.rows, hidden_size, dtype=dtype, requires_grad=True)
        targets = torch.randint(0, vocab, (args.rows,))

        def step(path: str) -> float:
            compiled._active = path == "compiled"
            start = time.perf_counter()
            if path == "matmuls":
                with torch.no_grad():
                    (hidden @ weight.T) @ weight
            else:
                loss_module.linear_cross_entropy(hidden, weight, None, targets).backward()
            seconds = time.perf_counter() - start
            hidden.grad = None
            compiled._active = False
            return seconds

        med = alternate(step, ("eager", "compiled", "matmuls"), args.rounds)
        print(f"head={name} eager={med['eager']:.3f}s compiled={med['compiled']:.3f}s matmuls={med['matmuls']:.3f}s"
              f" compiled_speedup={med['eager'] / med['compiled']:.2f}"
              f" element_wise_speedup={(med['eager'] - med['matmuls']) / max(med['compiled'] - med['matmuls'], 1e-9):.2f}"
              f" cpu=\"{cpu_label()}\"", flush=True)

        odd = args.rows - 1 + args.rows % 2
        odd_hidden = hidden.detach()[:odd].clone().requires_grad_()

        def padding_step(path: str) -> float:
            compiled._active = True
            multiple, loss_module.ROW_MULTIPLE = loss_module.ROW_MULTIPLE, 2 if path == "padded" else 1
            start = time.perf_counter()
            loss_module.linear_cross_entropy(odd_hidden, weight, None, targets[:odd]).backward()
            seconds = time.perf_counter() - start
            loss_module.ROW_MULTIPLE = multiple
            odd_hidden.grad = None
            compiled._active = False
            return seconds

        med = alternate(padding_step, ("padded", "unpadded"), args.rounds)
        print(f"head={name} rows={odd} padded={med['padded']:.3f}s unpadded={med['unpadded']:.3f}s"
              f" row_padding_speedup={med['unpadded'] / med['padded']:.2f} cpu=\"{cpu_label()}\"", flush=True)


def alternate(step, paths: tuple[str, ...], rounds: int) -> dict[str, float]:
    """Median seconds of each path's `step`, after one warm-up call each, the order reversed every other round."""
    for path in paths:
        step(path)  # warm-up; the compiled path compiles here
    times = {path: [] for path in paths}
    for round_index in range(rounds):
        for path in paths if round_index % 2 == 0 else paths[::-1]:
            times[path].append(step(path))
    return {path: statistics.median(t) for path, t in times.items()}


if __name__ == "__main__":
    main()
