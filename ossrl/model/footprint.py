"""What a model's weights take on a device, and whether they fit there: checked before any weight is read, so a
model too big for the machine fails in a second with a clear line instead of minutes into the load."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

MXFP4_BITS = 4.25  # 4-bit values + one 8-bit scale per 32


class DoesNotFit(ValueError):
    """The weights need more memory than the device has free."""


def weight_bytes(model: nn.Module, dtype: torch.dtype, *, mxfp4_experts: bool) -> int:
    """Bytes of ``model``'s parameters (a meta-device model is fine) loaded in ``dtype``, expert matrices packed
    when ``mxfp4_experts``; norms and sinks count in fp32, as they are kept."""
    total = 0.0
    for name, p in model.named_parameters():
        if mxfp4_experts and name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            total += p.numel() * MXFP4_BITS / 8
        elif p.dim() <= 1 and ("norm" in name or name.endswith("sinks")):
            total += p.numel() * 4
        else:
            total += p.numel() * torch.finfo(dtype).bits / 8
    return int(total)


def free_bytes(device: torch.device) -> int | None:
    """Memory free for new tensors on ``device``: CUDA's free memory, or the host's MemAvailable (None: unknown)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "cpu":
        meminfo = Path("/proc/meminfo")
        if meminfo.exists():
            for line in meminfo.read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    return None


def check_fits(model: nn.Module, dtype: torch.dtype, device: torch.device, *, mxfp4_experts: bool, what: str) -> int:
    """Raise ``DoesNotFit`` (one line: what, how much, what to change) when the weights cannot fit; else their
    bytes."""
    need = weight_bytes(model, dtype, mxfp4_experts=mxfp4_experts)
    free = free_bytes(device)
    if free is not None and need > free:
        hint = (
            "a GPU with more memory, or MXFP4 experts (the release's format)"
            if not mxfp4_experts
            else ("a device with more free memory")
        )
        raise DoesNotFit(f"{what}: its weights need {need / 2**30:.1f} GiB in {str(dtype).removeprefix('torch.')} on "
                         f"{device}, which has {free / 2**30:.1f} GiB free; use {hint}")  # fmt: skip
    return need
