"""Multi-process training: which process writes, and how the batch adds up across processes.

lmtune runs no distributed loop of its own. A launcher (`torchrun`, `accelerate launch`) starts one
process per device and sets RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE; the transformers
Trainer reads them and trains with DDP, FSDP or DeepSpeed. What lmtune adds is decided before the
Trainer exists, so it reads the same variables: only rank 0 prints and writes outputs, the
optimizer-step arithmetic counts every process, and CPU threads are shared between the processes
of one machine. With no launcher every function answers as for a single process.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ConfigError


@dataclass(frozen=True)
class BatchPlan:
    """Samples per optimizer step = per-device batch x gradient accumulation x processes."""

    per_device: int
    grad_accum: int
    processes: int

    @property
    def global_batch(self) -> int:
        return self.per_device * self.grad_accum * self.processes

    def describe(self) -> str:
        s = "es" if self.processes != 1 else ""
        return (f"{self.global_batch} samples ({self.per_device} per device x {self.grad_accum} accumulation"
                f" x {self.processes} process{s})")


def batch_plan(per_device: int, grad_accum: int, global_batch_size: int, processes: int) -> BatchPlan:
    """The batch of one optimizer step. With `global_batch_size` (train.global_batch_size > 0) the accumulation
    is derived from it, so a config keeps its global batch, and its learning rate's meaning, at any world size."""
    if not global_batch_size:
        return BatchPlan(per_device, grad_accum, processes)
    per_pass = per_device * processes
    if global_batch_size % per_pass:
        lower, upper = (global_batch_size // per_pass) * per_pass, (global_batch_size // per_pass + 1) * per_pass
        nearest = " or ".join(str(n) for n in (lower, upper) if n > 0)
        raise ConfigError([
            f"train.global_batch_size {global_batch_size} is not a multiple of train.batch_size {per_device} x "
            f"{processes} process{'es' if processes != 1 else ''} = {per_pass}; use {nearest}, or change train.batch_size"
        ])
    return BatchPlan(per_device, global_batch_size // per_pass, processes)


def sharded_engine(trainer) -> str | None:
    """The engine name when each process holds only a shard of the weights (FSDP, DeepSpeed ZeRO-3), else None."""
    if getattr(trainer, "is_fsdp_enabled", False):
        return "FSDP"
    if getattr(trainer, "is_deepspeed_enabled", False):
        stage = trainer.accelerator.state.deepspeed_plugin.zero_stage
        return f"DeepSpeed ZeRO-{stage}" if stage == 3 else None
    return None


def gathered_state_dict(trainer) -> dict | None:
    """The full weights for saving when they are sharded across processes, else None (save the model as it is).

    Every process must call this: gathering FSDP or ZeRO-3 shards is a collective operation. It is the
    same call the Trainer's own save_model makes; accelerate returns the full dict on rank 0.
    """
    if not (getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_deepspeed_enabled", False)):
        return None
    return trainer.accelerator.get_state_dict(trainer.model_wrapped)
