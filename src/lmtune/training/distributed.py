"""Multi-process training: which process writes, and how the batch adds up across processes.

lmtune runs no distributed loop of its own. A launcher (`torchrun`, `accelerate launch`) starts one
process per device and sets RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE; the transformers
Trainer reads them and trains with DDP, FSDP or DeepSpeed. What lmtune adds is decided before the
Trainer exists, so it reads the same variables: only rank 0 prints and writes outputs, the
optimizer-step arithmetic counts every process, and CPU threads are shared between the processes
of one machine. With no launcher every function answers as for a single process.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from .. import processes
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

    def describe(self, unit: str = "samples") -> str:
        s = "es" if self.processes != 1 else ""
        return (f"{self.global_batch} {unit} ({self.per_device} per device x {self.grad_accum} accumulation"
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


def engine(trainer) -> str | None:
    """How the processes share the training, for the run's batch line: 'DDP', 'FSDP' or 'DeepSpeed ZeRO-N';
    None for one process."""
    if getattr(trainer, "is_fsdp_enabled", False):
        return "FSDP"
    if getattr(trainer, "is_deepspeed_enabled", False):
        return f"DeepSpeed ZeRO-{trainer.accelerator.state.deepspeed_plugin.zero_stage}"
    if trainer.args.world_size < 2:
        return None
    # accelerate (1.x) turns FSDP and DeepSpeed on only for GPU-like devices; on CPUs it runs DDP without a word.
    for variable, asked in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        if os.environ.get(variable, "").lower() == "true":
            return f"DDP (not {asked}: accelerate runs {asked} only on GPUs; each process holds the whole model)"
    return "DDP"


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


class GlobalBatchSampler:
    """The order in which one epoch deals its samples, defined over the global batch, not per process.

    The Trainer deals consecutive micro-batches of this order to the processes in turn (accelerate's
    BatchSamplerShard), and each process takes `grad_accum` of them per optimizer step; so optimizer step k trains
    samples [k*G, (k+1)*G) of this list, G = the global batch, whatever the process count. The stock samplers break
    that: transformers' LengthGroupedSampler groups by a batch of per-device x accumulation (a different one on
    each world size) and draws its permutation from the global RNG, and accelerate pads an epoch that processes
    cannot share evenly with samples from its start. Here the permutation comes from a generator seeded with the
    run's seed and the epoch (so a resumed run deals the same epoch again), the length grouping is transformers'
    own over global batches, and the epoch is padded to whole global batches by cycling its permutation, as
    DistributedSampler does, for one process as for many.
    """

    def __init__(self, lengths: list[int], global_batch: int, seed: int, group_by_length: bool):
        if global_batch < 1:
            raise ValueError(f"global batch must be at least 1, got {global_batch}")
        self.lengths = list(lengths)
        self.global_batch = global_batch
        self.seed = seed
        self.group_by_length = group_by_length
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        n = len(self.lengths)
        return -(-n // self.global_batch) * self.global_batch if n else 0

    def __iter__(self):
        import torch

        n = len(self.lengths)
        if not n:
            return iter(())
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(n, generator=generator).tolist()
        while len(order) < len(self):
            order += order[: len(self) - len(order)]
        if self.group_by_length:
            from transformers.trainer_pt_utils import get_length_grouped_indices

            grouped = get_length_grouped_indices([self.lengths[i] for i in order], self.global_batch, generator=generator)
            order = [order[i] for i in grouped]
        return iter(order)


def global_batch_sampler(args, dataset) -> GlobalBatchSampler | None:
    """The training sampler for a Trainer with these TrainingArguments, or None where transformers' own should stay:
    datasets without a length or an `input_ids` column, and sampling strategies other than random/length-grouped."""
    if args.train_sampling_strategy not in ("random", "group_by_length"):
        return None
    try:
        lengths = [len(sample["input_ids"]) for sample in dataset]
    except (TypeError, KeyError, IndexError):
        return None
    global_batch = args.train_batch_size * args.gradient_accumulation_steps * max(1, args.world_size)
    seed = args.data_seed if args.data_seed is not None else args.seed
    return GlobalBatchSampler(lengths, global_batch, seed, args.train_sampling_strategy == "group_by_length")


def epoch_callback():
    """A TrainerCallback that tells the training sampler (its `sampler` attribute) which epoch begins. The Trainer's
    own set_epoch does not reach a sampler inside the wrappers a resumed multi-process epoch stacks around it
    (skip -> shard -> batch sampler): without this, 2 processes resumed in epoch 1 dealt it in epoch 0's order
    (the two-host test's resumed run then ends 1.7e-3 away from the uninterrupted one)."""
    import math

    from transformers import TrainerCallback

    class SamplerEpoch(TrainerCallback):
        sampler: GlobalBatchSampler | None = None

        def on_epoch_begin(self, args, state, control, **kwargs):
            if self.sampler is not None:
                # state.epoch is a whole number at an epoch's start, and the fraction reached when a run resumes.
                self.sampler.set_epoch(math.floor((state.epoch or 0) + 1e-9))

    return SamplerEpoch()


# What gloo and NCCL say when a collective fails because another process of the run went away: its process was
# killed or crashed (gloo: the socket closed or was reset; NCCL: the communicator aborted or a remote error), or
# nothing came within the process-group timeout (a machine that lost power or its network closes nothing).
_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Timed out waiting",
              "remote process exited", "NCCL communicator was aborted", "Connection refused")
_PEER_ADDRESS = re.compile(r"\[([0-9A-Fa-f.:]+)\]:(\d+)")


def lost_peer(error: BaseException) -> str | None:
    """When `error` says that another process of a multi-process run was lost: what was lost, naming its address
    when the backend gives it ('the process at 10.0.0.2:43905'); else None."""
    if processes.world_size() < 2 or not isinstance(error, RuntimeError):
        return None
    text = str(error)
    if not any(sign in text for sign in _PEER_LOST):
        return None
    address = _PEER_ADDRESS.search(text)
    who = f"the process at {address.group(1)}:{address.group(2)}" if address else "another process of this run"
    return (f"lost the connection to {who}: its machine or its lmtune stopped, or the network between them failed")

