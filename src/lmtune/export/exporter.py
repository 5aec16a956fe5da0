"""`lmtune export`: a merged model (or an adapter, merged in memory) -> one verified GGUF file, and
optionally an Ollama Modelfile beside it.

Order of work: refuse what cannot succeed before loading anything (output exists, unsupported
architecture or quant type, k-quants without llama.cpp); load or merge; write to hidden temporary files;
load the file back and compare logits (verify.py); only then rename into place. A failed check, an
interrupt or a full disk leaves no file behind and any previous file intact.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import GenerateConfig
from ..data.template import PromptTemplate
from ..errors import LmtuneError
from ..model import base_model_of_adapter, configure_cpu_threads, load_model, load_tokenizer, resolve_source
from ..outputs import CONFIG_FILE, atomic_files, file_sha256
from . import llamacpp
from .errors import ExportError
from .gguf import LLAMA_CPP_QUANTS, QUANTS, check_exportable, gguf_family, write_gguf
from .merge import merge_in_memory, probe_batch
from .ollama import go_template, modelfile_text, stop_strings, template_pieces
from .verify import LogitCheck, verify
from .vocab import adds_bos

MODELFILE = "Modelfile"


@dataclass
class ExportResult:
    path: str
    quant: str
    architecture: str
    pre_tokenizer: str
    size_bytes: int
    sha256: str
    checks: list[LogitCheck]
    notes: list[str] = field(default_factory=list)
    modelfile: str | None = None
    ollama_command: str | None = None


def _check_request(output: Path, quant: str, model: str | None, adapter: str | None) -> None:
    if not model and not adapter:
        raise ExportError("give --model (a merged model folder) or --adapter (with its base read from it, or --model)")
    if output.suffix.lower() != ".gguf":
        raise ExportError(f"--output {output}: give a file name ending in .gguf")
    if quant not in QUANTS:
        raise ExportError(f"--quant {quant}: choose one of {', '.join(QUANTS)}")
    if quant in LLAMA_CPP_QUANTS and not llamacpp.available():
        raise ExportError(f"--quant {quant} is made by llama.cpp's own quantizer, and the llama-cpp-python bindings are "
                          f"not installed; {llamacpp.INSTALL_HINT}. f32, f16, bf16 and q8_0 need nothing")


def _check_architecture(name: str, trust_remote_code: bool) -> None:
    """Read only the config, so an unsupported model is refused before gigabytes of weights are loaded."""
    from transformers import AutoConfig

    source = resolve_source(name)
    try:
        config = AutoConfig.from_pretrained(source.path, trust_remote_code=trust_remote_code, **source.kwargs())
    except (OSError, ValueError) as e:
        raise LmtuneError(f"cannot read the model config of '{name}': {str(e).splitlines()[0]}") from None
    check_exportable(config)


def _generate_defaults(*folders: str | None) -> GenerateConfig:
    """The generate section of the training config saved beside the model or adapter, else lmtune's defaults."""
    import yaml

    for folder in folders:
        path = Path(folder) / CONFIG_FILE if folder else None
        if path is not None and path.is_file():
            section = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("generate") or {}
            known = {k: v for k, v in section.items() if k in GenerateConfig.__dataclass_fields__}
            return GenerateConfig(**known)
    return GenerateConfig()


def export_gguf(output: str, model: str | None = None, adapter: str | None = None, quant: str = "q8_0",
                ollama: bool = False, overwrite: bool = False, name: str | None = None, allow_pickle: bool = False,
                trust_remote_code: bool = False, use_llama_cpp: bool = True, log=print) -> ExportResult:
    """Export a merged model (`model`) or `adapter` (merged into `model` or its recorded base) to `output`."""
    output = Path(output)
    _check_request(output, quant, model, adapter)
    paths = ([output.parent / MODELFILE] if ollama else []) + [output]
    # Entering checks that no output exists (unless overwrite); nothing is created before the writes below.
    with atomic_files(paths, overwrite) as tmps:
        _check_architecture((model or base_model_of_adapter(adapter)) if adapter else model, trust_remote_code)
        configure_cpu_threads(log)  # torch's threads here, and llama.cpp's in its child (llamacpp.threads)
        if adapter:
            merged = merge_in_memory(adapter, model, log=log, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
            network, tokenizer, template = merged.model, merged.tokenizer, merged.template
        else:
            log(f"export: loading {model}")
            source = resolve_source(model)
            network = load_model(source, trust_remote_code, dtype=torch.float32, allow_pickle=allow_pickle)
            tokenizer = load_tokenizer(source, trust_remote_code)
            template = (None if source.gguf_file else PromptTemplate.load(source.path)) or PromptTemplate.for_tokenizer(tokenizer)
        network.eval()
        probe = probe_batch(tokenizer, template)
        with torch.no_grad():
            expected = network(**probe).logits[probe["attention_mask"].bool()]

        target = tmps[-1]
        title = name or output.stem
        if quant in LLAMA_CPP_QUANTS:
            # llama.cpp's quantizer reads a GGUF: write f32 (exact) to a hidden sibling, quantize, remove it.
            intermediate = target.with_name(target.name + ".f32")
            try:
                log(f"export: writing an f32 GGUF for llama.cpp's {quant} quantizer")
                written = write_gguf(network, tokenizer, template, intermediate, "f32", title)
                llamacpp.quantize(intermediate, target, quant)
            finally:
                intermediate.unlink(missing_ok=True)
        else:
            log(f"export: writing {quant} GGUF ({type(network).__name__} as llama.cpp '{gguf_family(network.config).gguf_architecture}')")
            written = write_gguf(network, tokenizer, template, target, quant, title)
        add_bos = adds_bos(tokenizer)
        verification = verify(target, probe, expected, quant, tokenizer, template, written.chat_template, add_bos,
                              use_llama_cpp=use_llama_cpp, log=log, config=network.config)
        for note in verification.notes:
            log(f"export: {note}")

        result = ExportResult(str(output), quant, written.architecture, written.pre_tokenizer, target.stat().st_size,
                              file_sha256(target), verification.checks, verification.notes)
        if ollama:
            def render(messages, generation):
                return tokenizer.apply_chat_template(messages, chat_template=written.chat_template,
                                                     add_generation_prompt=generation, tokenize=False)

            pieces = template_pieces(render)
            eos_ids = getattr(getattr(network, "generation_config", None), "eos_token_id", None)
            eos_ids = eos_ids if isinstance(eos_ids, list) else [eos_ids] if eos_ids is not None else []
            next_turn = template.prompt.partition("{question}")[0] if template.kind == "plain" else ""
            text = modelfile_text(output.name, go_template(pieces), template.system_prompt,
                                  stop_strings(tokenizer, pieces, eos_ids, next_turn), _generate_defaults(adapter, model))
            tmps[0].write_text(text, encoding="utf-8")
            result.modelfile = str(paths[0])
            # Run from the Modelfile's folder: its FROM names the GGUF file relative to it.
            create = f"ollama create {_ollama_name(title)} -f {MODELFILE}"
            result.ollama_command = create if output.parent == Path(".") else f"cd {shlex.quote(str(output.parent))} && {create}"
    log(f"export: wrote {output} ({result.size_bytes / 1e6:.1f} MB, {quant}, pre-tokenizer '{result.pre_tokenizer}')")
    if result.ollama_command:
        log(f"export: wrote {result.modelfile}; to run it in Ollama:\n  {result.ollama_command}")
    return result


def _ollama_name(title: str) -> str:
    # Ollama model names: lowercase letters, digits, '-', '_', '.'.
    cleaned = "".join(c if c.isalnum() or c in "-_." else "-" for c in title.lower()).strip("-.")
    return cleaned or "lmtune-model"
