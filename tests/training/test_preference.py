"""Preference tuning (train.method dpo, orpo, kto): the data layouts are read, prompt ids are exactly what chat sends,
the answer-only log-probabilities equal the full-logits ones, the reference (adapter off) equals a separately loaded
frozen model, and each method moves the model the way its loss asks; resume, merge and export work for each."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from conftest import run, train_config, write_jsonl

from lmtune.data.preferences import PreferenceCollator, load_preferences, tokenize_preferences
from lmtune.data.template import PromptTemplate
from lmtune.errors import DataError, TrainingInterrupted
from lmtune.training.checkpoints import complete_checkpoints, partial_dir
from lmtune.training.methods.preference import answer_logps, reference_logps
from lmtune.training.train import train

QUIET = {"log": lambda _: None}
FP32 = {"model.dtype": "float32", "model.device": "cpu"}

PAIRS = [
    {"prompt": "Học máy là gì?", "chosen": "Học máy là một nhánh của AI giúp máy tính học từ dữ liệu.",
     "rejected": "Machine learning is a kind of thing."},
    {"prompt": "LoRA là gì?", "chosen": "LoRA là kỹ thuật tinh chỉnh chỉ huấn luyện các ma trận hạng thấp.",
     "rejected": "Điều này phụ thuộc vào nhiều yếu tố."},
    {"prompt": "AI là gì?", "chosen": "AI là khả năng mô phỏng trí thông minh con người của máy móc.",
     "rejected": "AI là một loại cà phê."},
    {"prompt": "Overfitting là gì?", "chosen": "Overfitting là khi mô hình học thuộc dữ liệu huấn luyện.",
     "rejected": "Overfitting is good, good, good, good."},
]
UNPAIRED = [{"prompt": r["prompt"], "completion": r[side], "label": side == "chosen"}
            for r in PAIRS for side in ("chosen", "rejected")]


@pytest.fixture
def pairs_file(tmp_path) -> str:
    return write_jsonl(tmp_path / "pairs.jsonl", PAIRS)


# ---------------------------------------------------------------- data


def test_the_fields_usual_layouts_are_read_without_configuration(tmp_path):
    user = {"role": "user", "content": "Học máy là gì?"}
    rows = [
        {"prompt": "Học máy là gì?", "chosen": "Đúng.", "rejected": "Sai."},
        {"question": "Học máy là gì?", "chosen": "Đúng.", "rejected": "Sai."},
        {"prompt": [{"role": "system", "content": "Trả lời ngắn."}, user],
         "chosen": [{"role": "assistant", "content": "Đúng."}], "rejected": [{"role": "assistant", "content": "Sai."}]},
        {"chosen": [user, {"role": "assistant", "content": "Đúng."}],
         "rejected": [user, {"role": "assistant", "content": "Sai."}]},  # the hub layout: shared turns are the prompt
    ]
    examples, report = load_preferences([write_jsonl(tmp_path / "p.jsonl", rows)])
    assert report.rows_read == 4
    assert [(e.prompt[-1]["content"], e.chosen, e.rejected) for e in examples] == [("Học máy là gì?", "Đúng.", "Sai.")] * 4
    assert examples[2].prompt[0] == {"role": "system", "content": "Trả lời ngắn."}
    csv = tmp_path / "p.csv"
    csv.write_text("prompt;chosen;rejected\nHọc máy là gì?;Đúng.;Sai.\n", encoding="utf-8")
    assert [(e.chosen, e.rejected) for e in load_preferences([str(csv)])[0]] == [("Đúng.", "Sai.")]
    unpaired, _ = load_preferences([write_jsonl(tmp_path / "k.jsonl", UNPAIRED)])
    assert [(e.chosen, e.label, e.paired) for e in unpaired[:2]] == [(PAIRS[0]["chosen"], True, False),
                                                                     (PAIRS[0]["rejected"], False, False)]


@pytest.mark.parametrize("row, message", [
    ({"prompt": "Q?", "chosen": "", "rejected": "Sai."}, "p.jsonl:2: field 'chosen' is empty"),
    ({"chosen": "Đúng.", "rejected": "Sai."}, "p.jsonl:2: missing field 'prompt'"),
    ({"prompt": "Q?", "completion": "Đúng.", "label": "maybe"}, "p.jsonl:2: field 'label' must be true or false"),
    ({"chosen": [{"role": "user", "content": "A?"}, {"role": "assistant", "content": "x"}],
      "rejected": [{"role": "user", "content": "B?"}, {"role": "assistant", "content": "y"}]}, "must share the prompt"),
    ({"prompt": "Q?", "chosen": 5, "rejected": "Sai."}, "p.jsonl:2: field 'chosen' must be text"),
])
def test_bad_preference_rows_name_file_line_and_field(tmp_path, row, message):
    path = write_jsonl(tmp_path / "p.jsonl", [PAIRS[0], row])
    with pytest.raises(DataError, match=None) as e:
        load_preferences([path])
    assert message in str(e.value)


def test_a_bad_preference_file_is_one_clear_line_from_the_cli(tiny_llama_dir, tmp_path, capsys):
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [PAIRS[0], UNPAIRED[0]])
    code, _, err = run(capsys, "train", "--model", tiny_llama_dir, "--data", mixed, "--output-dir", tmp_path / "o",
                       "--method", "dpo")
    assert code == 2 and "Traceback" not in err
    assert "mixed.jsonl:2: an unpaired row" in err
    kto_on_pairs = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    code, _, err = run(capsys, "train", "--model", tiny_llama_dir, "--data", kto_on_pairs, "--output-dir", tmp_path / "o",
                       "--method", "kto")
    assert code == 2 and "use train.method dpo or orpo" in err
    assert not (tmp_path / "o").exists() and not partial_dir(tmp_path / "o").exists()


@pytest.mark.parametrize("tokenizer_fixture", ["llama_tokenizer", "chat_tokenizer"])
def test_prompt_ids_are_exactly_what_chat_sends_and_only_answers_are_trained(request, tmp_path, tokenizer_fixture):
    tokenizer = request.getfixturevalue(tokenizer_fixture)
    template = PromptTemplate.for_tokenizer(tokenizer)
    examples, _ = load_preferences([write_jsonl(tmp_path / "p.jsonl", PAIRS)])
    samples, report = tokenize_preferences(examples, tokenizer, template, 256)
    for row, sample in zip(PAIRS, samples):
        prompt = template.conversation_ids(tokenizer, [{"role": "user", "content": row["prompt"]}])
        assert prompt == template.prompt_ids(tokenizer, row["prompt"])  # what generate/chat/serve send
        for side in ("", "rejected_"):
            ids, labels = sample[f"{side}input_ids"], sample[f"{side}labels"]
            answer = template.answer_ids(tokenizer, row["chosen" if not side else "rejected"])
            assert ids == prompt + answer and answer[-1] == tokenizer.eos_token_id
            assert labels == [-100] * len(prompt) + answer
    batch = PreferenceCollator(tokenizer)(samples)  # chosen rows, then rejected rows, one forward pass
    assert batch["input_ids"].shape[0] == 2 * len(samples)
    assert report.trained_tokens == int((batch["labels"] != -100).sum())


def test_answer_logps_equal_the_full_logits_computation(tiny_llama_dir, llama_tokenizer, tmp_path):
    from conftest import lora_llama

    model = lora_llama(tiny_llama_dir)
    with torch.no_grad():  # a non-zero adapter, so that the LoRA path is part of what is compared
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    template = PromptTemplate.for_tokenizer(llama_tokenizer)
    samples, _ = tokenize_preferences(load_preferences([write_jsonl(tmp_path / "p.jsonl", PAIRS)])[0], llama_tokenizer,
                                      template, 256)
    batch = PreferenceCollator(llama_tokenizer)(samples)
    fast, counts = answer_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    trained = targets != -100
    token = torch.log_softmax(logits, -1).gather(2, targets.clamp(min=0)[..., None]).squeeze(2)
    assert torch.allclose(fast, (token * trained).sum(1), atol=1e-4)
    assert torch.equal(counts, trained.sum(1))


# ---------------------------------------------------------------- training


def _pair_logps(model_dir: str, adapter: str | None, tokenizer, rows) -> torch.Tensor:
    """Per pair: log p(chosen) and log p(rejected) under base (+ adapter), as [pairs, 2]."""
    from lmtune.model import apply_adapter, load_model, resolve_source

    model = load_model(resolve_source(model_dir), dtype=torch.float32)
    if adapter:
        model = apply_adapter(model, adapter, model_dir)
    model.eval()
    template = PromptTemplate.for_tokenizer(tokenizer)
    samples, _ = tokenize_preferences(rows, tokenizer, template, 256)
    batch = PreferenceCollator(tokenizer)(samples)
    with torch.no_grad():
        logps = answer_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])[0]
    return logps.view(2, -1).T


SETTINGS = {
    "dpo": {"train.method": "dpo"},
    "dpo-ipo": {"train.method": "dpo", "preference.loss_type": "ipo"},
    "dpo-simpo": {"train.method": "dpo", "preference.loss_type": "simpo", "preference.beta": 2.0},
    "dpo-smoothed": {"train.method": "dpo", "preference.label_smoothing": 0.1},
    "orpo": {"train.method": "orpo"},
}


@pytest.mark.parametrize("variant", list(SETTINGS))
def test_each_pair_method_raises_chosen_against_rejected(tiny_llama_dir, llama_tokenizer, pairs_file, tmp_path, variant):
    out = tmp_path / "a"
    result = train(train_config(tiny_llama_dir, pairs_file, out, **FP32, **SETTINGS[variant],
                                **{"train.epochs": 6, "train.learning_rate": 5e-3}), **QUIET)
    rows = load_preferences([pairs_file])[0]
    before = _pair_logps(tiny_llama_dir, None, llama_tokenizer, rows)
    after = _pair_logps(tiny_llama_dir, str(out), llama_tokenizer, rows)
    margin_before, margin_after = before[:, 0] - before[:, 1], after[:, 0] - after[:, 1]
    assert bool((margin_after > margin_before).all()), (margin_before, margin_after)
    logged = [e for e in result.log if "rewards/accuracy" in e]
    assert logged and logged[-1]["rewards/accuracy"] == 1.0 and logged[-1]["rewards/margin"] > 0
    manifest = json.loads((out / "lmtune_manifest.json").read_text())
    assert manifest["method"]["method"] == SETTINGS[variant]["train.method"]
    assert not (out / "reference_logps.json").exists()  # a training aid, not part of the adapter
    if variant.startswith("dpo") and variant != "dpo-simpo":
        assert manifest["method"]["reference"] == "base (adapter off)"
        first = next(e for e in result.log if "loss" in e)
        assert abs(first["loss"] - (0.6931 if variant != "dpo-ipo" else 25.0)) < 1e-3  # policy == reference at step 1


def test_kto_raises_good_answers_and_lowers_bad_ones(tiny_llama_dir, llama_tokenizer, tmp_path):
    data = write_jsonl(tmp_path / "k.jsonl", UNPAIRED)
    out = tmp_path / "a"
    result = train(train_config(tiny_llama_dir, data, out, **FP32, **{"train.method": "kto", "train.epochs": 6,
                                                                     "train.learning_rate": 5e-3}), **QUIET)
    rows = load_preferences([write_jsonl(tmp_path / "p.jsonl", PAIRS)])[0]
    before = _pair_logps(tiny_llama_dir, None, llama_tokenizer, rows)
    after = _pair_logps(tiny_llama_dir, str(out), llama_tokenizer, rows)
    assert bool((after[:, 0] > before[:, 0]).all()) and bool((after[:, 1] < before[:, 1]).all()), (before, after)
    assert any("rewards/desirable" in e for e in result.log) and any("kl" in e for e in result.log)


def test_the_reference_is_the_frozen_base_with_no_second_copy(tiny_llama_dir, llama_tokenizer, pairs_file, tmp_path):
    """With the adapter switched off, the trained model's log-probabilities equal a separately loaded frozen base's."""
    from lmtune.model import Precision, apply_adapter, load_model, resolve_source

    out = tmp_path / "a"
    train(train_config(tiny_llama_dir, pairs_file, out, **FP32, **{"train.method": "dpo", "train.epochs": 3}), **QUIET)
    template = PromptTemplate.for_tokenizer(llama_tokenizer)
    samples, _ = tokenize_preferences(load_preferences([pairs_file])[0], llama_tokenizer, template, 256)
    collate = PreferenceCollator(llama_tokenizer)
    cpu = Precision(device="cpu", compute_dtype=torch.float32)
    tuned = apply_adapter(load_model(resolve_source(tiny_llama_dir), dtype=torch.float32), str(out), tiny_llama_dir)
    adapter_off = reference_logps(tuned, samples, collate, 2, cpu, adapter_off=True)
    adapter_on = reference_logps(tuned, samples, collate, 2, cpu, adapter_off=False)
    frozen = reference_logps(load_model(resolve_source(tiny_llama_dir), dtype=torch.float32), samples, collate, 2, cpu,
                             adapter_off=False)
    for off, base, on in zip(adapter_off, frozen, adapter_on):
        assert off.keys() == base.keys() == {"reference_logp", "reference_rejected_logp"}
        assert all(abs(off[k] - base[k]) < 1e-5 for k in off)
        assert abs(on["reference_logp"] - base["reference_logp"]) > 1e-3  # the adapter did change the model


def test_dpo_continues_an_sft_adapter_and_merges(tiny_llama_dir, qa_file, pairs_file, tmp_path):
    from lmtune.export.merge import merge

    train(train_config(tiny_llama_dir, qa_file, tmp_path / "sft", **FP32, **{"train.max_steps": 4}), **QUIET)
    out = tmp_path / "dpo"
    train(train_config(tiny_llama_dir, pairs_file, out, **FP32, **{"train.method": "dpo", "train.max_steps": 4,
                                                                  "train.init_adapter": str(tmp_path / "sft")}), **QUIET)
    manifest = json.loads((out / "lmtune_manifest.json").read_text())["method"]
    assert manifest["reference"] == f"adapter {tmp_path / 'sft'}" and manifest["init_adapter"] == str(tmp_path / "sft")
    from safetensors.torch import load_file

    sft, dpo = (load_file(str(p / "adapter_model.safetensors")) for p in (tmp_path / "sft", out))
    assert sft.keys() == dpo.keys() and any(not torch.equal(sft[k], dpo[k]) for k in sft)  # the same adapter, trained on
    merge(str(out), str(tmp_path / "merged"), **QUIET)
    assert (tmp_path / "merged" / "config.json").is_file()


@pytest.mark.parametrize("method", ["dpo", "orpo", "kto"])
def test_interrupted_preference_run_resumes_to_the_same_weights(tiny_llama_dir, tmp_path, monkeypatch, method):
    import transformers
    from safetensors.torch import load_file

    data = write_jsonl(tmp_path / "d.jsonl", UNPAIRED if method == "kto" else PAIRS)
    settings = {**FP32, "train.method": method, "train.max_steps": 6 if method != "kto" else 12,
                "train.checkpoint_minutes": 0}
    train(train_config(tiny_llama_dir, data, tmp_path / "reference", **settings), **QUIET)
    out = tmp_path / "resumed"
    real_step_end = transformers.trainer_callback.CallbackHandler.on_step_end
    boundary = 4 if method != "kto" else 8  # an epoch boundary

    def ctrl_c(self, args, state, control):
        if state.global_step == boundary:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step_end(self, args, state, control)

    monkeypatch.setattr(transformers.trainer_callback.CallbackHandler, "on_step_end", ctrl_c)
    with pytest.raises(TrainingInterrupted):
        train(train_config(tiny_llama_dir, data, out, **settings), **QUIET)
    assert [p.name for p in complete_checkpoints(partial_dir(out))] == [f"checkpoint-{boundary}"]
    monkeypatch.setattr(transformers.trainer_callback.CallbackHandler, "on_step_end", real_step_end)
    train(train_config(tiny_llama_dir, data, out, **settings, **{"train.resume": True}), **QUIET)
    reference, resumed = (load_file(str(Path(p) / "adapter_model.safetensors")) for p in (tmp_path / "reference", out))
    assert reference.keys() == resumed.keys()
    for name, value in reference.items():
        assert torch.allclose(resumed[name], value, atol=1e-6), name


def test_a_preference_adapter_exports_to_gguf(tiny_llama_dir, pairs_file, tmp_path):
    from lmtune.export.exporter import export_gguf

    train(train_config(tiny_llama_dir, pairs_file, tmp_path / "a", **FP32, **{"train.method": "orpo",
                                                                             "train.max_steps": 2}), **QUIET)
    export_gguf(str(tmp_path / "m.gguf"), adapter=str(tmp_path / "a"), quant="f32", use_llama_cpp=False, **QUIET)
    assert (tmp_path / "m.gguf").stat().st_size > 0


@pytest.mark.parametrize("split", ["eval_paths", "val_size"])
def test_validation_logs_the_reward_accuracy(tiny_llama_dir, pairs_file, tmp_path, split):
    held_out = write_jsonl(tmp_path / "held.jsonl", PAIRS[:2])
    settings = {"data.eval_paths": [held_out]} if split == "eval_paths" else {"data.val_size": 1}
    result = train(train_config(tiny_llama_dir, pairs_file, tmp_path / "a", **FP32,
                                **{"train.method": "dpo", "train.max_steps": 4, "train.eval_steps": 2, **settings}),
                   **QUIET)
    evals = [e for e in result.log if "eval_loss" in e]
    assert evals and all("eval_rewards/accuracy" in e and "eval_rewards/margin" in e for e in evals)


def test_eval_on_preference_data_reports_base_vs_tuned(tiny_llama_dir, pairs_file, tmp_path, capsys):
    train(train_config(tiny_llama_dir, pairs_file, tmp_path / "a", **FP32, **{"train.method": "dpo", "train.epochs": 6,
                                                                             "train.learning_rate": 5e-3}), **QUIET)
    code, out, err = run(capsys, "eval", "--adapter", tmp_path / "a", "--data", pairs_file, "--baseline", tiny_llama_dir,
                         "--output-dir", tmp_path / "e", "--max-new-tokens", "8")
    assert code == 0, err
    report = json.loads((tmp_path / "e" / "report.json").read_text())
    assert report["kind"] == "preference" and report["n"] == len(PAIRS)
    assert report["tuned"]["mean_margin"] > report["base"]["mean_margin"]
    assert report["rewards_vs_base"]["reward_accuracy"] == 100.0  # every chosen answer gained against its rejected one
    assert "chosen preferred %" in out and "reward accuracy % (vs base)" in out
    assert f"answering: tuned model {len(PAIRS)}/{len(PAIRS)} (" in err and f"answering: base model 0/{len(PAIRS)}" in err
    rows = [json.loads(line) for line in (tmp_path / "e" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == len(PAIRS) and {"tuned", "base", "chosen", "rejected"} <= rows[0].keys()


def test_quickstart_with_a_preference_method_runs_sft_then_dpo_and_compares_them(tiny_llama_dir, pairs_file, tmp_path,
                                                                                   capsys):
    """`lmtune quickstart --method dpo`: SFT on the bundled pairs, DPO from that adapter on the bundled preference
    pairs, both merged, the held-out preference pairs compared (a tiny model and a short run: the path, not the result)."""
    code, out, err = run(capsys, "quickstart", "--config", "configs/quickstart.yaml", "--model", tiny_llama_dir,
                         "--method", "dpo", "--output-dir", tmp_path / "q", "--max-steps", "3", "--max-new-tokens", "4",
                         "--data", pairs_file,
                         "--max-samples", "8", "--lora.target_modules", "auto", "--dtype", "float32")
    assert code == 0, err
    report = json.loads((tmp_path / "q" / "quickstart_report.json").read_text())
    assert report["method"] == "dpo" and report["heldout"]["kind"] == "preference" and report["heldout"]["n"] >= 50
    manifest = json.loads((tmp_path / "q" / "adapter" / "lmtune_manifest.json").read_text())
    assert manifest["method"]["init_adapter"] == str(tmp_path / "q" / "sft-adapter")
    assert (tmp_path / "q" / "merged" / "config.json").is_file() and "reward accuracy % (vs base)" in out


def test_data_inspect_and_clean_name_each_problem_of_a_preference_file(tmp_path, capsys):
    rows = [PAIRS[0],
            {"prompt": "Q1?", "chosen": "Giống nhau.", "rejected": "Giống nhau."},
            {"prompt": "Q2?", "chosen": "Câu  trả lời.", "rejected": "Câu trả lời.\n"},
            {"prompt": "Học máy là gì?", "chosen": "Machine learning is a kind of thing.", "rejected": "Sai."},
            {"prompt": "Q3?", "chosen": "", "rejected": "Sai."},
            PAIRS[0]]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    code, out, err = run(capsys, "data", "inspect", path)
    assert code == 0, err
    assert "p.jsonl:2: chosen and rejected are the same" in out
    assert "p.jsonl:3: chosen and rejected differ only in spaces or line breaks" in out
    assert "p.jsonl:1: the rejected answer is another row's chosen answer (chosen at " in out and "p.jsonl:4)" in out
    assert "p.jsonl:5: row cannot be read (field 'chosen' is empty)" in out
    assert "p.jsonl:6: the same row again (as " in out
    assert "chosen length (characters): median" in out
    code, out, err = run(capsys, "data", "clean", path, "--output", tmp_path / "clean.jsonl")
    assert code == 0, err
    kept = [json.loads(line) for line in (tmp_path / "clean.jsonl").read_text().splitlines()]
    rejects = [json.loads(line) for line in (tmp_path / "clean.rejects.jsonl").read_text().splitlines()]
    assert len(kept) + len(rejects) == len(rows) and len(rejects) == 5
    assert load_preferences([str(tmp_path / "clean.jsonl")])[0]  # what clean keeps trains


@pytest.mark.parametrize("method", ["dpo", "orpo", "kto"])
def test_dry_run_estimates_each_preference_method(tiny_llama_dir, tmp_path, method):
    data = write_jsonl(tmp_path / "d.jsonl", UNPAIRED if method == "kto" else PAIRS)
    result = train(train_config(tiny_llama_dir, data, tmp_path / "a", **FP32, **{"train.method": method}), dry_run=True,
                   **QUIET)
    assert result.dry_run_estimate["seconds_total"] > 0 and not (tmp_path / "a").exists()


def test_train_with_validation_pairs_writes_the_preference_report(tiny_llama_dir, pairs_file, tmp_path, capsys):
    code, out, err = run(capsys, "train", "--model", tiny_llama_dir, "--data", pairs_file, "--output-dir", tmp_path / "a",
                         "--method", "dpo", "--val-size", "1", "--max-steps", "2", "--generate.max_new_tokens", "4",
                         "--dtype", "float32")
    assert code == 0, err
    report = json.loads((tmp_path / "a" / "eval" / "report.json").read_text())
    assert report["kind"] == "preference" and report["n"] == 1 and "chosen_preferred" in report["tuned"]
    assert "chosen preferred %" in out
    assert "answering: tuned model, validation prompts 0/1\nanswering: tuned model, validation prompts 1/1 (" in err
    manifest = json.loads((tmp_path / "a" / "lmtune_manifest.json").read_text())
    assert manifest["validation"]["report"]["n"] == 1
