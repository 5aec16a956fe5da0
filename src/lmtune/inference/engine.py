"""Which engine answers a loaded model, decided in one place for every command that answers (`generate`, `chat`,
`serve`, `eval`, the web UI's Try page): llama.cpp on a verified GGUF (`generate.engine: llama.cpp`,
llamacpp_engine.py), else lmtune's own decode loop, with the compiled one-token step where `generate.compile` says
it pays (compiled_decode.py)."""

from __future__ import annotations

from .load import LoadedModel


def prepare(loaded: LoadedModel, engine: str, compile_setting, one_answer: bool, model: str | None,
            adapter: str | None, **safety) -> None:
    """Attach the chosen engine to `loaded`; `model`/`adapter` name what was loaded (the GGUF is exported from them)."""
    if engine == "llama.cpp":
        from . import llamacpp_engine

        llamacpp_engine.enable(loaded, model, adapter, **safety)
    else:
        from . import compiled_decode

        compiled_decode.enable(loaded, compile_setting, one_answer)
