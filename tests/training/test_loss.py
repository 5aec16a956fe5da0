"""The answer-only loss must be the model's own loss, with the same gradients, only cheaper."""

import pytest
import torch
from conftest import QA

from lmtune.data.collate import Collator
from lmtune.data.readers import Example
from lmtune.data.template import PromptTemplate
from lmtune.data.tokenize import tokenize_example
from lmtune.model import add_lora, load_model, load_tokenizer, resolve_source
from lmtune.training.loss import answer_only_loss, supports_answer_only


def _batch(model_dir):
    tok = load_tokenizer(resolve_source(model_dir))
    samples = [tokenize_example(Example(r["question"], r["answer"]), tok, PromptTemplate(), 512) for r in QA]
    return Collator(tok)(samples)


@pytest.mark.parametrize("model_fixture", ["tiny_bloom_dir", "tiny_llama_dir"])
def test_answer_only_loss_and_gradients_equal_the_full_logits_loss(request, model_fixture):
    model_dir = request.getfixturevalue(model_fixture)
    batch = _batch(model_dir)
    model = add_lora(load_model(resolve_source(model_dir)), 4, 8, 0.0, "none", "all-linear")
    with torch.no_grad():  # make LoRA B non-zero so LoRA gradients are not trivially equal
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    lm = model.get_base_model()
    assert supports_answer_only(lm)

    full = model(**batch).loss
    full.backward()
    full_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()

    fast = answer_only_loss(lm, batch["input_ids"], batch["attention_mask"], batch["labels"])
    fast.backward()
    assert torch.allclose(fast, full, atol=1e-5), (fast, full)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p.grad, full_grads[name], atol=1e-5, rtol=1e-4), name


def test_num_items_divides_the_summed_loss(tiny_bloom_dir):
    batch = _batch(tiny_bloom_dir)
    lm = load_model(resolve_source(tiny_bloom_dir))
    trained = int((batch["labels"][:, 1:] != -100).sum())
    with torch.no_grad():
        mean = answer_only_loss(lm, batch["input_ids"], batch["attention_mask"], batch["labels"])
        halved = answer_only_loss(lm, batch["input_ids"], batch["attention_mask"], batch["labels"], num_items=2 * trained)
    assert torch.allclose(halved, mean / 2)


def test_models_that_transform_logits_take_the_ordinary_path(tiny_llama_dir):
    lm = load_model(resolve_source(tiny_llama_dir))
    lm.config.final_logit_softcapping = 30.0
    assert not supports_answer_only(lm)


def test_training_with_answer_only_loss_matches_the_ordinary_trainer(tiny_bloom_dir, qa_file, tmp_path, monkeypatch):
    """Same seed, fp32, gradient accumulation 2: the fast path and the Trainer's own loss end at the same weights."""
    import importlib

    from lmtune.config import build_config
    from lmtune.training.train import train

    loss_module = importlib.import_module("lmtune.training.loss")
    calls = {"fast": 0}
    real = loss_module.answer_only_loss

    def counting(*a, **k):
        calls["fast"] += 1
        return real(*a, **k)

    monkeypatch.setattr(loss_module, "answer_only_loss", counting)

    def run(out):
        config = build_config(overrides={
            "model.name_or_path": tiny_bloom_dir, "data.paths": [qa_file], "train.output_dir": str(out),
            "train.max_steps": 3, "train.batch_size": 1, "train.grad_accum": 2, "train.learning_rate": 1e-2,
            "model.dtype": "float32", "lora.dropout": 0.0, "train.group_by_length": False,
            "train.cpu_micro_batch": 1})  # both runs accumulate 2 micro-batches (none merged on this CPU)
        result = train(config, log=lambda _: None)
        return {n: p.detach().clone() for n, p in result.model.named_parameters() if p.requires_grad}, result

    fast_weights, fast = run(tmp_path / "fast")
    assert calls["fast"] == 6  # 3 steps x 2 micro-batches went through the answer-only loss
    monkeypatch.setattr(loss_module, "supports_answer_only", lambda lm: False)
    slow_weights, slow = run(tmp_path / "slow")
    assert calls["fast"] == 6
    for name in fast_weights:
        assert torch.allclose(fast_weights[name], slow_weights[name], atol=1e-5), name
    assert [e["loss"] for e in fast.log] == pytest.approx([e["loss"] for e in slow.log], rel=1e-4)


def test_answer_only_path_runs_under_the_trainers_mixed_precision(tiny_bloom_dir, qa_file, tmp_path, monkeypatch):
    """bf16 training must really compute in bf16 on the fast path (accelerate's autocast wraps only model.forward)."""
    import importlib

    from lmtune.config import build_config
    from lmtune.training.train import train

    loss_module = importlib.import_module("lmtune.training.loss")
    seen = []
    real = loss_module.answer_only_loss

    def recording(*a, **k):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return real(*a, **k)

    monkeypatch.setattr(loss_module, "answer_only_loss", recording)
    config = build_config(overrides={"model.name_or_path": tiny_bloom_dir, "data.paths": [qa_file], "train.output_dir": str(tmp_path / "a"),
                                     "train.max_steps": 1, "model.dtype": "bfloat16", "model.device": "cpu"})
    train(config, log=lambda _: None)
    assert seen and all(seen)


def test_fused_head_and_loss_equal_the_plain_ones_in_any_number_of_chunks(monkeypatch):
    import lmtune.training.loss as loss_module

    torch.manual_seed(0)
    hidden = torch.randn(7, 16, dtype=torch.float64, requires_grad=True)
    weight, bias = torch.randn(50, 16, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    targets = torch.randint(0, 50, (7,))
    plain = torch.nn.functional.cross_entropy(torch.nn.functional.linear(hidden, weight, bias), targets, reduction="sum")
    (plain * 3).backward()
    expected = hidden.grad.clone()
    # Chunks hold a multiple of ROW_MULTIPLE (2) rows: chunks of 2 and an odd last one, 2 + 2 + 2 + 1, 6 + 1, one
    # chunk of all 7 (padded to 8).
    for rows_per_chunk in (1, 3, 7, 100):
        monkeypatch.setattr(loss_module, "CHUNK_BYTES", 4 * 50 * rows_per_chunk)
        hidden.grad = None
        fused = loss_module.linear_cross_entropy(hidden, weight, bias, targets)
        (fused * 3).backward()  # the upstream gradient is applied in backward
        # float64 inputs, but the loss is computed in fp32 by design: fp32 agreement
        torch.testing.assert_close(fused.double(), plain.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(hidden.grad, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 6, 9])
def test_the_head_runs_an_even_number_of_rows_and_drops_the_padding(monkeypatch, rows):
    """An odd number of trained positions is padded with a zero row for the head's matmuls (ROW_MULTIPLE): every
    matmul sees an even number of rows, and the loss and gradients are those of the rows alone."""
    import lmtune.training.loss as loss_module

    torch.manual_seed(0)
    hidden = torch.randn(rows, 16, dtype=torch.float64, requires_grad=True)
    weight, bias = torch.randn(50, 16, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    targets = torch.randint(0, 50, (rows,))
    plain = torch.nn.functional.cross_entropy(torch.nn.functional.linear(hidden, weight, bias), targets, reduction="sum")
    expected = torch.autograd.grad(plain, hidden)[0]
    seen = []
    linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda x, *a: seen.append(x.shape[0]) or linear(x, *a))
    fused = loss_module.linear_cross_entropy(hidden, weight, bias, targets)
    fused.backward()
    assert seen == [rows + rows % 2]
    torch.testing.assert_close(fused.double(), plain.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden.grad, expected, rtol=1e-5, atol=1e-5)
    assert hidden.grad.shape == (rows, 16)
    # Evaluation's loss (no gradient) takes the same padded matmul and counts the real rows only.
    torch.testing.assert_close(loss_module.linear_cross_entropy(hidden.detach(), weight, bias, targets).double(),
                               plain.detach(), rtol=1e-5, atol=1e-5)
    assert seen == [rows + rows % 2] * 2


def test_a_trainable_head_gets_its_gradient():
    from lmtune.training.loss import linear_cross_entropy

    torch.manual_seed(0)
    hidden, weight = torch.randn(5, 8), torch.randn(30, 8, requires_grad=True)
    targets = torch.randint(0, 30, (5,))
    linear_cross_entropy(hidden, weight, None, targets).backward()
    expected = torch.autograd.grad(torch.nn.functional.cross_entropy(hidden @ weight.T, targets, reduction="sum"), weight)[0]
    torch.testing.assert_close(weight.grad, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_compiled_head_loss_equals_the_eager_one(monkeypatch, tmp_path, dtype):
    """While the layers run compiled, the head's loss and gradient come from Inductor's fused kernels: the same
    values as the eager passes, in fp32 and in bf16 logits, over uneven chunks."""
    import torch._dynamo

    import lmtune.training.loss as loss_module
    from lmtune.training import compiled

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch.manual_seed(0)
    hidden = torch.randn(9, 32, dtype=dtype)
    weight = torch.randn(300, 32, dtype=dtype)
    targets = torch.randint(0, 300, (9,))
    monkeypatch.setattr(loss_module, "CHUNK_BYTES", 4 * 300 * 4)  # chunks of 4, 4 and 1 rows (padded to 2)

    def loss_and_grad():
        h = hidden.clone().requires_grad_()
        loss = loss_module.linear_cross_entropy(h, weight, None, targets)
        loss.backward()
        return loss, h.grad

    eager_loss, eager_grad = loss_and_grad()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    monkeypatch.setattr(compiled, "_active", True)
    fused_loss, fused_grad = loss_and_grad()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # really compiled
    torch.testing.assert_close(fused_loss, eager_loss, rtol=1e-5, atol=1e-4)
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1.6e-2, "atol": 1e-2}
    torch.testing.assert_close(fused_grad, eager_grad, **tolerance)
