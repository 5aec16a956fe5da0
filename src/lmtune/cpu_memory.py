"""Resident memory that stays flat over a long CPU run.

Two things made a bf16 training run on a CPU grow from step 50 to step 300 by two thirds (docs/performance.md,
"Memory over a long run"), and neither is a tensor lmtune keeps:

* oneDNN, which runs PyTorch's bf16 matmuls on a CPU, compiles a primitive for every shape it meets and keeps the
  last 1,024 of them. Micro-batches of varying length give every matmul of the model a new shape, several
  primitives each, so the cache keeps filling for hundreds of steps, at megabytes a primitive. The primitives one
  micro-batch needs (each layer's matmuls share their shapes) are a few dozen, so a cache of 64 still reuses them
  across the layers and the backward pass, and stops growing within the first steps. oneDNN reads the capacity
  from ONEDNN_PRIMITIVE_CACHE_CAPACITY when it makes its first primitive, and PyTorch exposes no setter, so it is
  set in the environment when lmtune is imported, unless the user set it.
* glibc's allocator keeps the memory of freed activations of ever-changing sizes in its heap instead of giving it
  back. `malloc_trim` returns those free pages; the training loop calls it every few optimizer steps
  (training.train adds the callback). Why by hand: neither PyTorch nor the Trainer hands freed CPU memory back.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

# Primitives oneDNN keeps (its own default is 1,024).
ONEDNN_PRIMITIVE_CACHE_CAPACITY = 64
# Unpacked micro-batch widths on a CPU training in bf16 are rounded up to a multiple (data.pad_to_multiple_of 0):
# a few widths instead of one per sample length, so the heap reuses the blocks freed by earlier steps. The multiple
# is a power of two between these two, about 1/WIDTH_ROUNDING_SHARE of the data's median length, so the padding it
# adds stays near 1/8 of a micro-batch: a multiple of 32 padded 66-token samples to 96 and cost 1.2 to 1.4x a step
# on short samples (docs/performance.md, "Memory over a long run").
CPU_BF16_MIN_WIDTH_MULTIPLE = 8
CPU_BF16_MAX_WIDTH_MULTIPLE = 32
WIDTH_ROUNDING_SHARE = 8
# How often (optimizer steps) a CPU training run gives freed heap memory back; LMTUNE_TRIM_HEAP_EVERY overrides it,
# 0 turns it off.
TRIM_HEAP_EVERY = 10


def cpu_bf16_width_multiple(lengths: list[int]) -> int:
    """The multiple that micro-batch widths of samples of these token lengths are rounded up to on a CPU training in
    bf16: the power of two nearest below median / WIDTH_ROUNDING_SHARE, within the two bounds (the upper one when
    the lengths are not known)."""
    if not lengths:
        return CPU_BF16_MAX_WIDTH_MULTIPLE
    median = sorted(lengths)[len(lengths) // 2]
    multiple = CPU_BF16_MIN_WIDTH_MULTIPLE
    while multiple * 2 <= min(CPU_BF16_MAX_WIDTH_MULTIPLE, median / WIDTH_ROUNDING_SHARE):
        multiple *= 2
    return multiple


def cap_onednn_primitive_cache() -> None:
    """Cap oneDNN's primitive cache for this process, keeping a capacity the user set (under either of oneDNN's
    names for it). Must run before the first bf16 matmul: oneDNN reads the variable once."""
    if "ONEDNN_PRIMITIVE_CACHE_CAPACITY" not in os.environ and "DNNL_PRIMITIVE_CACHE_CAPACITY" not in os.environ:
        os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = str(ONEDNN_PRIMITIVE_CACHE_CAPACITY)


@functools.lru_cache(maxsize=1)
def _glibc_malloc_trim():
    """glibc's malloc_trim, or None where the C library is not glibc (macOS, Windows, musl)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def trim_heap() -> bool:
    """Give the heap's free pages back to the operating system; whether any were (False where not glibc)."""
    trim = _glibc_malloc_trim()
    return bool(trim(0)) if trim is not None else False


def trim_heap_every() -> int:
    """Optimizer steps between two heap trims of a CPU training run; 0 = never."""
    value = os.environ.get("LMTUNE_TRIM_HEAP_EVERY", "").strip()
    if not value:
        return TRIM_HEAP_EVERY
    if not value.isdigit():
        from .config import ConfigError

        raise ConfigError([f"LMTUNE_TRIM_HEAP_EVERY={value!r}: expected a whole number of optimizer steps (0 turns "
                           f"heap trimming off)"])
    return int(value)


def trim_heap_callback(every: int):
    """A TrainerCallback that trims the heap after every `every`-th optimizer step."""
    from transformers import TrainerCallback

    class TrimHeap(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % every == 0:
                trim_heap()

    return TrimHeap()
