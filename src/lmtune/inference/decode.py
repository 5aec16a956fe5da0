"""The decode loop behind `generate`, `generate_batch`, `chat` and `serve`: the model's forward pass over a KV
cache, one step per new token, and as little else as possible.

Why not `model.generate()`: on a CPU, the small models people fine-tune (SmolLM2-135M: 30 layers of 576-wide
matmuls) spend a few milliseconds per token in their matmuls, and generate()'s per-step machinery (logits
processors and warpers, stopping criteria, model-kwargs bookkeeping, re-concatenating the whole sequence,
streamer queues) adds a large share on top; `bench/generate_speed.py` measures the two in one run. The loop
below does what our callers need and nothing else: left-padded batches, positions that skip the padding, logits
of the last position only, per-row stopping decided by the caller.
"""

from __future__ import annotations

from typing import Callable

import torch

# Picks the next token of every row from the last position's logits [rows, vocab] (fp32).
Choose = Callable[[torch.Tensor], torch.Tensor]
# Told the tokens just chosen (one per row); answers, per row, whether that row is finished.
Observe = Callable[[list[int]], list[bool]]


# Finished rows leave the batch once this share of the rows still in it have finished (see decode).
COMPACT_SHARE = 0.25


def greedy(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=-1)


def decode(model, prompts: list[list[int]], pad_id: int, max_new_tokens: int, choose: Choose, observe: Observe,
           device: str = "cpu", compact_share: float = COMPACT_SHARE) -> None:
    """Generate for every prompt at once until `observe` says every row is finished or `max_new_tokens` is reached.

    `choose` always sees logits for every row (a finished row's are zeros; its token is ignored). Once at least
    `compact_share` of the rows still in the batch have finished, they leave it: the KV cache keeps only the
    others (`Cache.batch_select_indices`), so the answers of an evaluation batch do not all run as long as its
    longest one (`bench/eval_batches.py`: 1.11x on SmolLM2's evaluation-shaped batches of 24). Compacting copies
    the cache, so it waits for a share of rows rather than acting on each one; 0 turns it off.
    """
    from transformers import DynamicCache

    if max_new_tokens <= 0:
        return
    width = max(len(p) for p in prompts)
    padded = any(len(p) != width for p in prompts)
    input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    # Left padding: each row's positions count its own tokens only, as they did in training.
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    config = getattr(model, "config", None)
    # BLOOM (ALiBi) derives positions from the attention mask and takes no position_ids.
    takes_positions = getattr(config, "model_type", "") != "bloom"

    def forward(ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        kwargs = {"position_ids": pos} if takes_positions else {}
        # Without padding no mask is needed: the model's causal path is exact and cheaper.
        attention = mask if padded or not takes_positions else None
        out = model(input_ids=ids, attention_mask=attention, cache=cache, use_cache=True, logits_to_keep=1, **kwargs)
        return out.logits[:, -1].float()

    rows = len(prompts)
    live = list(range(rows))  # the rows still in the batch, in batch order
    with torch.inference_mode():
        logits = forward(input_ids, positions)
        positions = positions[:, -1:]
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
                keep = torch.tensor([n for n, i in enumerate(live) if not done[i]], device=device)
                cache.batch_select_indices(keep)
                positions, mask, live = positions[keep], mask[keep], going
            positions = positions + 1
            if padded or not takes_positions:
                mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
            logits = forward(tokens[live][:, None].to(device), positions)
