"""Regional compilation of the decoder layers: the same loss and gradients as eager, really compiled, undone after,
used by a real training run, and chosen by "auto" only where it pays and can work."""

import json

import pytest
import torch

from lmtune import compiling
from lmtune.model import add_lora, load_model, resolve_source
from lmtune.training import compiled
from lmtune.training.loss import answer_only_loss, causal_lm_of
from lmtune.training.train import train

from conftest import lora_llama, train_config


def _batches():
    torch.manual_seed(1)
    batches = []
    for rows, length in ((3, 12), (2, 17)):  # two shapes: one dynamic graph must serve both
        ids = torch.randint(5, 60, (rows, length))
        mask = torch.ones_like(ids)
        mask[1, length - 4:] = 0  # right padding, as the collator pads
        labels = ids.clone()
        labels[:, :4] = -100
        labels[mask == 0] = -100
        batches.append((ids, mask, labels))
    return batches


def _losses_and_grads(model, batches, dtype=torch.bfloat16):
    out = []
    for ids, mask, labels in batches:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = answer_only_loss(causal_lm_of(model), ids, mask, labels)
        loss.backward()
        out.append((loss.detach(), {n: p.grad.clone().float() for n, p in model.named_parameters() if p.grad is not None}))
    return out


def _compiled(layer) -> bool:
    """Whether the layer runs through torch.compile: its forward is no longer its class's own."""
    return getattr(layer.forward, "__func__", None) is not type(layer).forward


def _distance(a, b) -> float:
    return float(1 - torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


@pytest.mark.skipif(compiling.cpp_compiler() is None, reason="torch.compile needs a C++ compiler on a CPU")
def test_compiled_layers_give_the_same_loss_and_gradients_and_are_undone_after(tiny_llama_dir, tmp_path, monkeypatch):
    import torch._dynamo

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    model = lora_llama(tiny_llama_dir, dtype=torch.bfloat16)
    lm = causal_lm_of(model)
    batches = _batches()
    eager = _losses_and_grads(model, batches)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with compiled.compiled_layers(lm, True, strict=True):
        assert all(_compiled(layer) for layer in lm.model.layers)
        fused = _losses_and_grads(model, batches)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # really compiled, not silently eager
    assert any((tmp_path / "inductor").iterdir())  # kernels cached where asked
    assert not any(_compiled(layer) for layer in lm.model.layers)
    exact = _losses_and_grads(model.float(), batches, torch.float32)  # the reference: fp32 weights, no autocast
    for (eager_loss, eager_grads), (fused_loss, fused_grads), (exact_loss, exact_grads) in zip(eager, fused, exact):
        # Fused kernels round bf16 intermediates differently from eager: as close to fp32 as eager bf16 is.
        torch.testing.assert_close(fused_loss, eager_loss, rtol=1e-2, atol=1e-3)
        assert abs(fused_loss - exact_loss) <= 2 * abs(eager_loss - exact_loss) + 1e-3
        assert fused_grads.keys() == eager_grads.keys() and any("lora_A" in n for n in fused_grads)
        for name, grad in exact_grads.items():
            eager_error, fused_error = _distance(eager_grads[name], grad), _distance(fused_grads[name], grad)
            assert fused_error <= 2 * eager_error + 1e-4, (name, fused_error, eager_error)


def _decide(**overrides):
    args = dict(device="cpu", processes=1, method_blocker=None, quantized=False, checkpointing=False,
                causal_lm=None, tokens=0.0)
    args.update(overrides)
    return compiling.decide_training(args.pop("setting", "auto"), **args)


def _blocker(overrides: dict) -> str | None:
    """What the training method of these settings says against compiling (training.methods)."""
    from lmtune.config import build_config
    from lmtune.training.methods import method_for

    return method_for(build_config(overrides=overrides)).compile_blocker()


def test_auto_compiles_only_long_single_process_cpu_lora_runs_with_a_compiler(tiny_llama_dir, monkeypatch):
    lm = causal_lm_of(lora_llama(tiny_llama_dir, dtype=torch.bfloat16))
    weights = sum(p.numel() for p in lm.model.layers.parameters() if p.dim() == 2)
    long_run = compiling.COMPILE_WORTH_FLOPS / (4 * weights) * 1.01
    monkeypatch.setattr(compiling, "cpp_compiler", lambda: "/usr/bin/g++")
    assert _decide(causal_lm=lm, tokens=long_run)[0] is True
    use, why = _decide(causal_lm=lm, tokens=long_run * 0.98)
    assert not use and "too short" in why
    for overrides, reason in [({"device": "cuda"}, "CPU only"), ({"processes": 2}, "several processes"),
                              ({"method_blocker": _blocker({"train.method": "full"})}, "full fine-tuning"),
                              ({"method_blocker": _blocker({"lora.use_dora": True})}, "DoRA"),
                              ({"quantized": True}, "quantized"), ({"checkpointing": True}, "checkpointing")]:
        use, why = _decide(causal_lm=lm, tokens=long_run, **overrides)
        assert not use and reason in why, (overrides, why)
    assert _decide(setting=True, causal_lm=lm, tokens=0.0)[0] is True
    assert _decide(setting=False, causal_lm=lm, tokens=long_run)[0] is False
    monkeypatch.setattr(compiling, "cpp_compiler", lambda: None)
    use, why = _decide(causal_lm=lm, tokens=long_run)
    assert not use and "no C++ compiler" in why


def test_auto_leaves_bloom_eager_where_compiling_measured_no_gain(tiny_bloom_dir, monkeypatch):
    lm = causal_lm_of(add_lora(load_model(resolve_source(tiny_bloom_dir)), 4, 8, 0.0, "none", "all-linear"))
    assert compiling.decoder_layers(lm) is lm.transformer.h
    monkeypatch.setattr(compiling, "cpp_compiler", lambda: "/usr/bin/g++")
    use, why = _decide(causal_lm=lm, tokens=1e15)
    assert not use and "bloom layers (no measured gain)" in why
    assert _decide(setting=True, causal_lm=lm, tokens=0.0)[0] is True


def test_no_compiler_is_found_when_none_is_on_the_path(monkeypatch, tmp_path):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert compiling.cpp_compiler() is None
    fake = tmp_path / "g++"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    assert compiling.cpp_compiler() == str(fake)


@pytest.mark.skipif(compiling.cpp_compiler() is None, reason="torch.compile needs a C++ compiler on a CPU")
def test_a_training_run_with_compile_on_learns_what_the_eager_run_learns(tiny_llama_dir, qa_file, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    adapters, logs = {}, {}
    for name, setting, dtype in (("eager", False, "bfloat16"), ("compiled", True, "bfloat16"), ("fp32", False, "float32")):
        lines = []
        out = tmp_path / name
        # Validation too: it runs eager inside the compiled run.
        config = train_config(tiny_llama_dir, qa_file, out, **{"train.compile": setting, "train.epochs": 2,
                                                               "data.val_size": 2, "model.dtype": dtype})
        result = train(config, log=lines.append)
        weights = load_file(str(out / "adapter_model.safetensors"))
        adapters[name] = torch.cat([weights[k].flatten().float() for k in sorted(weights)])
        logs[name] = lines
        assert not any(_compiled(layer) for layer in causal_lm_of(result.model).model.layers)
        entries = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
        assert any("eval_loss" in e for e in entries)
    assert "compile: on (train.compile true)" in logs["compiled"]
    assert not any(line.startswith("compile:") for line in logs["eager"])
    # Trained at a high learning rate in bf16, neither run keeps fp32's bits; the compiled one strays no further.
    eager_error, fused_error = _distance(adapters["eager"], adapters["fp32"]), _distance(adapters["compiled"], adapters["fp32"])
    assert fused_error <= 2 * eager_error + 1e-3, (fused_error, eager_error)


def test_kernels_are_cached_under_the_users_cache_unless_a_folder_is_chosen(monkeypatch, tmp_path):
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    # What importing transformers leaves in the environment: Inductor's own default under /tmp, not a choice.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
    assert compiling.inductor_cache_dir() == tmp_path / "xdg" / "lmtune" / "torchinductor"
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    assert compiling.inductor_cache_dir() == tmp_path / "xdg" / "lmtune" / "torchinductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert compiling.inductor_cache_dir() == tmp_path / "mine"
