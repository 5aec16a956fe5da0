"""Merge a LoRA adapter into its base model, prove the merge changed nothing, and save a plain model.

The merged folder loads with `AutoModelForCausalLM.from_pretrained` alone: safetensors weights,
tokenizer, a generation_config.json with the right eos/pad ids, and the prompt template.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.template import PromptTemplate
from ..errors import LmtuneError
from ..model import (
    apply_adapter,
    base_model_of_adapter,
    load_adapter_tokenizer,
    load_model,
    resolve_source,
    save_generation_config,
)
from ..outputs import (
    CONFIG_FILE,
    LOG_FILE,
    MANIFEST_FILE,
    PLOT_FILE,
    atomic_output,
    check_output_free,
    now_iso,
    read_json,
    write_json,
)
from ..safeload import check_adapter_weights
from ..training.quantization import trained_quantization

PROBE_QUESTIONS = ["Trí tuệ nhân tạo là gì?", "Học máy khác gì học sâu?", "What is LoRA?"]


@dataclass
class MergeResult:
    output_dir: str
    max_logit_diff: float


class MergeMismatchError(LmtuneError):
    pass


def probe_batch(tokenizer, template: PromptTemplate) -> dict[str, torch.Tensor]:
    prompts = [template.prompt_ids(tokenizer, q) + template.answer_ids(tokenizer, "AI là khả năng của máy.") for q in PROBE_QUESTIONS]
    width = max(map(len, prompts))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return {
        "input_ids": torch.tensor([p + [pad] * (width - len(p)) for p in prompts]),
        "attention_mask": torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in prompts]),
    }


@dataclass
class MergedInMemory:
    """An adapter merged into its base, checked against base + adapter, not yet saved anywhere."""

    model: object  # the merged transformers model, fp32 weights
    tokenizer: object
    template: PromptTemplate
    base_name: str  # the base model as the user (or the adapter) named it
    stored_dtype: torch.dtype | None  # the dtype the base was published in (None: keep fp32)
    max_logit_diff: float


# The probe's tolerance is relative to its largest logit: the merged W + BA and the separate x W + (x A) B round
# differently in fp32, and that rounding grows with the logits' scale (a well-trained SmolLM2 adapter: largest logit
# 35.6, one logit 1.25e-3 apart, mean 2.4e-5, every argmax equal). A wrong merge (a lost scaling or layer) moves logits
# by tenths or more.
MERGE_RTOL = 1e-4


def merge_tolerance(logits: torch.Tensor, rtol: float = MERGE_RTOL) -> float:
    """The largest logit difference a correct fp32 merge may show on these base+adapter logits."""
    return rtol * max(10.0, float(logits.abs().max()))


def merge_in_memory(adapter: str, model: str | None = None, rtol: float = MERGE_RTOL, log=print,
                    allow_pickle: bool = False, trust_remote_code: bool = False) -> MergedInMemory:
    """Merge `adapter` into its base model (read from the adapter unless `model` is given), in memory.

    Raises MergeMismatchError if the merged model's logits differ from base+adapter by more than `rtol` times the
    largest of them (at least 10) on a probe batch. Shared by `merge` (which saves a folder) and the GGUF export (which writes a file).
    """
    base_name = model or base_model_of_adapter(adapter)
    source = resolve_source(base_name)
    check_adapter_weights(adapter, allow_pickle)
    tokenizer = load_adapter_tokenizer(adapter, source, trust_remote_code)
    template = PromptTemplate.load(adapter) or PromptTemplate.for_tokenizer(tokenizer)

    log(f"merge: loading {base_name} and {adapter}")
    quantized = trained_quantization(adapter)
    if quantized != "none":
        # LoRA learned a correction to the quantized weights; added to the full-precision ones it is the usual QLoRA
        # result (a merged model without k-bit kernels), which the probe below compares against base+adapter.
        log(f"merge: base was trained {quantized} quantized; merging into the full-precision base")
    # Merge in fp32 so the sum W + BA is exact to float precision, then store in the base's own dtype.
    base = load_model(source, trust_remote_code, dtype=torch.float32, allow_pickle=allow_pickle)
    stored_dtype = _stored_dtype(source)
    peft_model = apply_adapter(base, adapter, base_name).eval()
    probe = probe_batch(tokenizer, template)
    mask = probe["attention_mask"].bool()
    with torch.no_grad():
        expected = peft_model(**probe).logits[mask]
        merged = peft_model.merge_and_unload()
        actual = merged(**probe).logits[mask]
    diff, atol = float((expected - actual).abs().max()), merge_tolerance(expected, rtol)
    log(f"merge: max |logit difference| base+adapter vs merged on the probe batch = {diff:.2e} (tolerance {atol:.2g})")
    if not diff <= atol:
        raise MergeMismatchError(f"merged model differs from base+adapter by {diff:.3g} > {atol:.2g}; nothing was written")
    return MergedInMemory(merged, tokenizer, template, base_name, stored_dtype, diff)


MERGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def merge(adapter: str, output_dir: str, model: str | None = None, overwrite: bool = False, rtol: float = MERGE_RTOL,
          log=print, allow_pickle: bool = False, trust_remote_code: bool = False, dtype: str = "auto") -> MergeResult:
    """Merge `adapter` into its base model (read from the adapter unless `model` is given) and save to `output_dir`.

    The weights are stored in `dtype`: "auto" keeps the base's own (fp32 for a GGUF base), or "float32",
    "bfloat16", "float16" (half the size of fp32: SmolLM2-135M is 538 MB in fp32). The merge itself is in fp32.
    Raises MergeMismatchError if the merged model's logits differ from base+adapter by more than the tolerance
    (merge_tolerance) on a probe batch; nothing is written then.
    """
    if dtype != "auto" and dtype not in MERGE_DTYPES:
        raise LmtuneError(f"merge: dtype must be auto, {', '.join(MERGE_DTYPES)}; got {dtype!r}")
    check_output_free(output_dir, overwrite)
    done = merge_in_memory(adapter, model, rtol, log, allow_pickle, trust_remote_code)
    merged, tokenizer, template = done.model, done.tokenizer, done.template

    with atomic_output(output_dir, overwrite) as out:
        stored = MERGE_DTYPES[dtype] if dtype != "auto" else done.stored_dtype
        if stored is not None and stored != torch.float32:
            merged = merged.to(stored)
        merged.save_pretrained(out)  # safetensors
        tokenizer.save_pretrained(out)
        save_generation_config(merged, tokenizer, out)
        template.save(out)
        for name in (CONFIG_FILE, LOG_FILE, PLOT_FILE):
            if (Path(adapter) / name).is_file():
                shutil.copy2(Path(adapter) / name, out / name)
        manifest = read_json(Path(adapter) / MANIFEST_FILE) if (Path(adapter) / MANIFEST_FILE).is_file() else {}
        manifest["merge"] = {"adapter": str(adapter), "base_model": done.base_name, "max_logit_diff": done.max_logit_diff,
                             "finished": now_iso()}
        write_json(out / MANIFEST_FILE, manifest)
    log(f"merge: saved merged model to {output_dir}")
    return MergeResult(output_dir, done.max_logit_diff)


def _stored_dtype(source) -> torch.dtype | None:
    """The dtype the base checkpoint was published in (None for GGUF, which we dequantize to fp32)."""
    if source.gguf_file:
        return None
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source.path)
    except (OSError, ValueError):
        return None
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else None
