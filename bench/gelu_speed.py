"""BLOOM's Python GeLU vs torch's fused F.gelu(approximate="tanh") in a BLOOM-560m training step, one run.

    .venv/bin/python bench/gelu_speed.py      # about 2 minutes on a 2-core CPU

Two copies of the same random BLOOM-560m-shaped model with LoRA r=8 (as bench/train_speed.py), one with
BLOOM's own GeLU module and one after lmtune's swap (model.use_fused_gelu), run forward + backward of the
answer-only loss over the same 16 samples in micro-batches of 2, in bf16 autocast, alternating; prints
the median seconds of each and their ratio.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from train_speed import N_SAMPLES, REPO, bpe_tokenizer, make_model, read_pairs


def main() -> None:
    from lmtune.data import Collator, Example, PromptTemplate, tokenize_examples
    from lmtune.loss import answer_only_loss
    from lmtune.model import add_lora, configure_cpu_threads, use_fused_gelu

    configure_cpu_threads()
    tok = bpe_tokenizer()
    pairs = read_pairs(REPO / "data" / "vi_ai_qa.jsonl")[:N_SAMPLES]
    samples, _ = tokenize_examples([Example(p["question"], p["answer"]) for p in pairs], tok, PromptTemplate(), 512)
    samples.sort(key=lambda s: len(s["input_ids"]))
    collate = Collator(tok)
    batches = [collate(samples[i : i + 2]) for i in range(0, len(samples), 2)]

    def build(fused: bool):
        model = add_lora(make_model().to(torch.bfloat16), 8, 32, 0.05, "none", ["query_key_value"])
        if fused:
            use_fused_gelu(model)
        return model.train()

    def step(model) -> float:
        start = time.perf_counter()
        for b in batches:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = answer_only_loss(model.get_base_model(), b["input_ids"], b["attention_mask"], b["labels"])
            loss.backward()
        return time.perf_counter() - start

    models = {"bloom_gelu": build(False), "fused_gelu": build(True)}
    for model in models.values():
        step(model)  # warm-up
    times = {name: [] for name in models}
    for round_index in range(4):
        order = list(models) if round_index % 2 == 0 else list(models)[::-1]
        for name in order:
            times[name].append(step(models[name]))
            print(f"round {round_index + 1} {name}: {times[name][-1]:.2f} s for {len(samples)} samples", flush=True)
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"bloom_gelu={med['bloom_gelu']:.2f}s fused_gelu={med['fused_gelu']:.2f}s speedup={med['bloom_gelu'] / med['fused_gelu']:.2f}")


if __name__ == "__main__":
    sys.exit(main())
