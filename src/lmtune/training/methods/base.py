"""What a training method is: the part of a run that differs from one method to the next.

`training.train.train` owns what every method shares: the run folder and its lock, the graceful stop, resume and
checkpoints, the batch plan over processes, compiling, the loss log, the plot and the manifest's common part.
A method owns the rest, called in this order:

    check()                      before anything is loaded: settings this method cannot run with
    prepare_data(tokenizer, log) rows -> tokenized samples (and validation samples) under the label contract
    preflight(prepared, ...)     show one sample, check every batch once
    load_model(source, ...)      the network to train: frozen base + adapter, or every weight
    compile_blocker()            why `train.compile auto` should not compile this method (None: it may)
    int8_blocker()               why this method's frozen weights cannot multiply in int8 (None: they can)
    arrange(prepared, ...)       how the samples become the trainer's rows (packed rows, or as they are)
    collator(tokenizer)          samples -> a batch the trainer's loss reads
    loss(model, batch)           one micro-batch's loss, as the trainer computes it (for the dry-run estimate)
    trainer_class()              the transformers Trainer subclass whose compute_loss is this method's loss
    before_training(...)         on every process, before the first step: what the run folder must hold from the
                                 first start (resumed runs reuse it), and anything computed from the starting model
    save(model, ..., out)        the trained weights, tokenizer, template and config into the run folder
    manifest()                   this method's settings, for lmtune_manifest.json

The methods are listed in `training.methods.METHODS`, one module each.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ...config import Config
from ...data.readers import LoadReport
from ...data.template import PromptTemplate
from ...data.tokenize import TokenizeReport


@dataclass
class PreparedData:
    """A method's tokenized data; what the run's manifest, console and validation report read from it."""
    template: PromptTemplate
    samples: list[dict]
    load_report: LoadReport
    token_report: TokenizeReport
    val_samples: list[dict] = field(default_factory=list)
    leaked_val_questions: int = 0
    val_examples: list = field(default_factory=list)  # asked again after the run (the validation report)
    # What the trainer iterates when it is not the samples themselves: packed rows (data/packing.py).
    rows: list[dict] | None = None
    packing: dict | None = None  # with packed rows: their length, count and share of positions that are tokens

    @property
    def train_rows(self) -> list[dict]:
        return self.samples if self.rows is None else self.rows


class TrainingMethod:
    name: str = ""
    # What the run folder holds when it is done: "adapter" (merge it, or load it on its base) or "model".
    output_kind: str = "adapter"
    # Whether the micro-batches of a step may run merged into larger ones on a CPU (training/micro_batches.py): only
    # where the loss is normalised over the whole step, so the merge changes neither loss nor gradients.
    merges_micro_batches: bool = False

    def __init__(self, config: Config):
        self.config = config

    def check(self) -> None:
        """Raise an LmtuneError for settings this method cannot run with, before anything is loaded."""

    def prepare_data(self, tokenizer, log: Callable[[str], None]):
        raise NotImplementedError

    def preflight(self, prepared, tokenizer, log: Callable[[str], None]) -> None:
        raise NotImplementedError

    def load_model(self, source, precision, log: Callable[[str], None]):
        raise NotImplementedError

    def compile_blocker(self) -> str | None:
        return None

    def int8_blocker(self) -> str | None:
        # Supervised LoRA only: a preference method's reference log-probabilities come from the fp32 model before
        # training, and a policy computed in int8 would start apart from them.
        return f"train.method {self.name}"

    def arrange(self, prepared: PreparedData, causal_lm, precision, log: Callable[[str], None]) -> None:
        """Once the model is loaded: lay the samples out as the trainer iterates them (`prepared.rows`); by default
        each sample is one row of its batch."""

    def collator(self, tokenizer):
        raise NotImplementedError

    def loss(self, model, batch):
        raise NotImplementedError

    def trainer_class(self):
        raise NotImplementedError

    def before_training(self, model, tokenizer, prepared: PreparedData, out: Path) -> None:
        """Called on every process at every start of the run (resumed or not), before the first step."""

    def save(self, model, tokenizer, prepared, out: Path, state_dict: dict | None = None) -> None:
        raise NotImplementedError

    def manifest(self) -> dict:
        return {"method": self.name}
