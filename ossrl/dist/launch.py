"""torchrun's environment -> one initialised process group per run (NCCL on CUDA, gloo on CPU), with a collective
timeout so that a rank that died or hangs makes every other rank fail with a clear error instead of waiting forever.

A process started without ``WORLD_SIZE`` (a plain ``ossrl train``) never touches ``torch.distributed``."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


class DistributedError(RuntimeError):
    """A multi-process run cannot go on: bad launch, mismatched configs, a collective that failed or timed out."""


@dataclass(frozen=True)
class DistContext:
    """This process's place in the run."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    timeout_s: float

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """Started by torchrun (or anything that sets its environment)."""
    return "WORLD_SIZE" in os.environ


def _env_int(name: str) -> int:
    value = os.environ.get(name)
    if value is None or not value.strip().lstrip("-").isdigit():
        raise DistributedError(f"torchrun environment: {name}={value!r} is not an integer (launch with torchrun, or "
                               "set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT)")  # fmt: skip
    return int(value)


def init_distributed(device_name: str, timeout_s: float) -> DistContext:
    """Join the process group torchrun's environment describes. ``device_name`` is ``model.device``: auto/cuda use
    ``cuda:LOCAL_RANK`` and NCCL; cpu uses gloo. Idempotent within a process (a second call returns the same)."""
    rank, world, local = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    if not (world >= 1 and 0 <= rank < world and local >= 0):
        raise DistributedError(f"torchrun environment: RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local} "
                               "do not describe a process of the run")  # fmt: skip
    use_cuda = device_name in ("auto", "cuda") and torch.cuda.is_available() or device_name.startswith("cuda")
    if use_cuda:
        if local >= torch.cuda.device_count():
            raise DistributedError(f"LOCAL_RANK={local} but this node has {torch.cuda.device_count()} GPU(s): start "
                                   "at most one process per GPU (torchrun --nproc-per-node)")  # fmt: skip
        device, backend = torch.device("cuda", local), "nccl"
        torch.cuda.set_device(device)
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {"backend": backend, "timeout": datetime.timedelta(seconds=timeout_s)}
        if backend == "nccl":
            kwargs["device_id"] = device  # eager NCCL init: a bad GPU fails here, not in the first collective
        dist.init_process_group(**kwargs)
    return DistContext(rank, world, local, device, backend, timeout_s)


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def check_same_config(config: dict[str, Any], group=None) -> None:
    """Every rank must run the same config (a rank with other settings would train something else, or deadlock
    in a collective): their hashes are compared; a mismatch fails on every rank, naming the fields that differ."""
    blob = json.dumps(config, sort_keys=True, default=str)
    digest = hashlib.sha256(blob.encode()).hexdigest()
    world = dist.get_world_size(group)
    digests: list[Any] = [None] * world
    dist.all_gather_object(digests, digest, group=group)
    if len(set(digests)) == 1:
        return
    configs: list[Any] = [None] * world
    dist.all_gather_object(configs, config, group=group)
    odd = next(r for r, d in enumerate(digests) if d != digests[0])
    fields = sorted(_differences(configs[0], configs[odd]))
    raise DistributedError(f"the ranks were started with different configs (rank 0 vs rank {odd} differ in "
                           f"{', '.join(fields[:8])}{' ...' if len(fields) > 8 else ''}): give every rank the same "
                           "recipe and overrides")  # fmt: skip


def _differences(a: Any, b: Any, where: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += _differences(a.get(key), b.get(key), f"{where}.{key}" if where else str(key))
        return out
    return [] if a == b else [where or "config"]


@contextmanager
def rank0_first(dist_ctx: DistContext | None, wait_s: float = 4 * 3600.0) -> Iterator[None]:
    """Rank 0 runs the block first, then the others (one process: just the block). For work that fills a shared
    cache (the tiny checkpoint, a warm start: minutes, longer than ``parallel.timeout_s``), so that only rank 0
    writes it and the others read it. The wait has its own long timeout; a rank 0 that dies ends it at once."""
    if dist_ctx is None or dist_ctx.world_size == 1:
        yield
        return
    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=wait_s))
    if not dist_ctx.is_main:
        dist.barrier(group=group)
    yield
    if dist_ctx.is_main:
        dist.barrier(group=group)
    dist.destroy_process_group(group)
