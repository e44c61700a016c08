"""A nanoGPT-style harness: a character-level GPT whose attention normalizer is a choice.

``normattn train | sample | compare`` on the command line. From Python: ``GPT`` and the configs
here, ``normattn.gpt.train.train(model_config, train_config, RunOptions(...))`` to train.
"""

from .config import PRESETS, GPTConfig, TrainConfig, UsageError, build_configs
from .model import GPT

__all__ = ["GPT", "GPTConfig", "TrainConfig", "PRESETS", "UsageError", "build_configs"]
