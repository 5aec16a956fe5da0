"""One padding-free row per micro-batch, with the prompt tokens every sample begins with run once.

A micro-batch of right-padded rows computes its padding, and a chat template puts the same tokens in front of every
sample: SmolLM2's default system prompt is 24 tokens ("<|im_start|>system\\nYou are a helpful AI assistant named
SmolLM ...<|im_start|>user\\n"), about an eighth of a bundled sample, and a system prompt of the user's own is often
longer. Laid out as one row (the common prefix once, then every sample's own tokens, then padding up to the width
multiple), the linear layers, norms and activations, most of a step, run on the real tokens only, and the prefix's
hidden states once: the same loss and gradients (tests check both) for less work. The gradients that every sample
sends back to the prefix's keys and values are summed into the one copy, as autograd sums them through an expand.

Only attention differs (`shared_prefix_attention`): each sample's queries, keys and values are gathered into
[samples, length] slots, every sample's tokens attend to the prefix's keys and values and to their own earlier
tokens, and the outputs are gathered back into the row; the prefix's tokens attend to the prefix's earlier tokens
only. The decoder layers (compiled or not) run unchanged. The prefix ends before the first trained position of
every sample (positions whose hidden state predicts a trained token are never moved), and no sample's first token is
trained, so the answer-only loss sees every trained token once even where the next sample follows in the row.

Where it applies: a CPU training step on the answer-only path of a family whose attention goes through
transformers' attention interface (the families that train on packed rows), without gradient checkpointing (its
recomputation would run the model's own attention), without dropout (one copy of the prefix would share one dropout
mask) and without attention soft-capping.

Why by hand: padding-free training in the field runs flash-attention's variable-length kernel, which has no CPU
build; prefix sharing (vLLM's and SGLang's prefix caching) serves inference, and transformers' key/value cache could
hold the prefix only with a second pass and a cache update inside each compiled layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data.tokenize import IGNORE_INDEX
from . import attention
from .attention import reads_packed_rows

# Fewer shared tokens than this are not worth looking further.
MIN_PREFIX_TOKENS = 8
# The layout is used when it saves at least this share of the batch's positions (or `blocks_pay`): (smallest hidden
# size, saving) from narrow to wide. Its cost, the gathers of queries, keys, values and outputs both ways, grows with
# a layer's width; its gain, the FLOPs of the positions it drops, with about the width squared. So a narrow model
# needs a larger saving to come out ahead (docs/performance.md, "Shared prefixes").
MIN_SAVING = ((0, 0.10), (1024, 0.05))
# Eager attention runs each sample's queries in this many blocks, each against the keys up to its own last query
# (`_eager_attention`), where a sample's slots are at least QUERY_BLOCKS_FROM long; shorter ones, where attention is
# a small part of the step, run as one block (every query against every key).
QUERY_BLOCKS = 2
QUERY_BLOCKS_FROM = 256
SHARED_PREFIX_ATTENTION = "lmtune_shared_prefix"
PREFIX_KWARG = "shared_prefix"  # how the layout reaches the attention function (transformers' attention kwargs)


class _Gather(torch.autograd.Function):
    """`x` with a zero row appended along dim 2, at `index`; the backward pass gathers the gradient at `inverse` the
    same way. Exact where every row of `x` that receives a gradient appears once in `index` and every other entry of
    the result receives none (padding slots: masked keys, discarded queries). Its backward pass is a gather where
    indexing's would be a scatter-add."""

    @staticmethod
    def forward(ctx, x, index, inverse):
        ctx.save_for_backward(inverse)
        return _take(x, index)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return _take(grad, inverse), None, None


def _take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    zero = x.new_zeros(x.shape[0], x.shape[1], 1, x.shape[3])
    return torch.cat([x, zero], dim=2).index_select(2, index)


@dataclass
class SharedPrefixBatch:
    input_ids: torch.Tensor  # [1, tokens]: the prefix once, then every sample's own tokens, then padding
    labels: torch.Tensor
    position_ids: torch.Tensor
    prefix: int  # tokens computed once (0: none, the row only drops the padding)
    samples: int
    length: int  # the most own tokens of a sample: attention runs over [samples, length] slots
    slot_token: torch.Tensor  # [samples * length]: the row's token in each slot; a padding slot: the zero row
    token_slot: torch.Tensor  # [tokens]: each sample's token's slot; the prefix's and the row's padding: the zero row
    visible: torch.Tensor  # [samples, 1, length, prefix + length]: which keys (the prefix's, then the sample's) it sees
    key_positions: torch.Tensor  # [samples, prefix + length]: the position of each of those keys

    def attention_kwargs(self, dtype: torch.dtype) -> dict:
        """The layout for the attention function, with the masks also as the additive masks eager attention takes in
        `dtype` (the queries' dtype), cut into blocks of queries, built once here rather than in every layer."""
        p = torch.arange(self.prefix, device=self.visible.device)
        prefix_visible = (p[None, :] <= p[:, None])[None, None]
        # The outputs go back the other way: each sample's token from its slot, each slot's gradient from its token
        # among the tokens after the prefix.
        back = (self.token_slot[self.prefix :], self.slot_token - self.prefix)
        blocks = _query_blocks(_additive(self.visible, dtype), self.prefix, self.length)
        return {PREFIX_KWARG: (self.samples, self.length, self.prefix, self.slot_token, self.token_slot, back,
                               self.visible, blocks, prefix_visible, _additive(prefix_visible, dtype),
                               self.key_positions)}


def _additive(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(~visible, torch.finfo(dtype).min)


def _query_blocks(additive: torch.Tensor, prefix: int, length: int) -> tuple[torch.Tensor, ...]:
    """The additive mask cut into QUERY_BLOCKS blocks of slots (one below QUERY_BLOCKS_FROM slots), each
    [samples, 1, its slots, prefix + its last slot + 1]: a sample's query sees no key of a later slot of its own, so
    a block needs no key beyond its last query's. Cut here, once per micro-batch, so that inside the compiled layers
    every block's size is a size of its mask (slicing by sizes computed there from the dynamic length fails to
    compile)."""
    count = QUERY_BLOCKS if length >= QUERY_BLOCKS_FROM else 1
    edges = sorted({length * i // count for i in range(count + 1)})
    return tuple(additive[:, :, start:end, : prefix + end].contiguous() for start, end in zip(edges, edges[1:]))


def blocks_pay(samples: int, length: int, prefix: int, heads: int) -> bool:
    """Whether the layout is worth taking for its attention alone, where it saves no positions: samples of at least
    QUERY_BLOCKS_FROM slots run eager attention in blocks of queries (`_eager_attention`), where the ordinary batch
    computes every query against every key. Only while the scores are small enough for eager attention; above that,
    both run sdpa."""
    scores = samples * heads * length * (prefix + length) * 4
    return QUERY_BLOCKS > 1 and length >= QUERY_BLOCKS_FROM and 0 < scores <= attention.EAGER_SCORES_BYTES


def min_saving(hidden_size: int) -> float:
    """The share of a micro-batch's positions the layout must save in a model of this hidden size (MIN_SAVING)."""
    return [saving for width, saving in MIN_SAVING if hidden_size >= width][-1]


def hidden_size_of(causal_lm) -> int:
    return causal_lm.config.get_text_config().hidden_size


def heads_of(causal_lm) -> int:
    return causal_lm.config.get_text_config().num_attention_heads


def shared_prefix_layout(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor,
                         width_multiple: int = 1, min_tokens: int = MIN_PREFIX_TOKENS, hidden_size: int = 0,
                         heads: int = 0) -> SharedPrefixBatch | None:
    """The micro-batch as one row (module docstring), or None where it would not pay: a row that saves less than
    `min_saving(hidden_size)` of the batch's positions, unless its samples are long enough for eager attention in
    blocks of queries (`blocks_pay`, given the model's number of attention `heads`). A common prefix shorter than
    `min_tokens` runs in every sample. The rows are right-padded (the collator's contract); the row's length is
    rounded up to `width_multiple` as the collator rounds widths."""
    rows, width = input_ids.shape
    if rows < 1 or attention_mask is None:
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
        prefix = 0
    own = [n - prefix for n in lengths]  # each sample's tokens after the prefix
    multiple = max(1, width_multiple)
    tokens = -(-(prefix + sum(own)) // multiple) * multiple
    length = max(1, max(own))
    saves = rows > 1 and tokens <= (1 - min_saving(hidden_size)) * rows * width  # one row has nothing to share
    if not saves and not blocks_pay(rows, length, prefix, heads):
        return None
    device = input_ids.device
    ids = torch.full((tokens,), int(input_ids[0, 0]), dtype=input_ids.dtype, device=device)
    new_labels = torch.full((tokens,), IGNORE_INDEX, dtype=labels.dtype, device=device)
    # The row's padding takes position 0: rope scalings that read the largest position id (dynamic NTK, longrope)
    # must pick what they pick for the ordinary batch.
    positions = torch.zeros((tokens,), dtype=torch.long, device=device)
    ids[:prefix] = input_ids[0, :prefix]
    positions[:prefix] = torch.arange(prefix, device=device)
    slot_token = torch.full((rows * length,), tokens, dtype=torch.long, device=device)
    token_slot = torch.full((tokens,), rows * length, dtype=torch.long, device=device)
    at = prefix
    for row, n in enumerate(own):
        ids[at : at + n] = input_ids[row, prefix : prefix + n]
        new_labels[at : at + n] = labels[row, prefix : prefix + n]
        positions[at : at + n] = torch.arange(prefix, prefix + n, device=device)
        slot_token[row * length : row * length + n] = torch.arange(at, at + n, device=device)
        token_slot[at : at + n] = torch.arange(row * length, row * length + n, device=device)
        at += n
    # A sample's token sees the whole prefix and its sample's earlier tokens. A padding slot sees its sample's
    # first slot (a softmax row must see something; its output is never read).
    column = torch.arange(length, device=device)
    real = column[None, :] < torch.tensor(own, device=device)[:, None]  # [samples, length]
    sees_own = (column[None, :] <= column[:, None])[None] & real[:, None, :]
    sees_own = torch.where(real[:, :, None], sees_own, column[None, None, :] == 0)
    visible = torch.cat([real[:, :, None].expand(rows, length, prefix), sees_own], dim=-1)[:, None]
    slot_positions = torch.cat([positions, positions.new_zeros(1)])[slot_token].view(rows, length)
    key_positions = torch.cat([torch.arange(prefix, device=device).expand(rows, prefix), slot_positions], dim=1)
    return SharedPrefixBatch(ids[None], new_labels[None], positions[None], prefix, rows, length, slot_token,
                             token_slot, visible, key_positions)


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
    return (f"shared prefix: every sample begins with the same {prefix} prompt tokens; they run once per micro-batch, "
            f"in one row without padding, where that saves at least {min_saving(hidden_size_of(causal_lm)):.0%} of "
            f"its positions or its samples are {QUERY_BLOCKS_FROM} tokens or longer (the same loss and gradients)")


def shared_prefix_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    layout = kwargs.pop(PREFIX_KWARG, None)
    if layout is None:
        raise RuntimeError(f"{type(module).__name__} did not pass {PREFIX_KWARG} to its attention function")
    (samples, length, prefix, slot_token, token_slot, back, visible, blocks, prefix_visible, prefix_additive,
     key_positions) = layout
    kwargs.pop("position_ids", None)
    window = kwargs.pop("sliding_window", None) or None
    heads, dim = query.shape[1], query.shape[3]

    def by_sample(states):  # [1, heads, tokens, dim] -> [samples, heads, length, dim]
        return _Gather.apply(states, slot_token, token_slot).view(states.shape[1], samples, length, dim).transpose(0, 1)

    q, k, v = by_sample(query), by_sample(key), by_sample(value)
    if prefix:
        k = torch.cat([key[:, :, :prefix].expand(samples, -1, -1, -1), k], dim=2)
        v = torch.cat([value[:, :, :prefix].expand(samples, -1, -1, -1), v], dim=2)
    if window is not None:  # a sliding-window layer sees only keys less than `window` positions back
        query_positions = key_positions[:, prefix:]
        visible = visible & ((query_positions[:, None, :, None] - key_positions[:, None, None, :]) < window)
        blocks = (_additive(visible, query.dtype),)
        p = torch.arange(prefix, device=query.device)
        prefix_visible = prefix_visible & ((p[:, None] - p[None, :]) < window)
        prefix_additive = _additive(prefix_visible, query.dtype)
    out = _attend(module, q, k, v, visible, blocks, dropout, scaling, kwargs)  # [samples, length, heads, dim]
    out = out.permute(2, 0, 1, 3).reshape(1, heads, samples * length, dim)
    own = _Gather.apply(out, *back).transpose(1, 2)  # [1, tokens - prefix, heads, dim]
    if not prefix:
        return own, None
    # The prefix's tokens see the prefix's earlier tokens only.
    prefix_out = _attend(module, query[:, :, :prefix], key[:, :, :prefix], value[:, :, :prefix], prefix_visible,
                         (prefix_additive,), dropout, scaling, kwargs)
    return torch.cat([prefix_out, own], dim=1), None


def _attend(module, query, key, value, visible, blocks, dropout, scaling, kwargs):
    """Attention of `query` over `key` and `value` where `visible` (sdpa) or the additive masks of `blocks` of
    queries (eager) allow it: [samples, length, heads, dim]."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.shape[0] * query.shape[1] * query.shape[2] * key.shape[2] * 4 <= attention.EAGER_SCORES_BYTES:
        # The same choice as attention_for_batch: eager attention for small score tensors (training/attention.py).
        return _eager_attention(module, query, key, value, blocks, dropout, scaling, kwargs)
    return sdpa_attention_forward(module, query, key, value, visible, dropout=dropout, scaling=scaling,
                                  is_causal=False, **kwargs)[0]


def _eager_attention(module, query, key, value, blocks, dropout, scaling, kwargs):
    """transformers' eager attention, one block of queries at a time, each over the keys its mask covers.

    Why by hand: eager attention computes the scores of every query against every key and masks half of a causal
    block's away; a block of the first half of the slots has no visible key in the second half, so cutting the
    queries in two leaves about a quarter of the scores, softmax and matmuls uncomputed. The result is the same (the
    keys left out have a softmax weight of exactly 0). docs/performance.md, "Shared prefixes", has its figures."""
    from transformers.models.llama.modeling_llama import eager_attention_forward

    outputs, start = [], 0
    for mask in blocks:
        rows, keys = mask.shape[2], mask.shape[3]
        outputs.append(eager_attention_forward(module, query[:, :, start : start + rows], key[:, :, :keys],
                                               value[:, :, :keys], mask.to(query.dtype), dropout=dropout,
                                               scaling=scaling, **kwargs)[0])
        start += rows
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)


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
