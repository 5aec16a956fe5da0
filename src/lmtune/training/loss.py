"""Answer-only loss: the output head runs only at positions whose next token is trained.

A causal LM computes logits for every position, then the loss ignores the prompt and the padding.
For BLOOM-560m that head is a 250,880 x 1024 matmul per position, about half the model's FLOPs per
token, and a 250,880-float logits row per position to keep for the backward pass. Computing the
backbone's hidden states and applying the head only where the label is not -100 gives the same
loss and gradients (a test checks both) for a fraction of the work and memory.

Why by hand: transformers' `logits_to_keep` keeps the same positions for every row of a batch,
and the answer spans of right-padded rows start and end at different positions.

The head and the cross-entropy are also fused (`linear_cross_entropy`): the gradient with respect to
the hidden states is computed in the forward pass, chunk by chunk, so the [tokens, vocabulary] logits,
their fp32 copy, log-probabilities and gradient never exist whole. Liger-Kernel does this on GPUs
with Triton; nothing in torch or transformers does it on CPUs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.packing import PACKED_TOKENS
from ..data.tokenize import IGNORE_INDEX
from .attention import attention_for_batch, attention_for_packed_rows
from .shared_prefix import attention_with_shared_prefix, can_share, heads_of, hidden_size_of, shared_prefix_layout
from . import compiled
from .compiled import eager
from .distributed import epoch_callback, global_batch_sampler

# Config attributes of architectures that transform logits after the head (soft-capping, scaling).
# Those models take the ordinary full-logits path, which applies them.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def causal_lm_of(model):
    """The *ForCausalLM module inside a PeftModel (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def supports_answer_only(causal_lm) -> bool:
    config = causal_lm.config
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS):
        return False
    backbone = getattr(causal_lm, causal_lm.base_model_prefix, None)
    head = causal_lm.get_output_embeddings()
    return backbone is not None and backbone is not causal_lm and isinstance(head, torch.nn.Linear)


def answer_only_loss(causal_lm, input_ids, attention_mask=None, labels=None, num_items: int | torch.Tensor | None = None,
                     position_ids=None, share_prefix: bool = False, width_multiple: int = 1):
    """Sum of next-token cross-entropy over trained positions, divided by `num_items` (default: their count).

    A packed batch (data/packing.py) comes with position ids and no attention mask. `share_prefix`: the batch runs as
    one row without padding, the tokens every row begins with once (training/shared_prefix.py), where the model
    allows it; the row's length is rounded up to `width_multiple` as the collator rounds widths."""
    backbone = getattr(causal_lm, causal_lm.base_model_prefix)
    packed = position_ids is not None and attention_mask is None
    shared = None
    # Training steps only: validation and the run's time estimate measure the ordinary batch, as validation runs it.
    if (share_prefix and not packed and input_ids.device.type == "cpu" and torch.is_grad_enabled()
            and causal_lm.training and can_share(causal_lm)):
        shared = shared_prefix_layout(input_ids, attention_mask, labels, width_multiple,
                                      hidden_size=hidden_size_of(causal_lm), heads=heads_of(causal_lm))
    if shared is not None:
        labels = shared.labels
        with attention_with_shared_prefix(causal_lm):
            hidden = backbone(input_ids=shared.input_ids, position_ids=shared.position_ids, use_cache=False,
                              **shared.attention_kwargs(_compute_dtype(causal_lm))).last_hidden_state
    else:
        with attention_for_packed_rows(causal_lm) if packed else attention_for_batch(causal_lm, input_ids):
            hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    trained = targets != IGNORE_INDEX
    head = causal_lm.get_output_embeddings()
    loss = linear_cross_entropy(hidden[:, :-1][trained], head.weight, head.bias, targets[trained])
    divisor = num_items if num_items is not None else trained.sum()
    return loss / divisor


def _compute_dtype(causal_lm) -> torch.dtype:
    """The dtype the model's activations take: autocast's where it is on, else the weights'."""
    device = causal_lm.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else causal_lm.dtype


# Rows of logits per chunk: about 256 MB of fp32 logits for BLOOM's 250,880 words, and typically one
# chunk per micro-batch, so the fusion saves passes over memory rather than adding loop overhead.
CHUNK_BYTES = 1 << 28
# The head's matmuls take a multiple of this many rows: a chunk's rows are rounded up with zero rows, whose loss and
# gradient are dropped. Why: torch's bf16 matmul on a CPU (oneDNN) runs many odd row counts markedly slower than the
# even counts beside them, in both of the head's matmuls (docs/performance.md, "An even number of rows"), and half
# of all micro-batches have an odd number of trained positions. One zero row costs a row's FLOPs.
ROW_MULTIPLE = 2


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor) -> torch.Tensor:
    """sum(cross_entropy(hidden @ weight.T + bias, targets)), in fp32, chunked over rows.

    A frozen head (LoRA) takes the fused path; a trainable head needs its weight gradient, which the
    ordinary path computes."""
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        return F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, reduction="sum")
    chunk = CHUNK_BYTES // (4 * weight.shape[0]) // ROW_MULTIPLE * ROW_MULTIPLE
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, max(ROW_MULTIPLE, chunk))


def _padded(hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`hidden` and `targets` with zero rows appended up to a multiple of ROW_MULTIPLE."""
    pad = -hidden.shape[0] % ROW_MULTIPLE
    if not pad:
        return hidden, targets
    return torch.cat([hidden, hidden.new_zeros(pad, hidden.shape[1])]), torch.cat([targets, targets.new_zeros(pad)])


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk):
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if hidden.requires_grad else None
        loss_and_grad = _compiled_loss_and_grad() if grad_hidden is not None and compiled.active() else _loss_and_grad
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            count = len(targets[rows])
            padded_hidden, padded_targets = _padded(hidden[rows], targets[rows])
            logits = F.linear(padded_hidden, weight, bias)  # the matmul runs in the autocast dtype
            if grad_hidden is None:
                loss -= torch.log_softmax(logits[:count].float(), dim=-1).gather(1, targets[rows, None]).sum()
                continue
            row_losses, grad_logits = loss_and_grad(logits, padded_targets)
            del logits
            loss += row_losses[:count].sum()
            grad_hidden[rows] = (grad_logits.to(weight.dtype) @ weight)[:count]
        ctx.save_for_backward(grad_hidden)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_loss.to(grad_hidden.dtype), None, None, None, None


def _loss_and_grad(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(each row's cross-entropy in fp32, d(loss)/d(logits) = softmax - one_hot), eagerly: each operation is a pass
    over the [rows, vocabulary] floats, so the gradient is computed in place in the log-probabilities."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)  # one fused kernel: faster than logsumexp and a subtraction
    loss = -log_probs.gather(1, targets[:, None]).squeeze(1)
    probs = log_probs.exp_()
    probs[torch.arange(len(targets), device=probs.device), targets] -= 1
    return loss, probs


def _fused_loss_and_grad(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same as `_loss_and_grad`, written for Inductor: it fuses these operations into a reduction over the
    logits and one pass that writes the gradient in the logits' dtype, where the eager version makes about five
    passes over fp32 copies (`bench/train_shapes.py` measures the training step with it)."""
    x = logits.float()
    peak = x.amax(dim=-1, keepdim=True)
    log_total = (x - peak).exp().sum(dim=-1, keepdim=True).log() + peak
    loss = (log_total - x.gather(1, targets[:, None])).squeeze(1)
    grad = (x - log_total).exp()
    is_target = torch.arange(x.shape[1], device=x.device)[None, :] == targets[:, None]
    return loss, torch.where(is_target, grad - 1, grad).to(logits.dtype)


_compiled = None


def _compiled_loss_and_grad():
    """`_fused_loss_and_grad` compiled once per process (rows vary from chunk to chunk: dynamic shapes); used only
    while the decoder layers run compiled, so the same decision (and fallback) covers both."""
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(_fused_loss_and_grad, dynamic=True)
    return _compiled


def make_trainer_class(loraplus_lr_ratio: float = 0.0, share_prefix: bool = False, width_multiple: int = 1):
    """A Trainer whose loss is the answer-only loss when the model allows it (imported lazily: transformers is slow to import).

    With `loraplus_lr_ratio` > 0 its optimizer is LoRA+'s (peft): the B matrices (and 1-D weights such as DoRA's
    magnitudes) learn at ratio x the learning rate, the A matrices at the learning rate. `share_prefix` and
    `width_multiple`: as `answer_only_loss` takes them."""
    from transformers import Trainer

    class AnswerOnlyTrainer(Trainer):
        def create_optimizer(self, model=None):
            if self.optimizer is not None or not loraplus_lr_ratio:
                return super().create_optimizer(model)
            from peft.optimizers import create_loraplus_optimizer

            opt_model = self.model if model is None else model
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            optimizer_kwargs.pop("lr", None)
            self.optimizer = create_loraplus_optimizer(opt_model, optimizer_cls, lr=self.args.learning_rate,
                                                       loraplus_lr_ratio=loraplus_lr_ratio,
                                                       loraplus_weight_decay=self.args.weight_decay, **optimizer_kwargs)
            return self.optimizer

        _sampler_epoch = None

        def _get_train_sampler(self, train_dataset=None):
            # Each optimizer step trains the same samples on 1 or N processes (training/distributed.py).
            sampler = global_batch_sampler(self.args, self.train_dataset if train_dataset is None else train_dataset)
            if sampler is None:
                return super()._get_train_sampler(train_dataset)
            if self._sampler_epoch is None:
                self._sampler_epoch = epoch_callback()
                self.add_callback(self._sampler_epoch)
            self._sampler_epoch.sampler = sampler
            return sampler

        def _track_num_input_tokens(self, inputs):
            # A packed batch has no attention mask to count its tokens by: it says how many it holds.
            tokens = inputs.get(PACKED_TOKENS)
            if tokens is None or self.args.include_num_input_tokens_seen == "no":
                return super()._track_num_input_tokens(inputs)
            self.state.num_input_tokens_seen += self.accelerator.gather(tokens.sum().to(self.args.device)).sum().item()

        def prediction_step(self, *args, **kwargs):
            # Validation runs eager: its no-grad graph is not worth a compile of its own (training/compiled.py).
            with eager():
                return super().prediction_step(*args, **kwargs)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs = {k: v for k, v in inputs.items() if k != PACKED_TOKENS}
            causal_lm = causal_lm_of(self.accelerator.unwrap_model(model))
            # Distributed wrappers (DDP, FSDP, DeepSpeed) must see their own forward call to sync gradients;
            # there the ordinary path runs. So do models whose logits are transformed after the head.
            wrapped = self.accelerator.unwrap_model(model) is not model
            if return_outputs or wrapped or not supports_answer_only(causal_lm):
                self.loss_is_scaled_for_ga = None
                if "position_ids" in inputs and "attention_mask" not in inputs:
                    # Packed rows: transformers reads sample boundaries off the position ids only without a cache.
                    inputs["use_cache"] = False
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            # accelerate applies mixed precision by wrapping model.forward; this path calls the backbone
            # directly, so it enters the same autocast itself.
            with self.accelerator.autocast():
                loss = answer_only_loss(causal_lm, inputs["input_ids"], inputs.get("attention_mask"), inputs["labels"],
                                        num_items_in_batch, inputs.get("position_ids"), share_prefix, width_multiple)
            # Normalised by the trained-token count of the whole accumulated batch: already scaled for accumulation.
            self.loss_is_scaled_for_ga = num_items_in_batch is not None
            return loss

    return AnswerOnlyTrainer
