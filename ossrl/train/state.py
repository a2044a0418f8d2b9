"""Training checkpoints: the LoRA adapter in PEFT's format (or full weights without LoRA) plus everything needed to
continue exactly: optimizer, scheduler, RNG states, data position and step."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Protocol

import torch

from ossrl.model import GptOss
from ossrl.model.lora import load_peft_adapter, save_peft_adapter


class Trainable(Protocol):
    """What a checkpoint holds (``ossrl.train.trainer.Trainer`` has it)."""

    config: Any
    model: GptOss
    device: torch.device
    optimizer: torch.optim.Optimizer
    scheduler: Any
    step: int
    position: int
    base_model_name: str


STATE_FILE = "trainer_state.pt"


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Checkpoints of a run, oldest first (``checkpoint-000010``)."""
    return sorted(p for p in (run_dir / "checkpoints").glob("checkpoint-*") if (p / STATE_FILE).exists())


def save_training_state(trainer: Trainable, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    if trainer.config.lora.enabled:
        save_peft_adapter(trainer.model, directory / "adapter", base_model_name_or_path=trainer.base_model_name)
    else:
        trainer.model.save_pretrained(directory / "model")
    state = {
        "step": trainer.step,
        "position": trainer.position,
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "python_rng": random.getstate(),
    }
    tmp = directory / (STATE_FILE + ".tmp")
    torch.save(state, tmp)
    tmp.replace(directory / STATE_FILE)  # a checkpoint is complete only once its state file exists
    (directory / "config.json").write_text(json.dumps(trainer.config.to_dict(), indent=2))
    return directory


def load_training_state(trainer: Trainable, directory: Path) -> None:
    state = torch.load(directory / STATE_FILE, weights_only=False)
    if trainer.config.lora.enabled:
        load_peft_adapter(trainer.model, directory / "adapter")
    else:
        loaded = GptOss.from_pretrained(directory / "model", dtype=trainer.model.dtype, device=trainer.device)
        trainer.model.load_state_dict(loaded.state_dict())
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    random.setstate(state["python_rng"])
    trainer.step, trainer.position = state["step"], state["position"]
