"""Training checkpoints: the LoRA adapter in PEFT's format (or full weights without LoRA) plus everything needed to
continue exactly: optimizer, scheduler, RNG states, data position and step. Written atomically (a ``.partial``
directory renamed into place) with a checksum of every file, which a resume checks."""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
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
CHECKSUMS_FILE = "checksums.json"  # sha256 of every other file: written last, checked on resume
_NAME = re.compile(r"checkpoint-\d+")


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, read-only directory); the last good one is intact."""


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (``checkpoint-000010``): renamed into place, with checksums.
    Whether their files are intact is ``verify_checkpoint``'s to say."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _NAME.fullmatch(p.name) and (p / CHECKSUMS_FILE).is_file()]
    return sorted(found)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _checksums(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): _sha256(p) for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != CHECKSUMS_FILE}  # fmt: skip


def verify_checkpoint(directory: Path, run_id: str | None = None) -> str | None:
    """Why ``directory`` cannot be resumed from (None: it can): a missing or changed file, or another run's."""
    try:
        expected = json.loads((directory / CHECKSUMS_FILE).read_text())
    except (OSError, json.JSONDecodeError) as err:
        return f"unreadable {CHECKSUMS_FILE} ({err})"
    if run_id is not None and expected.get("run_id") not in (None, run_id):
        return f"written by another run ({expected.get('run_id')}, this run is {run_id})"
    files = expected.get("files", {})
    if STATE_FILE not in files:
        return f"no {STATE_FILE}"
    for name, digest in files.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if _sha256(path) != digest:
            return f"{name} does not match its checksum (truncated or changed)"
    return None


def save_training_state(trainer: Trainable, directory: Path, run_id: str | None = None) -> Path:
    """Write a checkpoint atomically: everything goes to ``NAME.partial``, checksums last, then one rename. A
    failure (disk full, read-only) removes the partial directory and raises ``CheckpointWriteError``; earlier
    checkpoints are never touched."""
    partial = directory.with_name(directory.name + ".partial")
    try:
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
        if trainer.config.lora.enabled:
            save_peft_adapter(trainer.model, partial / "adapter", base_model_name_or_path=trainer.base_model_name)
        else:
            trainer.model.save_pretrained(partial / "model")
        state = {
            "step": trainer.step,
            "position": trainer.position,
            "run_id": run_id,
            "optimizer": trainer.optimizer.state_dict(),
            "scheduler": trainer.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "python_rng": random.getstate(),
        }
        torch.save(state, partial / STATE_FILE)
        (partial / "config.json").write_text(json.dumps(trainer.config.to_dict(), indent=2))
        (partial / CHECKSUMS_FILE).write_text(json.dumps({"run_id": run_id, "files": _checksums(partial)}, indent=1))
        if directory.exists():  # the same step saved again (the final checkpoint): the new one replaces it
            shutil.rmtree(directory)
        partial.rename(directory)
    except (OSError, RuntimeError) as err:  # torch.save reports a full disk as a RuntimeError
        shutil.rmtree(partial, ignore_errors=True)
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err).splitlines()[0]
        raise CheckpointWriteError(f"cannot write checkpoint {directory}: {reason}; the earlier checkpoints are "
                                   "intact") from err  # fmt: skip
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
