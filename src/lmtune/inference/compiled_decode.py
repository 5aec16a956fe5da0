"""Single-stream decoding through a compiled one-token step: what `chat` and `serve` use for one answer at a time.

Decoding one token on a CPU reads every weight once, as a one-row matrix product per linear layer. PyTorch's eager
bf16 matmul reads a one-row product at about 8-10 GB/s on this project's machine (a plain sum reads 20-25 GB/s),
and the eager loop adds Python and dispatch work per layer on top. Two things from the field close part of the gap:

* transformers' StaticCache with `torch.compile` of the model's forward for one new token (what transformers'
  own `generate(cache_implementation="static")` does on a GPU): one graph for the whole step, fixed shapes;
* Inductor's own `decompose_mm_pass`, which turns a one-row matmul on a CPU into a fused multiply-and-sum loop
  that reads the weight once, vectorized, fused with the layer's other work (RMSNorm, rotary, SiLU).
  Without it the compiled step was only 1.1-1.2x the eager loop; with it, 1.8-2.0x
  (`bench/generate_speed.py`, SmolLM2-135M bf16, single stream, greedy).

The step runs in the weights' dtype, as `load_for_inference` chose it: bf16 on a CPU with native bf16 (AVX-512
BF16, AMX), fp32 on one without (AVX2 only, as many laptops are), where bf16 arithmetic is emulated and slower than fp32.
On an AVX2-only EPYC (Zen 3, 2 cores) the compiled fp32 step measured 2.0x the eager fp32 loop: 25.6 against 12.7
tokens/s, 0.50 of the bound of reading the fp32 weights once per token at the bandwidth measured in the same run.

Batched decoding (eval, `generate_batch`, `serve` under load) stays eager: with 8 rows each weight is read once for
8 tokens, the eager loop did 100 tokens/s, and the compiled static-cache step measured 0.83-0.95x of it.

The cache is sized in buckets (512, 2,048, 8,192 tokens, up to the model's context): attention reads the whole
static cache every step, so a 2,048-slot cache for a 300-token answer cost a third of the gain (1.2-1.5x instead of
1.8-2.0x). Each bucket is one more compile (about a minute the first time, seconds when Inductor's disk cache has
it), said on stderr when it starts; the first bucket is compiled when the model loads.

"auto" compiles where the compile is repaid: a CPU, bf16 or fp32 weights (what `load_for_inference` picks on a
CPU), a Llama-family model (RMSNorm; where it was measured), a C++ compiler (Inductor generates C++),
weights of at least `COMPILE_WORTH_BYTES` (a small model's tokens are fast anyway), and a session of many answers
(`chat`, `serve`): for one `generate` answer the compile costs more than it saves.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager

import torch

from ..training.compiled import cpp_compiler, inductor_cache_dir

# Weights (bytes) from which "auto" compiles: SmolLM2-135M in bf16 is 270 MB, test models are a few MB.
COMPILE_WORTH_BYTES = 200e6
SMALLEST_CACHE = 512
# Each bucket is 4x the last: each is one more compile, and marking the cache's length dynamic did not give one
# graph for all (mark_dynamic: a constraint violation; maybe_mark_dynamic: specialised back, one compile per bucket).
BUCKET_GROWTH = 4
# Inductor's pass decomposes one-row matmuls whose weight dimensions are both at most this (its CPU default,
# 2,048, leaves out the output head, 49,152 x 576 for SmolLM2, the largest matmul of the step).
DECOMPOSE_UP_TO = 1 << 20


def weight_bytes(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:  # a tied embedding is the output head too: counted once
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def decide(setting, model, device: str, compute_dtype: torch.dtype, one_answer: bool) -> tuple[bool, str]:
    """(compile the decode step?, why) for generate.compile = setting ("auto", True or False)."""
    if setting is False:
        return False, "off (generate.compile false)"
    config = getattr(model, "config", None)
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    # Forced or not, these cannot work: the step runs on its weights without autocast, through a StaticCache.
    if device != "cpu":
        return False, f"off: the compiled decode step is for a CPU (this model is on {device})"
    # bf16 on a CPU with native bf16, fp32 on one without (AVX2 only), as load_for_inference picks them: the step
    # computes in its weights' dtype, so the weights must be in the compute dtype and one of those two. "In", not
    # "only": peft keeps an adapter's LoRA weights in fp32 on a bf16 base (autocast_adapter_dtype), and that compiles.
    if compute_dtype not in (torch.bfloat16, torch.float32) or compute_dtype not in dtypes:
        return False, "off: the compiled decode step needs bf16 or fp32 weights (--dtype auto, bfloat16 or float32)"
    if not getattr(model, "_can_compile_fullgraph", True):  # a peft model answers for its base model
        return False, f"off: transformers cannot compile {getattr(config, 'model_type', 'this model')} in one graph"
    if cpp_compiler() is None:
        return False, ("off: no C++ compiler found (g++, clang++ or $CXX), which torch.compile needs on a CPU; "
                       "installing one makes single answers about 1.8x faster")
    if setting is True:
        return True, "on (generate.compile true)"
    if not hasattr(config, "rms_norm_eps"):
        return False, f"off: auto does not compile {getattr(config, 'model_type', 'this model')} (no measured gain)"
    if one_answer:
        return False, "off: one answer does not repay compiling (chat and serve compile; generate.compile true forces it)"
    if weight_bytes(model) < COMPILE_WORTH_BYTES:
        return False, "off: the model is small enough that its tokens are fast without compiling"
    return True, "on: one-token decode step compiled for single answers (about a minute the first time, cached after)"


@contextmanager
def _matvecs_decomposed():
    from torch._inductor import config
    from torch._inductor.fx_passes import decompose_mem_bound_mm

    # The pass reads its size limits once, when first imported (any earlier compile imports it, training's too),
    # so the module's copy is set as well; it only acts where decompose_mm_pass is asked for, as below.
    decompose_mem_bound_mm.cpu_max_other_dimension_decomposition = DECOMPOSE_UP_TO
    options = {"decompose_mm_pass": {"cpu_max_other_dimension_decomposition": DECOMPOSE_UP_TO}}
    with config.patch(post_grad_fusion_options=options):
        yield


class CompiledDecoder:
    """Greedy or sampled decoding of one prompt through a StaticCache and a compiled one-token forward."""

    def __init__(self, model, context_length: int, strict: bool = False, log=None):
        self.model = model
        self.log = log or (lambda message: None)
        self.context_length = context_length
        self.strict = strict
        self._caches: dict[int, object] = {}
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(inductor_cache_dir())
        self._step = torch.compile(self._forward, dynamic=False, fullgraph=True)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        out = self.model(input_ids=ids, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float()

    def bucket(self, tokens: int) -> int | None:
        """The cache size for `tokens` (prompt + answer), or None when it exceeds the model's context."""
        if tokens > self.context_length:
            return None
        size = SMALLEST_CACHE
        while size < tokens:
            size *= BUCKET_GROWTH
        return min(size, self.context_length)

    def fits(self, prompt_tokens: int, max_new_tokens: int) -> bool:
        return self.bucket(prompt_tokens + max_new_tokens) is not None

    def _cache(self, size: int):
        from transformers import StaticCache

        if size not in self._caches:
            if self._caches:  # the first one is compiled while loading, and said there
                self.log(f"compile: the decode step for answers up to {size} tokens (about a minute the first time)")
            self._caches[size] = StaticCache(config=self.model.config, max_cache_len=size)
        return self._caches[size]

    def decode(self, prompt: list[int], max_new_tokens: int, choose, observe) -> None:
        """As decode.decode for one row: `choose` gets the last position's logits [1, vocab] (fp32)."""
        if max_new_tokens <= 0:
            return
        cache = self._cache(self.bucket(len(prompt) + max_new_tokens))
        # The weights are in the compute dtype already: the graph must not depend on the caller's autocast.
        with torch.inference_mode(), torch.autocast("cpu", enabled=False), _matvecs_decomposed():
            cache.reset()
            positions = torch.arange(len(prompt))[None]
            # The prompt runs eager: its length changes with every request, and it is one step of many.
            logits = self._forward(torch.tensor([prompt]), positions, cache)
            position = len(prompt)
            for step in range(max_new_tokens):
                tokens = choose(logits)
                done = observe(tokens.tolist())
                if all(done) or step == max_new_tokens - 1:
                    return
                logits = self._run_step(tokens[:, None], torch.tensor([[position]]), cache)
                position += 1

    def _run_step(self, ids, positions, cache):
        if self.strict:
            return self._step(ids, positions, cache)
        import torch._dynamo

        # "auto": a compile that fails (an unsupported layer, a broken compiler) falls back to the eager forward.
        suppress = torch._dynamo.config.suppress_errors
        torch._dynamo.config.suppress_errors = True
        try:
            return self._step(ids, positions, cache)
        finally:
            torch._dynamo.config.suppress_errors = suppress

    def warm_up(self) -> None:
        """Compile the smallest bucket's step now, so the first answer is not the one that waits for it."""
        self.decode([0], 2, lambda logits: logits.argmax(-1), lambda tokens: [False])


def enable(loaded, setting, one_answer: bool, log=None) -> bool:
    """Attach a CompiledDecoder to `loaded` when `decide` says so, compiled before it returns; says which in one line."""
    from .batching import context_length

    log = log or (lambda message: print(message, file=sys.stderr))
    use, why = decide(setting, loaded.model, loaded.device, loaded.compute_dtype, one_answer)
    if use or setting is True:
        log(f"compile: {why}")
    if not use:
        if setting is True:
            from ..errors import ModelError

            raise ModelError(f"generate.compile true: {why.removeprefix('off: ')}")
        return False
    loaded.compiled_decoder = CompiledDecoder(loaded.model, context_length(loaded), strict=setting is True, log=log)
    loaded.compiled_decoder.warm_up()
    return True
