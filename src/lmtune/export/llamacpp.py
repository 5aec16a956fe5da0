"""llama.cpp through the optional `llama-cpp-python` bindings (`pip install 'lmtune[gguf]'`): its k-quant
quantizer, and loading an exported file into the real llama.cpp to check it.

Nothing here is needed for f32/f16/bf16/q8_0 exports; when the bindings are missing, k-quants are refused
with how to get them, and the llama.cpp check is skipped with a note.

What an export asks of llama.cpp runs in a child process (`run_in_child`, the work itself in
llamacpp_child.py): native code that dies by a signal (SIGILL from an instruction the CPU refuses, SIGSEGV,
an out-of-memory kill) would otherwise take the lmtune process with it, without a word and with a half-written
temporary file left behind. The in-process helpers below (`load`, `greedy`...) serve tests and benchmarks.
"""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from ..errors import LmtuneError

INSTALL_HINT = ("install it with: pip install 'lmtune[gguf]' (pip builds llama-cpp-python from source with this "
                "machine's C++ compiler and cmake: a few minutes, once)")

# How to rebuild llama-cpp-python without AMX, as scripts/setup.sh --with-llama-cpp builds it. llama.cpp compiles
# with -march=native, which turns AMX on whenever the CPU lists it; its GGML_AMX_* CMake options only apply when
# GGML_NATIVE is off, so the compiler flags are what turns AMX off (gcc lets -mno-amx-* win over -march=native).
_NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
REBUILD_WITHOUT_AMX = (f"CMAKE_ARGS='-DCMAKE_C_FLAGS=\"{_NO_AMX}\" -DCMAKE_CXX_FLAGS=\"{_NO_AMX}\"' pip install "
                       "--force-reinstall --no-deps --no-cache-dir 'llama-cpp-python>=0.3.36,<0.4'")
CHILD = Path(__file__).with_name("llamacpp_child.py")
# Run the child file by path without putting its folder first on sys.path (that folder has a gguf.py).
_BOOT = "import runpy, sys; del sys.path[0]; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"


class LlamaCppCrashed(LmtuneError):
    """llama.cpp ended its process with a signal (an illegal instruction, a segmentation fault, a kill)."""


def threads() -> int:
    """llama.cpp gets the threads lmtune's own torch work uses (model.configure_cpu_threads: OMP_NUM_THREADS when
    set, else this process's share of the physical cores). Its threads meet at a barrier after every operation,
    so one thread more than the cores free makes it many times slower: greedy decoding of SmolLM2 beside other
    busy processes on a 2-core machine took 48 s with 2 threads and 3.9 s with 1, with the same tokens."""
    import torch

    return max(1, torch.get_num_threads())


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def crash_message(signal_number: int, doing: str) -> str:
    try:
        name = signal.Signals(signal_number).name
    except ValueError:
        name = f"signal {signal_number}"
    what = {"SIGILL": "SIGILL (illegal instruction)", "SIGSEGV": "SIGSEGV (segmentation fault)",
            "SIGKILL": "SIGKILL"}.get(name, name)
    if name == "SIGILL":
        why = ("this llama-cpp-python build uses CPU instructions this machine refuses, most likely AMX, which "
               "llama.cpp's -march=native build turns on when the CPU lists it and some virtual machines list without "
               f"allowing it; rebuild it without AMX: {REBUILD_WITHOUT_AMX} (in a source checkout, "
               "scripts/setup.sh --with-llama-cpp builds it so)")
    elif name == "SIGKILL":
        why = "killed from outside, most often by the kernel when memory runs out"
    else:
        why = f"a crash inside llama.cpp (llama-cpp-python {_version()})"
    return f"llama.cpp died with {what} while {doing}; nothing was written. {why[0].upper()}{why[1:]}"


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("llama_cpp_python")
    except metadata.PackageNotFoundError:
        return "unknown version"


def run_in_child(task: str, request: dict, doing: str) -> tuple[dict, np.ndarray | None]:
    """Run one llamacpp_child task in a fresh Python process; (its result, the logits it saved or None).
    A death by signal raises LlamaCppCrashed saying which signal, why it likely happened and what to do."""
    with tempfile.TemporaryDirectory(prefix="lmtune-llamacpp-") as folder:
        request_file = Path(folder) / "request.json"
        request_file.write_text(json.dumps({**request, "task": task, "out": folder}), encoding="utf-8")
        done = subprocess.run([sys.executable, "-c", _BOOT, str(CHILD), str(request_file)],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace")
        if done.returncode < 0:
            raise LlamaCppCrashed(crash_message(-done.returncode, doing))
        result_file = Path(folder) / "result.json"
        if done.returncode != 0 or not result_file.is_file():
            lines = [line for line in done.stderr.splitlines() if line.strip()]
            raise LmtuneError(f"llama.cpp failed while {doing} (exit code {done.returncode}): "
                              f"{lines[-1] if lines else 'no message'}; nothing was written")
        result = json.loads(result_file.read_text(encoding="utf-8"))
        if "error" in result:
            raise LmtuneError(f"{result['error']}; nothing was written")
        logits_file = Path(folder) / "logits.npy"
        return result, (np.load(logits_file) if logits_file.is_file() else None)


def quantize(source: Path, target: Path, quant: str) -> None:
    """llama.cpp's own quantizer (what `llama-quantize` runs), in a child process: k-quants pick per-tensor types
    (q4_k_m keeps some tensors at q6_k) by rules that live only in llama.cpp, so they are not re-implemented here."""
    ftype = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
             "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K"}[quant]
    result, _ = run_in_child("quantize", {"source": str(source), "target": str(target), "ftype": ftype,
                                          "threads": threads()}, f"quantizing to {quant}")
    if result["status"] != 0 or not Path(target).is_file():
        raise LmtuneError(f"llama.cpp's quantizer failed ({quant}, status {result['status']}) on {source}")


def check(path: Path, sequences: list[list[int]], texts: list[str], conversation: list[dict[str, str]]):
    """llama.cpp's view of an exported file, computed in a child process: (logits of each sequence concatenated
    [tokens, vocab], the ids of each text, the chat template rendered for `conversation`, its ids)."""
    request = {"model": str(path), "sequences": sequences, "texts": texts, "conversation": conversation,
               "n_ctx": max(64, max(map(len, sequences)) + 16), "threads": threads()}
    result, logits = run_in_child("check", request, "loading the exported file to check it")
    return logits, result["tokenized"], result["rendered"], result["rendered_ids"]


def load(path: Path, n_ctx: int = 512, logits_all: bool = True):
    """The real llama.cpp in this process, with logits kept for every position of an evaluated sequence."""
    from llama_cpp import Llama

    try:
        return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=logits_all, verbose=False,
                     n_threads=threads(), n_threads_batch=threads())
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
