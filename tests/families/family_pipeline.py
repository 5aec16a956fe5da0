"""What every family added to lmtune.families must do, end to end on a tiny random model: train a few LoRA steps,
merge, answer (lmtune's decode loop gives what transformers' own greedy generate gives), and export to GGUF with the
export's verification (transformers' GGUF reader and, when installed, the real llama.cpp)."""

from __future__ import annotations

import importlib.util

import torch
from conftest import QA, run, train_config, write_jsonl

HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
QUIET = {"log": lambda _: None}


def save(folder, model, tokenizer) -> str:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def randomize_norms(model) -> None:
    """Norm weights start at a constant; random ones make a norm written wrongly (or not at all) change the logits."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.normal_(0, 0.5)


def train_merge_answer(model_dir: str, tmp_path) -> str:
    """Train 4 LoRA steps on every linear layer, merge, answer; returns the merged folder."""
    from transformers import AutoModelForCausalLM

    from lmtune.config import GenerateConfig
    from lmtune.export.merge import merge
    from lmtune.inference.generate import generate
    from lmtune.inference.load import load_for_inference
    from lmtune.training.train import train

    data = write_jsonl(tmp_path / "qa.jsonl", QA)
    config = train_config(model_dir, data, tmp_path / "adapter", **{"train.max_steps": 4, "lora.target_modules": "all-linear"})
    result = train(config, **QUIET)
    assert result.steps == 4 and result.final_loss == result.final_loss  # trained, loss not NaN
    lora_b = [p for n, p in result.model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # peft starts B at zero: training moved it

    merged = tmp_path / "merged"
    merge(result.output_dir, str(merged), **QUIET)  # raises unless merged logits equal base + adapter

    loaded = load_for_inference(model=str(merged), dtype="float32")
    question = QA[1]["question"]
    answer = generate(loaded, question, GenerateConfig(greedy=True, max_new_tokens=12, repetition_penalty=1.0,
                                                       compile=False))
    # The same greedy answer from transformers' own generate on the merged model: lmtune's decode loop (positions,
    # cache, and for Gemma 3 the sliding-window layers past the window) runs the family as transformers does.
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    prompt = loaded.template.prompt_ids(loaded.tokenizer, question)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                             eos_token_id=loaded.tokenizer.eos_token_id, pad_token_id=loaded.tokenizer.eos_token_id)
    new = [t for t in out[0, len(prompt):].tolist() if t != loaded.tokenizer.eos_token_id]
    assert answer.new_tokens > 0
    assert answer.text == loaded.tokenizer.decode(new, skip_special_tokens=True).strip()
    return str(merged)


def export_verified(capsys, model_dir: str, output, quant: str = "f32") -> str:
    """`lmtune export` of `model_dir`; returns its output after checking both readers verified the file."""
    code, out, err = run(capsys, "export", "--model", model_dir, "--output", output, "--quant", quant)
    assert code == 0, err
    text = out + err
    assert "verified with transformers" in text
    assert ("verified with llama.cpp" in text) == HAS_LLAMA_CPP, text
    return text
