"""Shared prompt prefixes: the tokens every sample of a micro-batch begins with run through the model once.

A chat template puts the same tokens in front of every sample: SmolLM2's default system prompt is 24 tokens
("<|im_start|>system\\nYou are a helpful AI assistant named SmolLM ...<|im_start|>user\\n"), about an eighth of a
bundled sample, and a system prompt of the user's own is often longer. Their hidden states are the same in every
row, so computing them once per micro-batch and letting every row attend to that one copy gives the same loss
and gradients (a test checks both) for less work: the gradients that every row sends back to the prefix's keys
and values are summed into the one copy, as autograd sums them through an expand.

The layout keeps one tensor of rows, so the decoder layers (compiled or not) run unchanged: every row holds its
sample without the prefix, with position ids that start after it, and the prefix's tokens (positions 0, 1, ...)
fill padding slots at the ends of the shortest rows. The batch is as wide as its longest sample less the prefix.
Only attention differs (`shared_prefix_attention`): every sample's tokens attend to the prefix's keys and values,
gathered from their slots, and to their own row's earlier tokens; the prefix's tokens attend to the prefix's earlier
tokens only. The prefix ends before the first trained position of every row (positions whose hidden state predicts
a trained token are never moved), so the answer-only loss sees every trained token once.

Where it applies: a CPU training step on the answer-only path of a family whose attention goes through
transformers' attention interface (the families that train on packed rows), without gradient checkpointing (its
recomputation would run the model's own attention), without dropout (one copy would share one dropout mask) and
without attention soft-capping.

Why by hand: prefix sharing in the field (vLLM's and SGLang's prefix caching) serves inference; transformers'
key/value cache could hold the prefix, but it would need a second pass and its update inside each compiled layer
would add graphs; this layout needs neither.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data.tokenize import IGNORE_INDEX
from . import attention
from .attention import reads_packed_rows

# Fewer shared tokens than this are not worth looking further.
MIN_PREFIX_TOKENS = 8
# The layout is used when it saves at least this share of the batch's positions: its gathers, the prefix's keys in
# every row's attention and the larger mask cost about what a smaller saving gains (docs/performance.md,
# "Shared prefixes").
MIN_SAVING = 0.10
SHARED_PREFIX_ATTENTION = "lmtune_shared_prefix"
PREFIX_KWARG = "shared_prefix"  # how the layout reaches the attention function (transformers' attention kwargs)


@dataclass
class SharedPrefixBatch:
    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    prefix: int  # tokens computed once
    slots: torch.Tensor  # [prefix]: where prefix token p sits, as row * width + column
    visible: torch.Tensor  # [rows, 1, width, prefix + width]: which keys (the prefix's, then the row's) each query sees
    key_positions: torch.Tensor  # [rows, prefix + width]: the position of each of those keys

    def attention_kwargs(self, dtype: torch.dtype) -> dict:
        """The layout for the attention function, with `visible` also as the additive mask eager attention takes in
        `dtype` (the queries' dtype), built once here rather than in every layer."""
        additive = torch.zeros(self.visible.shape, dtype=dtype, device=self.visible.device)
        additive.masked_fill_(~self.visible, torch.finfo(dtype).min)
        return {PREFIX_KWARG: (self.slots, self.visible, additive, self.key_positions)}


def shared_prefix_layout(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor,
                         width_multiple: int = 1, min_tokens: int = MIN_PREFIX_TOKENS) -> SharedPrefixBatch | None:
    """The micro-batch in the shared-prefix layout (module docstring), or None where it would not pay: fewer than
    two rows, a prefix shorter than `min_tokens`, or a batch less than MIN_SAVING narrower. The rows are
    right-padded (the collator's contract); the new width is rounded up to `width_multiple` as the collator rounds
    it."""
    rows, width = input_ids.shape
    if rows < 2 or attention_mask is None:
        return None
    lengths = attention_mask.sum(dim=1).tolist()
    agree = (input_ids == input_ids[:1]).all(dim=0)
    common = int(agree.long().cumprod(dim=0).sum())
    trained = labels != IGNORE_INDEX
    first_trained = int(torch.where(trained.any(dim=1), trained.float().argmax(dim=1), width).min())
    # The prefix's last position predicts the token after it: that token must not be trained, so the prefix stops
    # one before the first trained token of any row.
    prefix = min(common, min(lengths), first_trained - 1)
    if prefix < min_tokens:
        return None
    own = [n - prefix for n in lengths]  # each row's tokens after the prefix
    multiple = max(1, width_multiple)
    new_width = -(-max(own) // multiple) * multiple
    while sum(new_width - n for n in own) < prefix:  # the prefix needs that many free slots
        new_width += multiple
    if new_width > (1 - MIN_SAVING) * width:
        return None
    device = input_ids.device
    ids = torch.full((rows, new_width), int(input_ids[0, 0]), dtype=input_ids.dtype, device=device)
    new_labels = torch.full((rows, new_width), IGNORE_INDEX, dtype=labels.dtype, device=device)
    positions = torch.full((rows, new_width), prefix, dtype=torch.long, device=device)
    positions += torch.arange(new_width, device=device)
    # Padding never goes past the batch's last real position: rope scalings that read the largest position id
    # (dynamic NTK, longrope) must pick what they pick for the ordinary batch.
    positions.clamp_(max=max(lengths) - 1)
    for row, n in enumerate(own):
        ids[row, :n] = input_ids[row, prefix : prefix + n]
        new_labels[row, :n] = labels[row, prefix : prefix + n]
    # The prefix fills free slots, the shortest rows' first.
    slots = [row * new_width + column for row in sorted(range(rows), key=own.__getitem__)
             for column in range(own[row], new_width)][:prefix]
    slots_t = torch.tensor(slots, dtype=torch.long, device=device)
    ids.view(-1)[slots_t] = input_ids[0, :prefix]
    positions.view(-1)[slots_t] = torch.arange(prefix, device=device)
    # Queries: a sample's own token sees the whole prefix and its row's own earlier tokens; a prefix token sees the
    # prefix's earlier tokens only. A padding slot sees the whole prefix (a softmax row must see something).
    column = torch.arange(new_width, device=device)
    own_t = torch.tensor(own, device=device)
    is_own = column[None, :] < own_t[:, None]  # [rows, width]
    prefix_index = torch.full((rows * new_width,), -1, dtype=torch.long, device=device)
    prefix_index[slots_t] = torch.arange(prefix, device=device)
    prefix_index = prefix_index.view(rows, new_width)
    is_prefix = prefix_index >= 0
    p = torch.arange(prefix, device=device)
    sees_prefix = torch.where(is_prefix[..., None], p[None, None, :] <= prefix_index[..., None], True)
    sees_own = (column[None, None, :] <= column[None, :, None]) & is_own[:, None, :] & ~is_prefix[..., None]
    visible = torch.cat([sees_prefix, sees_own], dim=-1)[:, None]
    key_positions = torch.cat([p.expand(rows, prefix), positions], dim=1)
    return SharedPrefixBatch(ids, new_labels, positions, prefix, slots_t, visible, key_positions)


def common_prefix(samples: list[dict]) -> int:
    """The prompt tokens every one of the tokenized samples begins with, up to one before the first trained token
    (the layout's rule; a micro-batch of some of them may share more)."""
    if not samples:
        return 0
    first = samples[0]["input_ids"]
    common = min(len(first), *(_first_trained(s) - 1 for s in samples))
    for s in samples[1:]:
        common = next((i for i, (a, b) in enumerate(zip(first[:common], s["input_ids"])) if a != b),
                      min(common, len(s["input_ids"])))
    return max(0, common)


def _first_trained(sample: dict) -> int:
    return next((i for i, label in enumerate(sample["labels"]) if label != IGNORE_INDEX), len(sample["labels"]))


def describe(samples: list[dict], causal_lm, enabled: bool) -> str | None:
    """The pre-flight line about a prompt prefix every sample shares, or None when they share too little."""
    prefix = common_prefix(samples)
    if prefix < MIN_PREFIX_TOKENS:
        return None
    reason = "train.share_prefix is false" if not enabled else why_not_shared(causal_lm, training=True)
    if reason:
        return f"shared prefix: every sample begins with the same {prefix} prompt tokens, run for each sample ({reason})"
    return (f"shared prefix: every sample begins with the same {prefix} prompt tokens; they run once per micro-batch "
            f"where that makes it at least {MIN_SAVING:.0%} narrower (the same loss and gradients)")


def shared_prefix_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.models.llama.modeling_llama import eager_attention_forward

    layout = kwargs.pop(PREFIX_KWARG, None)
    if layout is None:
        raise RuntimeError(f"{type(module).__name__} did not pass {PREFIX_KWARG} to its attention function")
    slots, visible, additive, key_positions = layout
    query_positions = kwargs.pop("position_ids", None)
    window = kwargs.pop("sliding_window", None) or None
    rows, heads, width = query.shape[0], query.shape[1], query.shape[2]

    def with_prefix(states):  # [rows, kv heads, width, dim] -> [rows, kv heads, prefix + width, dim]
        flat = states.transpose(1, 2).reshape(rows * width, states.shape[1], states.shape[3])
        prefix = flat[slots].transpose(0, 1)[None]  # [1, kv heads, prefix, dim]
        return torch.cat([prefix.expand(rows, -1, -1, -1), states], dim=2)

    key, value = with_prefix(key), with_prefix(value)
    if window is not None:  # a sliding-window layer sees only keys less than `window` positions back
        visible = visible & ((query_positions[:, None, :, None] - key_positions[:, None, None, :]) < window)
        additive = torch.zeros(visible.shape, dtype=query.dtype, device=query.device)
        additive = additive.masked_fill(~visible, torch.finfo(query.dtype).min)
    if rows * heads * width * key.shape[2] * 4 <= attention.EAGER_SCORES_BYTES:
        # The same choice as attention_for_batch: eager attention for small score tensors (training/attention.py).
        return eager_attention_forward(module, query, key, value, additive.to(query.dtype), dropout=dropout,
                                       scaling=scaling, **kwargs)
    return sdpa_attention_forward(module, query, key, value, visible, dropout=dropout, scaling=scaling,
                                  is_causal=False, **kwargs)


def can_share(causal_lm) -> bool:
    """Whether this model's training step can run the shared-prefix layout now (module docstring)."""
    return why_not_shared(causal_lm) is None


def why_not_shared(causal_lm, training: bool | None = None) -> str | None:
    """Why this model's training step cannot run the shared-prefix layout now (`training`: as if in that mode;
    default its own); None when it can."""
    from .. import families

    config = causal_lm.config
    # Families proven to read rows of several samples through the attention interface alone (tests/training/
    # test_shared_prefix.py); others may mix positions outside attention (convolutions, state-space layers) or pass
    # their attention more than the plain function computes (attention sinks).
    if not families.packs(config):
        return f"{families.facts(config).name}'s layers are not known to read it"
    if attention._checkpointing(causal_lm):  # the recomputation would run the model's own attention
        return "gradient checkpointing is on"
    if not reads_packed_rows(causal_lm):
        return "the model's attention does not go through transformers' attention interface"
    if getattr(config, "attn_logit_softcapping", None):  # the plain attention below does not cap scores
        return "the model caps attention scores"
    if not (causal_lm.training if training is None else training):
        return None
    if float(getattr(config, "attention_dropout", 0.0) or 0.0) > 0:
        return "attention dropout is on"
    if any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in causal_lm.modules()):
        return "dropout is on (lora.dropout)"
    return None


def attention_with_shared_prefix(causal_lm):
    """Run the block with `shared_prefix_attention`; the model's own choice is restored after."""
    return attention.custom_attention(causal_lm, SHARED_PREFIX_ATTENTION, shared_prefix_attention)
