"""ossrl: reinforcement learning for OpenAI's GPT-OSS models.

import ossrl
ossrl.GRPOTrainer(model="tiny", reward_funcs=[fn], train_dataset="data.jsonl").train()   # see ossrl.api
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["GRPOTrainer", "__version__"]


def __getattr__(name: str) -> Any:
    """The API is imported on first use: ``import ossrl`` (and the CLI's start) stays light."""
    if name == "GRPOTrainer":
        from ossrl.api import GRPOTrainer

        return GRPOTrainer
    raise AttributeError(f"module 'ossrl' has no attribute {name!r}")
