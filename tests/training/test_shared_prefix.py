"""Shared prompt prefixes (training/shared_prefix.py): the layout keeps every trained token, the loss and gradients
equal the ordinary batch's in every family that can share (Gemma 3's sliding window included), and the layout is
used only where it is exact."""

import pytest
import torch

from conftest import QA, lora_llama, train_config, write_jsonl
from lmtune.data.tokenize import IGNORE_INDEX
from lmtune.training import attention, shared_prefix
from lmtune.training.loss import answer_only_loss, causal_lm_of
from lmtune.training.shared_prefix import can_share, shared_prefix_layout
from test_packing import FAMILIES


def _batch(prefix: int = 10, lengths=(30, 24, 40, 33), prompt: int = 15, width: int = 48, vocab: int = 60, seed: int = 0):
    """Right-padded rows that begin with the same `prefix` tokens; the first `prompt` tokens of each are not trained."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(5, vocab, (prefix,), generator=g)
    ids = torch.full((len(lengths), width), 3)
    labels = torch.full((len(lengths), width), IGNORE_INDEX)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.cat([start, torch.randint(5, vocab, (n - prefix,), generator=g)])
        labels[row, prompt:n] = ids[row, prompt:n]
        mask[row, :n] = 1
    return ids, mask, labels


def test_the_layout_is_one_row_with_the_prefix_once_and_no_padding():
    ids, mask, labels = _batch()  # lengths 30, 24, 40, 33 in rows 48 wide; 10 shared tokens
    shared = shared_prefix_layout(ids, mask, labels, width_multiple=8)
    assert shared.prefix == 10
    # The prefix, then each sample's own tokens (20 + 14 + 30 + 23 = 87): 97 tokens, rounded up to 104.
    assert shared.input_ids.shape == shared.labels.shape == shared.position_ids.shape == (1, 104)
    assert torch.equal(shared.input_ids[0, :10], ids[0, :10])
    assert torch.equal(shared.position_ids[0, :10], torch.arange(10))
    own, at = [20, 14, 30, 23], 10
    for row, n in enumerate(own):
        assert torch.equal(shared.input_ids[0, at : at + n], ids[row, 10 : 10 + n])
        assert torch.equal(shared.labels[0, at : at + n], labels[row, 10 : 10 + n])
        assert torch.equal(shared.position_ids[0, at : at + n], 10 + torch.arange(n))
        # Attention runs per sample: its slots hold its own tokens, in order.
        assert torch.equal(shared.slot_token[row * 30 : row * 30 + n], at + torch.arange(n))
        assert torch.equal(shared.token_slot[at : at + n], row * 30 + torch.arange(n))
        at += n
    assert bool((shared.labels[0, at:] == IGNORE_INDEX).all()) and bool((shared.position_ids[0, at:] == 0).all())
    assert bool((shared.token_slot[:10] == 4 * 30).all()) and bool((shared.token_slot[at:] == 4 * 30).all())
    assert bool((shared.token_slot[:10] == 4 * 30).all()) and bool((shared.token_slot[at:] == 4 * 30).all())
    # Every trained token is still trained, once, and no sample's first own token is: the token before it belongs to
    # another sample (or the prefix).
    assert int((shared.labels != IGNORE_INDEX).sum()) == int((labels != IGNORE_INDEX).sum())
    starts = [10, 30, 44, 74]
    assert all(int(shared.labels[0, start]) == IGNORE_INDEX for start in starts)
    # What attends to what: a sample's token sees the whole prefix and its own earlier tokens; a padding slot sees
    # one key (its output is never read).
    visible = shared.visible[:, 0]
    assert visible.shape == (4, 30, 10 + 30)
    assert bool(visible[2, 5, :10].all()) and torch.equal(visible[2, 5, 10:], torch.arange(30) <= 5)
    assert not bool(visible[1, 20, :10].any()) and torch.equal(visible[1, 20, 10:], torch.arange(30) == 0)
    assert torch.equal(shared.key_positions[2, :10], torch.arange(10))
    assert torch.equal(shared.key_positions[2, 10:40], 10 + torch.arange(30))


def test_the_prefix_stops_before_the_first_trained_token_and_layouts_that_save_little_are_not_used():
    ids, mask, labels = _batch(prefix=10, prompt=15)
    labels[2, 6:15] = ids[2, 6:15]  # row 2 trains from position 6: position 5 predicts it, so 5 tokens can be shared
    assert shared_prefix_layout(ids, mask, labels, min_tokens=5).prefix == 5
    assert shared_prefix_layout(ids, mask, labels).prefix == 0  # fewer than MIN_PREFIX_TOKENS: only the padding goes
    ids, mask, labels = _batch(prefix=4)
    assert shared_prefix_layout(ids, mask, labels).prefix == 0  # rows share only 4 tokens
    ids, mask, labels = _batch()
    assert shared_prefix_layout(ids[:1], mask[:1], labels[:1]) is None  # one row: nothing to share
    assert shared_prefix_layout(ids, None, labels) is None
    # Too little saved: rows without padding or prefix, or a rounding that takes most of the saving back.
    full, _, _ = _batch(prefix=4, lengths=(48, 48, 48, 48))
    assert shared_prefix_layout(full, torch.ones_like(full), labels) is None
    assert shared_prefix_layout(ids, mask, labels, width_multiple=176) is None  # 97 -> 176 of 192 positions


def test_a_wide_model_takes_the_layout_for_a_smaller_saving_than_a_narrow_one():
    # Only padding to drop, 14 of 192 positions (7.3%): under a narrow model's threshold, over a wide one's.
    ids, mask, labels = _batch(prefix=4, lengths=(48, 48, 48, 34))
    assert shared_prefix.min_saving(576) == 0.10 and shared_prefix.min_saving(2048) == 0.05
    assert shared_prefix_layout(ids, mask, labels, hidden_size=576) is None
    wide = shared_prefix_layout(ids, mask, labels, hidden_size=2048)
    assert wide is not None and wide.input_ids.shape == (1, 48 * 3 + 34)
    # Every threshold lies between no saving and all of it, and none rises with the width.
    savings = [saving for _, saving in shared_prefix.MIN_SAVING]
    assert all(0 < s < 1 for s in savings) and savings == sorted(savings, reverse=True)


def _record_layouts(monkeypatch) -> list:
    """The layouts the loss builds from now on (None where it keeps the ordinary batch)."""
    layouts = []
    real_layout = shared_prefix.shared_prefix_layout
    monkeypatch.setattr("lmtune.training.loss.shared_prefix_layout",
                        lambda *a, **k: layouts.append(real_layout(*a, **k)) or layouts[-1])
    return layouts


def _loss_and_grads(model, ids, mask, labels, share: bool):
    model.zero_grad(set_to_none=True)
    loss = answer_only_loss(causal_lm_of(model), ids, mask, labels, share_prefix=share)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("kernel", ["eager", "sdpa"])
def test_the_shared_prefix_gives_the_loss_and_gradients_of_the_ordinary_batch(family, kernel, llama_tokenizer,
                                                                              monkeypatch):
    # A row that missed the prefix (or saw another row) would differ by far more than fp32 rounding (float64 is not
    # used: transformers' eager Gemma 3 gives NaN in it). Gemma 3's window (4 tokens) is shorter than the prefix, so
    # its sliding layers must slide across the shared copy.
    model = FAMILIES[family](llama_tokenizer).train()
    assert can_share(model)
    if kernel == "sdpa":
        monkeypatch.setattr(attention, "EAGER_SCORES_BYTES", 0)
    ids, mask, labels = _batch(vocab=len(llama_tokenizer))
    layouts = _record_layouts(monkeypatch)
    shared_loss, shared = _loss_and_grads(model, ids, mask, labels, share=True)
    assert layouts and layouts[0].prefix == 10  # the layout was used
    assert model.config._attn_implementation == "sdpa"  # and the model's own attention restored
    ordinary_loss, ordinary = _loss_and_grads(model, ids, mask, labels, share=False)
    assert len(layouts) == 1
    torch.testing.assert_close(shared_loss, ordinary_loss, rtol=1e-5, atol=1e-6)
    assert len(shared) == len(ordinary) > 0
    for got, expected in zip(shared, ordinary):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("case", ["padding only", "prefix cut by the first answer", "bf16 autocast"])
def test_the_loss_and_gradients_hold_where_the_prefix_spreads_or_is_cut(family, case, llama_tokenizer, monkeypatch):
    model = FAMILIES[family](llama_tokenizer).train()
    vocab = len(llama_tokenizer)
    if case == "padding only":  # rows share too few tokens: the row drops their padding alone
        ids, mask, labels = _batch(prefix=4, vocab=vocab)
        expected_prefix = 0
    elif case == "prefix cut by the first answer":  # rows share 14 tokens, row 2 trains from token 9
        ids, mask, labels = _batch(prefix=14, prompt=15, vocab=vocab)
        labels[2, 9:15] = ids[2, 9:15]
        expected_prefix = 8
    else:
        ids, mask, labels = _batch(vocab=vocab)
        expected_prefix = 10
    layouts = _record_layouts(monkeypatch)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "bf16 autocast")
    with autocast:
        shared_loss, shared = _loss_and_grads(model, ids, mask, labels, share=True)
        ordinary_loss, ordinary = _loss_and_grads(model, ids, mask, labels, share=False)
    assert layouts[0].prefix == expected_prefix and layouts[0].input_ids.shape[0] == 1
    if case == "bf16 autocast":  # bf16 rounds each element differently: the gradients agree as wholes
        torch.testing.assert_close(shared_loss, ordinary_loss, rtol=1e-2, atol=1e-3)
        for got, expected in zip(shared, ordinary):
            assert float((got - expected).norm() / expected.norm()) < 2e-2
        return
    torch.testing.assert_close(shared_loss, ordinary_loss, rtol=1e-5, atol=1e-6)
    for got, expected in zip(shared, ordinary):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_query_blocks_leave_out_only_keys_their_queries_do_not_see(monkeypatch):
    ids, mask, labels = _batch()
    shared = shared_prefix_layout(ids, mask, labels)
    assert len(shared.attention_kwargs(torch.float32)[shared_prefix.PREFIX_KWARG][7]) == 1  # 30 slots: one block
    monkeypatch.setattr(shared_prefix, "QUERY_BLOCKS_FROM", 30)
    layout = shared.attention_kwargs(torch.float32)[shared_prefix.PREFIX_KWARG]
    visible, blocks = layout[6], layout[7]
    additive = shared_prefix._additive(visible, torch.float32)
    assert shared.length == 30 and len(blocks) == shared_prefix.QUERY_BLOCKS == 2
    start = 0
    for block in blocks:
        end = start + block.shape[2]
        keys = block.shape[3]
        assert keys == shared.prefix + end
        assert not bool(visible[:, :, start:end, keys:].any())  # the keys left out are none its queries see
        assert torch.equal(block, additive[:, :, start:end, :keys])
        start = end
    assert start == shared.length and blocks[0].shape[3] == 10 + 15 < additive.shape[3]


def test_long_samples_take_the_layout_for_its_query_blocks_where_it_saves_nothing(monkeypatch):
    monkeypatch.setattr(shared_prefix, "QUERY_BLOCKS_FROM", 30)
    one, one_mask, one_labels = _batch(prefix=4, lengths=(48,))  # one row, no padding, trained from token 15
    assert shared_prefix_layout(one, one_mask, one_labels) is None  # the model's heads unknown: no blocks
    layout = shared_prefix_layout(one, one_mask, one_labels, heads=4)
    # The prompt runs as the prefix block; the 34 trained slots run in two blocks of queries.
    assert layout.prefix == 14 and layout.length == 34 and layout.input_ids.shape == (1, 48)
    assert len(layout.attention_kwargs(torch.float32)[shared_prefix.PREFIX_KWARG][7]) == 2
    full, full_mask, full_labels = _batch(prefix=4, lengths=(48, 48, 48, 48))  # 4 full rows, nothing shared
    assert shared_prefix_layout(full, full_mask, full_labels) is None
    assert shared_prefix_layout(full, full_mask, full_labels, heads=4).input_ids.shape == (1, 4 * 48)
    # Where the slots are shorter than the blocks start, or the scores too large for eager attention (both paths
    # run sdpa then), there is nothing to gain.
    monkeypatch.setattr(shared_prefix, "QUERY_BLOCKS_FROM", 35)
    assert shared_prefix_layout(one, one_mask, one_labels, heads=4) is None
    assert shared_prefix_layout(full, full_mask, full_labels, heads=4) is not None
    monkeypatch.setattr(shared_prefix, "QUERY_BLOCKS_FROM", 49)
    assert shared_prefix_layout(full, full_mask, full_labels, heads=4) is None
    monkeypatch.setattr(shared_prefix, "QUERY_BLOCKS_FROM", 30)
    monkeypatch.setattr(attention, "EAGER_SCORES_BYTES", 4 * 34 * 48 * 4)  # one row's [heads, 34, 14 + 34] fp32
    assert shared_prefix_layout(one, one_mask, one_labels, heads=4) is not None
    monkeypatch.setattr(attention, "EAGER_SCORES_BYTES", 4 * 34 * 48 * 4 - 1)
    assert shared_prefix_layout(one, one_mask, one_labels, heads=4) is None


@pytest.mark.parametrize("rows, expected_prefix", [(1, 14), (3, 0)])  # one row: its prompt; three: nothing shared
def test_long_rows_in_query_blocks_give_the_loss_and_gradients_of_the_ordinary_batch(rows, expected_prefix,
                                                                                     llama_tokenizer, monkeypatch):
    model = FAMILIES["llama"](llama_tokenizer).train()
    # Rows without padding that share 4 tokens: the layout saves no position and is taken for its blocks alone.
    ids, mask, labels = _batch(prefix=4, lengths=(48,) * rows, vocab=len(llama_tokenizer))
    ordinary_loss, ordinary = _loss_and_grads(model, ids, mask, labels, share=False)
    monkeypatch.setattr(shared_prefix, "QUERY_BLOCKS_FROM", 30)
    layouts = _record_layouts(monkeypatch)
    shared_loss, shared = _loss_and_grads(model, ids, mask, labels, share=True)
    assert layouts[0].samples == rows and layouts[0].prefix == expected_prefix
    assert layouts[0].input_ids.numel() == ids.numel()
    assert len(layouts[0].attention_kwargs(torch.float32)[shared_prefix.PREFIX_KWARG][7]) == 2
    torch.testing.assert_close(shared_loss, ordinary_loss, rtol=1e-5, atol=1e-6)
    for got, expected in zip(shared, ordinary):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("blocks", [2, 3, 7])
def test_every_number_of_query_blocks_gives_the_loss_and_gradients_of_the_ordinary_batch(blocks, llama_tokenizer,
                                                                                         monkeypatch):
    model = FAMILIES["llama"](llama_tokenizer).train()
    ids, mask, labels = _batch(vocab=len(llama_tokenizer))
    ordinary_loss, ordinary = _loss_and_grads(model, ids, mask, labels, share=False)
    monkeypatch.setattr(shared_prefix, "QUERY_BLOCKS", blocks)
    monkeypatch.setattr(shared_prefix, "QUERY_BLOCKS_FROM", 0)
    layouts = _record_layouts(monkeypatch)
    shared_loss, shared = _loss_and_grads(model, ids, mask, labels, share=True)
    assert len(layouts[0].attention_kwargs(torch.float32)[shared_prefix.PREFIX_KWARG][7]) == blocks
    torch.testing.assert_close(shared_loss, ordinary_loss, rtol=1e-5, atol=1e-6)
    for got, expected in zip(shared, ordinary):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_compiled_layers_read_the_shared_prefix_too(tiny_llama_dir, monkeypatch):
    from lmtune.training.compiled import compiled_layers

    model = lora_llama(tiny_llama_dir)
    ids, mask, labels = _batch(vocab=60)
    ordinary_loss, ordinary = _loss_and_grads(model, ids, mask, labels, share=False)
    layouts = _record_layouts(monkeypatch)
    with compiled_layers(causal_lm_of(model), True, strict=True):
        shared_loss, shared = _loss_and_grads(model, ids, mask, labels, share=True)
    assert [layout.prefix for layout in layouts] == [10]
    torch.testing.assert_close(shared_loss, ordinary_loss, rtol=1e-5, atol=1e-6)
    for got, expected in zip(shared, ordinary):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_dropout_checkpointing_and_unproven_families_keep_the_ordinary_batch(tiny_llama_dir, tiny_bloom_dir):
    from lmtune.model import add_lora, load_model, resolve_source

    model = lora_llama(tiny_llama_dir)
    lm = causal_lm_of(model)
    assert can_share(lm)
    (getattr(lm, "activation_checkpointing_enable", None) or lm.gradient_checkpointing_enable)()
    assert shared_prefix.why_not_shared(lm) == "gradient checkpointing is on"  # its recomputation runs sdpa
    dropped = add_lora(load_model(resolve_source(tiny_llama_dir)), 4, 8, 0.1, "none", "all-linear").train()
    # One copy of the prefix would share one dropout mask.
    assert shared_prefix.why_not_shared(causal_lm_of(dropped)) == "dropout is on (lora.dropout)"
    assert can_share(causal_lm_of(dropped.eval()))  # no dropout outside training
    bloom = add_lora(load_model(resolve_source(tiny_bloom_dir)), 4, 8, 0.0, "none", "all-linear").train()
    assert "not known to read it" in shared_prefix.why_not_shared(causal_lm_of(bloom))
    ids, mask, labels = _batch(vocab=60)
    # Validation and the run's estimate (no gradients) measure the ordinary batch too.
    with torch.no_grad():
        loss = answer_only_loss(lm, ids, mask, labels, share_prefix=True)
    assert torch.isfinite(loss)


def test_training_shares_the_prefix_and_follows_the_same_losses(tiny_llama_dir, tmp_path, monkeypatch):
    from lmtune.training.train import train

    # A system prompt every sample begins with, as chat templates write one.
    data = write_jsonl(tmp_path / "qa.jsonl", QA * 3)
    prefixes = []
    real_layout = shared_prefix.shared_prefix_layout

    def recording(*args, **kwargs):
        layout = real_layout(*args, **kwargs)
        prefixes.append(layout and layout.prefix)
        return layout

    monkeypatch.setattr("lmtune.training.loss.shared_prefix_layout", recording)
    losses = {}
    for share in (True, False):
        config = train_config(tiny_llama_dir, data, tmp_path / f"adapter-{share}", **{
            "train.share_prefix": share, "train.epochs": 2, "train.batch_size": 4, "train.compile": False,
            "train.learning_rate": 1e-3, "model.dtype": "float32",
            "data.system_prompt": "You are a careful assistant who answers briefly."})
        lines = []
        result = train(config, log=lines.append)
        said = [line for line in lines if line.startswith("shared prefix:")]
        assert len(said) == 1 and ("run once per micro-batch" in said[0]) == share, said
        losses[share] = [e["loss"] for e in result.log if "loss" in e]
        if share:
            assert prefixes and all(p and p >= shared_prefix.MIN_PREFIX_TOKENS for p in prefixes)
            prefixes.clear()
    assert not prefixes  # train.share_prefix false: never asked for the layout
    # The same steps: the first loss (before any update) equal, the later ones as close as rounding lets Adam be.
    assert len(losses[True]) == len(losses[False]) > 2
    assert losses[True][0] == pytest.approx(losses[False][0], rel=1e-5)
    assert losses[True] == pytest.approx(losses[False], rel=1e-3)
