"""The trainable state (trained parameters: LoRA adapters or the full weights, and the optimizer's state) through
``torch.distributed.checkpoint`` (DCP), for ``ossrl.train.state``'s multi-process checkpoints.

- Keys are parameter names (``get_state_dict``), not positions or ranks, and DCP stores each shard with its place
  in the full tensor: N processes write their shards in parallel, and any number M of processes (FSDP2 DTensors,
  or one process with plain tensors and no process group at all) read back the slices they hold. 8 -> 4 GPUs and
  2 -> 1 process resume from the same files.
- Only trained parameters are saved: frozen base weights (and MXFP4 expert buffers) come from the base model again.
- ``agree`` turns one rank's failure into the same error on every rank, so a save that failed anywhere is never
  marked good and no rank waits in a collective the failed one will never join.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

DCP_DIR = "dcp"  # inside a checkpoint directory: DCP's .metadata and one __RANK_*.distcp file per writing rank
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def _clean(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def trainable_names(model: nn.Module) -> set[str]:
    return {_clean(n) for n, p in model.named_parameters() if p.requires_grad}


def trainable_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``{"model": {name: trained parameter}, "optim": {"state": {name: {...}}, "param_groups": [...]}}``: DTensor
    shards under FSDP2, plain tensors in one process. The tensors are the live ones (a DCP load fills them in
    place; ``set_state_dict`` then puts them into the model and the optimizer)."""
    model_sd, optim_sd = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    names = trainable_names(model)
    model_sd = {k: v for k, v in model_sd.items() if k in names}  # buffers (MXFP4 experts, rotary) are not trained
    missing = sorted(names - set(model_sd))
    if missing:
        raise RuntimeError(f"get_state_dict left out {len(missing)} trained parameters (e.g. {missing[0]})")
    return {"model": model_sd, "optim": optim_sd}


def save_trainable(model: nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Every rank writes its shards under ``path`` (a collective when a process group is up)."""
    write_state(trainable_state(model, optimizer), path)


def write_state(state: dict[str, Any], path: Path) -> None:
    """``dcp.save`` of a ``trainable_state``: a failure on any rank raises ``OSError`` on every rank (DCP gathers
    the failures; its own exception is a BaseException, which would slip past ``except Exception``)."""
    try:
        dcp.save(state, checkpoint_id=str(path))
    except CheckpointException as err:
        raise OSError(f"writing the shards failed on {_failures(err)}") from err


def _failures(err: CheckpointException) -> str:
    """``rank 1 (OSError: [Errno 28] No space left on device), ...``"""
    failures = getattr(err, "failures", None) or {}
    parts = []
    for rank, wrapped in sorted(failures.items()):
        exc = wrapped[0] if isinstance(wrapped, tuple) else wrapped
        parts.append(
            f"rank {rank} ({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''})"
        )
    return ", ".join(parts) or str(err)


def load_trainable(model: nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Read what ``save_trainable`` wrote, by any number of ranks (or one process without a process group), into
    ``model``'s trained parameters and ``optimizer``'s state; a different set of trained parameters or other
    shapes (another LoRA rank or targets) is an error naming the checkpoint."""
    state = trainable_state(model, optimizer)
    try:
        dcp.load(state, checkpoint_id=str(path))
    except (Exception, CheckpointException) as err:  # DCP's CheckpointException wraps every rank's error
        text = _failures(err) if isinstance(err, CheckpointException) else str(err).strip().splitlines()[0]
        raise ValueError(f"{path}: cannot load the trained parameters and optimizer state ({text}): was it written "
                         "with other LoRA settings (r, targets) or another model?") from err  # fmt: skip
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(strict=False))  # fmt: skip


def load_full_into(model: nn.Module, optimizer: torch.optim.Optimizer, params: dict[str, torch.Tensor],
                   optim_state: dict[str, Any]) -> None:  # fmt: skip
    """Load full (unsharded) tensors into a model that may be FSDP2-sharded: ``params`` by name, ``optim_state`` as
    ``optimizer.state_dict()`` of a one-process run (keyed by position in the same parameter order). Every rank
    passes the same full tensors and keeps its shards. A one-process checkpoint resumed by N processes."""
    names = {id(p): _clean(n) for n, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    saved_count = sum(len(g["params"]) for g in optim_state["param_groups"])
    if saved_count != len(order):
        raise ValueError(f"the checkpoint's optimizer holds {saved_count} parameters, this run trains {len(order)}: "
                         "was it written with other LoRA settings (r, targets)?")  # fmt: skip
    by_name = {
        "state": {order[i]: s for i, s in optim_state["state"].items()},
        "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in optim_state["param_groups"]],
    }
    set_state_dict(model, optimizer, model_state_dict=params, optim_state_dict=by_name,
                   options=StateDictOptions(full_state_dict=True, strict=False))  # fmt: skip


def agree(error: BaseException | None, what: str) -> None:
    """Every rank learns whether any rank failed ``what`` (one all-reduce); all raise alike if one did."""
    if not (dist.is_available() and dist.is_initialized()):
        if error is not None:
            raise error
        return
    failed = torch.tensor([float(error is not None)], device=_collective_device())
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if error is not None:
        raise error
    if failed.item() > 0:
        raise RuntimeError(f"another rank failed while {what} (see its error)")


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def rng_state() -> dict[str, Any]:
    return {"torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}  # fmt: skip


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    random.setstate(state["python_rng"])


def all_rng_states() -> list[dict[str, Any]]:
    """Every rank's RNG states, in rank order (a collective; one process: its own)."""
    mine = rng_state()
    if not (dist.is_available() and dist.is_initialized()):
        return [mine]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, mine)
    return out
