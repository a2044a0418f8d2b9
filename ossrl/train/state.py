"""Training checkpoints: the LoRA adapter in PEFT's format (or full weights without LoRA) plus everything needed to
continue exactly: optimizer, scheduler, RNG states, data position and step. Written atomically (a ``.partial``
directory renamed into place) with a checksum of every file, which a resume checks.

Under torchrun (``trainer.dist`` set) the trained parameters and the optimizer state go through
``torch.distributed.checkpoint`` instead (``dcp/``: every rank writes its shards; ``ossrl.dist.checkpoint``), and
any number of processes resumes from them, one process included. The adapter (or full weights) for export is
written by rank 0 alone, gathered whole. The ``.partial`` directory is renamed by rank 0 only after every rank
reported its part written; a rank that fails or dies mid-save leaves the new checkpoint unmarked (no checksums,
never renamed) and the previous one the last good one. A one-process checkpoint resumes in N processes too."""

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
    # under torchrun also: ``dist`` (a DistContext; None or absent in one process) and ``engine.model``, the
    # engine's plain model that ``sync_weights`` fills with the gathered full trained weights after every update


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
    if _distributed(trainer):
        return _save_sharded(trainer, directory, run_id)
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


def _distributed(trainer: Trainable) -> bool:
    return getattr(trainer, "dist", None) is not None


def _reason(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _write_export(trainer: Trainable, directory: Path) -> None:
    """The adapter (or full weights) for ``ossrl eval``/``chat``/PEFT: in one process from the model; under
    torchrun from the engine's plain model, which holds the gathered full tensors (rank 0 only)."""
    model = trainer.engine.model if _distributed(trainer) else trainer.model  # type: ignore[attr-defined]
    if trainer.config.lora.enabled:
        save_peft_adapter(model, directory / "adapter", base_model_name_or_path=trainer.base_model_name)
    else:
        model.save_pretrained(directory / "model")


def _save_sharded(trainer: Trainable, directory: Path, run_id: str | None) -> Path:
    """The multi-process checkpoint (see the module docstring): phases separated by an all-reduce of every rank's
    outcome, so that all ranks raise ``CheckpointWriteError`` together when one fails (and none waits in a
    collective that rank never joins); only after the last one does rank 0 write the checksums and rename."""
    import torch.distributed as tdist

    from ossrl.dist.checkpoint import DCP_DIR, agree, all_rng_states, trainable_state, write_state

    rank = tdist.get_rank()
    main = rank == 0
    partial = directory.with_name(directory.name + ".partial")

    def phase(what: str, work, *, main_only: bool = False) -> Any:
        result, error = None, None
        if main or not main_only:
            try:
                result = work()
            except Exception as err:
                error = err
        try:
            agree(error, what)
        except Exception as err:
            if main:
                shutil.rmtree(partial, ignore_errors=True)
            raise CheckpointWriteError(f"cannot write checkpoint {directory}: rank {rank} {what}: {_reason(err)}; "
                                       "the earlier checkpoints are intact") from err  # fmt: skip
        return result

    def prepare() -> None:
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)

    def rank0_files() -> None:
        _write_export(trainer, partial)
        state = {"format": "dcp", "world_size": tdist.get_world_size(), "step": trainer.step,
                 "position": trainer.position, "run_id": run_id, "scheduler": trainer.scheduler.state_dict(),
                 "rng": rngs}  # fmt: skip
        torch.save(state, partial / STATE_FILE)
        (partial / "config.json").write_text(json.dumps(trainer.config.to_dict(), indent=2))

    def mark_good() -> None:
        (partial / CHECKSUMS_FILE).write_text(json.dumps({"run_id": run_id, "files": _checksums(partial)}, indent=1))
        if directory.exists():
            shutil.rmtree(directory)
        partial.rename(directory)

    phase("preparing the directory", prepare, main_only=True)
    state = phase("collecting the state dict", lambda: trainable_state(trainer.model, trainer.optimizer))
    phase("writing its shards", lambda: write_state(state, partial / DCP_DIR))
    rngs = all_rng_states()
    phase("writing the adapter and trainer state", rank0_files, main_only=True)
    phase("marking the checkpoint good", mark_good, main_only=True)
    return directory


def load_training_state(trainer: Trainable, directory: Path) -> None:
    """Resume from ``directory``: a multi-process checkpoint (``dcp/``) by any number of processes, a one-process
    one in one process as it was written, or in N processes (its full tensors sharded on load)."""
    state = torch.load(directory / STATE_FILE, weights_only=False)
    distributed = _distributed(trainer)
    if state.get("format") == "dcp":
        from ossrl.dist.checkpoint import DCP_DIR, load_trainable, set_rng_state

        load_trainable(trainer.model, trainer.optimizer, directory / DCP_DIR)
        rank, world = (trainer.dist.rank, trainer.dist.world_size) if distributed else (0, 1)  # type: ignore
        rngs = state["rng"]
        set_rng_state(rngs[rank] if len(rngs) == world else rngs[0])  # another world size: rank 0's streams
    elif distributed:
        _load_single_into_sharded(trainer, directory, state)
    else:
        if trainer.config.lora.enabled:
            load_peft_adapter(trainer.model, directory / "adapter")
        else:
            loaded = GptOss.from_pretrained(directory / "model", dtype=trainer.model.dtype, device=trainer.device)
            trainer.model.load_state_dict(loaded.state_dict())
        trainer.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        random.setstate(state["python_rng"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    trainer.step, trainer.position = state["step"], state["position"]
    if distributed:  # the engine's own model gets the loaded weights, as after an update (one process: it runs this)
        from ossrl.dist.sync import sync_weights

        sync_weights(trainer.model, trainer.engine, lora=trainer.config.lora.enabled)  # type: ignore[attr-defined]


def _load_single_into_sharded(trainer: Trainable, directory: Path, state: dict[str, Any]) -> None:
    """A one-process checkpoint resumed under torchrun: every rank reads the full adapter (or weights) into the
    engine's plain model, and hands them with the optimizer state, keyed by name, to ``set_state_dict``, which
    keeps each rank's shards."""
    from ossrl.dist.checkpoint import load_full_into, set_rng_state, trainable_names

    plain = trainer.engine.model  # type: ignore[attr-defined]
    if trainer.config.lora.enabled:
        load_peft_adapter(plain, directory / "adapter")
    else:
        loaded = GptOss.from_pretrained(directory / "model", dtype=plain.dtype, device=trainer.device)
        plain.load_state_dict(loaded.state_dict())
    names = trainable_names(trainer.model)
    params = {n: p.detach() for n, p in plain.named_parameters() if n in names}
    load_full_into(trainer.model, trainer.optimizer, params, state["optimizer"])
    set_rng_state(state)
