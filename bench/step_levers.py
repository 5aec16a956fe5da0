"""The two hand-written CPU levers of lmtune's training step, each measured against what it replaced, in one run.

    .venv/bin/python bench/step_levers.py      # about 3 minutes on a 2-core CPU

Three copies of the same random BLOOM-560m-shaped model with LoRA r=8 (as bench/train_speed.py) run
forward + backward of the answer-only loss over the same 16 samples in micro-batches of 2, in bf16
autocast, in alternating order after a warm-up:

  plain        BLOOM's own Python GeLU; output head, then F.cross_entropy on its fp32 logits
  fused_gelu   torch's fused F.gelu(approximate="tanh") (model.use_fused_gelu); the same head and loss
  lmtune       fused GeLU and the fused, chunked head + cross-entropy (loss.linear_cross_entropy)

Prints the median seconds of each and the ratios.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
import torch.nn.functional as F
from train_speed import N_SAMPLES, REPO, bpe_tokenizer, make_model, read_pairs


def plain_head_loss(hidden, weight, bias, targets):
    return F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, reduction="sum")


def main() -> None:
    import lmtune.training.loss as loss_module
    from lmtune.data.collate import Collator
    from lmtune.data.readers import Example
    from lmtune.data.template import PromptTemplate
    from lmtune.data.tokenize import tokenize_examples
    from lmtune.model import add_lora, configure_cpu_threads, use_fused_gelu

    configure_cpu_threads()
    tok = bpe_tokenizer()
    pairs = read_pairs(REPO / "data" / "vi_ai_qa.jsonl")[:N_SAMPLES]
    samples, _ = tokenize_examples([Example(p["question"], p["answer"]) for p in pairs], tok, PromptTemplate(), 512)
    samples.sort(key=lambda s: len(s["input_ids"]))
    collate = Collator(tok)
    batches = [collate(samples[i : i + 2]) for i in range(0, len(samples), 2)]
    fused_loss = loss_module.linear_cross_entropy

    def build(fused_gelu: bool):
        model = add_lora(make_model().to(torch.bfloat16), 8, 32, 0.05, "none", ["query_key_value"])
        if fused_gelu:
            use_fused_gelu(model)
        return model.train()

    variants = {"plain": (build(False), plain_head_loss), "fused_gelu": (build(True), plain_head_loss),
                "lmtune": (build(True), fused_loss)}

    def step(name: str) -> float:
        model, head_loss = variants[name]
        loss_module.linear_cross_entropy = head_loss
        start = time.perf_counter()
        for b in batches:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = loss_module.answer_only_loss(model.get_base_model(), b["input_ids"], b["attention_mask"], b["labels"])
            loss.backward()
        seconds = time.perf_counter() - start
        model.zero_grad(set_to_none=True)
        return seconds

    for name in variants:
        step(name)  # warm-up
    times = {name: [] for name in variants}
    for round_index in range(4):
        for name in (list(variants) if round_index % 2 == 0 else list(variants)[::-1]):
            times[name].append(step(name))
            print(f"round {round_index + 1} {name:10s}: {times[name][-1]:.2f} s for {len(samples)} samples", flush=True)
    loss_module.linear_cross_entropy = fused_loss
    med = {name: statistics.median(t) for name, t in times.items()}
    print(" ".join(f"{name}={seconds:.2f}s" for name, seconds in med.items())
          + f" fused_gelu_speedup={med['plain'] / med['fused_gelu']:.2f} fused_head_loss_speedup={med['fused_gelu'] / med['lmtune']:.2f}"
          f" total_speedup={med['plain'] / med['lmtune']:.2f}")


if __name__ == "__main__":
    sys.exit(main())
