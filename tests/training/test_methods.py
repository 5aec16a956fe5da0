"""The field's training methods: each is shown to change what is trained or how, not only to be accepted,
and merge and resume are shown to work with it.

DoRA magnitudes exist and train; rsLoRA scales by alpha/sqrt(r); PiSSA/OLoRA start from the base's own output and
their saved adapters merge onto the ORIGINAL base; NEFTune noises the embeddings in training only; LoRA+ gives the
B matrices ratio x the learning rate; modules_to_save trains whole modules; full fine-tuning changes the base
weights and saves a loadable model; report_to tensorboard writes event files beside the adapter."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import signal
from pathlib import Path

import pytest
import torch
from conftest import train_config

from lmtune.data.template import PromptTemplate
from lmtune.errors import LmtuneError, ModelError, TrainingInterrupted
from lmtune.export.merge import merge, probe_batch
from lmtune.model import add_lora, load_model, resolve_source
from lmtune.training.checkpoints import complete_checkpoints, partial_dir
from lmtune.training.train import train

train_module = importlib.import_module("lmtune.training.train")  # the package re-exports train(), hiding the module
lora_module = importlib.import_module("lmtune.training.methods.lora")  # where LoRA is added to the base

QUIET = {"log": lambda _: None}
FP32 = {"model.dtype": "float32", "model.device": "cpu"}  # exact comparisons: no bf16 weights or autocast


def _train_recording(config, monkeypatch):
    """train(config) with a snapshot of every parameter right after LoRA was added."""
    snapshot = {}
    real = lora_module.add_lora

    def recording(*args, **kwargs):
        model = real(*args, **kwargs)
        snapshot.update({n: p.detach().clone() for n, p in model.named_parameters()})
        return model

    monkeypatch.setattr(lora_module, "add_lora", recording)
    return train(config, **QUIET), snapshot


def _probe(folder):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    template = PromptTemplate.load(folder) or PromptTemplate.for_tokenizer(tokenizer)
    return probe_batch(tokenizer, template)


def _logits(model, probe) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**probe).logits[probe["attention_mask"].bool()]


def _load(folder):
    return load_model(resolve_source(str(folder)), dtype=torch.float32)


# ---------------------------------------------------------------- DoRA and rsLoRA


def test_dora_magnitude_vectors_exist_and_train_and_rslora_scales_by_sqrt_r(tiny_bloom_dir, qa_file, tmp_path, monkeypatch):
    config = train_config(tiny_bloom_dir, qa_file, tmp_path / "a", **{"train.max_steps": 4, "lora.r": 4, "lora.alpha": 8,
                                                                      "lora.use_dora": True, "lora.use_rslora": True})
    result, before = _train_recording(config, monkeypatch)
    magnitudes = [n for n in before if "lora_magnitude_vector" in n]
    assert magnitudes
    after = dict(result.model.named_parameters())
    for name in magnitudes:
        assert after[name].requires_grad and not torch.equal(before[name], after[name].detach()), name
    layers = [m for m in result.model.modules() if hasattr(m, "scaling") and "default" in getattr(m, "scaling", {})]
    assert layers and all(m.scaling["default"] == pytest.approx(8 / 4 ** 0.5) for m in layers)  # not alpha/r = 2

    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved["use_dora"] is True and saved["use_rslora"] is True
    manifest = json.loads((tmp_path / "a" / "lmtune_manifest.json").read_text())
    assert manifest["method"]["use_dora"] and manifest["method"]["use_rslora"]


def test_without_rslora_the_scaling_is_alpha_over_r(tiny_bloom_dir):
    model = add_lora(_load(tiny_bloom_dir), 4, 8, 0.0, "none", "auto")
    scalings = {m.scaling["default"] for m in model.modules() if isinstance(getattr(m, "scaling", None), dict) and m.scaling}
    assert scalings == {2.0}
    assert not any("lora_magnitude_vector" in n for n, _ in model.named_parameters())  # DoRA off by default


def test_dora_merged_logits_equal_the_trained_model(tiny_bloom_dir, qa_file, tmp_path):
    config = train_config(tiny_bloom_dir, qa_file, tmp_path / "a", **FP32, **{"train.max_steps": 4, "lora.use_dora": True})
    result = train(config, **QUIET)
    merge(str(tmp_path / "a"), str(tmp_path / "m"), **QUIET)
    probe = _probe(tmp_path / "a")
    trained, merged, base = _logits(result.model, probe), _logits(_load(tmp_path / "m"), probe), _logits(_load(tiny_bloom_dir), probe)
    assert torch.allclose(trained, merged, atol=1e-4)
    assert not torch.allclose(merged, base, atol=1e-3)


# ---------------------------------------------------------------- PiSSA / OLoRA


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_initial_adapter_reproduces_the_base(tiny_bloom_dir, init):
    base = _load(tiny_bloom_dir)
    probe = _probe(tiny_bloom_dir)
    expected = _logits(base, probe)
    weight_before = base.transformer.h[0].self_attention.query_key_value.weight.detach().clone()
    model = add_lora(base, 4, 8, 0.0, "none", "auto", init=init)
    layer = model.base_model.model.transformer.h[0].self_attention.query_key_value
    assert layer.lora_B["default"].weight.abs().sum() > 0  # not the default B = 0: the adapter holds part of the base
    assert not torch.allclose(layer.base_layer.weight, weight_before)  # ... and the base holds the rest
    assert torch.allclose(_logits(model, probe), expected, atol=1e-4)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_saved_pissa_adapter_merges_onto_the_original_base(tiny_bloom_dir, qa_file, tmp_path, init):
    config = train_config(tiny_bloom_dir, qa_file, tmp_path / "a", **FP32, **{"train.max_steps": 4, "lora.init": init,
                                                                              "lora.r": 4, "lora.alpha": 8})
    result = train(config, **QUIET)
    out = tmp_path / "a"
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["r"] == 8 and saved["lora_alpha"] == 16 and saved["init_lora_weights"] is True  # plain LoRA, rank 2r
    assert not (out / "initial_adapter").exists()
    merge(str(out), str(tmp_path / "m"), **QUIET)  # loads the original base from disk, with its own logit check
    probe = _probe(out)
    trained = _logits(result.model, probe)  # the residual base + the trained adapter, as training left it
    assert torch.allclose(_logits(_load(tmp_path / "m"), probe), trained, atol=1e-4)
    assert not torch.allclose(trained, _logits(_load(tiny_bloom_dir), probe), atol=1e-3)


# ---------------------------------------------------------------- NEFTune and LoRA+


def _trainer(config, tmp_path, callbacks=()):
    from lmtune.model import choose_precision, load_tokenizer
    from lmtune.training.methods.supervised import prepare_data
    from lmtune.training.train import build_trainer

    source = resolve_source(config.model.name_or_path)
    tokenizer = load_tokenizer(source)
    prepared = prepare_data(config, tokenizer, log=lambda _: None)
    model = add_lora(_load(config.model.name_or_path), config.lora.r, config.lora.alpha, 0.0, "none", "auto")
    precision = choose_precision("cpu", "float32")
    return build_trainer(config, model, tokenizer, prepared.samples, precision, tmp_path, list(callbacks))


class _EmbeddingProbe:
    """After each step: the input embeddings of fixed ids, twice in train mode and twice in eval mode."""

    def __init__(self):
        from transformers import TrainerCallback

        outer = self
        self.seen = []

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, model=None, **kwargs):
                outer.seen.append(_embeddings_by_mode(model))

        self.callback = Callback()


def _embeddings_by_mode(model):
    from lmtune.training.loss import causal_lm_of

    embeddings = causal_lm_of(model).get_input_embeddings()
    ids = torch.tensor([[5, 6, 7, 8]])
    was_training = embeddings.training
    with torch.no_grad():
        embeddings.train()
        train_a, train_b = embeddings(ids), embeddings(ids)
        embeddings.eval()
        eval_a, eval_b = embeddings(ids), embeddings(ids)
    embeddings.train(was_training)
    return train_a, train_b, eval_a, eval_b


@pytest.mark.parametrize("alpha", [5.0, 0.0])
def test_neftune_noises_embeddings_in_training_only(tiny_bloom_dir, qa_file, tmp_path, alpha):
    config = train_config(tiny_bloom_dir, qa_file, tmp_path / "a", **FP32, **{"train.max_steps": 2, "train.neftune_noise_alpha": alpha})
    probe = _EmbeddingProbe()
    trainer = _trainer(config, tmp_path, [probe.callback])
    trainer.train()
    assert len(probe.seen) == 2
    for train_a, train_b, eval_a, eval_b in probe.seen:
        assert torch.equal(eval_a, eval_b)
        assert torch.equal(train_a, eval_a) == (alpha == 0)
        if alpha:
            noise = (train_a - eval_a).abs().max()
            assert 0 < noise <= alpha / (4 * eval_a.shape[-1]) ** 0.5 + 1e-6  # NEFTune's bound alpha / sqrt(L * d)
            assert not torch.equal(train_a, train_b)  # fresh noise each forward pass
    # After training the hook is gone: generation (even in train mode) sees the plain embeddings.
    train_a, _, eval_a, _ = _embeddings_by_mode(trainer.model)
    assert torch.equal(train_a, eval_a)


def test_loraplus_gives_b_matrices_ratio_times_the_learning_rate(tiny_bloom_dir, qa_file, tmp_path):
    config = train_config(tiny_bloom_dir, qa_file, tmp_path / "a", **FP32, **{
        "train.max_steps": 2, "train.loraplus_lr_ratio": 16, "train.learning_rate": 1e-3, "train.lr_scheduler": "constant"})
    trainer = _trainer(config, tmp_path)
    trainer.train()  # the optimizer the run really stepped with
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    lrs = {names[id(p)]: group["lr"] for group in trainer.optimizer.param_groups for p in group["params"]}
    a = {n: lr for n, lr in lrs.items() if "lora_A" in n}
    b = {n: lr for n, lr in lrs.items() if "lora_B" in n}
    assert a and b and len(a) == len(b)
    assert all(lr == pytest.approx(1e-3) for lr in a.values()) and all(lr == pytest.approx(16e-3) for lr in b.values())


def test_without_loraplus_every_group_has_the_learning_rate(tiny_bloom_dir, qa_file, tmp_path):
    config = train_config(tiny_bloom_dir, qa_file, tmp_path / "a", **FP32, **{"train.learning_rate": 1e-3})
    trainer = _trainer(config, tmp_path)
    trainer.create_optimizer()
    assert {g["lr"] for g in trainer.optimizer.param_groups} == {1e-3}


# ---------------------------------------------------------------- modules_to_save and full fine-tuning


@pytest.mark.parametrize("model_fixture", ["tiny_bloom_dir", "tiny_llama_dir"])  # tied and untied output head
def test_modules_to_save_trains_the_output_head_and_merges(request, model_fixture, qa_file, tmp_path, monkeypatch):
    model_dir = request.getfixturevalue(model_fixture)
    config = train_config(model_dir, qa_file, tmp_path / "a", **FP32, **{"train.max_steps": 3, "lora.modules_to_save": ["lm_head"]})
    result, before = _train_recording(config, monkeypatch)
    after = dict(result.model.named_parameters())
    # BLOOM ties its head to the input embeddings: the trained copy is the embedding's, and the head stays tied to it
    head = [n for n in before if "modules_to_save" in n and ("lm_head" in n or "word_embeddings" in n)]
    assert len(head) == 1 and not torch.equal(before[head[0]], after[head[0]].detach())
    assert all("lora_" in n or n in head for n, p in result.model.named_parameters() if p.requires_grad)
    from safetensors.torch import load_file

    assert any("modules_to_save" in k or "lm_head" in k or "word_embeddings" in k for k in load_file(str(tmp_path / "a" / "adapter_model.safetensors")))
    merge(str(tmp_path / "a"), str(tmp_path / "m"), **QUIET)
    probe = _probe(tmp_path / "a")
    # the saved merged folder, loaded again, still carries the trained head
    assert torch.allclose(_logits(_load(tmp_path / "m"), probe), _logits(result.model, probe), atol=1e-4)


def test_modules_to_save_names_a_missing_module(tiny_bloom_dir):
    with pytest.raises(ModelError, match=r"lora.modules_to_save \['lm_haed'\] not found in BloomForCausalLM; its top modules"):
        add_lora(_load(tiny_bloom_dir), 4, 8, 0.0, "none", "auto", modules_to_save=["lm_haed"])


def test_full_finetuning_changes_base_weights_and_saves_a_loadable_model(tiny_bloom_dir, qa_file, tmp_path, capsys):
    from conftest import run
    from transformers import AutoModelForCausalLM

    config = train_config(tiny_bloom_dir, qa_file, tmp_path / "full", **FP32, **{"train.max_steps": 3, "train.method": "full",
                                                                                "train.learning_rate": 1e-3})
    result = train(config, **QUIET)
    out = tmp_path / "full"
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "lmtune_template.json",
                 "lmtune_manifest.json"):
        assert (out / name).is_file(), name
    assert not (out / "adapter_config.json").exists()
    base, tuned = AutoModelForCausalLM.from_pretrained(tiny_bloom_dir), AutoModelForCausalLM.from_pretrained(out)
    base_weights = dict(base.named_parameters())
    changed = [n for n, p in tuned.named_parameters() if not torch.equal(p, base_weights[n])]
    assert "transformer.h.0.mlp.dense_4h_to_h.weight" in changed and "transformer.word_embeddings.weight" in changed
    probe = _probe(out)
    assert torch.allclose(_logits(tuned, probe), _logits(result.model, probe), atol=1e-4)
    assert json.loads((out / "lmtune_manifest.json").read_text())["method"]["method"] == "full"

    code, stdout, _ = run(capsys, "generate", "--model", out, "--prompt", "Học máy là gì?", "--greedy", "--max-new-tokens", "4")
    assert code == 0 and stdout.strip()
    code, _, err = run(capsys, "merge", "--adapter", out, "--output-dir", tmp_path / "m")
    assert code == 2 and "is a whole model" in err and "pass it as --model" in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------- report_to


def test_report_to_tensorboard_writes_event_files_beside_the_adapter(tiny_bloom_dir, qa_file, tmp_path):
    pytest.importorskip("tensorboard")
    train(train_config(tiny_bloom_dir, qa_file, tmp_path / "a", **{"train.max_steps": 2, "train.report_to": "tensorboard"}), **QUIET)
    events = list((tmp_path / "a" / "tensorboard").glob("events.out.tfevents.*"))
    assert events and (tmp_path / "a" / "adapter_model.safetensors").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(tmp_path / "a" / "tensorboard"))
    accumulator.Reload()
    assert "train/loss" in accumulator.Tags()["scalars"]


def test_report_to_without_the_package_names_the_pip_command(tiny_bloom_dir, qa_file, tmp_path, monkeypatch, capsys):
    import importlib.util

    from conftest import run

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(LmtuneError, match=r"'tensorboard' package is not installed: pip install tensorboard"):
        train(train_config(tiny_bloom_dir, qa_file, tmp_path / "a", **{"train.report_to": "tensorboard"}), **QUIET)
    assert not (tmp_path / "a").exists() and not partial_dir(tmp_path / "a").exists()
    code, _, err = run(capsys, "train", "--model", tiny_bloom_dir, "--data", qa_file, "--output-dir", tmp_path / "b",
                       "--report-to", "tensorboard")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "pip install tensorboard" in err


# ---------------------------------------------------------------- resume


METHODS = {
    "dora+rslora": {"lora.use_dora": True, "lora.use_rslora": True},
    "pissa": {"lora.init": "pissa"},
    "loraplus": {"train.loraplus_lr_ratio": 8},
    "neftune": {"train.neftune_noise_alpha": 5.0},
    "full": {"train.method": "full", "train.learning_rate": 1e-3},
}


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    name = "adapter_model.safetensors" if (folder / "adapter_model.safetensors").is_file() else "model.safetensors"
    return load_file(str(folder / name))


@pytest.mark.parametrize("method", list(METHODS))
def test_interrupted_run_resumes_to_the_same_weights(tiny_bloom_dir, qa_file, tmp_path, monkeypatch, method):
    import transformers

    settings = {**FP32, "train.max_steps": 6, "train.checkpoint_minutes": 0, **METHODS[method]}
    train(train_config(tiny_bloom_dir, qa_file, tmp_path / "reference", **settings), **QUIET)

    out = tmp_path / "resumed"
    # Interrupted at an epoch boundary (2 steps per epoch here). Mid-epoch, a resumed run does not reproduce the
    # random draws (NEFTune's noise, LoRA dropout) of an uninterrupted one exactly, with or without these methods.
    real_step_end = transformers.trainer_callback.CallbackHandler.on_step_end

    def ctrl_c_at_step_4(self, args, state, control):
        if state.global_step == 4:
            os.kill(os.getpid(), signal.SIGINT)  # GracefulStop: finish the step, checkpoint, stop
        return real_step_end(self, args, state, control)

    monkeypatch.setattr(transformers.trainer_callback.CallbackHandler, "on_step_end", ctrl_c_at_step_4)
    with pytest.raises(TrainingInterrupted):
        train(train_config(tiny_bloom_dir, qa_file, out, **settings), **QUIET)
    assert [p.name for p in complete_checkpoints(partial_dir(out))] == ["checkpoint-4"]
    monkeypatch.setattr(transformers.trainer_callback.CallbackHandler, "on_step_end", real_step_end)
    # where the run logs is not how it trains: a resumed run may start logging to TensorBoard
    report = {"train.report_to": "tensorboard"} if method == "neftune" and importlib.util.find_spec("tensorboard") else {}
    result = train(train_config(tiny_bloom_dir, qa_file, out, **settings, **report, **{"train.resume": True}), **QUIET)
    assert result.steps == 6
    reference, resumed = _weights(tmp_path / "reference"), _weights(out)
    assert reference.keys() == resumed.keys()
    for name, value in reference.items():
        assert torch.allclose(resumed[name], value, atol=1e-6), name
    if method == "pissa":  # the resumed run converted against the initial adapter of its first start
        merge(str(out), str(tmp_path / "m"), **QUIET)


# ---------------------------------------------------------------- export


@pytest.mark.parametrize("method", ["dora", "pissa", "full"])
def test_gguf_export_of_each_method(tiny_bloom_dir, qa_file, tmp_path, method):
    """export merges an adapter in memory (merge's logit check) and loads its GGUF file back to compare logits again."""
    from lmtune.export.exporter import export_gguf

    settings = {"dora": {"lora.use_dora": True}, "pissa": {"lora.init": "pissa"}, "full": {"train.method": "full"}}[method]
    train(train_config(tiny_bloom_dir, qa_file, tmp_path / "a", **FP32, **{"train.max_steps": 2, **settings}), **QUIET)
    source = {"model": str(tmp_path / "a")} if method == "full" else {"adapter": str(tmp_path / "a")}
    export_gguf(str(tmp_path / "m.gguf"), quant="f32", use_llama_cpp=False, **source, **QUIET)
    assert (tmp_path / "m.gguf").stat().st_size > 0


@pytest.mark.parametrize("dropout", [0.0, 0.05])
def test_a_cpu_run_with_lora_dropout_says_that_zero_trains_faster(tiny_bloom_dir, qa_file, tmp_path, dropout):
    from lmtune.model import choose_precision

    config = train_config(tiny_bloom_dir, qa_file, tmp_path, **FP32, **{"lora.dropout": dropout})
    lines = []
    model = lora_module.load_lora_model(config, resolve_source(tiny_bloom_dir), choose_precision("cpu", "float32"),
                                        lines.append)
    drops = [m.p for name, m in model.named_modules() if "lora_dropout" in name and isinstance(m, torch.nn.Dropout)]
    assert drops == ([dropout] * len(drops) if dropout else [])  # peft draws masks only above 0
    notes = [line for line in lines if "lora.dropout" in line]
    if dropout:
        assert len(notes) == 1 and "lora.dropout 0.05 draws a random mask" in notes[0] and "0 trains faster" in notes[0]
        assert drops
    else:
        assert notes == []
