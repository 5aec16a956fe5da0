"""lmtune: LoRA fine-tuning of causal language models on question/answer data.

Library use mirrors the CLI:

    from lmtune import load_config, train, merge, load_for_inference, generate
    config = load_config("configs/quickstart.yaml", {"data.paths": ["data/vi_ai_qa.jsonl"], "train.output_dir": "out"})
    train(config)
    merge("out", "merged")
    model = load_for_inference("merged")
    print(generate(model, "Học máy là gì?", config.generate).text)
"""

from .config import Config, ConfigError, load_config
from .errors import DataError, LmtuneError, ModelError
from .export.merge import merge
from .inference.generate import generate, generate_batch
from .inference.load import load_for_inference
from .training.train import train

__all__ = [
    "Config", "ConfigError", "DataError", "LmtuneError", "ModelError",
    "load_config", "train", "merge", "load_for_inference", "generate", "generate_batch",
]
