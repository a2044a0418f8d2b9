"""The rollout engine's own model in a multi-process run, and the trainer -> engine weight sync.

The engine never runs the FSDP-wrapped model: ranks decode different numbers of steps, and FSDP's per-block
all-gathers would wait for each other forever. So each rank's engine gets a plain model, made before sharding:

- LoRA: a deep copy whose frozen base tensors (parameters and buffers, MXFP4 experts included) ARE the trainer's
  (the copy's memo is seeded with them): no second copy of the base; only the adapters are the engine's own. After
  each update the sync copies every adapter's full tensor (``DTensor.full_tensor()``, a few MB) into the engine.
- Full fine-tuning: the engine holds one full copy; the trainer holds 1/N shards. The copy is made with its
  parameters on the meta device (no memory), materialized only after FSDP has sharded (and freed) the trainer's full
  weights, and filled by the first sync; the sync gathers one decoder block at a time and copies it in. So a rank
  never holds two full copies: at most the engine's copy, the trainer's shards and one block's gather.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch
from torch import nn

from ossrl.model.lora import lora_adapters


def engine_model(model: nn.Module, *, lora: bool) -> nn.Module:
    """A plain copy of ``model`` (call it before ``apply_fsdp``) for the engine, sharing every tensor the trainer
    does not train (frozen base weights, buffers). Trained parameters: LoRA adapters are copied (small); full
    fine-tuning's are left on the meta device, for ``materialize`` once the trainer's model is sharded."""
    memo: dict[int, object] = {}
    adapters = {id(p) for a in lora_adapters(model) for p in a.parameters()}
    for tensor in [*model.parameters(), *model.buffers()]:
        if isinstance(tensor, nn.Parameter) and tensor.requires_grad and not lora:
            memo[id(tensor)] = nn.Parameter(torch.empty_like(tensor, device="meta"), requires_grad=False)
        elif id(tensor) not in adapters:
            memo[id(tensor)] = tensor
    copied = copy.deepcopy(model, memo)
    for p in copied.parameters():
        if id(p) in adapters or p.is_meta:  # the engine's own tensors are never trained through it
            p.requires_grad_(False)
    return copied.eval()


def materialize(model: nn.Module, device: torch.device) -> nn.Module:
    """Allocate (uninitialised) every parameter ``engine_model`` left on the meta device; the first
    ``sync_weights`` fills them."""
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p.is_meta:
                module._parameters[name] = nn.Parameter(torch.empty_like(p, device=device), requires_grad=False)
    return model


def _full(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _blocks(model: nn.Module, names: list[str]) -> Iterator[list[str]]:
    """Parameter names grouped by decoder block (``model.layers.I.``), the rest last, in order."""
    groups: dict[str, list[str]] = {}
    for name in names:
        parts = name.split(".")
        key = ".".join(parts[:3]) if name.startswith("model.layers.") else "rest"
        groups.setdefault(key, []).append(name)
    yield from groups.values()


@torch.no_grad()
def sync_weights(trainer_model: nn.Module, engine, *, lora: bool) -> int:
    """Copy the trained weights into ``engine``'s model through ``engine.update_weights``; every rank calls it
    (the gathers are collectives). Returns the number of tensors copied."""
    params = {n: p for n, p in trainer_model.named_parameters() if p.requires_grad}
    copied = 0
    if lora:  # the adapters: small, one call
        return engine.update_weights([(n, _full(p)) for n, p in params.items()])
    for names in _blocks(trainer_model, list(params)):  # full weights: one block's gather at a time
        copied += engine.update_weights([(n, _full(params[n])) for n in names])
    return copied
