"""The llama.cpp work of an export, run in a child process by `llamacpp.run_in_child`.

llama.cpp is native code: a build that uses an instruction the CPU refuses (AMX on some virtual machines), a
bug, or an out-of-memory kill ends the process with a signal, not an exception. In a child, that ends only
the child; the export process reports it in one line and leaves nothing behind.

This file imports nothing from lmtune (the child would otherwise import torch and transformers for nothing)
and is run by path, so its folder (which holds a `gguf.py`) is never put on the child's import path.
Request and result are JSON files; logits go beside the result as a .npy file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def quantize(request: dict) -> dict:
    """llama.cpp's own quantizer (what `llama-quantize` runs) from an f32 GGUF to a k-quant."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, request["ftype"])
    params.nthread = request["threads"]
    status = llama_cpp.llama_model_quantize(request["source"].encode(), request["target"].encode(), params)
    return {"status": int(status)}


def check(request: dict) -> dict:
    """Load the file into llama.cpp; logits of each sequence, tokenization of each text, and the file's chat
    template rendered for a conversation (and tokenized) as llama-cpp-python's chat applies it."""
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    try:
        llm = Llama(model_path=request["model"], n_ctx=request["n_ctx"], n_batch=request["n_ctx"], logits_all=True,
                    verbose=False, n_threads=request["threads"], n_threads_batch=request["threads"])
    except (ValueError, RuntimeError) as e:  # llama-cpp-python reports a file llama.cpp refused this way
        return {"error": f"llama.cpp could not load {request['model']}: {e}"}
    try:
        logits = []
        for ids in request["sequences"]:
            llm.reset()
            llm.eval(ids)
            logits.append(np.array(llm.scores[: len(ids)], dtype=np.float32))
        np.save(Path(request["out"]) / "logits.npy", np.concatenate(logits))

        def tokenize(text: str) -> list[int]:  # as a runtime sends text: special tokens parsed, no BOS added here
            return llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

        def text_of(token_id: int) -> str:
            return llm.detokenize([token_id], special=True).decode("utf-8", errors="replace") if token_id >= 0 else ""

        formatter = Jinja2ChatFormatter(dict(llm.metadata)["tokenizer.chat_template"], eos_token=text_of(llm.token_eos()),
                                        bos_token=text_of(llm.token_bos()), add_generation_prompt=True)
        rendered = formatter(messages=request["conversation"]).prompt
        return {"tokenized": [tokenize(text) for text in request["texts"]], "rendered": rendered,
                "rendered_ids": tokenize(rendered)}
    finally:
        llm.close()


TASKS = {"quantize": quantize, "check": check}


def main(request_file: str) -> None:
    request = json.loads(Path(request_file).read_text(encoding="utf-8"))
    result = TASKS[request["task"]](request)
    (Path(request["out"]) / "result.json").write_text(json.dumps(result), encoding="utf-8")


if __name__ == "__main__":
    main(sys.argv[1])
