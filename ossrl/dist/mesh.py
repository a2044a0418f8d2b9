"""The ``parallel`` config section -> a DeviceMesh with named dims ``(dp_replicate, dp_shard, sp)`` (row-major: the
sp ranks of one dp rank are neighbours, so on one node they share the fastest links)."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ossrl.config import ParallelSettings

DIMS = ("dp_replicate", "dp_shard", "sp")


class MeshError(ValueError):
    """The ``parallel`` section does not fit the world size or the model."""


def mesh_shape(parallel: ParallelSettings, world_size: int) -> dict[str, int]:
    """Each dim's size, -1 resolved to the ranks the others leave; every rank runs this before any collective, so
    a mesh that does not fit fails on every rank with the same message."""
    sizes = {name: getattr(parallel, name) for name in DIMS}
    fixed = 1
    for value in sizes.values():
        fixed *= value if value != -1 else 1
    free = [name for name, value in sizes.items() if value == -1]
    if free:
        if world_size % fixed:
            raise MeshError(f"parallel: {_describe(sizes)} cannot fill {world_size} processes: the fixed dims' product "
                            f"{fixed} does not divide the world size")  # fmt: skip
        sizes[free[0]] = world_size // fixed
    product = sizes["dp_replicate"] * sizes["dp_shard"] * sizes["sp"]
    if product != world_size:
        raise MeshError(f"parallel: {_describe(sizes)} is a mesh of {product} processes but the run has {world_size} "
                        "(torchrun --nproc-per-node x --nnodes); make dp_replicate x dp_shard x sp equal it, or set "
                        "one of them to -1")  # fmt: skip
    return sizes


def _describe(sizes: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sizes.items())


def check_heads(sp: int, model_config: Any) -> None:
    """Ulysses gives each sp rank whole attention heads: sp must divide the q and the kv head counts."""
    if sp <= 1:
        return
    for name in ("num_attention_heads", "num_key_value_heads"):
        heads = getattr(model_config, name)
        if heads % sp:
            raise MeshError(
                f"parallel.sp={sp} does not divide the model's {name}={heads}: Ulysses gives each "
                "sequence-parallel rank whole heads (choose an sp that divides both head counts)"
            )


def build_mesh(parallel: ParallelSettings, device_type: str) -> DeviceMesh:
    sizes = mesh_shape(parallel, dist.get_world_size())
    return init_device_mesh(device_type, tuple(sizes[name] for name in DIMS), mesh_dim_names=DIMS)


def dp_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The mesh FSDP2 shards over: (dp_replicate, dp_shard) for HSDP, else dp_shard alone."""
    return mesh["dp_replicate", "dp_shard"] if mesh["dp_replicate"].size() > 1 else mesh["dp_shard"]


def dp_group(mesh: DeviceMesh) -> Any:
    """One process group over every data-parallel rank with this rank's sp coordinate (the ranks whose data differ):
    the trainer's data-parallel reductions (token counts, metrics, rewards) run over it."""
    sizes = dict(zip(DIMS, mesh.mesh.shape, strict=True))
    sp = sizes["sp"]
    if sp == 1:
        return dist.group.WORLD
    mine = None
    for s in range(sp):  # every rank creates every group, in the same order (new_group's rule)
        ranks = [int(r) for r in mesh.mesh.flatten().tolist() if int(r) % sp == s]
        group = dist.new_group(ranks)
        if dist.get_rank() in ranks:
            mine = group
    return mine
