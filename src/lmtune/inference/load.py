"""Load a base, merged, or base+adapter model for inference, with the prompt template it was trained with,
and the few facts every decoding path needs (stop ids, padding id, autocast)."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from ..data.template import PromptTemplate
from ..errors import ModelError
from ..model import (
    apply_adapter,
    base_model_of_adapter,
    choose_precision,
    configure_cpu_threads,
    frozen_weights_dtype,
    load_adapter_tokenizer,
    load_model,
    load_tokenizer,
    resolve_source,
)
from ..safeload import check_adapter_weights


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    template: PromptTemplate
    device: str
    compute_dtype: torch.dtype
    # Set by compiled_decode.enable: single answers then decode through a compiled one-token step.
    compiled_decoder: object | None = None
    # Set by llamacpp_engine.enable (generate.engine llama.cpp): every row's tokens then come from llama.cpp.
    llama_cpp: object | None = None


def load_for_inference(
    model: str | None = None,
    adapter: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
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
    # "auto": bf16 wherever training would use it (a CPU with native bf16, a bf16 GPU). Decoding one token reads
    # every weight once, so bf16 weights halve the bytes read per token; greedy answers of the two agree closely
    # (bench/generate_speed.py reports the agreement on the bundled questions).
    precision = choose_precision(device, dtype)
    if precision.device == "cpu":  # answers on stderr: stdout carries the answers of `generate`
        configure_cpu_threads(log=lambda message: print(message, file=sys.stderr))
    if adapter:
        check_adapter_weights(adapter, allow_pickle)
    network = load_model(source, trust_remote_code, dtype=frozen_weights_dtype(precision), allow_pickle=allow_pickle)
    if adapter:
        # Merged into the weights for answering (peft's merge_and_unload, W + BA in place): the same function of the
        # input, without 7 extra pairs of small matmuls per layer per token, which an eager CPU step pays in full.
        # The quickstart adapter of SmolLM2, fp32 on an AVX2 CPU, 4 alternating rounds: one answer 13.7 against
        # 9.6 tokens/s (1.42x), evaluation batches of 24 82.0 against 68.5 (1.20x), the same greedy answer.
        network = apply_adapter(network, adapter, model).merge_and_unload()
    network.to(precision.device).eval()
    template = (PromptTemplate.load(adapter) if adapter else None) or PromptTemplate.load(source.path)
    if template is None:
        template = PromptTemplate.for_tokenizer(tokenizer, template_choice)
    return LoadedModel(network, tokenizer, template, precision.device, precision.compute_dtype)


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


def inference_autocast(loaded: LoadedModel):
    enabled = loaded.compute_dtype != torch.float32
    return torch.autocast(device_type=loaded.device, dtype=loaded.compute_dtype, enabled=enabled)
