"""Training methods: one module each, and the one table `train()` picks from by `train.method`.

To add a method: write a `TrainingMethod` subclass in its own module here (see base.py for what it owns and in what
order train() calls it), list it below, add its name to `train.method`'s choices in config.py (with the settings it
cannot be combined with in config.METHOD_RULES), and test that it is applied, not only accepted.
"""

from __future__ import annotations

from ...config import Config
from .base import PreparedData, TrainingMethod
from .full import FullFineTuning
from .lora import LoraFineTuning
from .dpo import DirectPreferenceOptimization
from .kto import KahnemanTverskyOptimization
from .orpo import OddsRatioPreferenceOptimization

METHODS: dict[str, type[TrainingMethod]] = {
    "lora": LoraFineTuning,
    "full": FullFineTuning,
    "dpo": DirectPreferenceOptimization,
    "orpo": OddsRatioPreferenceOptimization,
    "kto": KahnemanTverskyOptimization,
}


def method_for(config: Config) -> TrainingMethod:
    return METHODS[config.train.method](config)


__all__ = ["METHODS", "PreparedData", "TrainingMethod", "method_for"]
