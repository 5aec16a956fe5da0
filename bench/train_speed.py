"""Training speed on BLOOM-560m's shape: the tutorial's recipe vs lmtune vs TRL, measured in one run.

    .venv/bin/python bench/train_speed.py --quick     # about 3 minutes on a 2-core CPU
    .venv/bin/python bench/train_speed.py             # full optimizer steps for every path, ~15 minutes

All paths train the same randomly initialised BLOOM-560m-shaped model (seeded, LoRA r=8 on
query_key_value) on the same 16 samples of data/vi_ai_qa.jsonl, one optimizer step = 16 samples:

  seed    the tutorial's recipe, faithfully: "Human: q Assistant: a" padded to 512 tokens, batch 2 x
          accumulation 8, fp32, prepare_model_for_kbit_training (gradient checkpointing on), the
          language-modeling collator after pad := eos, so the loss covers prompt, answer and padding.
  lmtune  lmtune's default CPU path (configs/bloom-560m.yaml: batch 2 x accumulation 8): dynamic
          padding, length-grouped batches, answer-only labels and fused head + loss, fused GeLU, bf16
          autocast on a CPU with native bf16 (else fp32), no checkpointing.
  trl     TRL's SFTTrainer with prompt/completion data (loss on the completion only), its defaults
          (gradient checkpointing on, per-device batch 8) with accumulation 2 for the same global
          batch, in lmtune's precision (bf16 autocast on a CPU with native bf16, else fp32).

BLOOM's tokenizer is not reachable offline, so a byte-level BPE (vocabulary 8,000) is trained on
Vietnamese text here; the model keeps BLOOM's 250,880-word output layer all the same.

Per path: median time per optimizer step over the measured steps (after a warm-up step), peak
resident memory while the path ran (sampled every 20 ms), loss. In --quick mode the seed and TRL
paths time a few micro-batches and scale to a full step (their micro-batches are all the same
size: the seed pads everything to 512); TRL's are those of its second step, after a whole warm-up
step. The machine's matmul ceiling is measured in the same run; MFU counts only the FLOPs lmtune needs: forward and input-gradient matmuls of every real token
through the blocks, and of every trained token through the output head.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data" / "vi_alpaca_sample.jsonl"
N_SAMPLES = 16
HIDDEN, LAYERS, HEADS, VOCAB = 1024, 24, 16, 250880


# ---------------------------------------------------------------- shared setup


def read_pairs(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def bpe_tokenizer():
    """A byte-level BPE on Vietnamese text with BLOOM's special-token ids (<unk>=0 <s>=1 </s>=2 <pad>=3)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [t for r in read_pairs(REPO / "data" / "vi_ai_qa.jsonl") for t in (r["question"], r["answer"])]
    if SHARED_DATA.is_file():
        texts += [t for r in read_pairs(SHARED_DATA) for t in (r["prompt"], r["response"])]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=8000, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def make_model():
    from transformers import BloomConfig, BloomForCausalLM

    torch.manual_seed(0)
    config = BloomConfig(vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=LAYERS, n_head=HEADS,
                         bos_token_id=1, eos_token_id=2, pad_token_id=3)
    return BloomForCausalLM(config)


def release_memory():
    gc.collect()
    try:  # hand freed heap back to the OS so the next path's peak is its own
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class PeakRss:
    """Peak resident memory of this process while the block runs, sampled every 20 ms."""

    def __enter__(self):
        self.peak, self._stop = 0, threading.Event()
        page = os.sysconf("SC_PAGE_SIZE")

        def sample():
            while not self._stop.is_set():
                with open("/proc/self/statm") as f:
                    self.peak = max(self.peak, int(f.read().split()[1]) * page)
                time.sleep(0.02)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def gb(self) -> float:
        return self.peak / 1e9


class StopRun(Exception):
    pass


def timing_callback(micro_limit: int | None):
    """Records the duration of every micro-batch and optimizer step; stops after `micro_limit` micro-batches."""
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def __init__(self):
            self.micro, self.steps, self.losses = [], [], []
            self._mark = self._step_start = None

        def _tick(self):
            now = time.perf_counter()
            self.micro.append(now - self._mark)
            self._mark = now
            if micro_limit and len(self.micro) >= micro_limit:
                raise StopRun

        def on_step_begin(self, args, state, control, **kw):
            self._mark = self._step_start = time.perf_counter()

        def on_substep_end(self, args, state, control, **kw):
            self._tick()

        def on_step_end(self, args, state, control, **kw):
            self.steps.append(time.perf_counter() - self._step_start)
            self._tick()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    return Timer()


def run_trainer(trainer, timer) -> None:
    try:
        trainer.train()
    except StopRun:
        pass


def seconds_per_step(timer, accumulation: int, full_steps: bool, warm_micro: int = 1) -> float:
    """Median seconds per optimizer step: whole steps after the first, or (full_steps False) the micro-batches after
    the first `warm_micro` scaled to a step. A TRL path passes its accumulation as `warm_micro`, so that the whole
    first step is warm-up (oneDNN builds its kernels for each new shape): on an AVX-512 BF16 Zen 4, TRL's first-step
    micro-batches read up to 1.28x its second step's, which counted in lmtune's favour."""
    if full_steps:
        return statistics.median(timer.steps[1:])  # the first step is the warm-up
    return statistics.median(timer.micro[warm_micro:]) * accumulation


# ---------------------------------------------------------------- the three paths


def run_seed(tok, pairs, steps: int, micro_limit: int | None, scratch: str):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    texts = ["Human: " + p["question"] + " Assistant: " + p["answer"] for p in pairs]
    encoded = tok(texts, padding="max_length", max_length=512, truncation=True)  # pads with the real <pad> (id 3)
    rows = [{"input_ids": i, "attention_mask": m} for i, m in zip(encoded["input_ids"], encoded["attention_mask"])]
    seed_tok = tok.__class__(tokenizer_object=tok.backend_tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>")
    model = prepare_model_for_kbit_training(make_model())  # as the tutorial: turns gradient checkpointing on
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM",
                                             target_modules=["query_key_value"]))
    timer = timing_callback(micro_limit)
    args = TrainingArguments(output_dir=scratch, per_device_train_batch_size=2, gradient_accumulation_steps=8,
                             warmup_steps=2, max_steps=steps, learning_rate=2e-4, logging_steps=1, save_strategy="no",
                             report_to=[], use_cpu=True, remove_unused_columns=False, disable_tqdm=True, seed=42,
                             activation_checkpointing=True)
    # pad := eos after tokenizing: the collator masks id 2 (no EOS was ever added) and trains on <pad> (id 3)
    trainer = Trainer(model=model, args=args, train_dataset=rows,
                      data_collator=DataCollatorForLanguageModeling(seed_tok, mlm=False), callbacks=[timer])
    run_trainer(trainer, timer)
    return timer, 8


def run_lmtune(tok, pairs, steps: int, dtype: str, scratch: str, overrides: dict | None = None):
    from lmtune.bundled import bundled_path
    from lmtune.config import load_config
    from lmtune.data.readers import Example
    from lmtune.data.template import PromptTemplate
    from lmtune.data.tokenize import tokenize_examples
    from lmtune.model import (
        add_lora,
        choose_precision,
        configure_cpu_threads,
        frozen_weights_dtype,
        use_fused_gelu,
    )
    from lmtune.training.train import build_trainer

    config = load_config(bundled_path("configs/bloom-560m.yaml"),
                         {"train.max_steps": steps, "model.dtype": dtype, "train.logging_steps": 1, **(overrides or {})})
    samples, report = tokenize_examples([Example(p["question"], p["answer"]) for p in pairs], tok, PromptTemplate(), 512)
    precision = choose_precision("cpu", dtype)
    configure_cpu_threads()
    torch.manual_seed(config.train.seed)
    lora = config.lora
    model = make_model().to(frozen_weights_dtype(precision))
    use_fused_gelu(model)  # what lmtune's load_model does to a BLOOM model
    model = add_lora(model, lora.r, lora.alpha, lora.dropout, lora.bias, lora.target_modules)
    timer = timing_callback(None)
    trainer = build_trainer(config, model, tok, samples, precision, Path(scratch), [timer])
    trainer.args.disable_tqdm = True
    run_trainer(trainer, timer)
    return timer, samples, report, precision


def run_trl(tok, pairs, steps: int, micro_limit: int | None, scratch: str, bf16: bool):
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    data = Dataset.from_list([{"prompt": f"Human: {p['question']}\nAssistant:", "completion": " " + p["answer"]} for p in pairs])
    accumulation = 2
    # --quick: the whole first step is warm-up, then `micro_limit` micro-batches of the second are timed.
    timer = timing_callback(accumulation + micro_limit if micro_limit else None)
    args = SFTConfig(output_dir=scratch, per_device_train_batch_size=8, gradient_accumulation_steps=accumulation,
                     max_steps=steps, learning_rate=2e-4, warmup_steps=2, logging_steps=1, save_strategy="no", report_to=[],
                     use_cpu=True, bf16=bf16, disable_tqdm=True, seed=42)
    trainer = SFTTrainer(model=make_model(), args=args, train_dataset=data, processing_class=tok, callbacks=[timer],
                         peft_config=LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM",
                                                target_modules=["query_key_value"]))
    run_trainer(trainer, timer)
    return timer, accumulation


# ---------------------------------------------------------------- measures


def matmul_gflops(dtype: torch.dtype, n: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def lmtune_step_flops(samples: list[dict]) -> float:
    """FLOPs one optimizer step needs on the real tokens: forward + input-gradient backward (frozen weights)."""
    block_params = LAYERS * 12 * HIDDEN * HIDDEN  # qkv (3h^2) + dense (h^2) + MLP (8h^2) per layer
    flops = 0.0
    for s in samples:
        n = len(s["input_ids"])
        trained = n - s["prompt_length"]
        flops += 2 * 2 * block_params * n  # matmuls through the blocks, forward and backward
        flops += 2 * 2 * LAYERS * 2 * HIDDEN * n * n / 2  # causal attention scores and values
        flops += 2 * 2 * HIDDEN * VOCAB * trained  # output head on trained positions only
    return flops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="time a few micro-batches of the slow paths (under 5 minutes)")
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds of all paths (default: 1 quick, 2 full)")
    parser.add_argument("--skip-trl", action="store_true")
    args = parser.parse_args()
    rounds = args.rounds or (1 if args.quick else 2)
    import tempfile

    import transformers

    transformers.logging.set_verbosity_error()
    scratch = tempfile.mkdtemp(prefix="lmtune-bench-")
    started = time.perf_counter()
    tok = bpe_tokenizer()
    pairs = read_pairs(REPO / "data" / "vi_ai_qa.jsonl")[:N_SAMPLES]
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads;"
          f" {N_SAMPLES} samples, BLOOM-560m shape (vocab {VOCAB:,}), LoRA r=8 on query_key_value", flush=True)
    ceiling_bf16, ceiling_fp32 = matmul_gflops(torch.bfloat16), matmul_gflops(torch.float32)
    print(f"matmul ceiling: bf16 {ceiling_bf16:.0f} GFLOP/s, fp32 {ceiling_fp32:.0f} GFLOP/s", flush=True)
    from lmtune.model import choose_precision

    compute_dtype = choose_precision("cpu", "auto").compute_dtype  # the precision lmtune trains in on this CPU
    ceiling = ceiling_bf16 if compute_dtype == torch.bfloat16 else ceiling_fp32

    lm_steps = 3 if args.quick else 4
    results = {"seed": [], "lmtune": [], "trl": []}
    peaks = {"seed": 0.0, "lmtune": 0.0, "trl": 0.0}
    losses = {}
    samples = report = None
    order = ["lmtune", "seed", "trl"]
    for round_index in range(rounds):
        for name in (order if round_index % 2 == 0 else order[::-1]):
            if name == "trl" and args.skip_trl:
                continue
            release_memory()
            with PeakRss() as rss:
                if name == "seed":
                    timer, accumulation = run_seed(tok, pairs, 2, 3 if args.quick else None, scratch)
                    seconds = seconds_per_step(timer, accumulation, full_steps=not args.quick)
                elif name == "trl":
                    # TRL in the precision lmtune trains in: bf16 autocast on a CPU without native bf16 is emulated.
                    timer, accumulation = run_trl(tok, pairs, 2, 2 if args.quick else None, scratch,
                                                  bf16=compute_dtype == torch.bfloat16)
                    seconds = seconds_per_step(timer, accumulation, full_steps=not args.quick, warm_micro=accumulation)
                else:
                    timer, samples, report, precision = run_lmtune(tok, pairs, lm_steps, "auto", scratch)
                    seconds = seconds_per_step(timer, 8, full_steps=True)
                    losses["lmtune"] = timer.losses
            results[name].append(seconds)
            peaks[name] = max(peaks[name], rss.gb)
            print(f"round {round_index + 1} {name:6s}: {seconds:7.2f} s per optimizer step, peak RSS {rss.gb:.2f} GB"
                  f"{'' if name != 'lmtune' else f' (compute dtype {str(precision.compute_dtype)[6:]})'}", flush=True)

    release_memory()
    fp32_timer, *_ = run_lmtune(tok, pairs, lm_steps, "float32", scratch)
    fp32_loss, auto_loss = fp32_timer.losses[-1], losses["lmtune"][-1]
    loss_gap = abs(auto_loss - fp32_loss) / fp32_loss
    print(f"loss after {lm_steps} steps: lmtune {auto_loss:.4f}, same path in fp32 {fp32_loss:.4f}"
          f" (difference {100 * loss_gap:.2f}%, {statistics.median(fp32_timer.steps[1:]):.2f} s per step in fp32)")

    med = {k: statistics.median(v) for k, v in results.items() if v}
    tokens = report.tokens / len(samples)
    seed_tokens = statistics.mean(len(tok("Human: " + p["question"] + " Assistant: " + p["answer"])["input_ids"]) for p in pairs)
    mfu = lmtune_step_flops(samples) / med["lmtune"] / (ceiling * 1e9)
    print(f"mean real tokens per sample: lmtune {tokens:.1f} (prompt + answer + EOS), tutorial text {seed_tokens:.1f} padded to 512")
    print(f"lmtune tokens per second: {report.tokens / med['lmtune']:.0f}; seed path {N_SAMPLES * 512 / med['seed']:.0f} padded"
          f" tokens per second ({N_SAMPLES * seed_tokens / med['seed']:.0f} real)")
    print(f"total benchmark time {time.perf_counter() - started:.0f} s{' (--quick)' if args.quick else ''}")
    trl_ratio = med["trl"] / med["lmtune"] if "trl" in med else float("nan")
    print(f"speedup_vs_seed={med['seed'] / med['lmtune']:.1f} speedup_vs_trl={trl_ratio:.1f} mfu={mfu:.2f} peak_rss_gb={peaks['lmtune']:.2f}")


if __name__ == "__main__":
    sys.exit(main())
