"""lmtune: LoRA fine-tuning of causal language models on question/answer data.

Library use mirrors the CLI:

    from lmtune import load_config, train, merge, load_for_inference, generate
    config = load_config("configs/quickstart.yaml", {"data.paths": ["data/vi_ai_qa.jsonl"], "train.output_dir": "out"})
    train(config)
    merge("out", "merged")
    model = load_for_inference("merged")
    print(generate(model, "Học máy là gì?", config.generate).text)
"""

from .cpu_memory import cap_onednn_primitive_cache

cap_onednn_primitive_cache()  # before anything computes: oneDNN reads its cache capacity once

from .config import Config, ConfigError, load_config  # noqa: E402
from .errors import DataError, LmtuneError, ModelError  # noqa: E402
from .export.merge import merge  # noqa: E402
from .inference.generate import generate, generate_batch  # noqa: E402
from .inference.load import load_for_inference  # noqa: E402
from .training.train import train  # noqa: E402

__all__ = [
    "Config", "ConfigError", "DataError", "LmtuneError", "ModelError",
    "load_config", "train", "merge", "load_for_inference", "generate", "generate_batch",
]
