"""ossrl: reinforcement learning for OpenAI's GPT-OSS models.

import ossrl
ossrl.GRPOTrainer(model="tiny", reward_funcs=[fn], train_dataset="data.jsonl").train()   # see ossrl.api
with ossrl.deterministic(): ...    # batch-invariant kernels: engine and trainer log-probs equal bit for bit
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["GRPOTrainer", "__version__", "deterministic", "is_deterministic", "set_deterministic"]
_DETERMINISM = ("deterministic", "is_deterministic", "set_deterministic")


def __getattr__(name: str) -> Any:
    """The API is imported on first use: ``import ossrl`` (and the CLI's start) stays light."""
    if name == "GRPOTrainer":
        from ossrl.api import GRPOTrainer

        return GRPOTrainer
    if name in _DETERMINISM:  # ossrl.determinism (not ossrl.deterministic: that name is the context manager)
        from ossrl import determinism

        return getattr(determinism, name)
    raise AttributeError(f"module 'ossrl' has no attribute {name!r}")
