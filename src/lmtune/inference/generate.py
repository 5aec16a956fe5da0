"""Answer questions, one at a time (streaming) or batched, with the template the model was trained with."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..config import GenerateConfig
from ..data.template import PromptTemplate
from .load import LoadedModel, inference_autocast, padding_id, stop_token_ids


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
                if stream_end:  # cut inside a multi-byte character: its last bytes never come (see clean_answer)
                    text = text.rstrip("\ufffd")
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
