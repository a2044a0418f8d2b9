"""FSDP2 (``fully_shard``) applied to a GptOss from outside: one unit per decoder block, then the root.

- Full fine-tuning: every parameter is sharded over the dp mesh (HSDP on a 2-D mesh: sharded over dp_shard,
  replicated over dp_replicate). ``lm_head`` is a unit of its own because the trainer calls it apart from the
  backbone (chunked log-probs); ``hidden_states`` is registered as a forward method so the root unshards for it.
- LoRA: only the adapters are sharded. The frozen base weights are ``ignored_params``: replicated whole on every
  rank, never all-gathered, and shared by reference with the rollout engine's model (see ``ossrl.dist.sync``).
  MXFP4 experts are buffers, which FSDP never shards.
- Mixed precision: parameters compute in the dtype they are stored in (bf16 weights, fp32 norms, sinks and
  adapters: exactly the one-process numerics); gradients are reduced in fp32. FSDP2 needs one dtype per unit, so a
  block that mixes dtypes (a bf16 full fine-tune) is split into single-dtype units below it.
- FSDP2 AVERAGES gradients over the dp ranks; the trainer divides every rank's loss by the global token count, so
  the one-process gradient is the SUM: ``sum_gradients`` multiplies the averaged gradients back by the dp size
  (rather than a divide factor of 1, which needs NCCL's PreMulSum: gloo has none).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method


def apply_fsdp(
    model: nn.Module, mesh: DeviceMesh, *, lora: bool, mp_policy: MixedPrecisionPolicy | None = None
) -> nn.Module:
    """Shard ``model`` (a GptOss) in place over ``mesh`` (1-D: FSDP, 2-D (replicate, shard): HSDP); returns it."""
    mp_policy = mp_policy or MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)
    ignored = {p for p in model.parameters() if not p.requires_grad} if lora else set()
    if not lora:
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
        if frozen:
            raise ValueError(f"apply_fsdp(lora=False): {len(frozen)} frozen parameters (e.g. {frozen[0]}); full "
                             "fine-tuning shards every parameter and trains them all")  # fmt: skip
    kwargs = {"mesh": mesh, "mp_policy": mp_policy, "ignored_params": ignored}

    def managed(module: nn.Module, recurse: bool = True) -> list[nn.Parameter]:
        return [p for p in module.parameters(recurse=recurse) if p not in ignored and not _is_sharded(p)]

    def shard(module: nn.Module, reshard: bool = True) -> None:
        """One unit per single-dtype subtree: a mixed block splits into children, then the rest."""
        params = managed(module)
        if not params:
            return
        if len({p.dtype for p in params}) > 1:
            for child in module.children():
                shard(child, reshard)
            if not managed(module):
                return
        fully_shard(module, reshard_after_forward=reshard, **kwargs)

    for layer in model.model.layers:
        shard(layer)
    shard(model.lm_head, reshard=False)  # used right after the backbone, and first in the backward
    rest = managed(model)
    if rest and len({p.dtype for p in rest}) > 1:  # embeddings and the final norm in different dtypes
        shard(model.model.embed_tokens, reshard=False)
        shard(model.model.norm, reshard=False)
    fully_shard(model, reshard_after_forward=False, **kwargs)  # the root: what is left, and the lazy init
    register_fsdp_forward_method(model, "hidden_states")
    return model


@torch.no_grad()
def sum_gradients(params: list[torch.Tensor], dp_size: int) -> None:
    """FSDP2's averaged gradients -> their sum over the ``dp_size`` data-parallel ranks."""
    grads = [p.grad for p in params if p.grad is not None]
    if grads and dp_size > 1:
        torch._foreach_mul_(grads, float(dp_size))


def _is_sharded(p: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(p, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (a plain tensor is its own)."""
    return t.to_local() if _is_sharded(t) else t
