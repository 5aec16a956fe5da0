"""Prove an exported GGUF is the model: load it back and compare its logits with the merged model's.

Two readers: transformers' GGUF loader (always; it dequantizes into a torch model) and, when the
`llama-cpp-python` bindings are installed, the real llama.cpp. llama.cpp is also asked to tokenize test
sentences and to render the file's chat template, which must give the ids lmtune trains and prompts with.

Logits are compared as distributions: the mean KL divergence per token of the file's next-token
distribution from the merged model's, with a tolerance per quant type (KL_TOLERANCE). Quantization moves
logits by amounts that depend on their scale; a wrong tensor layout (an unpermuted Q/K, a misordered fused
QKV) moves the distribution far more.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data.template import PromptTemplate
from ..errors import LmtuneError
from ..families.base import rope_type
from . import llamacpp
from .vocab import adds_bos, sentencepiece_space_prefix

# Mean KL(merged || file) per probe token allowed for each quant type, for the worse of the two readers (llama.cpp
# also rounds activations to 8 bits in its quantized dot products, so it sits above transformers). Measured:
#   SmolLM2-135M-Instruct: f16 1.5e-5, q8_0 9.7e-3, q6_k 3.6e-2, q5_k_m 2.1e-1, q4_k_m 1.2e-1 (a 135M model is
#   sensitive to quantization, and its 576-wide rows make llama.cpp fall back to older types for k-quants);
#   the tiny random test models (large weights): f32 1.6e-6, bf16 4e-4, q8_0 3.1e-3, q5_k_m 0.12;
#   a Llama exported without the Q/K permutation: 1.85 (the error this check exists for).
# Each tolerance is 3x or more above what was measured and at least 3x below the layout error.
KL_TOLERANCE = {"f32": 1e-4, "f16": 2e-3, "bf16": 1e-2, "q8_0": 5e-2, "q6_k": 0.15, "q5_k_m": 0.6, "q4_k_m": 0.6}

# Sentences llama.cpp must tokenize exactly as the training tokenizer does.
TOKENIZE_CHECKS = ["Trí tuệ nhân tạo là gì?", "Học máy khác gì học sâu?",
                   "Mạng nơ-ron tích chập (CNN) xử lý ảnh 224x224 như thế nào?", "What is LoRA? It's low-rank adaptation."]
CONVERSATION = [{"role": "user", "content": "Học máy là gì?"},
                {"role": "assistant", "content": "Học máy là một nhánh của AI."},
                {"role": "user", "content": "Còn học sâu?"}]


class ExportVerificationError(LmtuneError):
    """The exported file does not reproduce the merged model; nothing was written."""


@dataclass
class LogitCheck:
    reader: str  # "transformers" or "llama.cpp"
    max_abs_diff: float
    mean_kl: float
    top1_agreement: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.mean_kl <= self.tolerance

    def describe(self) -> str:
        return (f"{self.reader}: mean KL {self.mean_kl:.2e} (tolerance {self.tolerance:.0e}), max |logit diff| "
                f"{self.max_abs_diff:.3g}, same top token {100 * self.top1_agreement:.1f}%")


@dataclass
class Verification:
    checks: list[LogitCheck] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def compare(reader: str, expected: torch.Tensor, actual: torch.Tensor, quant: str) -> LogitCheck:
    expected, actual = expected.float(), actual.float()
    kl = torch.nn.functional.kl_div(actual.log_softmax(-1), expected.log_softmax(-1), log_target=True, reduction="none")
    return LogitCheck(reader, float((expected - actual).abs().max()), float(kl.sum(-1).mean()),
                      float((expected.argmax(-1) == actual.argmax(-1)).float().mean()), KL_TOLERANCE[quant])


def runtime_ids(tokenizer, text: str, add_bos: bool) -> list[int]:
    """Ids a runtime (llama.cpp, Ollama) feeds for a rendered chat: special tokens parsed, and BOS in front when
    the vocabulary asks for one and the text does not already start with it."""
    space_prefix = sentencepiece_space_prefix(tokenizer)
    if space_prefix is None:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = llama_cpp_sentencepiece_ids(tokenizer, text, space_prefix)
    if add_bos and tokenizer.bos_token_id is not None and ids[:1] != [tokenizer.bos_token_id]:
        ids = [tokenizer.bos_token_id] + ids
    return ids


def llama_cpp_sentencepiece_ids(tokenizer, text: str, space_prefix: bool) -> list[int]:
    """How llama.cpp tokenizes text with a SentencePiece vocabulary (llama-vocab.cpp, LLAMA_VOCAB_TYPE_SPM), which
    is not always how transformers does: the text is cut at added tokens; every piece of text that starts the
    text or follows an added token gets a space in front (transformers 5's Llama tokenizers prefix only the
    start of the text, and not when it already starts with a space); spaces become "▁"; then BPE runs over
    the whole piece."""
    added = tokenizer.added_tokens_encoder
    model = tokenizer.backend_tokenizer.model
    ids: list[int] = []
    after_added = True
    pattern = "|".join(re.escape(token) for token in sorted(added, key=len, reverse=True))
    for piece in (re.split(f"({pattern})", text) if pattern else [text]):
        if piece in added:
            ids.append(added[piece])
            after_added = True
        elif piece:
            piece = (" " if space_prefix and after_added else "") + piece
            ids += [token.id for token in model.tokenize(piece.replace(" ", "\u2581"))]
            after_added = False
    return ids


def file_rope_factors(path: Path) -> torch.Tensor | None:
    """The `rope_freqs.weight` tensor of a GGUF file (Llama 3.1-3.3's rope scaling), or None."""
    import gguf

    for tensor in gguf.GGUFReader(str(path)).tensors:
        if tensor.name == "rope_freqs.weight":
            return torch.from_numpy(tensor.data.astype("float32").reshape(-1).copy())
    return None


def check_rope_factors(path: Path, config) -> str | None:
    """For a "llama3" rope-scaled model: None if the file's rope_freqs equal the divisors transformers' own llama3
    rope applies to the model's frequencies (its unscaled frequencies over its scaled ones); else the problem.
    Independent of the probe's length: for a real Llama 3.2 the scaled frequencies have wavelengths above 2048
    tokens, which a short probe hardly turns, so the logit checks alone would barely see a wrong factor."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type(config) != "llama3":
        return None
    factors = file_rope_factors(path)
    if factors is None:
        return "the model has Llama 3 rope scaling and the file has no rope_freqs tensor to carry it"
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config)
    theta = config.rope_parameters["rope_theta"]
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    unscaled = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    expected = unscaled / scaled.float()
    if factors.shape != expected.shape or not torch.allclose(factors, expected, rtol=1e-4, atol=0):
        return (f"the file's rope_freqs {factors.tolist()[:8]}... are not the Llama 3 rope divisors transformers "
                f"applies ({expected.tolist()[:8]}...)")
    return None


def _apply_file_rope_factors(model, factors: torch.Tensor) -> None:
    """transformers' GGUF reader (5.x) reads no rope scaling for Llama and drops the rope_freqs tensor, so a Llama 3.1+
    file comes back with unscaled rope. Apply the file's factors the way llama.cpp does (ggml_rope_ext divides each
    rotary frequency by its factor), so this check runs the frequencies the file holds, not the merged model's.
    Only when the reader left the rope unscaled: a later reader that applies them itself is not scaled twice."""
    config = model.config
    if str((getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")) != "default":
        return
    for module in model.modules():
        inv_freq = getattr(module, "inv_freq", None)
        if isinstance(inv_freq, torch.Tensor) and inv_freq.shape == factors.shape:
            module.inv_freq = inv_freq / factors.to(inv_freq)


def check_with_transformers(path: Path, probe: dict, expected: torch.Tensor, quant: str) -> LogitCheck:
    from transformers import AutoModelForCausalLM
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    verbosity, bars_on, real_tqdm = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled(), gguf_utils.tqdm
    hf_logging.set_verbosity_error()  # its progress bars and dequantization notes are noise here
    hf_logging.disable_progress_bar()
    gguf_utils.tqdm = lambda iterable, **_: iterable  # the reader's de-quantizing bar is a tqdm of its own
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    except Exception as e:  # anything transformers' reader trips on means the file is not what it should be
        raise ExportVerificationError(f"transformers could not load the exported file back: {type(e).__name__}: "
                                      f"{str(e).splitlines()[0] if str(e) else ''}; nothing was written") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        gguf_utils.tqdm = real_tqdm
        if bars_on:  # switching them on where the environment turned them off warns with a file path
            hf_logging.enable_progress_bar()
    if (factors := file_rope_factors(path)) is not None:
        _apply_file_rope_factors(model, factors)
    with torch.no_grad():
        actual = model(**probe).logits[probe["attention_mask"].bool()]
    return compare("transformers", expected, actual, quant)


def check_with_llama_cpp(path: Path, probe: dict, expected: torch.Tensor, quant: str, tokenizer,
                         template: PromptTemplate, add_bos: bool) -> tuple[LogitCheck, list[str]]:
    """Logits, tokenization and chat template, each through the real llama.cpp (in a child process, so a crash
    of native code is an error message, not the end of the export). Returns the logit check and the problems
    found with tokenization or the template (empty when all agree)."""
    mask = probe["attention_mask"].bool()
    sequences = [row[m].tolist() for row, m in zip(probe["input_ids"], mask)]
    logits, tokenized, rendered, got = llamacpp.check(path, sequences, TOKENIZE_CHECKS, CONVERSATION)
    check = compare("llama.cpp", expected, torch.from_numpy(logits), quant)
    problems = []
    for text, theirs in zip(TOKENIZE_CHECKS, tokenized):
        ours = tokenizer(text, add_special_tokens=False)["input_ids"]
        if ours != theirs:
            problems.append(f"llama.cpp tokenizes {text!r} as {theirs[:12]}..., training used {ours[:12]}...")
    expected_ids = template.conversation_ids(tokenizer, CONVERSATION)
    if add_bos and got[:1] != [tokenizer.bos_token_id]:
        got = [tokenizer.bos_token_id] + got
    if got != expected_ids:
        problems.append(f"the chat template in the file renders {rendered!r} for a two-turn conversation, which is "
                        "not the prompt lmtune trains with")
    return check, problems


def check_chat_template(chat_template: str, tokenizer, template: PromptTemplate, add_bos: bool) -> str | None:
    """None if the template, rendered by transformers' Jinja for a two-turn conversation, gives the ids lmtune
    builds (PromptTemplate.conversation_ids); else what it rendered."""
    text = tokenizer.apply_chat_template(CONVERSATION, chat_template=chat_template, add_generation_prompt=True,
                                         tokenize=False)
    if runtime_ids(tokenizer, text, add_bos) != template.conversation_ids(tokenizer, CONVERSATION):
        return text
    return None


def _space_after_special_reason(tokenizer, template: PromptTemplate, rendered: str) -> str:
    """Why a SentencePiece model's chat template fails the check, when the reason is llama.cpp's space rule: the
    text tokenized as transformers does gives the training ids, tokenized as llama.cpp does it does not."""
    if sentencepiece_space_prefix(tokenizer) is None:
        return ""
    hf_ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None and adds_bos(tokenizer) and hf_ids[:1] != [tokenizer.bos_token_id]:
        hf_ids = [tokenizer.bos_token_id] + hf_ids
    if hf_ids != template.conversation_ids(tokenizer, CONVERSATION):
        return ""
    return (" as a GGUF runtime tokenizes it: llama.cpp (and Ollama) put a space before text that follows a special "
            "token with a SentencePiece vocabulary, and this tokenizer (transformers 5's, legacy=False) did not when "
            "the model was trained, so the runtime would send ids training never saw")


def verify(path: Path, probe: dict, expected: torch.Tensor, quant: str, tokenizer, template: PromptTemplate,
           chat_template: str, add_bos: bool, use_llama_cpp: bool = True, log=print, config=None) -> Verification:
    """Raise ExportVerificationError unless every available reader reproduces the merged model (`config` is the
    merged model's, for the Llama 3 rope factors check)."""
    result = Verification()
    rendered = check_chat_template(chat_template, tokenizer, template, add_bos)
    if rendered is not None:
        raise ExportVerificationError(f"the chat template written to the file renders {rendered!r}, not the prompt "
                                      f"lmtune trains with{_space_after_special_reason(tokenizer, template, rendered)}; "
                                      "nothing was written")
    if config is not None and (problem := check_rope_factors(path, config)) is not None:
        raise ExportVerificationError(f"{problem}; nothing was written")
    checks = [check_with_transformers(path, probe, expected, quant)]
    problems: list[str] = []
    if use_llama_cpp and llamacpp.available():
        check, problems = check_with_llama_cpp(path, probe, expected, quant, tokenizer, template, add_bos)
        checks.append(check)
    elif use_llama_cpp:
        result.notes.append(f"llama.cpp check skipped: llama-cpp-python is not installed; {llamacpp.INSTALL_HINT}")
    for check in checks:
        log(f"export: verified with {check.describe()}")
    failed = [c for c in checks if not c.passed]
    if failed or problems:
        reasons = [f"{c.describe()}" for c in failed] + problems
        raise ExportVerificationError("the exported file does not reproduce the merged model: " + "; ".join(reasons)
                                      + "; nothing was written")
    result.checks = checks
    return result
