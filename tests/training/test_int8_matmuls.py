"""Int8 matmuls for the frozen base weights: the exact int8 arithmetic, close to fp32, gradients only for LoRA, undone
after (nothing saved differs), compiled as eager, chosen by "auto" only where they can run, and a real run with them."""

import json
import re

import pytest
import torch

from lmtune import compiling
from lmtune.errors import LmtuneError
from lmtune.training import compiled
from lmtune.training.int8_matmuls import _FrozenInt8Linear, decide, frozen_linears, int8_matmuls, quantize_rows
from lmtune.training.loss import answer_only_loss, causal_lm_of
from lmtune.training.train import train

from conftest import lora_llama, train_config


def _relative(a, b) -> float:
    return float((a - b).norm() / b.norm())


def test_rows_are_quantized_symmetrically_to_within_half_a_step():
    torch.manual_seed(0)
    x = torch.randn(7, 33) * torch.logspace(-3, 2, 7)[:, None]  # rows of very different sizes
    x[3] = 0.0  # an all-zero row (padding) must not divide by zero
    q, scale = quantize_rows(x)
    assert q.dtype == torch.int8 and scale.shape == (7, 1)
    assert int(q.abs().max()) == 127 and int(q[3].abs().max()) == 0
    assert torch.equal(q.abs().amax(dim=1)[torch.arange(7) != 3], torch.full((6,), 127, dtype=torch.int8))
    assert torch.all((q.float() * scale - x).abs() <= scale / 2 + 1e-12)


def _weights(out_features=24, in_features=40):
    torch.manual_seed(1)
    w = torch.randn(out_features, in_features) / in_features**0.5
    wq, ws = quantize_rows(w)
    wtq, wts = quantize_rows(w.t())
    return w, (wq, ws.reshape(1, -1), wtq.contiguous(), wts.reshape(1, -1))


def test_the_product_and_the_input_gradient_are_the_int8_arithmetic_and_close_to_fp32():
    w, packed = _weights()
    x = torch.randn(2, 9, 40, requires_grad=True)
    grad = torch.randn(2, 9, 24)
    y = _FrozenInt8Linear.apply(x, *packed)
    y.backward(grad)
    # Exactly the int8 products scaled back: x's rows and w's output channels each quantized on their own.
    x_q, x_scale = quantize_rows(x.detach().reshape(-1, 40))
    expected = (x_q.long() @ packed[0].long().t()).float() * x_scale * packed[1]
    torch.testing.assert_close(y.detach().reshape(-1, 24), expected, rtol=1e-6, atol=1e-6)
    g_q, g_scale = quantize_rows(grad.reshape(-1, 24))
    expected_dx = (g_q.long() @ packed[2].long().t()).float() * g_scale * packed[3]
    torch.testing.assert_close(x.grad.reshape(-1, 40), expected_dx, rtol=1e-6, atol=1e-6)
    # And close to fp32: about 1% error for random data, far from 0 and far from wrong.
    exact = torch.nn.functional.linear(x.detach(), w)
    assert 1e-4 < _relative(y.detach(), exact) < 0.03
    assert 1e-4 < _relative(x.grad, grad @ w) < 0.03


def _batch():
    torch.manual_seed(2)
    ids = torch.randint(5, 60, (3, 14))
    mask = torch.ones_like(ids)
    mask[2, 10:] = 0
    labels = ids.clone()
    labels[:, :5] = -100
    labels[mask == 0] = -100
    return ids, mask, labels


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = answer_only_loss(causal_lm_of(model), *batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_inside_the_frozen_weights_multiply_in_int8_and_after_the_model_is_as_it_was(tiny_llama_dir):
    model = lora_llama(tiny_llama_dir)
    batch = _batch()
    names = set(model.state_dict())
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    exact_loss, exact_grads = _loss_and_grads(model, batch)
    with int8_matmuls(model, True) as count:
        assert count == len(frozen_linears(model)) == 7 * len(causal_lm_of(model).model.layers)
        loss, grads = _loss_and_grads(model, batch)
        assert set(model.state_dict()) == names  # the int8 copies are never saved
    # Really int8 (not the fp32 path) and still the same computation: close losses, gradients pointing the same way.
    assert loss != exact_loss and abs(float(loss - exact_loss)) < 0.02 * float(exact_loss)
    assert grads.keys() == exact_grads.keys() and all("lora_" in n for n in grads)
    for name, g in grads.items():
        cosine = torch.nn.functional.cosine_similarity(g.flatten(), exact_grads[name].flatten(), dim=0)
        assert cosine > 0.99, (name, float(cosine))
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())  # nothing stepped, nothing changed
    after_loss, _ = _loss_and_grads(model, batch)
    assert torch.equal(after_loss, exact_loss)
    assert all(not hasattr(layer, "int8_weight") and "forward" not in vars(layer) for layer in frozen_linears(model))


@pytest.mark.skipif(compiling.cpp_compiler() is None, reason="torch.compile needs a C++ compiler on a CPU")
def test_compiled_layers_multiply_in_int8_as_the_eager_ones_do(tiny_llama_dir, tmp_path, monkeypatch):
    import torch._dynamo

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    model = lora_llama(tiny_llama_dir)
    batch = _batch()
    with int8_matmuls(model, True):
        eager_loss, eager_grads = _loss_and_grads(model, batch)
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        with compiled.compiled_layers(causal_lm_of(model), True, strict=True):
            fused_loss, fused_grads = _loss_and_grads(model, batch)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    torch.testing.assert_close(fused_loss, eager_loss, rtol=1e-4, atol=1e-5)
    for name, g in eager_grads.items():
        torch.testing.assert_close(fused_grads[name], g, rtol=1e-3, atol=1e-5)


def _decide(setting="auto", **overrides):
    given = {"device": "cpu", "compute_dtype": torch.float32, "method_blocker": None, "quantized": False, "vnni": True,
             "compiled": True}
    return decide(setting, **{**given, **overrides})


def test_auto_multiplies_in_int8_only_in_compiled_fp32_cpu_runs_with_vnni_for_supervised_lora():
    assert _decide()[0] is True
    assert _decide(vnni=False) == (False, "off: this CPU has no int8 dot-product instructions (VNNI)")
    assert _decide(True, vnni=False)[0] is True  # forced: torch's int8 GEMM runs without VNNI, only slower
    assert _decide(compiled=False) == (
        False, "off: auto multiplies in int8 only in compiled decoder layers (this run is not compiled)")
    assert _decide(True, compiled=False)[0] is True
    assert _decide(False) == (False, "off (train.int8_matmuls false)")
    use, why = _decide(compute_dtype=torch.bfloat16)
    assert not use and "computes in bfloat16" in why
    use, why = _decide(device="cuda")
    assert not use and "a CPU (this run is on cuda)" in why
    use, why = _decide(method_blocker="train.method dpo")
    assert not use and "supervised LoRA (not train.method dpo)" in why
    assert not _decide(quantized=True)[0]
    use, why = _decide(processes=2)
    assert not use and "one process (this run has 2)" in why


@pytest.mark.parametrize("overrides, need", [
    ({"compute_dtype": torch.bfloat16}, "needs a run that computes in fp32"),
    ({"device": "cuda"}, "needs a CPU"),
    ({"method_blocker": "DoRA"}, "needs supervised LoRA (not DoRA)"),
    ({"processes": 2}, "needs one process (this run has 2)"),
])
def test_forcing_int8_where_it_cannot_run_says_why(overrides, need):
    with pytest.raises(LmtuneError, match=re.escape(f"train.int8_matmuls true {need}")):
        _decide(True, **overrides)


def test_a_run_with_int8_matmuls_learns_what_the_fp32_run_learns(tiny_llama_dir, qa_file, tmp_path):
    from safetensors.torch import load_file

    adapters, logs, losses = {}, {}, {}
    for name, setting in (("fp32", False), ("int8", True)):
        lines = []
        out = tmp_path / name
        config = train_config(tiny_llama_dir, qa_file, out, **{"train.int8_matmuls": setting,
                                                               "model.dtype": "float32", "train.compile": False})
        result = train(config, log=lines.append)
        weights = load_file(str(out / "adapter_model.safetensors"))
        adapters[name] = torch.cat([weights[k].flatten() for k in sorted(weights)])
        logs[name] = lines
        entries = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
        losses[name] = [e["loss"] for e in entries if "loss" in e]
        assert json.loads((out / "lmtune_manifest.json").read_text())["int8_matmuls"] is setting
        assert not any(hasattr(layer, "int8_weight") for layer in frozen_linears(result.model))
    assert any(line.startswith("int8 matmuls: on") for line in logs["int8"])
    assert not any(line.startswith("int8 matmuls:") for line in logs["fp32"])
    assert losses["int8"][-1] < 0.75 * losses["int8"][0], losses  # it learns, as fast as the fp32 run
    assert abs(losses["int8"][-1] - losses["fp32"][-1]) < 0.05 * losses["fp32"][-1], losses
    assert not torch.equal(adapters["int8"], adapters["fp32"])
    cosine = torch.nn.functional.cosine_similarity(adapters["int8"], adapters["fp32"], dim=0)
    assert cosine > 0.9, float(cosine)


def test_forcing_int8_for_a_preference_method_is_refused_before_training(tiny_llama_dir, tmp_path):
    from conftest import write_jsonl

    data = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": f"q{i}", "chosen": "yes", "rejected": "no"}
                                                   for i in range(4)])
    config = train_config(tiny_llama_dir, data, tmp_path / "out", **{"train.method": "dpo",
                                                                     "train.int8_matmuls": True,
                                                                     "model.dtype": "float32"})
    with pytest.raises(LmtuneError, match=r"train.int8_matmuls true needs supervised LoRA \(not train.method dpo\)"):
        train(config, log=lambda line: None)
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()
