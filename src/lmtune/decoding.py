"""The decode primitive: a prefill of the prompts, then one step per new token, each a forward pass over a KV cache
that returns the last position's logits. One loop (`run`) drives it, with two implementations of the steps:

* `decode`: eager, any batch of left-padded prompts over a DynamicCache; what `generate`, `generate_batch`, `chat`,
  `serve` and `eval` use, and what the training dry run times to estimate the validation report;
* `CompiledDecoder`: one prompt over a StaticCache with a compiled one-token step; single answers in `chat` and
  `serve`, where `compiling.decide_decoding` says it pays.

Why not `model.generate()`: on a CPU, the small models people fine-tune spend a few milliseconds per token in their
matmuls, and generate()'s per-step machinery (logits processors and warpers, stopping criteria, model-kwargs
bookkeeping, re-concatenating the whole sequence, streamer queues) adds a large share on top; `bench/generate_speed.py`
measures the two in one run. The loop does what lmtune's callers need and nothing else: left-padded batches,
positions that skip the padding, logits of the last position only, per-row stopping decided by the caller.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Protocol

import torch

from . import compiling
from .families import takes_position_ids

# Picks the next token of every row from the last position's logits [rows, vocab] (fp32).
Choose = Callable[[torch.Tensor], torch.Tensor]
# Told the tokens just chosen (one per row); answers, per row, whether that row is finished.
Observe = Callable[[list[int]], list[bool]]

# Finished rows leave the batch once this share of the rows still in it have finished (see run).
COMPACT_SHARE = 0.25
SMALLEST_CACHE = 512
# Each static-cache bucket is 4x the last: each is one more compile, and marking the cache's length dynamic did not
# give one graph for all (mark_dynamic: a constraint violation; maybe_mark_dynamic: specialised back, one compile per
# bucket). Attention reads the whole static cache every step, so buckets keep short answers in a small cache.
BUCKET_GROWTH = 4
# Inductor's decompose_mm_pass turns a one-row matmul on a CPU into a fused multiply-and-sum loop that reads the
# weight once; it decomposes those whose weight dimensions are both at most this. Its CPU default, 2,048, leaves out
# the output head (49,152 x 576 for SmolLM2), the largest matmul of the step. The pass is most of the compiled step's
# gain over the eager loop (`python bench/generate_speed.py --quick` measures the two).
DECOMPOSE_UP_TO = 1 << 20


def greedy(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=-1)


def forward(model, ids: torch.Tensor, positions: torch.Tensor | None, mask: torch.Tensor | None,
            cache) -> torch.Tensor:
    """One forward pass over `cache`: the last position's logits [rows, vocab] in fp32."""
    kwargs = {"position_ids": positions} if positions is not None else {}
    out = model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True, logits_to_keep=1, **kwargs)
    return out.logits[:, -1].float()


class Steps(Protocol):
    """What `run` drives: the prompts' forward pass, then one pass per token chosen for the rows still going."""

    def context(self): ...

    def prefill(self) -> torch.Tensor: ...

    def keep(self, rows: torch.Tensor) -> None: ...

    def step(self, tokens: torch.Tensor) -> torch.Tensor: ...


def run(steps: Steps, rows: int, max_new_tokens: int, choose: Choose, observe: Observe,
        compact_share: float = COMPACT_SHARE) -> None:
    """Decode until `observe` says every row is finished or `max_new_tokens` is reached.

    `choose` always sees logits for every row (a finished row's are zeros; its token is ignored). Once at least
    `compact_share` of the rows still in the batch have finished, they leave it (`steps.keep`), so the answers of an
    evaluation batch do not all run as long as its longest one. Leaving copies the cache, so it waits for a share of
    rows rather than acting on each one; 0 turns it off.
    """
    if max_new_tokens <= 0:
        return
    live = list(range(rows))  # the rows still in the batch, in batch order
    with steps.context():
        logits = steps.prefill()
        for step in range(max_new_tokens):
            if len(live) < rows:
                every_row = logits.new_zeros((rows, logits.shape[-1]))
                every_row[live] = logits
                logits = every_row
            tokens = choose(logits)
            done = observe(tokens.tolist())
            if all(done) or step == max_new_tokens - 1:
                return
            going = [i for i in live if not done[i]]
            if compact_share > 0 and len(live) - len(going) >= compact_share * len(live):
                steps.keep(torch.tensor([n for n, i in enumerate(live) if not done[i]]))
                live = going
            logits = steps.step(tokens[live][:, None])


# ---------------------------------------------------------------- eager: any batch, DynamicCache


class EagerSteps:
    """Left-padded prompts over a DynamicCache; each row's positions count its own tokens only, as in training."""

    def __init__(self, model, prompts: list[list[int]], pad_id: int, device: str = "cpu"):
        from transformers import DynamicCache

        self.model, self.device = model, device
        width = max(len(p) for p in prompts)
        self.ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
        self.mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        self.positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
        self.cache = DynamicCache(config=model.config)
        self.takes_positions = takes_position_ids(getattr(model, "config", None))
        # Without padding no mask is needed: the model's causal path is exact and cheaper (BLOOM's ALiBi needs it).
        self.needs_mask = any(len(p) != width for p in prompts) or not self.takes_positions

    def context(self):
        return torch.inference_mode()

    def _forward(self, ids: torch.Tensor) -> torch.Tensor:
        return forward(self.model, ids, self.positions if self.takes_positions else None,
                       self.mask if self.needs_mask else None, self.cache)

    def prefill(self) -> torch.Tensor:
        logits = self._forward(self.ids)
        self.positions = self.positions[:, -1:]
        return logits

    def keep(self, rows: torch.Tensor) -> None:
        rows = rows.to(self.device)
        self.cache.batch_select_indices(rows)
        self.positions, self.mask = self.positions[rows], self.mask[rows]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.positions = self.positions + 1
        if self.needs_mask:
            self.mask = torch.cat([self.mask, self.mask.new_ones((self.mask.shape[0], 1))], dim=1)
        return self._forward(tokens.to(self.device))


def decode(model, prompts: list[list[int]], pad_id: int, max_new_tokens: int, choose: Choose, observe: Observe,
           device: str = "cpu", compact_share: float = COMPACT_SHARE) -> None:
    """Generate for every prompt at once, eager, until `observe` says every row is finished or `max_new_tokens` is
    reached (see `run`)."""
    if max_new_tokens <= 0:
        return
    run(EagerSteps(model, prompts, pad_id, device), len(prompts), max_new_tokens, choose, observe, compact_share)


# ---------------------------------------------------------------- compiled: one row, StaticCache


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


class _StaticSteps:
    """One prompt over a StaticCache: the prompt eager (its length changes with every request, and it is one step of
    many), each new token through the decoder's compiled step."""

    def __init__(self, decoder: "CompiledDecoder", prompt: list[int], cache):
        self.decoder, self.prompt, self.cache = decoder, prompt, cache
        self.position = len(prompt)

    @contextmanager
    def context(self):
        # The weights are in the compute dtype already: the graph must not depend on the caller's autocast.
        with torch.inference_mode(), torch.autocast("cpu", enabled=False), _matvecs_decomposed():
            yield

    def prefill(self) -> torch.Tensor:
        self.cache.reset()
        return self.decoder._forward(torch.tensor([self.prompt]), torch.arange(len(self.prompt))[None], self.cache)

    def keep(self, rows: torch.Tensor) -> None:
        raise RuntimeError("a single row never leaves its batch: once it is finished, decoding is")

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        logits = self.decoder._run_step(tokens, torch.tensor([[self.position]]), self.cache)
        self.position += 1
        return logits


class CompiledDecoder:
    """Decoding of one prompt through a StaticCache and a compiled one-token forward (`torch.compile` of the whole
    step, as transformers' own `generate(cache_implementation="static")` does on a GPU), with Inductor's
    decompose_mm_pass for the one-row matmuls. The cache is sized in buckets (`bucket`), each one compile; the
    step runs in the weights' dtype, which `compiling.decide_decoding` checked."""

    def __init__(self, model, context_length: int, strict: bool = False, log=None):
        self.model = model
        self.log = log or (lambda message: None)
        self.context_length = context_length
        self.strict = strict
        self.takes_positions = takes_position_ids(getattr(model, "config", None))
        self._caches: dict[int, object] = {}
        compiling.use_inductor_cache()
        self._step = torch.compile(self._forward, dynamic=False, fullgraph=True)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        return forward(self.model, ids, positions if self.takes_positions else None, None, cache)

    def _run_step(self, ids: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        with compiling.errors(self.strict):
            return self._step(ids, positions, cache)

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

    def decode(self, prompt: list[int], max_new_tokens: int, choose: Choose, observe: Observe) -> None:
        """As `decode` for one row: `choose` gets the last position's logits [1, vocab] (fp32)."""
        if max_new_tokens <= 0:
            return
        cache = self._cache(self.bucket(len(prompt) + max_new_tokens))
        run(_StaticSteps(self, prompt, cache), 1, max_new_tokens, choose, observe)

    def warm_up(self) -> None:
        """Compile the smallest bucket's step now, so the first answer is not the one that waits for it."""
        self.decode([0], 2, greedy, lambda tokens: [False])
