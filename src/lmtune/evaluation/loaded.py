"""Load a model for one evaluation and free it afterwards: the tuned model and its baseline are never in memory
together."""

from __future__ import annotations

import gc
from typing import Callable

from ..inference.engine import prepare
from ..inference.load import LoadedModel, load_for_inference


def evaluate_loaded(model: str | None, adapter: str | None, evaluate: Callable[[LoadedModel], object],
                    template=None, engine: str = "lmtune", **safety):
    """`evaluate(loaded)` on the model, asked with `template` when given (a baseline gets the tuned model's, so both
    see the same prompts); the result records the template it was asked with. `engine` "llama.cpp": the answers come
    from llama.cpp on a verified GGUF of the model (inference/llamacpp_engine.py); losses stay lmtune's."""
    loaded = load_for_inference(model, adapter, **safety)
    # Batches: lmtune's eager loop (no compiled step), or llama.cpp row by row.
    prepare(loaded, engine, False, False, model, adapter, **safety)
    if template is not None:
        loaded.template = template
    result = evaluate(loaded)
    result.template = loaded.template
    del loaded
    gc.collect()
    return result
