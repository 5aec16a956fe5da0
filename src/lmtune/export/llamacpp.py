"""llama.cpp through the optional `llama-cpp-python` bindings (`pip install 'lmtune[gguf]'`): its k-quant
quantizer, and loading an exported file into the real llama.cpp to check it.

Nothing here is needed for f32/f16/bf16/q8_0 exports; when the bindings are missing, k-quants are refused
with how to get them, and the llama.cpp check is skipped with a note.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from ..errors import LmtuneError
from ..model import physical_cores

INSTALL_HINT = ("install it with: pip install 'lmtune[gguf]' (pip builds llama-cpp-python from source with this "
                "machine's C++ compiler and cmake: a few minutes, once)")


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def quantize(source: Path, target: Path, quant: str) -> None:
    """llama.cpp's own quantizer (what `llama-quantize` runs): k-quants pick per-tensor types (q4_k_m keeps
    some tensors at q6_k) by rules that live only in llama.cpp, so they are not re-implemented here."""
    import llama_cpp

    ftype = {"q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M, "q5_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M,
             "q6_k": llama_cpp.LLAMA_FTYPE_MOSTLY_Q6_K}[quant]
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = physical_cores()
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params)
    if status != 0 or not Path(target).is_file():
        raise LmtuneError(f"llama.cpp's quantizer failed ({quant}, status {status}) on {source}")


def load(path: Path, n_ctx: int = 512, logits_all: bool = True):
    """The real llama.cpp, with logits kept for every position of an evaluated sequence."""
    from llama_cpp import Llama

    try:
        return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=logits_all, verbose=False,
                     n_threads=physical_cores(), n_threads_batch=physical_cores())
    except (ValueError, RuntimeError) as e:  # llama-cpp-python reports a file llama.cpp refused this way
        raise LmtuneError(f"llama.cpp could not load {path}: {e}") from None


def logits(llm, ids: list[int]) -> np.ndarray:
    """[len(ids), vocab] logits of one sequence, from a fresh context."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def tokenize(llm, text: str) -> list[int]:
    """llama.cpp's tokenization of text as a runtime sends it: special tokens parsed, no BOS added here."""
    return llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)


def metadata(llm) -> dict[str, str]:
    return dict(llm.metadata)


def render_chat(llm, messages: list[dict[str, str]]) -> str:
    """The file's chat template as llama-cpp-python applies it (its Jinja2ChatFormatter, with the bos/eos
    token texts llama.cpp reads from the file)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    def text_of(token_id: int) -> str:
        return llm.detokenize([token_id], special=True).decode("utf-8", errors="replace") if token_id >= 0 else ""

    template = metadata(llm)["tokenizer.chat_template"]
    formatter = Jinja2ChatFormatter(template, eos_token=text_of(llm.token_eos()), bos_token=text_of(llm.token_bos()),
                                    add_generation_prompt=True)
    return formatter(messages=messages).prompt


def greedy(llm, prompt_ids: list[int], max_new_tokens: int, stop_ids: set[int]) -> list[int]:
    """llama.cpp's greedy continuation of `prompt_ids` (its own sampler at temperature 0, no repetition
    penalty), up to `max_new_tokens` or a stop token (not included)."""
    generated: list[int] = []
    for token in llm.generate(prompt_ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
        if token in stop_ids:
            break
        generated.append(token)
        if len(generated) >= max_new_tokens:
            break
    return generated
