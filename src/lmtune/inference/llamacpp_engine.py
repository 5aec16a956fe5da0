"""Answers through llama.cpp (`generate.engine: llama.cpp`): `generate`, `chat` and `serve` decode on a GGUF file
of the loaded model, exported and verified by lmtune's own exporter and kept for the next run.

Why: single-stream decoding is bound by reading every weight once per token, and llama.cpp's hand-written CPU
kernels read them faster than lmtune's compiled step on some CPUs (AVX-512 BF16 without AMX: about 2x on the same
bf16 weights, `bench/generate_speed.py`; docs/performance.md has the figures per CPU). lmtune still loads the model
(its tokenizer, template and stop tokens), builds every prompt and does all the bookkeeping of a row (stop strings,
streaming, limits, cancellation: batching.py); only the choice of each next token comes from llama.cpp, fed the
same token ids. The exported file was checked by the exporter against the model's own logits, its tokenizer and
its chat template (export/verify.py), so both engines answer the same model.

llama-cpp-python decodes one sequence at a time, so a batch (`eval --engine llama.cpp`, `serve` under load) runs
row after row; lmtune's batched path is faster there and stays the default. Which engine a command uses is decided
in engine.py. llama.cpp runs in this process (a crash of its
native code ends the command); the export's own check ran it in a child process first.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import sys
import threading
from pathlib import Path
from typing import Callable

import torch

from ..errors import ModelError
from ..export import llamacpp
from ..model import resolve_source

# KV slots llama.cpp allocates: the model's context, up to this many (SmolLM2's 8,192 in f16 take about 190 MB).
MAX_CONTEXT = 8192
CACHE_FOLDER = "gguf-cache"  # inside an adapter or local model folder


def gguf_precision(compute_dtype: torch.dtype) -> str:
    """The GGUF type answering reads: bf16 where lmtune computes in bf16 (native bf16), else f16 (half of fp32's bytes
    per token; every CPU llama.cpp runs on converts f16 in hardware)."""
    return "bf16" if compute_dtype == torch.bfloat16 else "f16"


def _fingerprint(folder: Path) -> str:
    """Names, sizes and modification times of a folder's files (its cache folder left out): a retrained adapter or
    replaced weights get a new GGUF instead of a stale one."""
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and CACHE_FOLDER not in p.relative_to(folder).parts):
        stat = path.stat()
        h.update(f"{path.relative_to(folder)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _file_key(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:16]


def cache_path(model: str | None, adapter: str | None, quant: str) -> Path:
    """Where the GGUF of this model (and adapter) is kept: in the adapter's folder, else in the model's folder when it
    is a local folder lmtune may write to, else under ~/.cache/lmtune/gguf (a hub id, a pypi: model, a .gguf file)."""
    if adapter:
        folder = Path(adapter)
        key = _fingerprint(folder) + ("-" + hashlib.sha256(model.encode()).hexdigest()[:8] if model else "")
        if os.access(folder, os.W_OK):
            return folder / CACHE_FOLDER / f"{quant}-{key}.gguf"
        name = folder.resolve().name
    else:
        source = resolve_source(model)
        folder = Path(source.path)
        if source.gguf_file:
            key = _file_key(folder / source.gguf_file)
        elif folder.is_dir():
            key = _fingerprint(folder)
            if os.access(folder, os.W_OK):
                return folder / CACHE_FOLDER / f"{quant}-{key}.gguf"
        else:  # a hub id: its files sit in the hub's cache, which is not ours to write into
            key = hashlib.sha256(model.encode()).hexdigest()[:16]
        name = model
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_.") or "model"
    return Path.home() / ".cache" / "lmtune" / "gguf" / name / f"{quant}-{key}.gguf"


class LlamaCppEngine:
    """llama.cpp loaded on a verified GGUF; `answer` produces one row's tokens."""

    def __init__(self, path: Path, n_ctx: int):
        self.path = path
        self.n_ctx = n_ctx
        self.llm = llamacpp.load(path, n_ctx=n_ctx, logits_all=False)
        self._lock = threading.Lock()  # one llama.cpp context: one sequence at a time

    def answer(self, prompt_ids: list[int], temperature: float, top_p: float, top_k: int, repetition_penalty: float,
               seed: int | None, step: Callable[[int], bool]) -> None:
        """Feed llama.cpp's tokens to `step` until it returns True (the row is done). Greedy at temperature 0.
        llama.cpp's repetition penalty counts the last 64 tokens (its default window), lmtune's the whole row."""
        greedy = temperature <= 0
        with self._lock:
            # The sampler takes the context's seed when it is made: a fresh one per unseeded answer, as lmtune's own.
            self.llm.set_seed(seed if seed is not None else random.getrandbits(31))
            for token in self.llm.generate(prompt_ids, temp=0.0 if greedy else temperature, top_k=1 if greedy else top_k,
                                           top_p=1.0 if greedy else top_p, min_p=0.0,
                                           repeat_penalty=repetition_penalty, reset=True):
                if step(int(token)):
                    break


def enable(loaded, model: str | None, adapter: str | None, trust_remote_code: bool = False, allow_pickle: bool = False,
           log=None) -> LlamaCppEngine:
    """Attach a LlamaCppEngine to `loaded`: export a verified GGUF of the model (and adapter) on the first run, reuse it
    after."""
    from ..export.exporter import export_gguf
    from .batching import context_length

    log = log or (lambda message: print(message, file=sys.stderr))
    if loaded.device != "cpu":
        raise ModelError(f"generate.engine llama.cpp answers on the CPU; this model is loaded on {loaded.device} "
                         "(give --device cpu, or leave generate.engine at lmtune)")
    if not llamacpp.available():
        raise ModelError(f"generate.engine llama.cpp needs llama-cpp-python: {llamacpp.INSTALL_HINT}")
    quant = gguf_precision(loaded.compute_dtype)
    path = cache_path(model, adapter, quant)
    if path.is_file():
        log(f"engine: llama.cpp on {path} (exported and verified earlier)")
    else:
        log(f"engine: llama.cpp; exporting a {quant} GGUF once, kept for later runs: {path}")
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f"{quant}-*.gguf"):  # an earlier export of weights that changed since
            stale.unlink(missing_ok=True)
        export_gguf(str(path), model=model, adapter=adapter, quant=quant, allow_pickle=allow_pickle,
                    trust_remote_code=trust_remote_code, use_llama_cpp=True, log=log)
    engine = LlamaCppEngine(path, min(context_length(loaded), MAX_CONTEXT))
    loaded.llama_cpp = engine
    return engine
