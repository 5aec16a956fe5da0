"""What lmtune refuses to load unless asked, and what it says when a model cannot be found.

Pickle: `.bin`, `.pt`, `.pth` and `.ckpt` weights are Python pickles, and unpickling a file can run
any code it carries. transformers and peft unpickle with `torch.load(weights_only=True)`, which
blocks most such files but has had bypasses (CVE-2025-32434), so lmtune loads only safetensors
(and GGUF, which holds only tensors) unless `allow_pickle` is set. The check runs on the folder
before `from_pretrained` is called, so a refused file is never opened.

Missing models: the message lists what was looked for and the models that do exist nearby
(sibling folders, .gguf files, the Hugging Face cache), closest name first.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

from .errors import ModelError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
ADAPTER_SAFE = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"
MAX_CANDIDATES = 5


def _pickle_message(what: str, files: list[str]) -> str:
    return (f"{what} holds only pickle weights ({', '.join(files)}), and loading a pickle file can run any code it carries. "
            "Convert it to safetensors, or pass --allow-pickle (model.allow_pickle: true) if you trust where it came from")


def _weight_files(folder: Path) -> tuple[list[str], list[str]]:
    """(safetensors files, pickle files) directly inside `folder`, by name."""
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    safe = [n for n in names if n.endswith((".safetensors", ".safetensors.index.json"))]
    pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES) and not n.startswith(("training_args", "optimizer", "scheduler",
                                                                                       "rng_state", "scaler"))]
    return safe, pickles


def check_model_weights(folder: str | Path, allow_pickle: bool) -> None:
    """Refuse a local model folder whose weights exist only as pickles, before anything opens them."""
    folder = Path(folder)
    if allow_pickle or not folder.is_dir():
        return
    safe, pickles = _weight_files(folder)
    if not safe and pickles:
        raise ModelError(_pickle_message(f"model folder {folder}", pickles))


def pickle_refused_on_hub(name: str) -> ModelError:
    return ModelError(f"'{name}' has no safetensors weights, only pickle ones (pytorch_model.bin), and loading a pickle file "
                      "can run any code it carries. Pass --allow-pickle (model.allow_pickle: true) if you trust its publisher")


def check_adapter_weights(adapter: str | Path, allow_pickle: bool) -> None:
    """An adapter folder must hold adapter_model.safetensors (peft would otherwise unpickle adapter_model.bin)."""
    adapter = Path(adapter)
    if (adapter / ADAPTER_SAFE).is_file():
        return
    if (adapter / ADAPTER_PICKLE).is_file():
        if allow_pickle:
            return
        raise ModelError(_pickle_message(f"adapter folder {adapter}", [ADAPTER_PICKLE]))
    raise ModelError(f"{adapter}: no adapter weights (looked for {ADAPTER_SAFE}); is the training run complete?")


# ---------------------------------------------------------------- missing models


def _is_model(path: Path) -> bool:
    if path.is_file():
        return path.suffix.lower() == ".gguf"
    try:
        return path.is_dir() and ((path / "config.json").is_file() or any(path.glob("*.gguf")))
    except OSError:  # unreadable folder
        return False


def _closest(wanted: str, names: list[str]) -> list[str]:
    """`names` ordered by similarity to `wanted`, most similar first, at most MAX_CANDIDATES."""
    score = {n: difflib.SequenceMatcher(None, wanted.lower(), n.lower()).ratio() for n in names}
    return sorted(names, key=lambda n: (-score[n], n))[:MAX_CANDIDATES]


def local_candidates(wanted: str | Path) -> tuple[Path | None, list[str]]:
    """(the nearest existing folder above `wanted`, the models in it, closest name first)."""
    path = Path(os.path.expanduser(str(wanted))).absolute()
    parent = path.parent
    while not parent.is_dir() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return None, []
    try:
        models = [p.name for p in parent.iterdir() if _is_model(p)]
    except OSError:
        return parent, []
    return parent, _closest(path.name, models)


def missing_local_model(name: str, kind: str = "model folder") -> ModelError:
    """A path-like model name that does not exist: say where we looked and what exists there."""
    looked = Path(os.path.expanduser(name)).absolute()
    parent, found = local_candidates(name)
    message = f"{kind} not found: {name} (looked for {looked})"
    if parent is None:
        return ModelError(message)
    if found:
        listing = ", ".join(str(parent / n) for n in found)
        return ModelError(f"{message}; models in {parent}: {listing}")
    return ModelError(f"{message}; {parent} holds no model folder (with config.json) or .gguf file")


def hub_cache_dir() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def cached_hub_models(cache: str | None = None) -> list[str]:
    """Hub ids of the models in the Hugging Face cache ('models--org--name' folders)."""
    cache_path = Path(cache or hub_cache_dir())
    try:
        entries = list(cache_path.iterdir())
    except OSError:
        return []
    return sorted(p.name[len("models--"):].replace("--", "/") for p in entries if p.name.startswith("models--") and p.is_dir())


def hub_not_found_hint(name: str) -> str:
    """What was looked for when a hub id could not be loaded, and the models that are available instead."""
    cache = hub_cache_dir()
    cached = cached_hub_models(cache)
    where = f"looked for a local folder ./{name}, the Hugging Face cache {cache}, and the Hub (offline? misspelled? gated?)"
    if name in cached:
        return f"{where}; the cache holds '{name}' but not all its files (an interrupted download?)"
    parent, local = local_candidates(name)
    found = _closest(name, cached) + [str(parent / n) for n in local]
    return f"{where}; available instead: {', '.join(found)}" if found else f"{where}; no model is cached"
