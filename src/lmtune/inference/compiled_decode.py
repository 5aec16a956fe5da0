"""Single answers through the compiled one-token decode step (`decoding.CompiledDecoder`), attached to a loaded model
where `compiling.decide_decoding` says the compile pays: `chat`, `serve` and the web UI's Try page.

Batched decoding (eval, `generate_batch`, `serve` under load) stays eager: there each weight read already serves
several tokens, which is what the compiled step wins for a single row, and the compiled static-cache step measured
slower than the eager loop on batches of 8.
"""

from __future__ import annotations

import sys

from ..compiling import decide_decoding
from ..decoding import CompiledDecoder
from ..errors import ModelError
from .batching import context_length
from .load import LoadedModel


def enable(loaded: LoadedModel, setting, one_answer: bool, log=None) -> bool:
    """Attach a CompiledDecoder to `loaded` when `decide_decoding` says so, compiled before it returns; says which in
    one line."""
    log = log or (lambda message: print(message, file=sys.stderr))
    use, why = decide_decoding(setting, loaded.model, loaded.device, loaded.compute_dtype, one_answer)
    if use or setting is True:
        log(f"compile: {why}")
    if not use:
        if setting is True:
            raise ModelError(f"generate.compile true: {why.removeprefix('off: ')}")
        return False
    loaded.compiled_decoder = CompiledDecoder(loaded.model, context_length(loaded), strict=setting is True, log=log)
    loaded.compiled_decoder.warm_up()
    return True
