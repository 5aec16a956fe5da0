"""Eager attention for short training micro-batches: the same loss and gradients as sdpa, really used, and only
where it is safe (grad enabled, small scores, no checkpointing, a model that can switch)."""

import torch

from lmtune.model import add_lora, load_model, resolve_source
from conftest import lora_llama
from lmtune.training import attention
from lmtune.training.loss import answer_only_loss, causal_lm_of


def _batch():
    torch.manual_seed(1)
    ids = torch.randint(5, 60, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding, as the collator pads
    mask[2, 6:] = 0
    labels = ids.clone()
    labels[:, :4] = -100
    labels[mask == 0] = -100
    return ids, mask, labels


def _loss_and_grads(model, ids, mask, labels):
    model.zero_grad(set_to_none=True)
    loss = answer_only_loss(causal_lm_of(model), ids, mask, labels)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _kernels_seen(model):
    """The attention implementation the config names while each decoder layer runs."""
    seen = []
    lm = causal_lm_of(model)
    hooks = [layer.register_forward_pre_hook(lambda *_: seen.append(lm.config._attn_implementation))
             for layer in lm.model.layers]
    return seen, hooks


def test_eager_attention_gives_the_same_loss_and_gradients_and_is_really_used(tiny_llama_dir, monkeypatch):
    model = lora_llama(tiny_llama_dir)
    lm = causal_lm_of(model)
    assert lm.config._attn_implementation == "sdpa"
    ids, mask, labels = _batch()
    seen, hooks = _kernels_seen(model)
    switched_loss, switched = _loss_and_grads(model, ids, mask, labels)
    assert seen == ["eager", "eager"]
    assert lm.config._attn_implementation == "sdpa"  # restored after the forward pass
    monkeypatch.setattr(attention, "EAGER_SCORES_BYTES", 0)
    seen.clear()
    sdpa_loss, sdpa = _loss_and_grads(model, ids, mask, labels)
    assert seen == ["sdpa", "sdpa"]
    for hook in hooks:
        hook.remove()
    torch.testing.assert_close(switched_loss, sdpa_loss, rtol=1e-5, atol=1e-6)
    assert switched.keys() == sdpa.keys() and any("lora_A" in n for n in switched)
    for name in sdpa:
        torch.testing.assert_close(switched[name], sdpa[name], rtol=1e-4, atol=1e-6, msg=name)


def test_sdpa_is_kept_where_eager_would_cost_memory_or_break_checkpointing(tiny_llama_dir, monkeypatch):
    model = lora_llama(tiny_llama_dir)
    lm = causal_lm_of(model)
    ids, _, _ = _batch()
    assert attention.prefers_eager(lm, ids)
    with torch.no_grad():  # validation and generation: forward only, flash keeps no scores
        assert not attention.prefers_eager(lm, ids)
    # 3 rows x 4 heads x 12 x 12 fp32 scores = 6,912 bytes per layer
    monkeypatch.setattr(attention, "EAGER_SCORES_BYTES", 6_911)
    assert not attention.prefers_eager(lm, ids)
    monkeypatch.setattr(attention, "EAGER_SCORES_BYTES", 6_912)
    assert attention.prefers_eager(lm, ids)
    enable = getattr(lm, "activation_checkpointing_enable", None) or lm.gradient_checkpointing_enable
    enable()
    assert not attention.prefers_eager(lm, ids)


def test_a_model_whose_attention_cannot_switch_is_left_alone(tiny_bloom_dir):
    model = add_lora(load_model(resolve_source(tiny_bloom_dir)), 4, 8, 0.0, "none", "all-linear").train()
    lm = causal_lm_of(model)
    ids, mask, labels = _batch()
    before = lm.config._attn_implementation
    assert not attention.prefers_eager(lm, ids)
    answer_only_loss(lm, ids, mask, labels).backward()
    assert lm.config._attn_implementation == before
